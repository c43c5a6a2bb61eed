"""
Ensembling CNNs with ``torch.vmap``
===================================

Apply the recipe from the MLP tutorial to convolutional networks, see what
``vmap`` turns a batched convolution into, and learn why a fair comparison
of convolutions on a GPU has to think about TF32.

**What you will learn**

* that ``stack_module_state`` + ``functional_call`` + ``vmap`` works for a CNN
  without changing a line of the model;
* how ``vmap`` folds the member dimension of a convolution into *groups* (per
  member inputs) or *output channels* (a shared input), shown by doing it by hand;
* how to pick tolerances for convolutions on CPU and on CUDA GPUs, where cuDNN
  uses TF32 for float32 convolutions by default;
* when vectorizing CNNs pays off on your device, measured.

**Prerequisites**: :ref:`sphx_glr_tutorials_1_vectorizing_plot_01_mlp_ensembling.py`;
PyTorch 2.6 or newer; a GPU is optional.
"""

# %%
# Set-up
# ------
# As before: one visible seed, data and weights drawn on the CPU and moved to
# the device, and machine-dependent lines marked ``on this machine:``.
import copy

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state

import ensembling
from ensembling.tutorial import compare, plot_timings, print_measured, speedup, verdict

torch.manual_seed(0)
device = ensembling.default_device()
print_measured(f"running on {device}")

# %%
# The model
# ---------
# Two 3x3 convolutions (stride 1, no padding) take a 28x28 image to 26x26 and
# then 24x24; max-pooling halves that to 12x12, so flattening 64 channels
# gives 64 x 12 x 12 = 9216 features for the first linear layer. The forward
# pass returns logits. The channel counts and image size are arguments, so
# the benchmark can also build small CNNs.


