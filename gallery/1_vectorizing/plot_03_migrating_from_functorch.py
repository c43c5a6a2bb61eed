"""
Migrating from ``functorch.combine_state_for_ensemble``
=======================================================

Run old ``functorch`` ensembling code and its ``torch.func`` replacement side
by side on the same models and data, check that they agree, and see the four
differences that break code during the move.

**What you will learn**

* the one-to-one translation from ``combine_state_for_ensemble`` +
  ``functorch.vmap`` to ``stack_module_state`` + ``functional_call`` +
  ``torch.vmap``;
* tuples versus dictionaries, ``requires_grad``, the (absent) link back to the
  original modules, and the deprecation warning: each shown, not just stated;
* how to copy trained stacked weights back into ordinary modules;
* which ``torch.func`` function replaces each ``functorch`` name.

**Prerequisites**: :ref:`sphx_glr_tutorials_1_vectorizing_plot_01_mlp_ensembling.py`;
PyTorch 2.6 or newer. On a PyTorch that no longer ships
``functorch.combine_state_for_ensemble``, the legacy half runs on
:func:`ensembling.legacy.combine_state_for_ensemble`, a re-implementation that
the test suite checks against functorch's results, and the page says so.
"""

# %%
# Set-up
# ------
# Ten small MLPs and ten MNIST-shaped minibatches, seeded as usual. The legacy
# API is imported from ``functorch`` when this PyTorch still has it.
import copy
import importlib
import textwrap
import warnings

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state

import ensembling
from ensembling.tutorial import print_measured

try:
    from functorch import combine_state_for_ensemble
    from functorch import vmap as legacy_vmap

    legacy_source = "functorch"
except ImportError:  # functorch (or this function) was removed from PyTorch
    from ensembling.legacy import combine_state_for_ensemble

    legacy_vmap = torch.vmap
    legacy_source = "ensembling.legacy (this PyTorch no longer has functorch's version)"

torch.manual_seed(0)
device = ensembling.default_device()
print_measured(f"running on {device}, torch {torch.__version__}, legacy API from {legacy_source}")


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x.flatten(start_dim=1))))


num_models = 10
models = [MLP().to(device) for _ in range(num_models)]
minibatches = torch.randn(num_models, 64, 1, 28, 28).to(device)
targets = torch.randint(0, 10, (num_models, 64)).to(device)  # for the training step below

# %%
# Before: the legacy API
# ----------------------
# ``combine_state_for_ensemble`` returned a functional model and two tuples.
# It is deprecated, and says so with a :class:`FutureWarning`. We record the
# warning instead of letting it print, so that its text (which includes a
# file path on your machine) is shown under our control.
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    fmodel_legacy, params_legacy, buffers_legacy = combine_state_for_ensemble(models)
deprecation = next(w for w in caught if issubclass(w.category, FutureWarning))
print("warning category:", deprecation.category.__name__)
print("names the replacement:", "torch.func.stack_module_state" in str(deprecation.message))
for line in textwrap.wrap(str(deprecation.message), 90):
    print_measured(line)

# %%
# Every legacy function (``functorch.vmap``, ``functorch.grad``, ...) repeats
# such a warning on every call. Having read it once, we silence exactly these
# warnings for the rest of the page:
warnings.filterwarnings("ignore", message="(?s).*functorch", category=FutureWarning)

# %%
# The legacy call pattern, both ways: a minibatch per member, and one shared
# minibatch (``in_dims=(0, 0, None)``).
with torch.no_grad():
    legacy_per_model = legacy_vmap(fmodel_legacy)(params_legacy, buffers_legacy, minibatches)
    legacy_shared = legacy_vmap(fmodel_legacy, in_dims=(0, 0, None))(
        params_legacy, buffers_legacy, minibatches[0]
    )
print("legacy, option (1):", list(legacy_per_model.shape))
print("legacy, option (2):", list(legacy_shared.shape))

# %%
# After: ``torch.func``
# ---------------------
# The replacement splits the legacy function in two: stacking the state is
# :func:`torch.func.stack_module_state`, and the functional model is any copy
# of the architecture (here on the ``meta`` device, so it holds no weights)
# run through :func:`torch.func.functional_call`. ``torch.vmap`` is the same
# transform that ``functorch.vmap`` was.
params, buffers = stack_module_state(models)
base = copy.deepcopy(models[0]).to("meta")


