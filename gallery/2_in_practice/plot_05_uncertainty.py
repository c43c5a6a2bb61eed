"""
What an ensemble knows that a single model does not
===================================================

Use the disagreement between members as a measure of uncertainty: map it on
a 2-D toy problem, then use it on real digits to find the predictions that are
likely to be wrong.

**What you will learn**

* two uncertainty scores from an ensemble's probabilities: the entropy of the
  averaged prediction, and the *mutual information* (the part of that entropy
  due to members disagreeing);
* what they look like around and away from the training data;
* how uncertainty separates right from wrong predictions on held-out digits,
  and how much accuracy you gain by refusing to answer the most uncertain ones.

**Prerequisites**: :ref:`sphx_glr_tutorials_2_in_practice_plot_04_training_an_ensemble.py`;
PyTorch 2.6 or newer; scikit-learn (data generated or bundled, nothing
downloaded). A GPU is optional.
"""

# %%
# Set-up
# ------
# The training loop is the one from the previous page: each member trains on
# its own random half of the data (bagging), with the sum of the members'
# mean losses and one optimizer.
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits, make_moons
from torch import nn

import ensembling
from ensembling import Ensemble
from ensembling.tutorial import print_measured

torch.manual_seed(0)
device = ensembling.default_device()
print_measured(f"running on {device}")


