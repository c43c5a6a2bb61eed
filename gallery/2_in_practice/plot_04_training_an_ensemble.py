"""
Training an ensemble in one vectorized step
===========================================

Train sixteen classifiers on real handwritten digits with one model call and
one optimizer per step, and check that the ensemble beats its average member.

**What you will learn**

* how to train every member at once with :class:`ensembling.Ensemble`: one
  forward pass, one loss, one optimizer;
* why the loss is the *sum* of the members' mean losses, and a proof on a
  small case that this equals training each member alone;
* the trap that trains nothing (an optimizer over the original modules), and
  its fix;
* how to get the best member back as an ordinary module and save and reload it.

**Prerequisites**: :ref:`sphx_glr_tutorials_1_vectorizing_plot_01_mlp_ensembling.py`;
PyTorch 2.6 or newer; scikit-learn (for its bundled digits data: nothing is
downloaded). A GPU is optional.
"""

# %%
# Set-up and data
# ---------------
# scikit-learn ships 1,797 handwritten digits as 8x8 images with pixel values
# 0-16. We scale them to [0, 1], flatten them to 64 features and split them,
# with a fixed seed, into 1,257 training, 180 validation and 360 test digits.
# The validation set is for choices made after training (which member to
# keep); the test set only reports how good the choices turned out.
import copy
import pathlib
import tempfile

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.func import functional_call, stack_module_state

import ensembling
from ensembling import Ensemble
from ensembling.tutorial import print_measured

torch.manual_seed(0)
device = ensembling.default_device()
print_measured(f"running on {device}")

digits = load_digits()
X = torch.tensor(digits.data, dtype=torch.float32) / 16.0  # [1797, 64]
y = torch.tensor(digits.target)  # [1797], labels 0-9
order = torch.randperm(len(X))
train, val, test = order[:1257], order[1257:1437], order[1437:]
X_train, y_train = X[train].to(device), y[train].to(device)
X_val, y_val = X[val].to(device), y[val].to(device)
X_test, y_test = X[test].to(device), y[test].to(device)
print("train", list(X_train.shape), "validation", list(X_val.shape), "test", list(X_test.shape))

# %%
# The ensemble
# ------------
# Each member is a small MLP. ``Ensemble(factory, 16)`` calls the factory
# once and draws the sixteen initializations together, each from the layers'
# own initializers; the stacked weights are ordinary ``nn.Parameter`` objects
# with a leading member dimension.


def make_member() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


num_members = 16
ens = Ensemble(make_member, num_members).to(device)
print(ens)

# %%
# One training step for all members
# ---------------------------------
# Every member gets its own random minibatch (indices ``[members, batch]``), so
# the members see the data in different orders, which adds to their
# diversity. ``in_dims=0`` sends minibatch ``i`` to member ``i``.
#
# The loss is the **sum** of the members' mean losses. Member ``i``'s loss
# depends only on slice ``i`` of each stacked parameter, so the gradient of the
# sum with respect to that slice is exactly member ``i``'s own gradient. A mean
# over all members divides every gradient by the number of members. For plain
# SGD that is a smaller learning rate; Adam, used below, divides each step by a
# running estimate of the gradient's size, so scaling the loss changes its
# steps only through the small ``eps`` added to that estimate. The sum is what
# makes each member's gradient exactly the one it would get alone, whatever the
# optimizer.


def member_losses(ens: Ensemble, idx: torch.Tensor) -> torch.Tensor:
    logits = ens(X_train[idx], in_dims=0)  # [members, batch, 10]
    per_example = F.cross_entropy(logits.flatten(0, 1), y_train[idx].flatten(), reduction="none")
    return per_example.view(idx.shape).mean(dim=1)  # [members]


idx = torch.randint(len(X_train), (num_members, 32)).to(device)
losses = member_losses(ens, idx)
first_weight = ens.named_stacked_parameters()["0.weight"]  # [members, 64, 64]
grad_sum = torch.autograd.grad(losses.sum(), first_weight)[0]
grad_mean = torch.autograd.grad(member_losses(ens, idx).mean(), first_weight)[0]
torch.testing.assert_close(grad_mean * num_members, grad_sum)
scale = (grad_sum.norm() / grad_mean.norm()).item()
print(f"gradient of the sum / gradient of the mean: {scale:.1f} (= {num_members} members)")

# %%
# Now train. To make the members more different from each other (*bagging*),
# each one only ever sees its own random half of the training set: row ``i``
# of ``subsets`` lists member ``i``'s examples, and every step draws each
# member's minibatch from its own row. One forward pass, one backward pass and
# one Adam step per iteration update all sixteen members.
half = len(X_train) // 2
subsets = torch.stack([torch.randperm(len(X_train))[:half] for _ in range(num_members)]).to(device)
optimizer = torch.optim.Adam(ens.parameters(), lr=1e-2)
history = []
for step in range(300):
    picks = torch.randint(half, (num_members, 64)).to(device)
    idx = subsets.gather(1, picks)  # [members, 64] indices into X_train
    losses = member_losses(ens, idx)
    optimizer.zero_grad()
    losses.sum().backward()
    optimizer.step()
    history.append(losses.detach())