def fmodel(params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
    return functional_call(base, (params, buffers), (x,))


with torch.no_grad():
    new_per_model = torch.vmap(fmodel)(params, buffers, minibatches)
    new_shared = torch.vmap(fmodel, in_dims=(0, 0, None))(params, buffers, minibatches[0])

# %%
# Both APIs stack the same tensors and run the same operations, so the
# predictions are not merely close: they are bit-for-bit identical.
assert torch.equal(new_per_model, legacy_per_model)
assert torch.equal(new_shared, legacy_shared)
for option, new, old in (
    ("(1)", new_per_model, legacy_per_model),
    ("(2)", new_shared, legacy_shared),
):
    same = torch.equal(new, old)
    print(f"option {option}: predictions {'identical' if same else 'different'}")

# %%
# Every prediction of every member, legacy against new: all on the diagonal.
fig, axes = plt.subplots(1, 2, figsize=(7, 3.2), layout="constrained")
for ax, (title, legacy, new) in zip(
    axes, [("option (1): a minibatch per model", legacy_per_model, new_per_model),
           ("option (2): one shared minibatch", legacy_shared, new_shared)],
):  # fmt: skip
    ax.scatter(legacy.flatten().cpu().tolist(), new.flatten().cpu().tolist(), s=4)
    ax.axline((0, 0), slope=1, color="gray", linewidth=0.8)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("functorch-style prediction")
axes[0].set_ylabel("torch.func prediction")
plt.show()

# %%
# Difference 1: tuples ordered by position, dictionaries keyed by name
# ---------------------------------------------------------------------
# The legacy tuples follow the order of ``named_parameters()``; code that
# indexed them (``params[0]`` for ``fc1.weight``) must switch to names. Zipping
# the names with the tuple converts old state into the new form:
names = [name for name, _ in models[0].named_parameters()]
print("legacy:", type(params_legacy).__name__, "of", len(params_legacy))
print("new:   ", type(params).__name__, "keyed by", list(params))
as_dict = dict(zip(names, params_legacy))
assert all(torch.equal(as_dict[n], params[n]) for n in names)
same_order = list(as_dict) == list(params)
print(f"dict(zip(names, legacy)) has the new dict's keys {'in' if same_order else 'out of'} order")

# %%
# Difference 2: ``requires_grad``
# -------------------------------
# functorch detached the stacked tensors, so they did not require gradients
# and old training notebooks had to call ``requires_grad_()`` on each one.
# ``stack_module_state`` returns new leaf tensors that require gradients,
# ready for an optimizer.
print("legacy requires_grad:", {p.requires_grad for p in params_legacy})
print("new requires_grad:   ", {p.requires_grad for p in params.values()})
loss_legacy = legacy_vmap(fmodel_legacy)(params_legacy, buffers_legacy, minibatches).sum()
try:
    loss_legacy.backward()
except RuntimeError as err:
    print("backward through the legacy tensors:", type(err).__name__, "(they do not require grad)")
for p in params_legacy:
    p.requires_grad_()  # what old notebooks did
legacy_vmap(fmodel_legacy)(params_legacy, buffers_legacy, minibatches).sum().backward()
print("after requires_grad_(), fc1.weight gradient:", list(params_legacy[0].grad.shape))

# %%
# Difference 3: neither is linked to the original modules
# -------------------------------------------------------
# Both APIs *copy* the weights. One optimizer step on the stacked tensors
# changes them, and leaves every ``models[i]`` untouched. Each member's loss
# is a mean over its own minibatch; summing those means keeps each member's
# gradient exactly what it would get if trained alone.


def ensemble_loss(logits: torch.Tensor) -> torch.Tensor:
    per_example = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return per_example.view(num_models, -1).mean(dim=1).sum()


before = models[0].fc1.weight.detach().clone()
optimizer = torch.optim.SGD(params.values(), lr=0.1)
ensemble_loss(torch.vmap(fmodel)(params, buffers, minibatches)).backward()
optimizer.step()
stacked_changed = not torch.equal(params["fc1.weight"][0], before)
module_changed = not torch.equal(models[0].fc1.weight, before)
print(f"the stacked weights {'changed' if stacked_changed else 'did not change'}")
print(f"models[0] {'changed' if module_changed else 'did not change'}")

# %%
# To get the trained weights back into ordinary modules, copy slice ``i`` of
# every stacked tensor into member ``i``. Afterwards each module predicts
# exactly what the vectorized ensemble predicts for it. (The
# :class:`ensembling.Ensemble` class does this for you with ``unstack()``.)
with torch.no_grad():
    for i, model in enumerate(models):
        for name, p in model.named_parameters():
            p.copy_(params[name][i])
        for name, b in model.named_buffers():
            b.copy_(buffers[name][i])
    after_vmap = torch.vmap(fmodel)(params, buffers, minibatches)
    after_loop = torch.stack([m(x) for m, x in zip(models, minibatches)])
torch.testing.assert_close(after_loop, after_vmap, **ensembling.tolerances(torch.float32, device))
print("models[i] now predict like the trained ensemble (asserted above)")

# %%
# The names: functorch and its torch.func replacements
# -----------------------------------------------------
# Everything ``functorch`` exported has a ``torch.func`` (or ``torch``)
# counterpart. The table is generated and checked: each replacement is looked
# up in the installed PyTorch, and each legacy name in ``functorch`` if it is
# still there.
renames = [
    ("combine_state_for_ensemble", "torch.func.stack_module_state", "+ functional_call on a copy"),
    ("make_functional", "torch.func.functional_call", "with dict(model.named_parameters())"),
    ("make_functional_with_buffers", "torch.func.functional_call", "with (params, buffers) dicts"),
    ("vmap", "torch.vmap", "also torch.func.vmap"),
    ("grad", "torch.func.grad", ""),
    ("grad_and_value", "torch.func.grad_and_value", ""),
    ("vjp", "torch.func.vjp", ""),
    ("jvp", "torch.func.jvp", ""),
    ("jacrev", "torch.func.jacrev", ""),
    ("jacfwd", "torch.func.jacfwd", ""),
    ("hessian", "torch.func.hessian", ""),
]


def resolve(dotted: str):
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


legacy_module = importlib.import_module("functorch") if legacy_source == "functorch" else None
print(f"{'functorch':<38} {'replacement':<31} note")
for old, new, note in renames:
    assert callable(resolve(new)), new
    assert legacy_module is None or hasattr(legacy_module, old), old
    print(f"functorch.{old:<28} {new:<31} {note}".rstrip())

# %%
# The transforms are the same functions under both names, so gradients agree
# exactly. Checked here for ``grad`` and ``jacrev`` when ``functorch`` is
# still installed:
f = lambda x: (x.sin() * x).sum()  # noqa: E731
x = torch.linspace(-1, 1, 5)
if legacy_module is not None:
    assert torch.equal(legacy_module.grad(f)(x), torch.func.grad(f)(x))
    assert torch.equal(legacy_module.jacrev(torch.sin)(x), torch.func.jacrev(torch.sin)(x))
    print_measured("functorch.grad and functorch.jacrev match torch.func exactly")
else:
    print_measured("functorch is not installed: only the torch.func names were checked")

# %%
# Summary
# -------
# * ``fmodel, params, buffers = combine_state_for_ensemble(models)`` becomes
#   ``params, buffers = stack_module_state(models)`` plus a ``meta``-device
#   copy of one model called through ``functional_call``.
# * The predictions are bit-for-bit identical for per-member and shared inputs.
# * Tuples in ``named_parameters()`` order become dictionaries keyed by name:
#   ``dict(zip(names, params))`` converts.
# * Stacked tensors now require gradients; neither API links them back to the
#   modules, so copy trained weights back explicitly.
#
# Next steps
# ----------
# :ref:`sphx_glr_tutorials_2_in_practice_plot_04_training_an_ensemble.py` trains
# a real ensemble without any of the manual copying above. The
# :ref:`API reference <api>` documents
# :func:`ensembling.legacy.combine_state_for_ensemble` and the other helpers.
