"""
When does vectorizing pay? A performance map
============================================

Measure, on your device, how the speedup of a vectorized ensemble over a
Python loop depends on the number of members, their width and how the input
is shared, for inference and for a training step, and what ``chunk_size``
trades for memory.

**What you will learn**

* where vectorizing wins big, where it is a wash and where it loses, measured
  live rather than claimed;
* how close :class:`ensembling.Ensemble` gets to hand-batched matrix products,
  and what raw ``vmap`` costs on top;
* how peak memory grows with the ensemble, and how ``chunk_size`` caps it.

**Prerequisites**: :ref:`sphx_glr_tutorials_1_vectorizing_plot_01_mlp_ensembling.py`;
PyTorch 2.6 or newer. A GPU is optional; the conclusions printed below are
computed from the measurements, so they are true for the device that ran the
page.
"""

# %%
# Set-up
# ------
# The members are MLPs ``width -> width -> width -> 10`` (``nn.Sequential`` of
# ``Linear`` and ``ReLU``) evaluated on minibatches of 32. Timings use
# :func:`ensembling.tutorial.compare`: the candidates are timed in alternation,
# five rounds of at least 20 ms each (synchronized), so background load slows
# them alike, and :func:`ensembling.tutorial.verdict` words each comparison
# from the spread over the rounds. The sizes keep the page quick on a laptop CPU.
import warnings

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

import ensembling
from ensembling import Ensemble, peak_memory
from ensembling.tutorial import compare, print_measured, speedup, verdict

torch.manual_seed(0)
device = ensembling.default_device()
print_measured(f"running on {device}")

BATCH = 32
SIZES = [1, 4, 16, 64]
WIDTHS = [16, 64, 256]


def make_member(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    )


def timed(**candidates) -> dict:
    """Time the candidates in alternating rounds: {name: Timing}."""
    return compare(candidates, device=device, min_run_time=0.1, rounds=5, warmup=1)


# %%
# The sweep
# ---------
# For every ensemble size and width, with one minibatch shared by all members
# and with one minibatch per member: the loop over ordinary modules, and
# ``Ensemble`` (which, for this ``nn.Sequential``, runs batched matrix
# products directly). Each pair is checked to agree before it is timed.
ratios = {"shared": {}, "per-member": {}}  # (members, width) -> Ratio (loop time / Ensemble time)
tol = ensembling.tolerances(torch.float32, device)
for i, n in enumerate(SIZES):
    for j, width in enumerate(WIDTHS):
        ens = Ensemble(lambda: make_member(width), n).to(device).eval()
        members = ens.unstack()
        x = torch.randn(BATCH, width, device=device)
        xs = torch.randn(n, BATCH, width, device=device)
        with torch.no_grad():
            for kind, loop, vectorized in (
                ("shared", lambda: torch.stack([m(x) for m in members]), lambda: ens(x)),
                (
                    "per-member",
                    lambda: torch.stack([m(xs[k]) for k, m in enumerate(members)]),
                    lambda: ens(xs, in_dims=0),
                ),
            ):
                torch.testing.assert_close(vectorized(), loop(), **tol)
                t = timed(loop=loop, Ensemble=vectorized)
                ratios[kind][n, width] = speedup(t["Ensemble"], t["loop"])
speedup_map = {
    kind: torch.tensor([[r[n, w].value for w in WIDTHS] for n in SIZES])
    for kind, r in ratios.items()
}
print("measured", 2 * len(SIZES) * len(WIDTHS), "configurations")

# %%
# The map shows the median of loop time / ``Ensemble`` time over the rounds:
# above 1 the ensemble is faster. Cells where vectorizing *loses* (slower in at
# least nine rounds in ten, and by more than 5% in the median: the rule of
# :func:`ensembling.tutorial.verdict`) are outlined in red.
wins = lambda r: r.low > 1 and r.value > 1.05  # noqa: E731  (verdict's "faster")
loses = lambda r: r.high < 1 and r.value < 1 / 1.05  # noqa: E731  (verdict's "slower")
fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), layout="constrained", sharey=True)
limit = max(max(s.max().item(), 1 / s.min().item()) for s in speedup_map.values())
for ax, (kind, values) in zip(axes, speedup_map.items()):
    scale = torch.tensor(limit).log10().item()
    image = ax.imshow(
        values.log10().numpy(),
        cmap="RdYlGn",
        vmin=-scale,
        vmax=scale,
        aspect="auto",
        origin="lower",
    )
    cells = torch.cartesian_prod(torch.arange(len(SIZES)), torch.arange(len(WIDTHS))).tolist()
    for (i, j), value in zip(cells, values.flatten().tolist()):
        ax.text(
            j,
            i,
            f"{value:.2f}x" if value < 1 else f"{value:.1f}x",
            ha="center",
            va="center",
            fontsize=8,
        )
        if loses(ratios[kind][SIZES[i], WIDTHS[j]]):
            ax.add_patch(
                plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2)
            )
    ax.set_xticks(range(len(WIDTHS)), WIDTHS)
    ax.set_yticks(range(len(SIZES)), SIZES)
    ax.set_xlabel("member width")
    ax.set_title(f"{kind} input")