first, last = history[0].mean().item(), torch.stack(history[-20:]).mean().item()
assert last < first / 5
print_measured(f"mean member loss: {first:.3f} at step 0, {last:.3f} over the last 20 steps")

# %%
# Members against the ensemble
# ----------------------------
# On the test set we compare each member's accuracy with two ways of combining
# them: averaging the members' predicted probabilities, and a majority vote of
# their predicted labels. :meth:`torch.Tensor.mode` takes the most frequent
# label; on a tie it picks one of the tied labels (which one is not promised),
# and the page counts how often that happened.
ens.eval()
with torch.no_grad():
    probs = ens(X_test).softmax(dim=-1)  # [members, test, 10]
member_acc = (probs.argmax(-1) == y_test).float().mean(dim=1)  # [members]
ensemble_acc = (probs.mean(0).argmax(-1) == y_test).float().mean().item()
labels = probs.argmax(-1)  # [members, test]
votes = labels.mode(dim=0).values  # [test]
vote_acc = (votes == y_test).float().mean().item()
counts = F.one_hot(labels, 10).sum(dim=0)  # [test, 10]: votes per label
ties = int(((counts == counts.max(dim=1, keepdim=True).values).sum(dim=1) > 1).sum())
print_measured("member test accuracies (%): " + " ".join(f"{100 * a:.1f}" for a in member_acc))
print_measured(f"majority vote tied between labels on {ties} of {len(y_test)} test digits")

fig, ax = plt.subplots(figsize=(7, 3.2), layout="constrained")
ax.bar(range(num_members), (100 * member_acc).tolist(), color="lightgray", label="members")
for value, style, color, label in [
    (ensemble_acc, "-", "tab:blue", "averaged probabilities"),
    (vote_acc, "--", "tab:orange", "majority vote"),
    (member_acc.mean().item(), ":", "black", "average member"),
]:  # a thick solid line first, thinner dashed ones over it: equal values stay visible
    width = 4 if style == "-" else 1.5
    ax.axhline(
        100 * value,
        linestyle=style,
        color=color,
        linewidth=width,
        label=f"{label} ({100 * value:.1f}%)",
    )
ax.set_ylim(100 * member_acc.min().item() - 3, 100)
ax.set_xlabel("member")
ax.set_ylabel("test accuracy (%)")
ax.legend(
    loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False
)  # beside the bars, never over them
plt.show()

# %%
# The ensemble should beat the average member. Computed from the numbers above:
gain = ensemble_acc - member_acc.mean().item()
assert gain > 0, "the ensemble did not beat its average member"
beaten = int((member_acc < ensemble_acc).sum())
print_measured(
    f"averaged probabilities: {100 * ensemble_acc:.1f}%, majority vote: {100 * vote_acc:.1f}%, "
    f"average member: {100 * member_acc.mean():.1f}%"
)
print_measured(
    f"the ensemble is {100 * gain:.1f} points above the average member "
    f"and beats {beaten} of {num_members} members"
)

# %%
# Vectorized training equals training each member alone
# -----------------------------------------------------
# A small proof: three members, trained for five steps together (one
# ``Ensemble``, one optimizer) and separately (three modules, three
# optimizers), on the same minibatches, with SGD and momentum. The weights
# agree to float32 rounding.
torch.manual_seed(1)
small = Ensemble(make_member, 3).to(device)
alone = small.unstack()  # independent copies of the same starting weights
opt_together = torch.optim.SGD(small.parameters(), lr=0.1, momentum=0.9)
opt_alone = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in alone]
for step in range(5):
    idx = torch.randint(len(X_train), (3, 32)).to(device)
    opt_together.zero_grad()
    member_losses(small, idx).sum().backward()
    opt_together.step()
    for i, (model, opt) in enumerate(zip(alone, opt_alone)):
        opt.zero_grad()
        F.cross_entropy(model(X_train[idx[i]]), y_train[idx[i]]).backward()
        opt.step()
tol = ensembling.tolerances(torch.float32, device)
for i, model in enumerate(alone):
    for name, p in model.named_parameters():
        torch.testing.assert_close(small.named_stacked_parameters()[name][i], p, **tol)
print("3 members x 5 SGD steps: together == alone")

