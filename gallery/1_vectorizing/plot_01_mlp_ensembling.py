"""
Ensembling MLPs with ``torch.vmap``
===================================

Run ten small networks as one batched computation, prove that it gives the
same predictions as a Python loop, and measure on your own device when that
is worth doing.

**What you will learn**

* how :func:`torch.func.stack_module_state` turns a list of same-architecture
  modules into one dictionary of batched tensors;
* how :func:`torch.func.functional_call` and :func:`torch.vmap` evaluate every
  member at once, with a different minibatch per member or one shared minibatch;
* how to check the vectorized result against the loop with tolerances you can
  justify;
* when vectorizing pays off, measured live rather than claimed.

**Prerequisites**: PyTorch 2.6 or newer (``torch.func`` and
``torch.accelerator``). A GPU is optional: the page runs unchanged on CPU,
CUDA or MPS and picks the accelerator when there is one.
"""

# %%
# Set-up
# ------
# Every random number on this page comes from one visible seed, drawn on the
# CPU and then moved to the device, so the data and the initial weights are
# the same on every machine. Lines that start with ``on this machine:`` depend
# on your hardware; everything else printed here is the same everywhere.
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
# Why ensembles, and why vectorize them
# -------------------------------------
# An *ensemble* combines the predictions of several independently initialized
# (or independently trained) models. Averaging them usually beats any single
# member, and their disagreement is a useful measure of uncertainty.
#
# The straightforward implementation is a Python loop over the members. When
# all members share one architecture, the loop performs the same sequence of
# operations with different weights, so it can be rewritten as one sequence of
# *batched* operations over a new leading "member" dimension. That is what
# :func:`torch.vmap` does for us: one kernel launch per layer instead of one
# per layer per member.
#
# The model
# ---------
# A three-layer perceptron for 28x28 single-channel images: flatten, then
# ``Linear(784, 128)``, ReLU, ``Linear(128, 128)``, ReLU, ``Linear(128, 10)``.
# The sizes are arguments so that the benchmark at the end can also build
# tiny versions of it.


class MLP(nn.Module):
    def __init__(self, in_features: int = 784, hidden: int = 128, classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(start_dim=1)  # [batch, 1, 28, 28] -> [batch, 784]
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)  # logits, [batch, 10]


num_models = 10
models = [MLP().to(device) for _ in range(num_models)]

# %%
# The data are MNIST-shaped random images: 100 minibatches of 64 images of
# 1x28x28. We only need predictions, so there are no targets. Option (1) gives
# each model its own minibatch (the first ``num_models`` of them); option (2)
# feeds one minibatch to every model.
data = torch.randn(100, 64, 1, 28, 28).to(device)
minibatches = data[:num_models]  # option (1): minibatch i goes to model i
minibatch = data[0]  # option (2): every model sees the same minibatch
print("data       ", list(data.shape))
print("minibatches", list(minibatches.shape))
print("minibatch  ", list(minibatch.shape))

# %%
# The baseline: a Python loop
# ---------------------------
# This is the reference every vectorized result on this page is compared
# with: call each model in turn and stack the outputs along a new first
# dimension.
with torch.no_grad():
    loop_per_model = torch.stack([m(xb) for m, xb in zip(models, minibatches)])
    loop_shared = torch.stack([m(minibatch) for m in models])
print("option (1)", list(loop_per_model.shape))  # [models, batch, classes]
print("option (2)", list(loop_shared.shape))

# %%
# Stacking the members' weights
# -----------------------------
# :func:`torch.func.stack_module_state` takes the list of modules and returns
# two dictionaries, parameters and buffers, keyed by the names that
# ``named_parameters()`` / ``named_buffers()`` use. Each value holds the
# corresponding tensor of every member, stacked along a new leading dimension
# of size ``num_models``. ``nn.Linear`` stores its weight as
# ``[out_features, in_features]``, so one model's ``fc1.weight`` is
# ``[128, 784]`` and the stacked one is ``[10, 128, 784]``:
params, buffers = stack_module_state(models)
for name, stacked in params.items():
    single = models[0].get_parameter(name)
    print(f"{name:10s} one model {str(list(single.shape)):11s} stacked {list(stacked.shape)}")
print("buffers:", buffers)  # this MLP has none (no BatchNorm, for example)
assert models[0].fc1.weight.shape == (128, 784)
assert params["fc1.weight"].shape == (num_models, 128, 784)

