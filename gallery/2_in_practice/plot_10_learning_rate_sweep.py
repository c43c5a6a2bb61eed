"""
A learning-rate sweep in one run
================================

Train 32 classifiers with 32 different learning-rate and weight-decay settings
in one training run, pick the best on a validation split, and check that each
member trained exactly as it would have alone.

**What you will learn**

* how :class:`ensembling.optim.AdamW` takes one learning rate and one weight
  decay *per member*, so an ensemble becomes a hyperparameter sweep;
* how to feed every member from one :class:`ensembling.sweep.MemberBatches`
  iterator, and why a sweep gives them the same batches;
* how to choose on validation, report test for the chosen member only, and
  prove that a member equals a separate ``torch.optim.AdamW`` run;
* population-based training in a few lines with
  :func:`ensembling.sweep.exploit`.

**Prerequisites**: :ref:`sphx_glr_tutorials_2_in_practice_plot_04_training_an_ensemble.py`;
PyTorch 2.6 or newer; scikit-learn (for its bundled digits data: nothing is
downloaded). A GPU is optional.
"""

# %%
# Set-up and data
# ---------------
# scikit-learn's 1,797 handwritten digits, scaled to [0, 1] and split, with a
# fixed seed, into training (60%), validation (20%) and test (20%) sets. The
# validation set chooses the hyperparameters; the test set is looked at once.
import copy

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import ensembling
from ensembling import Ensemble
from ensembling.optim import AdamW
from ensembling.sweep import MemberBatches, exploit
from ensembling.tutorial import compare, print_measured, verdict

torch.manual_seed(0)
device = ensembling.default_device()
print_measured(f"running on {device}")

digits = load_digits()
X = torch.tensor(digits.data, dtype=torch.float32) / 16.0  # [1797, 64]
y = torch.tensor(digits.target)  # [1797]
order = torch.randperm(len(X))
train, val, test = order[:1078], order[1078:1437], order[1437:]
X_train, y_train = X[train].to(device), y[train].to(device)
X_val, y_val = X[val].to(device), y[val].to(device)
X_test, y_test = X[test].to(device), y[test].to(device)
print("train", len(train), "validation", len(val), "test", len(test))

# %%
# The grid: 8 learning rates x 4 weight decays
# --------------------------------------------
# Member ``i`` gets the ``i``-th pair of the grid. Every member starts from
# the *same* initial weights, so the only differences between them are their
# hyperparameters.
lrs = torch.logspace(-4, -0.5, 8)  # 1e-4 ... 0.32
decays = torch.tensor([0.0, 1e-3, 1e-2, 1e-1])
member_lr = lrs.repeat(len(decays))  # [32]: lrs, lrs, lrs, lrs
member_wd = decays.repeat_interleave(len(lrs))  # [32]: 0 x8, 1e-3 x8, ...
num_members = len(member_lr)


def make_member() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


start = make_member()
ens = Ensemble.from_modules([copy.deepcopy(start) for _ in range(num_members)]).to(device)
optimizer = AdamW(ens.parameters(), lr=member_lr, weight_decay=member_wd)
print(f"{num_members} members; lr per member: {optimizer.param_groups[0]['lr'].shape}")

# %%
# Training all 32 configurations at once
# --------------------------------------
# ``MemberBatches(..., mode="shared")`` gives every member the same minibatch,
# stacked as ``[members, batch, 64]`` (an expanded view, no copy), so the
# comparison between settings is not blurred by different data orders. (For
# bagging, ``mode="bootstrap"`` gives each member its own resample instead.)
# As on the training page, the loss is the sum of the members' mean losses,
# so each member gets exactly its own gradient.
EPOCHS, BATCH = 8, 64


def member_losses(model: Ensemble, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    logits = model(xb, in_dims=0)  # [members, batch, 10]
    losses = F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="none")
    return losses.view(yb.shape).mean(dim=1)  # [members]