# %%
# The trap: an optimizer that trains nothing
# ------------------------------------------
# A common first attempt keeps a list of modules, builds the optimizer over
# *their* parameters, and calls ``stack_module_state`` inside the loop. But
# ``stack_module_state`` returns **copies**: the loss is a function of the
# copies, gradients land on the copies, and the optimizer steps modules whose
# gradients are empty.
models = [make_member().to(device) for _ in range(3)]
before = copy.deepcopy(models[0].state_dict())
base = copy.deepcopy(models[0]).to("meta")
wrong_optimizer = torch.optim.SGD([p for m in models for p in m.parameters()], lr=0.1)
for step in range(3):
    params, buffers = stack_module_state(models)  # fresh copies, every step
    logits = torch.vmap(lambda p, b, x: functional_call(base, (p, b), (x,)), in_dims=(0, 0, None))(
        params, buffers, X_train[:64]
    )
    loss = F.cross_entropy(logits.flatten(0, 1), y_train[:64].repeat(3))
    wrong_optimizer.zero_grad()
    loss.backward()
    wrong_optimizer.step()
unchanged = all(torch.equal(before[k], v) for k, v in models[0].state_dict().items())
reached = any(p.grad is not None for p in models[0].parameters())
print(f"gradients {'reached' if reached else 'never reached'} the modules")
print(f"after 3 steps the modules are {'unchanged' if unchanged else 'changed'}")
assert unchanged and not reached

# %%
# The fix is to optimize the tensors the loss is computed from. With
# ``Ensemble.from_modules`` the stacked tensors *are* the ensemble's
# parameters, so ``ens.parameters()`` is the right thing to optimize:
fixed = Ensemble.from_modules(models)
fixed_optimizer = torch.optim.SGD(fixed.parameters(), lr=0.1)
start = fixed.named_stacked_parameters()["0.weight"].detach().clone()
logits = fixed(X_train[:64])
fixed_optimizer.zero_grad()
F.cross_entropy(logits.flatten(0, 1), y_train[:64].repeat(3)).backward()
fixed_optimizer.step()
changed = not torch.equal(fixed.named_stacked_parameters()["0.weight"], start)
print(f"one step {'changed' if changed else 'did not change'} the stacked weights")
assert changed

# %%
# Keeping the best member, saving and reloading
# ---------------------------------------------
# ``ens[i]`` is an ordinary ``nn.Sequential``, an independent copy of member
# ``i``. The best member is chosen on the validation set (choosing it by its
# test accuracy would make that accuracy an optimistic estimate), and its test
# accuracy is reported. We save its ``state_dict`` and the whole ensemble's,
# load both with ``torch.load(..., weights_only=True)`` (which only unpickles
# tensors and plain containers), and check that the reloaded models predict
# exactly what they predicted before saving.
with torch.no_grad():
    val_acc = (ens(X_val).argmax(-1) == y_val).float().mean(dim=1)  # [members]
best_index = int(val_acc.argmax())
best = ens[best_index]
print("best member is a", type(best).__name__)
with tempfile.TemporaryDirectory() as tmp:
    torch.save(best.state_dict(), pathlib.Path(tmp) / "best.pt")
    torch.save(ens.state_dict(), pathlib.Path(tmp) / "ensemble.pt")
    reloaded_best = make_member().to(device)
    reloaded_best.load_state_dict(torch.load(pathlib.Path(tmp) / "best.pt", weights_only=True))
    reloaded_ens = Ensemble(make_member, num_members).to(device)
    reloaded_ens.load_state_dict(torch.load(pathlib.Path(tmp) / "ensemble.pt", weights_only=True))
reloaded_ens.eval()
with torch.no_grad():
    same_best = torch.equal(reloaded_best(X_test), best(X_test))
    same_ens = torch.equal(reloaded_ens(X_test), ens(X_test))
assert same_best and same_ens
print("the reloaded best member and ensemble predict exactly as before saving")
print_measured(
    f"best member on validation: {best_index} ({100 * val_acc[best_index]:.1f}%), "
    f"its test accuracy {100 * member_acc[best_index]:.1f}%"
)

# %%
# Summary
# -------
# * One ``Ensemble`` call, one loss (the sum of per-member mean losses) and one
#   optimizer train every member; the result is the same as training each
#   member alone.
# * Averaging the members' probabilities beat the average member on held-out
#   digits (the gain is computed above, on your machine).
# * An optimizer must hold the tensors the loss is computed from:
#   ``stack_module_state`` inside the loop with an optimizer over the original
#   modules trains nothing.
# * ``ens[i]`` gives an ordinary module to save with ``state_dict``; an
#   ensemble's own ``state_dict`` round-trips through ``torch.save`` /
#   ``torch.load(weights_only=True)``.
#
# Next steps
# ----------
# :ref:`sphx_glr_tutorials_2_in_practice_plot_05_uncertainty.py` uses the
# members' disagreement as a measure of uncertainty.