axes[0].set_ylabel("members")
fig.colorbar(image, ax=axes, label="log10 speedup over the loop")
plt.show()

# %%
# What the map says, computed from it. A cell counts as a loss or a win only
# when the spread over its rounds lies entirely below or above 1; a trend
# along a column is reported only between cells whose ranges do not overlap.
for kind, values in speedup_map.items():
    best = divmod(int(values.argmax()), len(WIDTHS))
    worst = divmod(int(values.argmin()), len(WIDTHS))
    print_measured(
        f"{kind}: best {values.max():.1f}x at {SIZES[best[0]]} members of width {WIDTHS[best[1]]}, "
        f"worst {values.min():.2f}x at {SIZES[worst[0]]} members of width {WIDTHS[worst[1]]}"
    )
    losing = [f"{n}x{w}" for (n, w), r in ratios[kind].items() if loses(r)]
    unclear = [f"{n}x{w}" for (n, w), r in ratios[kind].items() if not (loses(r) or wins(r))]
    print_measured(
        f"{kind}: vectorizing loses in {len(losing)} of {values.numel()} cells {losing}, "
        f"too close to call in {len(unclear)} {unclear}"
    )


def trend(column: list) -> str:
    """How a column of Ratios changes from the fewest to the most members."""
    ups = sum(b.low > a.high for a, b in zip(column, column[1:]))
    downs = sum(b.high < a.low for a, b in zip(column, column[1:]))
    if ups == len(column) - 1:
        return "rises at every step"
    if downs == len(column) - 1:
        return "falls at every step"
    first, last = column[0], column[-1]
    overall = "rises" if last.low > first.high else "falls" if last.high < first.low else "is flat"
    return f"{overall} overall ({ups} clear rises, {downs} clear falls in {len(column) - 1} steps)"


for width in WIDTHS:
    column = [ratios["per-member"][n, width] for n in SIZES]
    print_measured(
        f"per-member input, width {width}: from {SIZES[0]} to {SIZES[-1]} members "
        f"the speedup {trend(column)}: {column[0].value:.2f}x to {column[-1].value:.2f}x"
    )

# %%
# Why the map can look like this. A single member (the bottom row) has
# nothing to batch, so the ensemble can only add its bookkeeping. The loop
# pays its per-layer overhead once per member while the ensemble pays it once,
# so wherever that overhead dominates (narrow members) the gain can grow with
# the number of members; wide layers give each call enough arithmetic to hide
# the overhead, so a loop of wide members is already compute-bound, especially
# on a CPU, and batching changes little there. The lines above say what your
# device did.
#
# Raw ``vmap``, ``Ensemble`` and a hand-batched reference
# -------------------------------------------------------
# For a few ensembles with per-member input: raw ``vmap`` over
# ``functional_call`` (what ``Ensemble`` does for arbitrary architectures,
# ``fast_path=False``), the default ``Ensemble`` (batched products for this
# ``nn.Sequential``), and a hand-written chain of :func:`torch.baddbmm` calls,
# the most direct way to write these MLPs batched, as a reference.


def hand_batched(ens: Ensemble, xs: torch.Tensor) -> torch.Tensor:
    p = ens.named_stacked_parameters()
    h = xs
    for k, layer in enumerate(("0", "2", "4")):
        h = torch.baddbmm(p[f"{layer}.bias"].unsqueeze(1), h, p[f"{layer}.weight"].mT)
        h = h.relu() if k < 2 else h
    return h


rows = []
for n, width in [(16, 16), (256, 16), (64, 64), (16, 256)]:
    ens = Ensemble(lambda: make_member(width), n).to(device).eval()
    vmap_ens = Ensemble.from_modules(ens.unstack(), fast_path=False).eval()
    xs = torch.randn(n, BATCH, width, device=device)
    with torch.no_grad():
        torch.testing.assert_close(hand_batched(ens, xs), ens(xs, in_dims=0), **tol)
        t = timed(
            vmap=lambda: vmap_ens(xs, in_dims=0),
            Ensemble=lambda: ens(xs, in_dims=0),
            hand=lambda: hand_batched(ens, xs),
        )
    rows.append((n, width, t))
for n, width, t in rows:
    print_measured(
        f"{n:3d} x width {width:3d}: {verdict(t['Ensemble'], t['hand'], y_name='hand-batched')}; "
        f"{verdict(t['vmap'], t['Ensemble'], x_name='raw vmap')}"
    )