batches = MemberBatches(
    X_train, y_train, num_members=num_members, batch_size=BATCH, mode="shared", seed=0
)
for epoch in range(EPOCHS):
    for xb, yb in batches:
        optimizer.zero_grad()
        member_losses(ens, xb, yb).sum().backward()
        optimizer.step()
print(f"trained {EPOCHS} epochs of {len(batches)} steps")

# %%
# Validation accuracy against the learning rate
# ---------------------------------------------
# One forward pass scores all 32 members on the validation set.


def accuracy(model: Ensemble, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return (model(X).argmax(-1) == y).float().mean(dim=1)  # [members]


val_acc = accuracy(ens, X_val, y_val).cpu()
fig, ax = plt.subplots(figsize=(6.5, 3.4), layout="constrained")
for k, wd in enumerate(decays.tolist()):
    rows = slice(k * len(lrs), (k + 1) * len(lrs))
    ax.plot(lrs.tolist(), (100 * val_acc[rows]).tolist(), marker="o", label=f"weight decay {wd:g}")
ax.set_xscale("log")
ax.set_xlabel("learning rate")
ax.set_ylabel("validation accuracy (%)")
ax.legend(loc="lower right", fontsize=8, frameon=False)
plt.show()

# %%
# The choice is made on validation; the test set is used once, for the chosen
# member only. A learning rate that is too small has not trained in the
# budget, so the best lies well above the smallest one.
best = int(val_acc.argmax())
best_lr, best_wd = member_lr[best].item(), member_wd[best].item()
test_acc = accuracy(ens, X_test, y_test)[best].item()
assert best_lr > lrs[0].item(), "the smallest learning rate should not win in this budget"
print_measured(
    f"chosen: member {best} (lr {best_lr:.2g}, weight decay {best_wd:g}), "
    f"validation {100 * val_acc[best]:.1f}%, test {100 * test_acc:.1f}%"
)
print_measured(
    f"worst validation accuracy: {100 * val_acc.min():.1f}% (lr {member_lr[val_acc.argmin()]:.2g})"
)

# %%
# Each member equals a separate run
# ---------------------------------
# The claim behind the sweep: member ``i`` is exactly the model that
# ``torch.optim.AdamW`` with member ``i``'s own ``lr`` and ``weight_decay``
# would have trained. We replay the whole training for three members, from the
# same start and on the same batches (same seed, same batches), once as a
# 3-member ensemble and once as three separate models. We replay in float64 on
# the CPU: in float32, the batched and the single-model matrix products round
# differently, and a hundred Adam steps amplify those last-bit differences; in
# float64 the two must agree to about 1e-10.
checked = [best, 0, num_members - 1]
X64, y64 = X_train.cpu().double(), y_train.cpu()
replay = Ensemble.from_modules([copy.deepcopy(start).double() for _ in checked])
replay_opt = AdamW(replay.parameters(), lr=member_lr[checked], weight_decay=member_wd[checked])
alone = [copy.deepcopy(start).double() for _ in checked]
alone_opts = [
    torch.optim.AdamW(m.parameters(), lr=member_lr[i].item(), weight_decay=member_wd[i].item())
    for i, m in zip(checked, alone)
]
replay_batches = MemberBatches(X64, y64, num_members=3, batch_size=BATCH, mode="shared", seed=0)
for epoch in range(EPOCHS):
    for xb, yb in replay_batches:
        replay_opt.zero_grad()
        member_losses(replay, xb, yb).sum().backward()
        replay_opt.step()
        for k, (model, opt) in enumerate(zip(alone, alone_opts)):
            opt.zero_grad()
            F.cross_entropy(model(xb[k]), yb[k]).backward()
            opt.step()
pairs = [
    (replay.named_stacked_parameters()[name][k], p)
    for k, model in enumerate(alone)
    for name, p in model.named_parameters()
]
for stacked, p in pairs:
    torch.testing.assert_close(stacked, p, rtol=1e-9, atol=1e-10)
same = all(torch.allclose(stacked, p, rtol=1e-9, atol=1e-10) for stacked, p in pairs)
print(
    f"members {checked} after {EPOCHS} epochs "
    f"{'equal' if same else 'differ from'} separate torch.optim.AdamW runs "
    "(float64, rtol 1e-9)"
)

# %%
# One run against the sweep run member by member
# ----------------------------------------------
# The usual sweep trains 32 models one after another. We time one training
# step of all 32 settings both ways, in alternating rounds (on copies, so the
# trained models above stay as they are), and let the numbers word the
# comparison.
timed_ens = copy.deepcopy(ens)
timed_opt = AdamW(timed_ens.parameters(), lr=member_lr, weight_decay=member_wd)
models = timed_ens.unstack()
model_opts = [
    torch.optim.AdamW(m.parameters(), lr=member_lr[i].item(), weight_decay=member_wd[i].item())
    for i, m in enumerate(models)
]
xb, yb = next(iter(batches))


def one_run_step() -> None:
    timed_opt.zero_grad()
    member_losses(timed_ens, xb, yb).sum().backward()
    timed_opt.step()


def member_by_member_step() -> None:
    for model, opt in zip(models, model_opts):
        opt.zero_grad()
        F.cross_entropy(model(xb[0]), yb[0]).backward()
        opt.step()


times = compare(
    {"one run": one_run_step, "member by member": member_by_member_step},
    device=device,
    min_run_time=0.6,
)
one_run, by_member = times["one run"], times["member by member"]
print_measured(
    f"one step of {num_members} settings: one run {one_run}, member by member {by_member}"
)
print_measured(
    verdict(one_run, by_member, x_name="the one-run sweep", y_name="the sequential sweep")
)

# %%
# Population-based training in a few lines
# ----------------------------------------
# Instead of fixing the settings up front, population-based training trains
# for a while, copies the best members (weights, Adam state and
# hyperparameters) into the worst, perturbs the copies' learning rates, and
# carries on. :func:`~ensembling.sweep.exploit` does the copying.
torch.manual_seed(1)
pbt = Ensemble.from_modules([copy.deepcopy(start) for _ in range(16)]).to(device)
pbt_opt = AdamW(pbt.parameters(), lr=torch.logspace(-4, -1, 16))
pbt_batches = MemberBatches(
    X_train, y_train, num_members=16, batch_size=BATCH, mode="shared", seed=1
)
for generation in range(4):
    for xb, yb in pbt_batches:  # one epoch per generation
        pbt_opt.zero_grad()
        member_losses(pbt, xb, yb).sum().backward()
        pbt_opt.step()
    src, dst = exploit(pbt, accuracy(pbt, X_val, y_val), fraction=0.25, optimizer=pbt_opt)
    assert torch.equal(
        pbt.named_stacked_parameters()["0.weight"][dst[0]],
        pbt.named_stacked_parameters()["0.weight"][src[0]],
    )
    lr = pbt_opt.param_groups[0]["lr"]
    lr[dst] = lr[dst] * torch.tensor([0.8, 1.25], dtype=lr.dtype)[torch.randint(2, (len(dst),))]
pbt_acc = accuracy(pbt, X_val, y_val)
print_measured(
    f"population-based training: best validation {100 * pbt_acc.max():.1f}%, "
    f"learning rates now {lr.min():.2g} to {lr.max():.2g}"
)

# %%
# Summary
# -------
# * :class:`ensembling.optim.AdamW` (and ``SGD``, ``Adam``) take one value per
#   member for every float hyperparameter: 32 settings train in one run.
# * Each member equals a separate ``torch.optim.AdamW`` run with its own
#   settings (checked above for three members).
# * Choose on validation, report test for the chosen member only.
# * The one-run sweep against the sequential sweep was measured above, and the
#   sentence comparing them was computed from those numbers and their spread.
# * :func:`ensembling.sweep.exploit` copies members with their optimizer state:
#   population-based training is a loop of train, exploit, perturb.
#
# Next steps
# ----------
# :ref:`sphx_glr_tutorials_2_in_practice_plot_05_uncertainty.py` uses an
# ensemble's disagreement; the API reference lists :mod:`ensembling.optim` and
# :mod:`ensembling.sweep`.
