"""Benchmark section ``sweep``: a hyperparameter sweep in one run versus one configuration at a time.

Two tables, every pair timed in alternating rounds by
:func:`ensembling.tutorial.compare` (so background load hits both alike):

* **training steps per second** of 16 and 64 configurations of an MLP (each
  with its own learning rate and weight decay): one :class:`~ensembling.Ensemble`
  with :class:`ensembling.optim.AdamW` versus the sequential sweep, one model
  and one ``torch.optim.AdamW`` per configuration (a "step" updates every
  configuration once);
* the **optimizer step alone** over the same stacked parameters: the
  per-member-values ``AdamW`` versus torch's foreach ``AdamW`` with one lr
  (and torch's fused one, for reference); the issue's target is a ratio of at
  most 1.15x to foreach.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ._bench_common import mlp, table
from ._ensemble import Ensemble
from .optim import AdamW
from .tutorial.timing import Timing, compare, format_seconds, speedup

__all__ = ["run"]


def _table(title: str, header: list[str], rows: list[list[str]]) -> list[str]:
    return table(title, header, rows).split("\n")


def _spread(t: Timing) -> str:
    return f"{1 / t.median:.1f}/s ({1 / t.high:.1f}-{1 / t.low:.1f})"


def _training(device: torch.device, configs: int, in_features: int, hidden: int, batch: int, min_run_time: float):
    torch.manual_seed(0)
    lrs = torch.logspace(-4, -1, configs)
    wds = torch.linspace(0, 0.1, configs)
    ens = Ensemble(lambda: mlp(in_features, hidden), configs).to(device)
    opt = AdamW(ens.parameters(), lr=lrs, weight_decay=wds)
    models = [m.to(device) for m in copy.deepcopy(ens).unstack()]
    opts = [
        torch.optim.AdamW(m.parameters(), lr=lrs[i].item(), weight_decay=wds[i].item()) for i, m in enumerate(models)
    ]
    xs = torch.randn(configs, batch, in_features, device=device)
    ys = torch.randint(0, 10, (configs, batch), device=device)

    def one_run() -> None:
        opt.zero_grad(set_to_none=True)
        logits = ens(xs, in_dims=0)  # [configs, batch, 10]
        F.cross_entropy(logits.flatten(0, 1), ys.flatten(), reduction="none").view(configs, batch).mean(
            1
        ).sum().backward()
        opt.step()

    def sequential() -> None:
        for k, (model, o) in enumerate(zip(models, opts)):
            o.zero_grad(set_to_none=True)
            F.cross_entropy(model(xs[k]), ys[k]).backward()
            o.step()

    return compare({"one run": one_run, "sequential": sequential}, device=device, min_run_time=min_run_time)


def _optimizer_step(device: torch.device, configs: int, in_features: int, hidden: int, min_run_time: float):
    torch.manual_seed(0)
    ens = Ensemble(lambda: mlp(in_features, hidden), configs).to(device)
    stacks = {
        name: [p.detach().clone().requires_grad_(True) for p in ens.parameters()]
        for name in ("ours", "foreach", "fused")
    }
    for params in stacks.values():
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
    candidates = {
        "per-member AdamW": AdamW(
            stacks["ours"], lr=torch.logspace(-5, -3, configs), weight_decay=torch.linspace(0, 0.1, configs)
        ),
        "torch AdamW foreach": torch.optim.AdamW(stacks["foreach"], lr=1e-4, weight_decay=0.05, foreach=True),
    }
    try:
        candidates["torch AdamW fused"] = torch.optim.AdamW(stacks["fused"], lr=1e-4, weight_decay=0.05, fused=True)
    except (RuntimeError, ValueError):
        pass  # no fused kernel on this device
    return compare({k: o.step for k, o in candidates.items()}, device=device, min_run_time=min_run_time)


def run(device: torch.device, quick: bool) -> list[str]:
    """The sweep section's tables, as lines to print."""
    min_run_time = 0.3 if quick else 1.0
    rows = []
    for configs in (16, 64):
        t = _training(device, configs, 64, 128, 64, min_run_time)
        r = speedup(t["one run"], t["sequential"])
        rows.append([str(configs), "64-128-128-10", "64", _spread(t["sequential"]), _spread(t["one run"]),
                     f"{r.value:.2f}x ({r.low:.2f}-{r.high:.2f})"])  # fmt: skip
    out = _table(
        "Hyperparameter sweep (AdamW, per-configuration lr and weight decay): training steps per second "
        "(one step = every configuration once; 10th-90th percentile over alternating rounds)",
        ["configs", "MLP", "batch", "sequential", "one run", "one run speedup"], rows,
    )  # fmt: skip
    rows = []
    for configs, in_features, hidden in ((16, 64, 128), (64, 784, 128)):
        t = _optimizer_step(device, configs, in_features, hidden, min_run_time)
        ours, foreach = t["per-member AdamW"], t["torch AdamW foreach"]
        r = speedup(foreach, ours)  # ours' time / foreach's time
        fused = t.get("torch AdamW fused")
        rows.append([str(configs), f"{in_features}-{hidden}-{hidden}-10", format_seconds(foreach.median),
                     format_seconds(ours.median), f"{r.value:.2f}x ({r.low:.2f}-{r.high:.2f})",
                     format_seconds(fused.median) if fused else "-"])  # fmt: skip
    out += _table(
        "Optimizer step over the same stacked parameters: ensembling.optim.AdamW (a lr and weight decay per member) "
        "vs torch.optim.AdamW (one lr); ratio = per-member time / foreach time (target <= 1.15x)",
        ["members", "MLP", "torch foreach", "per-member", "ratio", "torch fused"], rows,
    )  # fmt: skip
    return out


if __name__ == "__main__":
    from ._device import default_device

    print("\n".join(run(default_device(), quick=True)))