# %%
# ``torch.compile`` can fuse the element-wise work between the products. On a
# CPU compiling even one configuration takes longer than this whole page, so
# it is measured only when an accelerator runs the page (and by
# ``python -m ensembling.bench`` everywhere).
if device.type != "cpu":
    n, width = 64, 64
    ens = Ensemble(lambda: make_member(width), n).to(device).eval()
    # Inductor suggests TF32 on GPUs that have it; this page keeps float32 exact.
    warnings.filterwarnings("ignore", message=".*TensorFloat32 tensor cores.*")
    compiled = torch.compile(ens)
    xs = torch.randn(n, BATCH, width, device=device)
    with torch.no_grad():
        torch.testing.assert_close(compiled(xs, in_dims=0), ens(xs, in_dims=0), **tol)
        t = timed(eager=lambda: ens(xs, in_dims=0), compiled=lambda: compiled(xs, in_dims=0))
    print_measured(f"{n} x width {width}: {verdict(t['compiled'], t['eager'], y_name='eager')}")
else:
    print_measured("torch.compile: skipped on the CPU (compile time exceeds this page's budget)")

# %%
# A training step
# ---------------
# Forward, backward and an Adam step: a loop of separate models, each with its
# own optimizer, against one ``Ensemble`` with one optimizer (width 64,
# per-member minibatches).
train_times = {}
for n in [4, 16, 64]:
    ens = Ensemble(lambda: make_member(64), n).to(device)
    members = ens.unstack()
    xs, ys = (
        torch.randn(n, BATCH, 64, device=device),
        torch.randint(0, 10, (n, BATCH), device=device),
    )
    ens_opt = torch.optim.Adam(ens.parameters(), lr=1e-3)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in members]

    def loop_step():
        for k, (m, opt) in enumerate(zip(members, opts)):
            opt.zero_grad()
            F.cross_entropy(m(xs[k]), ys[k]).backward()
            opt.step()

    def ensemble_step():
        ens_opt.zero_grad()
        loss = F.cross_entropy(ens(xs, in_dims=0).flatten(0, 1), ys.flatten(), reduction="none")
        loss.view(n, BATCH).mean(dim=1).sum().backward()
        ens_opt.step()

    train_times[n] = timed(loop=loop_step, Ensemble=ensemble_step)
for n, t in train_times.items():
    print_measured(
        f"training step, {n:3d} members of width 64: "
        f"{verdict(t['Ensemble'], t['loop'], y_name='the loop')}"
    )

# %%
# Memory, and what ``chunk_size`` trades
# --------------------------------------
# Vectorizing keeps every member's activations in memory at once.
# :func:`ensembling.peak_memory` counts the bytes of the tensors a call keeps
# alive at the same time (at the PyTorch dispatcher, so the count is the same
# on every device). For 128 members of width 256 on the ``vmap`` path,
# ``chunk_size`` evaluates that many members at a time.
ens = Ensemble(lambda: make_member(256), 128).to(device).eval()
ens.fast_path = False  # chunking applies to the vmap path
xs = torch.randn(128, BATCH, 256, device=device)
memory, calls = {}, {}
with torch.no_grad():
    for chunk in (None, 32, 8):
        calls[f"chunk_size={chunk}"] = lambda chunk=chunk: ens(xs, in_dims=0, chunk_size=chunk)
        _, memory[chunk] = peak_memory(calls[f"chunk_size={chunk}"])
        print(f"chunk_size={chunk}: peak {memory[chunk] / 2**20:.1f} MiB")
    seconds = timed(**calls)
assert memory[8] < memory[32] < memory[None]
activation = 128 * BATCH * 256 * 4  # one hidden layer's output for all members, float32
print(f"one hidden activation for all 128 members: {activation / 2**20:.1f} MiB")
print(f"chunk_size=8 keeps {memory[None] / memory[8]:.1f}x less alive than no chunking")
print_measured(verdict(seconds["chunk_size=8"], seconds["chunk_size=None"], y_name="no chunking"))

# %%
# Without chunking, the peak is about two ``[members, batch, width]``
# activations (a layer's input and output), so it grows linearly with the
# number of members. ``chunk_size`` cuts it in proportion. Its effect on time
# depends on the device (the verdict is printed above): small chunks bring back
# per-call overhead, but can also fit a CPU's caches better.
#
# Summary
# -------
# * Vectorizing removes per-member overhead, not arithmetic: it pays where
#   many narrow members make the loop overhead-bound, and can lose where
#   there is nothing to batch (one member) or the loop is already
#   compute-bound (wide members on a CPU). The map and the lines above show
#   where each case falls on your device, and by how much.
# * How far ``Ensemble``'s batched-product path and raw ``vmap`` are from the
#   hand-written chain of products is printed above, with its spread.
# * The training step is compared the same way, by the verdicts printed above.
# * Peak memory is linear in the number of members; ``chunk_size`` trades time
#   for memory.
#
# Next steps
# ----------
# ``python -m ensembling.bench`` runs the full benchmark, with
# ``tensordict`` and ``torch.compile`` columns; the :ref:`API reference <api>`
# documents :class:`ensembling.Ensemble`.
