"""
Ensembling real architectures: transformers, LSTMs, BatchNorm CNNs
==================================================================

A small transformer classifier, an LSTM forecaster and a BatchNorm CNN,
each stacked into one :class:`ensembling.Ensemble`, checked against a loop of
separate models (outputs and every member's gradients), and timed against it
for inference and for a training step.

**What you will learn**

* which standard layers plain ``vmap(functional_call)`` cannot run, and what
  ``Ensemble`` does instead;
* how to check an ensemble of any architecture against the loop, outputs
  *and* gradients;
* how the loop and the ensemble compare per architecture, measured on the
  device that ran this page, and why recurrent layers behave differently.

**Prerequisites**: :ref:`sphx_glr_tutorials_2_in_practice_plot_04_training_an_ensemble.py`;
PyTorch 2.6 or newer. A GPU is optional.
"""

# %%
# Three members
# -------------
# Each is an ordinary ``nn.Module`` class, the kind you would train alone. The
# data are synthetic: token sequences, windows of a noisy sine wave and small
# images. Only the shapes matter here.
import re
import warnings

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state

import ensembling
from ensembling import Ensemble
from ensembling.tutorial import compare, print_measured, speedup, verdict

torch.manual_seed(0)
device = ensembling.default_device()
print_measured(f"running on {device}")
MEMBERS, BATCH = 8, 32


class TransformerClassifier(nn.Module):
    """Tokens [batch, 16] -> two encoder layers -> mean over positions -> 5 logits."""

    def __init__(self, vocab: int = 100, dim: int = 32, seq: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.empty(seq, dim))
        layer = nn.TransformerEncoderLayer(
            dim, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 5)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initializes the class's own parameter (Ensemble calls it to draw each member's)."""
        nn.init.normal_(self.position, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens) + self.position).mean(dim=1))


class LSTMForecaster(nn.Module):
    """A window [batch, 24, 1] of a series -> two LSTM layers -> the next value [batch, 1]."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.lstm = nn.LSTM(1, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(window)
        return self.head(out[:, -1])


