"""Which strategy runs an input signature: measured on its first calls, and measured again now and then.

With ``strategy="auto"`` the :class:`Planner` measures two candidates
(``vectorized`` and ``loop`` for members off the fast path; the fast path's two
activation layouts under autograd) on the first calls of each input signature
(shapes, dtypes, device, train/eval, grad mode, ...): the calls alternate
candidates, each is timed on the device (a training call from its start to the
start of the next call of the same signature, so the backward pass and the
optimizer step count too), and the faster is kept for that signature.

A choice is measured again after 50 more calls of its signature, then after
200, 800, ... (each interval four times the last), so a choice made while the
machine was busy does not stay wrong for a whole training run. Where the two
measured far apart the check waits longer: its calls of the slower candidate
may cost at most 5 % of the time the calls since the last check took (a loop
10x slower than vmap is measured again after 900 calls, not 50). Every
measured call is a real call with a real answer, so measuring changes no state
the loop would not change. Under :func:`torch.compile` nothing is measured: the
cached or forced choice runs, ``"vectorized"`` by default.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

from ._device import synchronize

__all__ = ["SCALARS", "Plan", "Planner", "describe_call", "measured", "signature"]

_WARMUP, _SAMPLES = 1, 4  # per strategy and signature: calls not timed, then calls timed (the fastest counts)
_RECHECK_FIRST, _RECHECK_GROWTH = 50, 4  # steady calls before a choice is measured again; the interval's growth
# ... and never sooner than the measured margin allows: measuring again runs the slower strategy for
# _WARMUP + _SAMPLES calls, and that extra time may be at most this share of the steady calls' time.
_RECHECK_SHARE = 0.05
SCALARS = (type(None), bool, int, float, str, torch.dtype, torch.device)  # non-tensor leaves a loop can carry


def _describe(value: Any) -> Any:
    if isinstance(value, Tensor):
        return (tuple(value.shape), value.dtype, value.device)
    return value if isinstance(value, SCALARS) else type(value).__qualname__


def signature(args: tuple[Any, ...], kwargs: dict[str, Any], dims: Any, kw_dims: Any, extra: tuple[Any, ...]) -> Any:
    """What a plan depends on: every input's shape, dtype and device (or value), the split dims and ``extra``."""
    if not kwargs and all(isinstance(a, Tensor) for a in args) and all(d is None or type(d) is int for d in dims):
        return (tuple((a.shape, a.dtype, a.device) for a in args), dims, extra)  # the common case, quickly
    leaves, spec = tree_flatten((args, kwargs))
    key = (spec, tuple(_describe(leaf) for leaf in leaves), repr(dims), repr(sorted(kw_dims.items())), extra)
    return key


@dataclass
class Plan:
    """One input signature's choice, and the measurements it was made from (seconds per call)."""

    description: str
    choice: str | None = None  # None while measuring
    names: tuple[str, str] = ("vectorized", "loop")  # the two candidates; the first is the default
    times: dict[str, list[float]] = field(default_factory=dict)
    calls: int = 0
    pending: tuple[str, float] | None = None  # a training call's strategy and start, timed until the next call
    steady: int = 0  # calls since the choice was made
    recheck_after: float = float("inf")  # steady calls before measuring again; set when a measurement decides
    previous: str | None = None  # the choice being measured again
    checks: int = 0  # how many times the choice was measured again

    def settled(self) -> str | None:
        """The choice for this call; None while measuring, or when it is due to be measured again (from now)."""
        if self.choice is None or self.pending is not None:
            return None
        self.steady += 1
        if self.steady <= self.recheck_after:
            return self.choice
        # Conditions may have changed since the choice (load, threads, data): measure both again.
        self.previous, self.choice, self.calls, self.steady = self.choice, None, 0, 0
        self.times = {name: [] for name in self.names}
        self.checks += 1
        return None

    def summary(self) -> str:
        def best(ts: list[float]) -> str:  # the fastest timed call, after the warm-up ones
            return f"{min(ts[_WARMUP:] or ts) * 1e3:.3g} ms"

        measured = ", ".join(f"{name} {best(ts)}" for name, ts in self.times.items() if ts)
        state = self.choice or (f"{self.previous}, measuring again" if self.previous else "measuring")
        return f"{self.description} -> {state}" + (f" (measured: {measured})" if measured else "")