class CNN(nn.Module):
    def __init__(self, c1: int = 32, c2: int = 64, hidden: int = 128, image: int = 28):
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, kernel_size=3, stride=1)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=3, stride=1)
        self.fc1 = nn.Linear(c2 * ((image - 4) // 2) ** 2, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))  # [batch, 32, 26, 26]
        x = F.relu(self.conv2(x))  # [batch, 64, 24, 24]
        x = F.max_pool2d(x, 2)  # [batch, 64, 12, 12]
        x = F.relu(self.fc1(x.flatten(start_dim=1)))  # [batch, 9216] -> [batch, 128]
        return self.fc2(x)  # logits, [batch, 10]


num_models = 10
models = [CNN().to(device) for _ in range(num_models)]
data = torch.randn(100, 64, 1, 28, 28).to(device)  # 100 MNIST-shaped minibatches
minibatches = data[:num_models]  # option (1): minibatch i for model i
minibatch = data[0]  # option (2): one minibatch for every model

# %%
# Stacked shapes
# --------------
# Nothing about :func:`~torch.func.stack_module_state` is specific to linear
# layers: every parameter gains a leading member dimension. A convolution
# weight is ``[out_channels, in_channels, kH, kW]``, so the stacked ``conv2``
# weight is ``[10, 64, 32, 3, 3]``; ``fc1.weight`` is ``[128, 9216]``, stacked
# ``[10, 128, 9216]``.
params, buffers = stack_module_state(models)
for name, stacked in params.items():
    single = models[0].get_parameter(name)
    print(f"{name:12s} one model {str(list(single.shape)):17s} stacked {list(stacked.shape)}")
assert params["fc1.weight"].shape == (num_models, 128, 9216)
assert params["conv2.weight"].shape == (num_models, 64, 32, 3, 3)

# %%
# Loop and ``vmap``, both options
# -------------------------------
# The functional model is the same three lines as for the MLP. We keep the
# convolutions in exact float32 for this comparison (see the next section for
# why that matters on GPUs) and use the matching tolerance.
base = copy.deepcopy(models[0]).to("meta")


def fmodel(params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
    return functional_call(base, (params, buffers), (x,))


tf32_default = torch.backends.cudnn.allow_tf32
torch.backends.cudnn.allow_tf32 = False  # exact float32 convolutions on CUDA
tol = ensembling.tolerances(torch.float32, device, op="conv")
with torch.no_grad():
    loop_per_model = torch.stack([m(xb) for m, xb in zip(models, minibatches)])
    loop_shared = torch.stack([m(minibatch) for m in models])
    vmap_per_model = torch.vmap(fmodel)(params, buffers, minibatches)
    vmap_shared = torch.vmap(fmodel, in_dims=(0, 0, None))(params, buffers, minibatch)
torch.testing.assert_close(vmap_per_model, loop_per_model, **tol)
torch.testing.assert_close(vmap_shared, loop_shared, **tol)
print("option (1)", list(vmap_per_model.shape), "equals the loop")
print("option (2)", list(vmap_shared.shape), "equals the loop")
print_measured(
    f"rtol=atol={tol['rtol']:g}; "
    f"max |vmap - loop| = {(vmap_per_model - loop_per_model).abs().max():.1e}"
)

# %%
# Tolerances, and TF32 on GPUs
# ----------------------------
# On a CPU both paths compute in IEEE float32, and the only difference is the
# order of the 288-term (32 channels x 3 x 3) sums in each convolution output
# and the 9216-term sums in ``fc1``. That costs a few units in the last place,
# so ``1e-5`` relative and absolute is a tight but safe bound (the measured
# difference is printed above).
#
# On NVIDIA GPUs since Ampere, PyTorch lets cuDNN run float32 convolutions in
# TF32 by default (``torch.backends.cudnn.allow_tf32`` is ``True``), which
# rounds the inputs of each multiplication to a 10-bit mantissa (unit roundoff
# 2^-11, about ``4.9e-4``). The loop and the batched convolution may pick
# different algorithms and round differently, so with TF32 on their results
# can differ by around ``1e-3`` relative, far beyond a ``1e-5`` bound. You can
# either loosen the tolerance to what TF32 guarantees
# (:func:`ensembling.tolerances` returns ``1e-2`` when it is on) or, as above,
# switch TF32 off for the comparison. This cell shows the difference TF32
# makes on your device, then restores the default.
torch.backends.cudnn.allow_tf32 = True
with torch.no_grad():
    tf32_diff = (torch.vmap(fmodel)(params, buffers, minibatches) - loop_per_model).abs().max()
torch.backends.cudnn.allow_tf32 = tf32_default
if device.type == "cuda":
    print_measured(f"with TF32 convolutions, max |vmap - exact loop| = {tf32_diff:.1e}")
else:
    print_measured(f"TF32 does not apply on {device.type}; max difference {tf32_diff:.1e}")

# %%
# What ``vmap`` does with a batched convolution
# ---------------------------------------------
# There is no "batched-weights" convolution kernel. ``vmap``'s rule for
# :func:`torch.nn.functional.conv2d` rewrites the call into an ordinary
# convolution:
#
# * **per-member inputs** (option 1): the members are stacked along the
#   channel dimension of the input and of the weight, and the convolution runs
#   with ``groups=num_models``, so member ``i``'s filters only see member
#   ``i``'s channels;
# * **a shared input** (option 2): the members' filters are concatenated
#   along the output channels: one convolution with ``num_models`` times more
#   filters.
#
# Doing both by hand for the first layer reproduces ``vmap`` exactly:
w, b = params["conv1.weight"], params["conv1.bias"]  # [10, 32, 1, 3, 3], [10, 32]
M, C_out = w.shape[:2]  # members, output channels
with torch.no_grad():
    xs = minibatches.transpose(0, 1).flatten(1, 2)  # [64, 10 * 1, 28, 28]
    grouped = F.conv2d(xs, w.flatten(0, 1), b.flatten(), groups=M)  # [64, 10 * 32, 26, 26]
    grouped = grouped.unflatten(1, (M, C_out)).transpose(0, 1)  # [10, 64, 32, 26, 26]
    stacked = F.conv2d(minibatch, w.flatten(0, 1), b.flatten())  # [64, 10 * 32, 26, 26]
    stacked = stacked.unflatten(1, (M, C_out)).transpose(0, 1)  # [10, 64, 32, 26, 26]
    by_vmap = torch.vmap(F.conv2d)(minibatches, w, b)
    by_vmap_shared = torch.vmap(F.conv2d, in_dims=(None, 0, 0))(minibatch, w, b)
torch.testing.assert_close(grouped, by_vmap, **tol)
torch.testing.assert_close(stacked, by_vmap_shared, **tol)
print("grouped convolution ", list(grouped.shape), "== vmap, per-member inputs")
print("concatenated filters", list(stacked.shape), "== vmap, shared input")

# %%
# Is it faster? Measure it
# ------------------------
# Whether one grouped convolution beats ten ordinary ones depends on the
# convolution library: grouped kernels are less tuned than dense ones on some
# CPUs, while on GPUs fewer, larger launches usually win. So we measure: the
# tutorial's ten CNNs on minibatches of 8 (kept small so this page stays quick
# on a laptop CPU), and a hundred small CNNs (4 and 8 channels, 12x12 images),
# each member with its own minibatch.


def loop_and_vmap(num: int, batch: int, c1: int, c2: int, hidden: int, image: int) -> dict:
    members = [CNN(c1, c2, hidden, image).to(device) for _ in range(num)]
    xs = torch.randn(num, batch, 1, image, image).to(device)
    p, b = stack_module_state(members)
    stateless = copy.deepcopy(members[0]).to("meta")
    batched = torch.vmap(lambda p, b, x: functional_call(stateless, (p, b), (x,)))

    @torch.no_grad()
    def loop():
        return torch.stack([m(x) for m, x in zip(members, xs)])

    @torch.no_grad()
    def vmapped():
        return batched(p, b, xs)

    torch.testing.assert_close(
        vmapped(), loop(), **ensembling.tolerances(torch.float32, device, op="conv")
    )
    return compare({"loop": loop, "vmap": vmapped}, device=device, min_run_time=0.3)


configs = {
    "10 CNNs (32/64 ch)\n28x28, batch 8": (10, 8, 32, 64, 128, 28),
    "100 CNNs (4/8 ch)\n12x12, batch 8": (100, 8, 4, 8, 16, 12),
}
results = {label: loop_and_vmap(*shape) for label, shape in configs.items()}
plot_timings(results, baseline="loop", title=f"CNN ensembles on {device.type}")
plt.show()

# %%
# What the numbers say
# --------------------
# Computed from the measurements above (the two were timed in alternation;
# a verdict is "too close to call" when the spread over the rounds reaches 1):
for label, times in results.items():
    print_measured(f"{label.replace(chr(10), ', ')}: loop {times['loop']}, vmap {times['vmap']}")
    print_measured(f"  {verdict(times['vmap'], times['loop'], y_name='the loop')}")
big, small = (speedup(t["vmap"], t["loop"]) for t in results.values())
if small.low > big.high:
    print_measured(f"small CNNs gain more from vmap: {small.value:.2f}x against {big.value:.2f}x")
elif big.low > small.high:
    print_measured(f"tutorial-size CNNs gain more: {big.value:.2f}x against {small.value:.2f}x")
else:
    print_measured(f"the two speedups overlap: {big.value:.2f}x and {small.value:.2f}x")

# %%
# Why: count the arithmetic in the tutorial CNN's second convolution.
conv2_macs = 64 * 32 * 3 * 3 * 24 * 24  # out ch x in ch x kernel x output pixels
print(f"conv2 multiply-adds per image: {conv2_macs / 1e6:.1f} million")

# %%
# With that much work per image, a CPU running the loop is already busy with
# large dense convolutions; folding ten of them into one grouped convolution
# changes the kernel, and on many CPUs the grouped kernel is the slower of the
# two. The small CNNs do so little arithmetic that the loop's per-layer
# overhead can dominate, and then one call per layer for the whole ensemble
# helps. On a GPU the same folding turns one kernel launch per layer *per
# member* into one launch per layer, which is what a launch-bound loop needs.
# These are the usual reasons; the verdicts above say which held on your device.
#
# Summary
# -------
# * The ``stack_module_state`` + ``functional_call`` + ``vmap`` recipe is
#   model-agnostic: the CNN needed no change.
# * ``vmap`` runs a batched convolution as one grouped convolution (per-member
#   inputs) or one convolution with concatenated filters (shared input).
# * float32 convolutions on CUDA default to TF32: disable it for exact
#   comparisons, or use a TF32-sized tolerance (``1e-2``) instead of ``1e-5``.
# * Vectorizing convolutions is not automatically faster: measure on your
#   device, as this page does.
#
# Next steps
# ----------
# :ref:`sphx_glr_tutorials_1_vectorizing_plot_03_migrating_from_functorch.py` maps old
# ``functorch`` ensembling code onto ``torch.func``; the :ref:`API reference
# <api>` documents the helpers.