def train(
    ens: Ensemble, X: torch.Tensor, y: torch.Tensor, steps: int, lr: float = 1e-2
) -> Ensemble:
    members, half = len(ens), len(X) // 2
    subsets = torch.stack([torch.randperm(len(X))[:half] for _ in range(members)]).to(device)
    optimizer = torch.optim.Adam(ens.parameters(), lr=lr)
    for _ in range(steps):
        idx = subsets.gather(1, torch.randint(half, (members, 64)).to(device))  # [members, 64]
        logits = ens(X[idx], in_dims=0)
        loss = F.cross_entropy(logits.flatten(0, 1), y[idx].flatten(), reduction="none")
        optimizer.zero_grad()
        loss.view(idx.shape).mean(dim=1).sum().backward()
        optimizer.step()
    return ens.eval()


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy in nats along the last (class) dimension."""
    return -(p * p.clamp_min(1e-12).log()).sum(dim=-1)


# %%
# Two scores
# ----------
# For an input, member :math:`m` gives class probabilities :math:`p_m`. The
# ensemble's prediction is their mean :math:`\bar p`, and its **total
# uncertainty** is the entropy :math:`H(\bar p)`. Part of it is uncertainty
# every member already has (a point right on the class boundary: each member
# says 50/50); the average of the members' own entropies measures that part.
# What remains is the **mutual information**
#
# .. math::
#
#    I = H(\bar p) - \frac{1}{M} \sum_{m=1}^{M} H(p_m) \;\geq\; 0,
#
# which is due to members *disagreeing*: each may be confident, but about
# different classes. A single network cannot report this kind; an ensemble can.
#
# Half-moons: where the data are, and where they are not
# ------------------------------------------------------
# 300 points from two interleaving half-moons, generated on the page.
X_np, y_np = make_moons(n_samples=300, noise=0.2, random_state=0)
X_moons = torch.tensor(X_np, dtype=torch.float32).to(device)
y_moons = torch.tensor(y_np).to(device)
moons = train(
    Ensemble(
        lambda: nn.Sequential(
            nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2)
        ),
        16,
    ).to(device),
    X_moons,
    y_moons,
    steps=400,
)

# %%
# Every point of a 150x150 grid around the data goes through all sixteen
# members in one call.
xs = torch.linspace(-3.0, 4.0, 150)
ys = torch.linspace(-2.5, 3.0, 150)
grid = torch.cartesian_prod(ys, xs).flip(1).to(device)  # [22500, 2] as (x, y)
with torch.no_grad():
    p = moons(grid).softmax(dim=-1)  # [members, 22500, 2]
p_mean = p.mean(dim=0)
total = entropy(p_mean)
mutual_information = total - entropy(p).mean(dim=0)
print("grid predictions:", list(p.shape))

fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained", sharey=True)
extent = (xs[0].item(), xs[-1].item(), ys[0].item(), ys[-1].item())
panels = [
    (p_mean[:, 1], "RdBu_r", "ensemble P(class 1)"),
    (mutual_information, "viridis", "mutual information (nats)"),
]
for ax, (values, cmap, title) in zip(axes, panels):
    image = ax.imshow(
        values.view(150, 150).cpu().numpy(), origin="lower", extent=extent, cmap=cmap, aspect="auto"
    )
    ax.scatter(*X_np.T, c=y_np, cmap="RdBu_r", s=6, edgecolors="white", linewidths=0.3)
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
plt.show()

# %%
# The members agree where the training data are and disagree away from them.
# We check this with the distance from each grid point to its nearest training
# point: within 0.1 counts as "inside the data", beyond 1.0 as "far from it".
distance = torch.cdist(grid, X_moons).min(dim=1).values
near, far = distance < 0.1, distance > 1.0
mi_near, mi_far = mutual_information[near].mean().item(), mutual_information[far].mean().item()
assert mi_far > 2 * mi_near
print_measured(
    f"mean mutual information: {mi_near:.3f} nats near the data, {mi_far:.3f} far from it"
)
print_measured(f"disagreement is {mi_far / mi_near:.1f}x higher far from the data")

# %%
# Digits: is uncertainty a warning sign?
# --------------------------------------
# Now the real task from the previous page: 16 MLPs on scikit-learn's bundled
# handwritten digits, a seeded fifth of them held out.
digits = load_digits()
X = torch.tensor(digits.data, dtype=torch.float32) / 16.0
y = torch.tensor(digits.target)
order = torch.randperm(len(X))
X_train, y_train = X[order[:1437]].to(device), y[order[:1437]].to(device)
X_test, y_test = X[order[1437:]].to(device), y[order[1437:]].to(device)
member = lambda: nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))  # noqa: E731
ens = train(Ensemble(member, 16).to(device), X_train, y_train, steps=300)
with torch.no_grad():
    probs = ens(X_test).softmax(dim=-1)  # [members, 360, 10]
prediction = probs.mean(dim=0)
correct = prediction.argmax(dim=-1) == y_test
score = entropy(prediction)  # total uncertainty of each test prediction
print("test predictions:", list(prediction.shape))

# %%
# If uncertainty is informative, the wrong predictions should be the
# uncertain ones. The histogram compares the two groups.
fig, ax = plt.subplots(figsize=(6, 3.2), layout="constrained")
bins = torch.linspace(0, score.max().item(), 25)
ax.hist(
    score[correct].cpu().numpy(),
    bins=bins.tolist(),
    alpha=0.7,
    label=f"correct ({int(correct.sum())})",
    density=True,
)
ax.hist(
    score[~correct].cpu().numpy(),
    bins=bins.tolist(),
    alpha=0.7,
    label=f"wrong ({int((~correct).sum())})",
    density=True,
)
ax.set_xlabel("entropy of the ensemble's prediction (nats)")
ax.set_ylabel("density")
ax.legend()
plt.show()

# %%
# Computed from the test set:
assert (~correct).any(), "no mistakes to analyse"
h_right, h_wrong = score[correct].mean().item(), score[~correct].mean().item()
assert h_wrong > h_right
print_measured(
    f"mean entropy: {h_right:.3f} nats when correct, "
    f"{h_wrong:.3f} when wrong ({h_wrong / h_right:.1f}x)"
)

# %%
# Refusing the most uncertain predictions
# ---------------------------------------
# A system can hand its least certain cases to a human. Sorting the test set
# by uncertainty and rejecting the top fraction gives the accuracy on what is
# left, as a function of the fraction rejected.
ranked = correct[score.argsort()].float()  # most certain first
kept_fraction = torch.linspace(1.0, 0.5, 11)
accuracy_kept = torch.stack([ranked[: max(1, int(f * len(ranked)))].mean() for f in kept_fraction])
fig, ax = plt.subplots(figsize=(6, 3.2), layout="constrained")
ax.plot((100 * (1 - kept_fraction)).tolist(), (100 * accuracy_kept).tolist(), marker="o")
ax.set_xlabel("most uncertain predictions rejected (%)")
ax.set_ylabel("accuracy on the rest (%)")
plt.show()
at_0, at_10 = accuracy_kept[0].item(), accuracy_kept[2].item()
assert at_10 >= at_0
print_measured(
    f"accuracy {100 * at_0:.1f}% answering everything, "
    f"{100 * at_10:.1f}% after rejecting the 10% most uncertain"
)

# %%
# Summary
# -------
# * The entropy of the averaged prediction measures total uncertainty; the
#   mutual information isolates the members' disagreement.
# * On the half-moons the members agree inside the data and disagree away from
#   it (the ratio is computed above): a single network gives no such signal.
# * On digits the wrong predictions have clearly higher entropy, so rejecting
#   the most uncertain predictions raises the accuracy on the rest.
#
# Next steps
# ----------
# :ref:`sphx_glr_tutorials_2_in_practice_plot_06_randomness_and_batchnorm.py`
# covers dropout, BatchNorm and the other parts of a model that need care
# under ``vmap``.
