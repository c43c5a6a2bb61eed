"""
Dropout, BatchNorm and other things ``vmap`` is strict about
============================================================

See the real errors that dropout, BatchNorm and a few common coding habits
raise under ``torch.vmap``, and the fix for each.

**What you will learn**

* why a vmapped model with dropout raises by default, and what
  ``randomness="different"``, ``"same"`` and ``"error"`` do;
* why BatchNorm in training mode fails when its running statistics are not
  stacked, that stacked statistics (as ``stack_module_state`` and
  :class:`ensembling.Ensemble` produce) work and stay per member, and when
  ``torch.func.replace_all_batch_norm_modules_`` is the better choice;
* the fixes for ``.item()``, data-dependent ``if`` statements and in-place
  writes into tensors that are not batched.

**Prerequisites**: :ref:`sphx_glr_tutorials_1_vectorizing_plot_01_mlp_ensembling.py`;
PyTorch 2.6 or newer. A GPU is optional.
"""

# %%
# Set-up
# ------
# A helper turns a list of modules into the usual stacked state and a
# function of it, so that each section can focus on one behaviour. Every error
# below is raised for real and caught; we print its type and the first line
# of its message.
import copy

import matplotlib.pyplot as plt
import torch
from torch import nn
from torch.func import functional_call, replace_all_batch_norm_modules_, stack_module_state

import ensembling
from ensembling import Ensemble
from ensembling.tutorial import print_measured

torch.manual_seed(0)
device = ensembling.default_device()
print_measured(f"running on {device}")


def functional(models: list[nn.Module]):
    """Stacked parameters and buffers of ``models``, and one member's forward as a function."""
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    return params, buffers, lambda p, b, x: functional_call(base, (p, b), (x,))


def show(err: Exception) -> None:
    print(f"{type(err).__name__}: {str(err).splitlines()[0]}")


# %%
# Dropout and ``randomness``
# --------------------------
# Four members with *identical* weights, so that any difference between their
# outputs comes from dropout alone. With 64 units per row, two independent
# masks coincide with probability ``2**-64``: the comparisons below do not
# depend on the random generator of the device. ``torch.vmap`` refuses random operations
# unless told how the members should draw: its default is
# ``randomness="error"``.
member = nn.Sequential(nn.Linear(8, 64), nn.Dropout(p=0.5)).to(device)
params, buffers, f = functional([copy.deepcopy(member) for _ in range(4)])
x = torch.ones(3, 8, device=device)  # one shared minibatch of 3 rows
try:
    torch.vmap(f, in_dims=(0, 0, None))(params, buffers, x)
except RuntimeError as err:
    show(err)

# %%
# ``"different"`` gives every member its own masks (what an ensemble wants:
# the members are meant to be independent); ``"same"`` draws one mask for all
# members (useful when the members are, say, copies being compared under
# identical noise). In both cases the rows of a minibatch still get different
# masks.
different = torch.vmap(f, in_dims=(0, 0, None), randomness="different")(params, buffers, x)
same = torch.vmap(f, in_dims=(0, 0, None), randomness="same")(params, buffers, x)
dropped = lambda out: out == 0  # noqa: E731  (which units were dropped)


def shares(a: torch.Tensor, b: torch.Tensor) -> str:
    return "share" if torch.equal(dropped(a), dropped(b)) else "do not share"


print(f"'different': members {shares(different[0], different[1])} masks")
same_all = all(torch.equal(dropped(same[0]), dropped(same[i])) for i in range(4))
print(f"'same':      members {'share' if same_all else 'do not share'} masks")
print(f"'same':      rows of a minibatch {shares(same[0, 0], same[0, 1])} masks")

# %%
# The masks themselves, for the first row of the minibatch: one line per member,
# a dark cell where a unit was dropped.
fig, axes = plt.subplots(1, 2, figsize=(8, 1.9), layout="constrained", sharey=True)
# sphinx_gallery_thumbnail_path = "_static/thumbs/plot_06_dropout_masks.png"
for ax, (mode, out) in zip(axes, [("different", different), ("same", same)]):
    ax.imshow(
        dropped(out[:, 0]).float().cpu().numpy(),
        cmap="Greys",
        aspect="auto",
        interpolation="nearest",
    )
    ax.set_title(f'randomness="{mode}"', fontsize=9)
    ax.set_xlabel("unit")
axes[0].set_ylabel("member")
plt.show()

# %%
# ``Ensemble`` defaults to ``randomness="different"``, and a call can override
# it. In eval mode dropout draws nothing, so even ``"error"`` is fine.
ens = Ensemble.from_modules([copy.deepcopy(member) for _ in range(4)])
out = ens(x)
print(f"Ensemble, train mode: members 0 and 1 {shares(out[0], out[1])} masks")
print("Ensemble, eval mode with 'error':", list(ens.eval()(x, randomness="error").shape))

# %%
# BatchNorm: the running statistics
# ---------------------------------
# In training mode BatchNorm normalizes with the minibatch statistics *and*
# updates its ``running_mean`` and ``running_var`` buffers in place. Under
# ``vmap`` each member computes its own statistics, so the update writes a
# batched value. If the buffers were passed *unbatched* (one copy for all
# members, ``in_dims=None``), that in-place write has nowhere to go:
bn_members = [nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6)).to(device) for _ in range(3)]
params, buffers, f = functional(bn_members)
xs = torch.randn(3, 16, 4, device=device)  # a minibatch of 16 per member
one_copy = {name: b[0].clone() for name, b in buffers.items()}
try:
    torch.vmap(f, in_dims=(0, None, 0))(params, one_copy, xs)