class Planner:
    """Per input signature, which strategy runs the members; measured (and re-measured) when ``strategy="auto"``."""

    def __init__(self) -> None:
        self.plans: dict[Any, Plan] = {}

    def choose(
        self, key: Any, describe: Callable[[], str], measurable: bool, names: tuple[str, str] = ("vectorized", "loop")
    ) -> tuple[str, Plan | None]:
        """The candidate for this call of signature ``key``, and its plan if the call is to be timed."""
        plan = self.plans.get(key)
        if plan is None:
            plan = Plan(describe(), choice=None if measurable else names[0], names=names, times={n: [] for n in names})
            self.plans[key] = plan  # (a choice not measured, as here, is never measured again)
        if plan.pending is not None:  # the previous training call of this signature ends here
            name, start = plan.pending
            plan.times[name].append(time.perf_counter() - start)
            plan.pending = None
            _decide(plan)
        if plan.choice is not None:
            return plan.choice, None
        plan.calls += 1
        return plan.names[0 if plan.calls % 2 else 1], plan

    def forget_pending(self) -> None:
        """Another signature ran in between: the open interval would time both, so it is dropped."""
        for plan in self.plans.values():
            plan.pending = None

    def describe(self) -> list[str]:
        return [plan.summary() for plan in self.plans.values()]


def _decide(plan: Plan) -> None:
    """Choose once both candidates have been timed enough, and when to measure the choice again.

    The next check comes after 50, 200, 800, ... steady calls (one interval per
    check so far), or later where the two measured far apart: the slower
    candidate's extra time during a check, ``_WARMUP + _SAMPLES`` calls of it,
    stays within ``_RECHECK_SHARE`` of the time the steady calls since the
    previous check took. A 10x slower loop is then measured again after 900
    calls, not 50 (where its 5 calls would double the average cost per call).
    """
    interval = _RECHECK_FIRST * _RECHECK_GROWTH**plan.checks
    if all(len(ts) >= _WARMUP + _SAMPLES for ts in plan.times.values()):
        # Other programs only ever slow a call down: the fastest timed call is the least disturbed estimate.
        best = {name: min(plan.times[name][_WARMUP:]) for name in plan.names}
        plan.choice = min(plan.names, key=best.__getitem__)
        fastest, slowest = min(best.values()), max(best.values())
        if fastest > 0:
            extra = (_WARMUP + _SAMPLES) * (slowest - fastest) / fastest  # in calls of the choice
            interval = max(interval, math.ceil(extra / _RECHECK_SHARE))
    elif plan.calls > 4 * (_WARMUP + _SAMPLES):  # intervals kept being interrupted: keep what ran, or the default
        plan.choice = plan.previous or plan.names[0]
    if plan.choice is not None:
        plan.recheck_after = interval


def measured(plan: Plan | None, name: str, runners: dict[str, Callable[[], Any]], device: torch.device) -> Any:
    """Run candidate ``name``; while ``plan`` is measuring, time the call (a training call: until the next one)."""
    if plan is None:
        return runners[name]()
    synchronize(device)
    start = time.perf_counter()
    out = runners[name]()
    leaves = tree_flatten(out)[0]
    if plan.calls == 1 and any(not isinstance(x, (Tensor, *SCALARS)) for x in leaves):
        plan.choice = plan.names[0]  # outputs the loop could not stack (objects such as caches): never measured again
    elif torch.is_grad_enabled() and any(isinstance(x, Tensor) and x.requires_grad for x in leaves):
        plan.pending = (name, start)  # timed until the next call: backward and optimizer step included
    else:
        synchronize(device)
        plan.times[name].append(time.perf_counter() - start)
        _decide(plan)
    return out


def describe_call(args: tuple[Any, ...], kwargs: dict[str, Any], dims: Any, kw_dims: Any, extra: tuple) -> str:
    """A signature in words: ``x: [8, 1, 28, 28] float32 cpu (shared), eval, no grad``."""

    def word(value: Any, dim: Any) -> str:
        tensors = [leaf for leaf in tree_flatten(value)[0] if isinstance(leaf, Tensor)]
        if not tensors:
            return type(value).__name__
        t = tensors[0]
        how = "shared" if dim is None else f"split on dim {dim}"
        return f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')} {t.device} ({how})"

    words = [word(a, d) for a, d in zip(args, dims)]
    words += [f"{k}={word(v, kw_dims.get(k))}" for k, v in kwargs.items()]
    training, grad = extra[0], extra[1]
    return f"({', '.join(words)}), {'train' if training else 'eval'}, {'grad' if grad else 'no grad'}"
