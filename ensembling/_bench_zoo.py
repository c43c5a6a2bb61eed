"""Benchmark section ``zoo``: real architectures, a loop of modules versus one ``Ensemble``.

For each architecture of :func:`zoo_configs` and each member count (4, 16
and 64 by default): forward in eval mode without grad, and a training step
(forward, backward, Adam). Loop and ``Ensemble`` are timed in alternating
rounds by :func:`ensembling.tutorial.compare` (single-threaded, so background
load falls on both alike), and the ratio loop time / ``Ensemble`` time is the
median of the per-round ratios (above 1: ``Ensemble`` is faster). The loop's
forward stacks the members' outputs, as ``Ensemble`` returns them (for large
outputs the copy is a few percent of a forward pass). The
``plan`` columns say what ran: ``baddbmm`` (the fast path), ``vectorized``
(``vmap``) or ``loop`` (members back to back through torch's own kernels), as
chosen by ``Ensemble``'s measurement of its first calls (``ens.plan()``),
which is settled before the timing starts.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ._bench_common import CustomMLP, mlp, table
from ._device import tolerances
from ._ensemble import Ensemble
from ._loss import ensemble_loss
from ._strategy import stack_outputs
from .tutorial.timing import compare, format_seconds, speedup

__all__ = ["MEMBER_COUNTS", "zoo", "zoo_configs"]

MEMBER_COUNTS = (4, 16, 64)
_SETTLE_CALLS = 14  # more than the calls Ensemble measures a new input signature over


def _bench_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    )  # fmt: skip


def zoo_configs() -> dict[str, tuple[Callable[[], nn.Module], Callable[..., tuple[torch.Tensor, ...]]]]:
    """The zoo section's architectures at benchmark sizes, each with its input maker (see ``_zoo``)."""
    from . import _zoo

    def attention_inputs(lead: tuple[int, ...], batch: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        return (torch.randn(*lead, batch, 16, 32, generator=gen),) * 3

    return {
        "custom MLP 32-64-64-10": (lambda: CustomMLP(mlp(32, 64)), _zoo.normal_inputs(32)),
        "BatchNorm CNN 16x16": (_bench_cnn, _zoo.normal_inputs(1, 16, 16)),
        "transformer classifier": (
            lambda: _zoo.TransformerClassifier(vocab=100, dim=32, heads=4, layers=2, seq=16, classes=5),
            _zoo.token_inputs(16, 100),
        ),
        "multihead attention": (lambda: nn.MultiheadAttention(32, 4, batch_first=True), attention_inputs),
        "LSTM forecaster": (lambda: _zoo.LSTMForecaster(features=1, hidden=32, layers=2), _zoo.sequence_inputs(24, 1)),
        "GRU bidirectional": (lambda: nn.GRU(8, 32, batch_first=True, bidirectional=True), _zoo.sequence_inputs(24, 8)),
        "embedding bag-of-words": (
            lambda: _zoo.EmbeddingBagOfWords(vocab=1000, dim=32, classes=5),
            _zoo.token_inputs(16, 1000),
        ),
    }


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _latest_choice(ens: Ensemble) -> str:
    """What ran the ensemble's latest input signature: ``baddbmm``, ``vectorized``, ``loop`` or ``vmap``."""
    planner = ens.__dict__.get("_planner")  # absent before the strategy planner existed: plain vmap
    plans = list(planner.plans.values()) if planner is not None else []
    if "path=baddbmm" in ens.extra_repr():  # with autograd, the activation layout is measured too
        last = plans[-1] if plans else None
        layout = (last.choice or last.previous) if last and last.description.startswith("baddbmm") else None
        return f"baddbmm ({layout})" if layout and torch.is_grad_enabled() else "baddbmm"
    return (plans[-1].choice or plans[-1].previous or "measuring") if plans else "vmap"


def _settle(fn: Callable[[], Any]) -> None:
    """Run ``fn`` as the timing will (one thread), until the ensemble has measured and fixed its plan."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(_SETTLE_CALLS):
            fn()
    finally:
        torch.set_num_threads(threads)


def _one(name: str, factory: Callable, make_inputs: Callable, members: int, batch: int, device, min_run_time):
    """Forward and training-step timings of one architecture at one member count: a table row."""
    torch.manual_seed(0)
    models = [factory().to(device) for _ in range(members)]
    ens = Ensemble.from_modules(models)
    args = tuple(a.to(device) for a in make_inputs((), batch, torch.Generator().manual_seed(0)))
    tol = tolerances(torch.float32, device, op="conv" if "CNN" in name else "matmul")
    for m in (*models, ens):
        m.eval()
    with torch.no_grad():
        expected = torch.stack([_first(m(*args)) for m in models])
        torch.testing.assert_close(_first(ens(*args)), expected, **tol, msg=lambda m: f"{name}: {m}")
        _settle(lambda: ens(*args))
        forward_plan = _latest_choice(ens)
        loop = lambda: stack_outputs([m(*args) for m in models])  # noqa: E731  (Ensemble's output: stacked)
        fwd = compare({"loop": loop, "Ensemble": lambda: ens(*args)},
                      device=device, min_run_time=min_run_time)  # fmt: skip
    for m in (*models, ens):
        m.train()
    fused = {"fused": True} if device.type in ("cpu", "cuda", "mps") else {}
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-3, **fused) for m in models]
    ens_opt = torch.optim.Adam(ens.parameters(), lr=1e-3, **fused)

    def loop_step() -> None:
        for model, opt in zip(models, optimizers):
            opt.zero_grad(set_to_none=True)
            _first(model(*args)).square().mean().backward()
            opt.step()

    def ensemble_step() -> None:
        ens_opt.zero_grad(set_to_none=True)
        ensemble_loss(_first(ens(*args)).square()).backward()  # [members, ...]: each member's mean, summed
        ens_opt.step()

    _settle(ensemble_step)
    step_plan = _latest_choice(ens)
    step = compare({"loop": loop_step, "Ensemble": ensemble_step}, device=device, min_run_time=min_run_time)
    ratio_fwd, ratio_step = speedup(fwd["Ensemble"], fwd["loop"]), speedup(step["Ensemble"], step["loop"])
    return [name, str(members), format_seconds(fwd["loop"].median), format_seconds(fwd["Ensemble"].median),
            f"{ratio_fwd.value:.2f}", forward_plan, format_seconds(step["loop"].median),
            format_seconds(step["Ensemble"].median), f"{ratio_step.value:.2f}", step_plan]  # fmt: skip


def zoo(device: torch.device, min_run_time: float, members: tuple[int, ...] = MEMBER_COUNTS, batch: int = 32) -> str:
    """Loop versus Ensemble for real architectures at each member count: a table (see the module docstring)."""

    header = ["architecture", "members", "loop fwd", "Ens fwd", "loop/Ens fwd", "fwd plan",
              "loop step", "Ens step", "loop/Ens step", "step plan"]  # fmt: skip
    rows = []
    for name, (factory, make_inputs) in zoo_configs().items():
        for n in members:
            rows.append(_one(name, factory, make_inputs, n, batch, device, min_run_time))
            print(f"  zoo {name} x{n} done", file=sys.stderr, flush=True)
    return table(
        f"Real architectures, batch {batch}: a loop of modules vs one Ensemble (forward in eval mode without "
        "grad; training step = forward + backward + Adam); loop/Ens = median of per-round ratios, above 1: "
        "Ensemble faster; plan = what Ensemble ran",
        header, rows,
    )  # fmt: skip