except RuntimeError as err:
    show(err)

# %%
# With stacked buffers, as ``stack_module_state`` returns them, every member
# updates its own slice. We check that against a loop over separate copies of
# the same modules, for three training steps' worth of minibatches.
reference = copy.deepcopy(bn_members)
for step in range(3):
    batch = torch.randn(3, 16, 4, device=device)
    torch.vmap(f)(params, buffers, batch)  # updates buffers[...] in place
    for i, module in enumerate(reference):
        module(batch[i])
tol = ensembling.tolerances(torch.float32, device)
for name in ("1.running_mean", "1.running_var"):
    for i, module in enumerate(reference):
        torch.testing.assert_close(buffers[name][i], module.get_buffer(name), **tol)
print("per-member running statistics match the loop (asserted above)")
print("updates counted per member:", buffers["1.num_batches_tracked"].tolist())

# %%
# In eval mode BatchNorm reads the running statistics instead of computing
# batch ones, and writes nothing, so the stacked statistics are simply used.
# ``Ensemble`` stores them as registered buffers, so ``ens.eval()`` is all it
# takes:
bn_ens = Ensemble.from_modules(reference).eval()
for module in reference:
    module.eval()
test = torch.randn(5, 4, device=device)
with torch.no_grad():
    torch.testing.assert_close(bn_ens(test), torch.stack([m(test) for m in reference]), **tol)
print("eval mode: Ensemble matches the loop (asserted above)")

# %%
# The alternative: ``replace_all_batch_norm_modules_``
# ----------------------------------------------------
# :func:`torch.func.replace_all_batch_norm_modules_` patches a model in place
# so that its BatchNorm layers stop tracking running statistics: they always
# normalize with the current minibatch, in training *and* eval mode, and have
# no buffers left to update.
patched = [replace_all_batch_norm_modules_(copy.deepcopy(m)) for m in bn_members]
params, buffers, f = functional(patched)
print("buffers after patching:", list(buffers))
out = torch.vmap(f, in_dims=(0, 0, None))(params, buffers, torch.randn(16, 4, device=device))
print("vmap works, output", list(out.shape))

# %%
# Which to use: keep stacked running statistics (``stack_module_state``,
# ``Ensemble``) when the ensemble will be *deployed* and must predict single
# examples in eval mode, which needs statistics from training. Patch the
# BatchNorm layers when a model never needs running statistics, for example
# when it is only ever applied to whole batches (meta-learning inner loops,
# per-sample-gradient computations), or when the stacked buffers' extra memory
# is a concern.
#
# Other habits ``vmap`` rejects, and their fixes
# ----------------------------------------------
# **Converting to a Python number.** ``.item()`` (and ``float()``, ``int()``,
# ``bool()``) needs one value, but under ``vmap`` a tensor holds one per
# member. Keep the value a tensor:
x = torch.randn(4, 5, device=device)
try:
    torch.vmap(lambda row: row.sum() / row.abs().max().item())(x)
except RuntimeError as err:
    show(err)
fixed = torch.vmap(lambda row: row.sum() / row.abs().max())(x)
print("fix: stay a tensor ->", list(fixed.shape))

# %%
# **Data-dependent Python control flow.** ``if tensor > 0:`` asks for one
# boolean. Compute both branches and choose element-wise with
# :func:`torch.where`:
try:
    torch.vmap(lambda row: row if row.mean() > 0 else -row)(x)
except RuntimeError as err:
    show(err)
fixed = torch.vmap(lambda row: torch.where(row.mean() > 0, row, -row))(x)
print("fix: torch.where ->", list(fixed.shape))

# %%
# **In-place writes into a tensor that is not batched.** A buffer created
# inside the function with ``torch.zeros(5)`` is the same for every member; writing a
# per-member value into it in place is impossible. Create it with
# ``torch.zeros_like`` of a batched input (or write out of place):


def running_total(row: torch.Tensor, make_buffer) -> torch.Tensor:
    total = make_buffer(row)
    total += row  # in place
    return total


try:
    torch.vmap(lambda row: running_total(row, lambda r: torch.zeros(5, device=r.device)))(x)
except RuntimeError as err:
    show(err)
fixed = torch.vmap(lambda row: running_total(row, torch.zeros_like))(x)
print("fix: zeros_like ->", list(fixed.shape))

# %%
# Summary
# -------
# * ``vmap`` raises on random operations unless you choose ``randomness``:
#   ``"different"`` (own dropout masks per member, ``Ensemble``'s default) or
#   ``"same"``.
# * BatchNorm in training mode needs *stacked* running statistics; then every
#   member updates its own, exactly as separate modules would. Eval mode uses
#   them. ``replace_all_batch_norm_modules_`` removes them instead.
# * ``.item()``, ``if tensor:`` and in-place writes into unbatched tensors
#   fail under ``vmap``; stay in tensors, use ``torch.where``, and create
#   buffers from batched inputs.
#
# Next steps
# ----------
# :ref:`sphx_glr_tutorials_2_in_practice_plot_07_performance_map.py` measures
# where vectorizing pays off.