class BatchNormCNN(nn.Module):
    """Images [batch, 1, 16, 16] -> two conv-BatchNorm-ReLU-pool blocks -> 10 logits."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(*self.block(1, 8), *self.block(8, 16))
        self.head = nn.Linear(16 * 4 * 4, 10)

    @staticmethod
    def block(c_in: int, c_out: int) -> list[nn.Module]:
        conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)  # BatchNorm adds the bias
        return [conv, nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).flatten(1))


steps = torch.arange(BATCH * 25, dtype=torch.float32).view(BATCH, 25)
series = torch.sin(0.3 * steps) + 0.1 * torch.randn(BATCH, 25)
setups = {  # name: (member class, a minibatch of inputs, targets)
    "transformer": (
        TransformerClassifier,
        torch.randint(0, 100, (BATCH, 16)),
        torch.randint(0, 5, (BATCH,)),
    ),
    "LSTM": (LSTMForecaster, series[:, :24, None], series[:, 24:]),
    "BatchNorm CNN": (BatchNormCNN, torch.randn(BATCH, 1, 16, 16), torch.randint(0, 10, (BATCH,))),
}
setups = {name: (cls, x.to(device), y.to(device)) for name, (cls, x, y) in setups.items()}


def loss_fn(name: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(output, target) if name == "LSTM" else F.cross_entropy(output, target)


# %%
# What plain ``vmap`` does with them
# ----------------------------------
# The recipe of the first tutorial, ``stack_module_state`` then
# ``vmap(functional_call)``, followed by a backward pass as in training. It
# works for the CNN. For the LSTM it fails: ``vmap`` has no batching rule for
# the fused kernel that runs a whole LSTM. For the transformer, what happens
# depends on the device: where ``vmap`` lacks a rule for a fused attention
# kernel it quietly runs the members one by one (it only warns), and in eval
# mode the encoder layer's fused "fast path" has no derivative under ``vmap``.
def plain_vmap(cls: type[nn.Module], x: torch.Tensor, train: bool) -> str:
    models = [cls().to(device).train(train) for _ in range(MEMBERS)]
    params, buffers = stack_module_state(models)
    base = cls().to("meta").train(train)
    run = lambda p, b, x: functional_call(base, (p, b), (x,))  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = torch.vmap(run, in_dims=(0, 0, None))(params, buffers, x)
            out.sum().backward()
        except RuntimeError as err:
            return "fails in " + re.search(r"aten::\w+", str(err)).group()
    loops = sorted(
        {
            re.search(r"aten::\w+", str(w.message)).group()
            for w in caught
            if "batching rule" in str(w.message)
        }
    )
    return (
        f"runs the members one by one in {loops}" if loops else f"works, output {list(out.shape)}"
    )


for name, (cls, x, _) in setups.items():
    show = (
        print_measured if name == "transformer" else print
    )  # the transformer's result depends on the device
    for train in (True, False):
        show(f"{name:13} {'train' if train else 'eval':5} mode: {plain_vmap(cls, x, train)}")

# %%
# ``Ensemble`` runs all three in both modes. Its members are the same modules,
# but inside the call it uses stand-ins for the layers ``vmap`` cannot batch:
# the LSTM's recurrence is unrolled over time, one batched matrix product per
# step for *all* members together (the same gate equations as the fused
# kernel), and attention runs on its unfused path (on a CPU, the math backend
# of ``scaled_dot_product_attention``), which is plain batched matrix products.
# No member is ever run on its own. Its repr says what runs: the path (``vmap``
# means one vmapped functional call of the member's architecture) and, after
# ``stand-ins:``, each layer that runs as something else inside that call, and
# what replaces it. An ensemble without a ``stand-ins:`` entry runs exactly what
# plain ``vmap`` would.
ensembles = {name: Ensemble(cls, MEMBERS).to(device) for name, (cls, _, _) in setups.items()}
for name, ens in ensembles.items():
    x = setups[name][1]
    for train in (True, False):
        assert ens.train(train)(x).shape[0] == MEMBERS
    print(f"{name:13} {ens.extra_repr()}")

# %%
# Checked against the loop
# ------------------------
# ``ens.unstack()`` gives the members back as ordinary modules running
# PyTorch's own kernels (a fused LSTM kernel: cuDNN on NVIDIA GPUs, oneDNN on
# most CPUs; the fused fast path for the transformer in eval mode). The
# ensemble must agree with them on the outputs in both modes, on the BatchNorm
# running statistics updated in training mode, and on each member's gradients.
for name, ens in ensembles.items():
    _, x, y = setups[name]
    tol = ensembling.tolerances(torch.float32, device, op="conv" if "CNN" in name else "matmul")
    for train in (False, True):
        members = ens.train(train).unstack()
        with torch.no_grad():
            expected = torch.stack([m(x) for m in members])
            torch.testing.assert_close(ens(x), expected, **tol)
        if train:  # the forward above updated the running statistics of both
            for key, stacked in ens.named_stacked_buffers().items():
                torch.testing.assert_close(
                    stacked, torch.stack([m.get_buffer(key) for m in members]), **tol
                )
    members = ens.unstack()  # train mode, current statistics
    ens.zero_grad()
    outputs = ens(x)
    sum(loss_fn(name, out, y) for out in outputs).backward()
    for m in members:
        loss_fn(name, m(x), y).backward()
    for key, stacked in ens.named_stacked_parameters().items():
        torch.testing.assert_close(
            stacked.grad, torch.stack([m.get_parameter(key).grad for m in members]), **tol
        )
    print(f"{name:13} outputs, statistics and gradients of all {MEMBERS} members match the loop")

# %%
# Can ``torch.compile`` take these ensembles whole? With ``fullgraph=True``
# any graph break raises. This page checks only the *capture*, in eval mode
# without gradients, with the ``"eager"`` backend, which runs the captured
# graph without generating code: the default backend (inductor), training
# mode and gradients are not checked here, because compiling them takes tens
# of seconds per model on a small CPU.
captured = []
for name, ens in ensembles.items():
    x = setups[name][1]
    compiled = torch.compile(ens.eval(), backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), ens(x))
    captured.append(name)
print(f"eval-mode forward captured as one graph, same outputs: {', '.join(captured)}")


# %%
# Timing: the loop against the ensemble
# -------------------------------------
# Forward passes in eval mode without gradients, then a full training step:
# forward, the loss, backward and an Adam step (one optimizer per member for
# the loop, one for the ensemble, which updates each member exactly as its own
# optimizer would). The loop's forward stacks its members' outputs, which is
# what the ensemble returns. The loop and the ensemble are timed in alternation, five
# rounds each (:func:`ensembling.tutorial.compare`), and each comparison is
# worded from the spread over the rounds.
def timed(loop, ensemble) -> dict:
    return compare({"loop": loop, "Ensemble": ensemble}, device=device, min_run_time=0.1, rounds=5)


results = {}
for name, ens in ensembles.items():
    _, x, y = setups[name]
    members = ens.unstack()
    with torch.no_grad():
        ens.eval()
        for m in members:
            m.eval()
        forward = timed(lambda: torch.stack([m(x) for m in members]), lambda: ens(x))
    ens.train()
    member_opts = []
    for m in members:
        m.train()
        member_opts.append(torch.optim.Adam(m.parameters(), lr=1e-3))
    ens_opt = torch.optim.Adam(ens.parameters(), lr=1e-3)

    def loop_step():
        for m, opt in zip(members, member_opts):
            opt.zero_grad()
            loss_fn(name, m(x), y).backward()
            opt.step()

    def ensemble_step():
        ens_opt.zero_grad()
        sum(loss_fn(name, out, y) for out in ens(x)).backward()
        ens_opt.step()

    results[name] = {"forward": forward, "training step": timed(loop_step, ensemble_step)}
    for what, t in results[name].items():
        print_measured(f"{name:13} {what:13}: loop {t['loop']}, Ensemble {t['Ensemble']}")
        print_measured(f"  {verdict(t['Ensemble'], t['loop'], y_name='the loop')}")

# %%
# Off the fast path, an ensemble's first calls with a new input signature
# alternate two strategies, ``vectorized`` (``vmap`` with the stand-ins) and
# ``loop`` (the members back to back through torch's own fused kernels), and
# keep the faster for that signature; the choice is measured again after 50,
# 200, 800, ... more calls (later where the two measured far apart, so that a
# check's calls of the slower one cost at most 5 % of the time in between), in
# case the machine got busier or quieter.
# :meth:`~ensembling.Ensemble.plan` shows what was measured and chosen on this
# machine:
for name, ens in ensembles.items():
    for line in ens.plan().splitlines():
        print_measured(line)

# %%
# Bars above 1 mean the ensemble is faster than the loop; each bar is the
# median over the rounds, its thin line the range of the middle 80% of them.
ratios = {
    (n, w): speedup(t["Ensemble"], t["loop"]) for n, v in results.items() for w, t in v.items()
}
fig, ax = plt.subplots(figsize=(7, 3), layout="constrained")
names = list(results)
for k, what in enumerate(["forward", "training step"]):
    r = [ratios[n, what] for n in names]
    spread = [[q.value - q.low for q in r], [q.high - q.value for q in r]]
    xs = [i + 0.38 * k for i in range(len(names))]
    bars = ax.bar(xs, [q.value for q in r], width=0.36, label=what, yerr=spread)
    ax.bar_label(bars, fmt="%.2fx", fontsize=8, label_type="center")
ax.axhline(1, color="black", linewidth=0.8)
ax.set_xticks([i + 0.19 for i in range(len(names))], names)
ax.set_ylabel("loop time / Ensemble time")
ax.set_ylim(0, 1.15 * max(q.high for q in ratios.values()))
ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
plt.show()

# %%
# Reading the measurements, computed from them:
verdicts = {
    key: verdict(results[key[0]][key[1]]["Ensemble"], results[key[0]][key[1]]["loop"])
    for key in ratios
}
for word, subject in [
    ("faster", "the ensemble is faster"),
    ("slower", "the ensemble is slower"),
    ("too close to call", "the two are too close to call"),
]:
    cases = [f"{n} {w}" for (n, w), text in verdicts.items() if word in text]
    print_measured(f"{subject} in {len(cases)} of {len(ratios)} measurements: {cases}")
forward = {n: ratios[n, "forward"] for n in names}
least = min(forward, key=lambda n: forward[n].value)
clear = all(forward[least].high < forward[n].low for n in names if n != least)
print_measured(
    f"the forward pass gains least for the {least} ({forward[least].value:.2f}x), "
    + ("clear of the others' spread" if clear else "but within the others' spread")
)

# %%
# Why the results differ. Vectorizing removes per-member *overhead*: Python,
# dispatch, kernel launches, and one optimizer update per member in the
# training step. It does not remove arithmetic. When each member's layers
# already keep the device busy (a CPU with a few cores and a batch of 32), the
# loop can be hard to beat. Fused inference kernels, like the transformer's
# eval-mode fast path and the LSTM's single-kernel recurrence, can make the
# loop faster still. The training step has more overhead to remove: the backward
# pass and the optimizer. Where launches are expensive and members are many
# (a GPU, dozens of members), the ensemble can be expected to gain the most:
# that follows from the same reasoning, but is not measured on this page
# unless a GPU ran it.
#
# The LSTM is a special case. In the loop, each member runs the whole
# sequence in one fused kernel (cuDNN on NVIDIA GPUs, oneDNN on most CPUs).
# Run ``vectorized``, the ensemble takes one time step at a time, ``24 x 2``
# steps of about ten batched operations each; where that measures slower, the
# plan above shows ``loop``: the members then run torch's fused kernel one
# after another, and the remaining cost is the per-member call and stacking
# the outputs. To cut the vectorized per-step overhead, you can try
# ``torch.compile(ens)`` with its default backend and time it as above (advice,
# not measured on this page; the compile check above used the ``"eager"``
# backend); ``python -m ensembling.bench --sections zoo`` measures more
# architectures.
#
# Summary
# -------
# * ``stack_module_state`` + ``vmap(functional_call)`` fails on LSTMs, GRUs
#   and RNNs (no batching rule for their fused kernels), and on transformer
#   layers it fails in eval mode or silently loops over members, depending on
#   the device.
# * ``Ensemble`` runs them with vectorized stand-ins (or, where that measures
#   slower, one member after another through torch's own kernels: see
#   ``plan()``), with the loop's outputs, running statistics and gradients, as
#   the checks above assert; the members
#   you get back with ``ens[i]`` or ``unstack()`` are the ordinary modules.
# * ``torch.compile(..., fullgraph=True)`` captured each ensemble's eval-mode
#   forward as one graph (checked with the ``"eager"`` backend; inductor,
#   training mode and gradients are not checked on this page).
# * Whether vectorizing pays depends on the architecture and the device:
#   measure it, as this page did.
#
# Next steps
# ----------
# :ref:`sphx_glr_tutorials_3_scaling_out_plot_09_sharding_members.py` spreads
# members across processes or GPUs; the :ref:`API reference <api>` documents
# :class:`ensembling.Ensemble`.