# %%
# The stacked tensors are *copies*: new leaf tensors with the same values as
# the members' parameters but their own memory, and no link back to the
# modules. Training them later will not change ``models[i]``, a point the
# training tutorial comes back to.
w = params["fc1.weight"]
same = torch.equal(w[3], models[3].fc1.weight)
shared = w.data_ptr() == models[0].fc1.weight.data_ptr()
print(f"slice 3 of the stacked fc1.weight {'equals' if same else 'differs from'} model 3's")
print(f"the stacked tensor {'shares' if shared else 'does not share'} model 0's memory")
print(
    f"it is {'a leaf' if w.is_leaf else 'not a leaf'} that "
    f"{'requires' if w.requires_grad else 'does not require'} gradients"
)
assert same and not shared and w.is_leaf and w.requires_grad

# %%
# A stateless copy of the architecture
# ------------------------------------
# :func:`torch.func.functional_call` runs a module's ``forward`` with tensors we
# pass in place of its own parameters. The module only supplies the
# *architecture*, so we move a copy of it to the ``meta`` device: its weights
# become shape-only placeholders that allocate no memory.
base = copy.deepcopy(models[0]).to("meta")
print("placeholder:", base.fc1.weight.device, list(base.fc1.weight.shape))


def fmodel(params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
    """One member's forward pass, with its weights passed in."""
    return functional_call(base, (params, buffers), (x,))


# %%
# Vectorizing with ``torch.vmap``
# -------------------------------
# :func:`torch.vmap` maps ``fmodel`` over a dimension of its inputs. By default
# it maps over dimension 0 of *every* argument: slice ``i`` of each stacked
# parameter together with minibatch ``i``. That is option (1).
#
# Both computations do the same sums in a different order (one batched matrix
# product per layer versus ten separate ones), so we cannot expect identical
# bits, only agreement to a few float32 rounding errors accumulated over the
# 784-term dot products. :func:`ensembling.tolerances` encodes that: ``1e-5``
# for float32 on CPU or CUDA, looser where the arithmetic is coarser (TF32,
# half precision, or a backend whose accumulation we cannot inspect).
tol = ensembling.tolerances(torch.float32, device)
print_measured(f"comparing with rtol={tol['rtol']:g}, atol={tol['atol']:g}")

with torch.no_grad():
    vmap_per_model = torch.vmap(fmodel)(params, buffers, minibatches)
print("option (1)", list(vmap_per_model.shape))
torch.testing.assert_close(vmap_per_model, loop_per_model, **tol)
print_measured(f"max |vmap - loop| = {(vmap_per_model - loop_per_model).abs().max():.1e}")

# %%
# For option (2) the minibatch must *not* be sliced: ``in_dims=(0, 0, None)``
# maps over the parameters and buffers but passes ``x`` whole to every member.
with torch.no_grad():
    vmap_shared = torch.vmap(fmodel, in_dims=(0, 0, None))(params, buffers, minibatch)
print("option (2)", list(vmap_shared.shape))
torch.testing.assert_close(vmap_shared, loop_shared, **tol)

# %%
# What ``vmap`` cannot transform
# ------------------------------
# ``vmap`` traces the function once with *batched* tensors standing in for the
# per-member slices, so the function must treat those tensors as black boxes:
#
# * **no Python side effects that depend on the batch**: appending a tensor to
#   a global list, or mutating a Python counter, happens once, not once per
#   member;
# * **no** ``.item()`` **or other conversions to Python values**: a batched
#   tensor has no single value to return;
# * **no data-dependent Python control flow**: ``if x.sum() > 0:`` needs one
#   boolean, but every member has its own. Use :func:`torch.where` instead.
#
# The last one fails loudly, which is the good case:


def clipped(x: torch.Tensor) -> torch.Tensor:
    if x.sum() > 0:  # one bool for a whole batch of members: not possible
        return x
    return torch.zeros_like(x)


try:
    torch.vmap(clipped)(torch.randn(3, 4))
except RuntimeError as err:
    print("vmap refused:", type(err).__name__)
ok = torch.vmap(lambda x: torch.where(x.sum() > 0, x, torch.zeros_like(x)))(torch.randn(3, 4))
print("with torch.where:", list(ok.shape))

# %%
# Is it faster? Measure it
# ------------------------
# We time the loop and ``vmap`` for three ensembles, each member seeing its
# own minibatch: the tutorial's ten 784-128-128-10 MLPs, a hundred small
# 32-32-32-10 MLPs and five hundred tiny 16-16-16-10 MLPs, the last two on
# minibatches of 8. :func:`ensembling.tutorial.compare` times the two in
# alternation, ten rounds each, so a burst of work from another program slows
# both alike; it synchronizes the accelerator, so the numbers include the
# kernels, not just their launch. Each line gives the median over the rounds.


def loop_and_vmap(num: int, batch: int, in_features: int, hidden: int) -> dict:
    members = [MLP(in_features, hidden).to(device) for _ in range(num)]
    xs = torch.randn(num, batch, in_features).to(device)
    p, b = stack_module_state(members)
    stateless = copy.deepcopy(members[0]).to("meta")
    batched = torch.vmap(lambda p, b, x: functional_call(stateless, (p, b), (x,)))

    @torch.no_grad()
    def loop():
        return torch.stack([m(x) for m, x in zip(members, xs)])

    @torch.no_grad()
    def vmapped():
        return batched(p, b, xs)

    torch.testing.assert_close(vmapped(), loop(), **tol)  # same answer first
    return compare({"loop": loop, "vmap": vmapped}, device=device)


configs = {
    "10 x 784-128\nbatch 64": (10, 64, 784, 128),
    "100 x 32-32\nbatch 8": (100, 8, 32, 32),
    "500 x 16-16\nbatch 8": (500, 8, 16, 16),
}
results = {label: loop_and_vmap(*shape) for label, shape in configs.items()}
for label, times in results.items():
    print_measured(f"{label.replace(chr(10), ', ')}: loop {times['loop']}, vmap {times['vmap']}")

# %%
# The figure puts the medians side by side on a log scale, with a thin line
# from the fastest to the slowest tenth of the rounds, and writes the speedup
# (loop time / vmap time) above each ``vmap`` bar.
ax = plot_timings(results, baseline="loop", title=f"loop vs vmap on {device.type}")
plt.show()

# %%
# What the numbers say
# --------------------
# The sentences below are computed from the measurements above, so they are
# true for the device that ran this page. :func:`ensembling.tutorial.verdict`
# takes the speedup round by round and calls one side faster only when even
# the slowest tenth of the rounds agrees (by at least 5%); otherwise it says
# the two are too close to call, and gives the range.
for label, t in results.items():
    print_measured(
        f"{label.replace(chr(10), ', ')}: {verdict(t['vmap'], t['loop'], y_name='the loop')}"
    )
ratios = {label: speedup(t["vmap"], t["loop"]).value for label, t in results.items()}
best = max(ratios, key=ratios.get)
print_measured(
    f"the highest loop time / vmap time is for {best.replace(chr(10), ', ')}: "
    f"{ratios[best]:.2f} (the lowest: {min(ratios.values()):.2f})"
)

# %%
# What decides the outcome. Vectorizing removes per-member *overhead* (Python,
# operator dispatch, kernel launches), not arithmetic. Each member of the
# tutorial-size ensemble does about 64 x (784 x 128 + 128 x 128 + 128 x 10),
# roughly 7.5 million multiply-adds per call; where that arithmetic takes much
# longer than the loop's overhead (a CPU with a few cores, for instance), the
# device is *compute-bound* and batching can only change the result a little,
# in either direction. The tiny members do a few thousand multiply-adds each,
# so a loop over them spends most of its time dispatching operators, one
# member at a time, while ``vmap`` dispatches each layer once for the whole
# ensemble: the more members share that one dispatch, the more overhead it
# saves. On a GPU every layer of every member in the loop is a separate kernel
# launch of a few microseconds, which is why the batched version tends to win
# there even at the tutorial size. The lines above say which case your device
# is in.
#
# Summary
# -------
# * :func:`~torch.func.stack_module_state` returns dictionaries of new leaf
#   tensors with a leading member dimension (``fc1.weight``: ``[10, 128, 784]``).
# * A ``meta``-device copy of one member plus
#   :func:`~torch.func.functional_call` gives a function of the weights;
#   :func:`torch.vmap` maps it over the members.
# * ``in_dims`` decides the data: the default slices the input per member,
#   ``(0, 0, None)`` shares it.
# * The result equals the loop up to float32 rounding, asserted above.
# * The speedup depends on the model size and the device: measure it, timing
#   the candidates in alternation and judging them by their spread, as above.
#
# Next steps
# ----------
# :ref:`sphx_glr_tutorials_1_vectorizing_plot_02_cnn_ensembling.py` applies the
# recipe to convolutional networks, and
# :ref:`sphx_glr_tutorials_2_in_practice_plot_04_training_an_ensemble.py` trains
# an ensemble with :class:`ensembling.Ensemble`. The :ref:`API reference <api>`
# documents the helpers used on this page.
