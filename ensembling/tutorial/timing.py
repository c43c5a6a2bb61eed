"""Timing helpers for the tutorials and the benchmark: measured live, side by side, with their spread.

A page that claims "X is faster than Y" must be right on the reader's machine,
even one busy with other work. So candidates are timed **in alternation**,
round after round (a burst of background load hits all of them alike), each
round long enough to be measured reliably, and the spread over the rounds is
kept. :func:`verdict` turns two timings into a sentence computed from the
numbers and that spread, and says "too close to call" when the spread does
not separate them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.utils import benchmark

from .._device import synchronize

__all__ = [
    "MEASURED_PREFIX",
    "Ratio",
    "Timing",
    "compare",
    "format_ratio",
    "format_seconds",
    "measure",
    "print_measured",
    "speedup",
    "verdict",
]

#: Every printed line whose content depends on the machine (timings, device
#: names, ratios) starts with this prefix. The notebook check replaces the rest
#: of such a line with a placeholder (see ``notebooks/nbval_sanitize.cfg``); every
#: other line is compared exactly.
MEASURED_PREFIX = "on this machine: "

#: The quantiles kept as a timing's or a ratio's low and high ends (10th and 90th percentiles).
_LOW, _HIGH = 0.1, 0.9


def _quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of a non-empty sequence (``q`` in [0, 1])."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


@dataclass(frozen=True)
class Timing:
    """The result of timing one callable.

    Attributes
    ----------
    label : str
        What was timed.
    median : float
        Median over the rounds of the seconds per call.
    iqr : float
        Interquartile range of the per-round seconds per call.
    runs : int
        How many rounds (timed blocks) the median is taken over.
    samples : tuple of float, default ()
        Seconds per call in each round, in round order; :func:`compare` fills it,
        and :func:`speedup` pairs the rounds of two timings made together.

    Examples
    --------
    >>> t = Timing("loop", median=0.0021, iqr=0.0001, runs=12)
    >>> str(t)  # the median, with a readable unit
    '2.10 ms'
    >>> t = Timing.from_samples("vmap", [1e-3, 3e-3, 2e-3])
    >>> t.median, t.runs
    (0.002, 3)
    """

    label: str
    median: float
    iqr: float
    runs: int
    samples: tuple[float, ...] = ()

    @classmethod
    def from_samples(cls, label: str, samples: Sequence[float]) -> Timing:
        """A Timing from per-round seconds per call (at least one)."""
        if not samples:
            raise ValueError(f"Timing.from_samples: {label!r} has no samples; time at least one round")
        iqr = _quantile(samples, 0.75) - _quantile(samples, 0.25)
        return cls(label, statistics.median(samples), iqr, len(samples), tuple(samples))

    @property
    def low(self) -> float:
        """The 10th percentile of the per-round times (the median when there are no samples)."""
        return _quantile(self.samples, _LOW) if self.samples else self.median

    @property
    def high(self) -> float:
        """The 90th percentile of the per-round times (the median when there are no samples)."""
        return _quantile(self.samples, _HIGH) if self.samples else self.median

    def __str__(self) -> str:
        return format_seconds(self.median)


def format_seconds(seconds: float) -> str:
    """Format a duration with a unit that keeps three significant digits.

    Examples
    --------
    >>> format_seconds(0.0123)
    '12.3 ms'
    >>> format_seconds(4.5e-6)
    '4.50 us'
    """
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9)):
        if seconds >= scale or unit == "ns":
            value = seconds / scale
            decimals = 0 if value >= 100 else 1 if value >= 10 else 2
            return f"{value:.{decimals}f} {unit}"
    raise AssertionError("unreachable")


def format_ratio(ratio: float) -> str:
    """Format a ratio with two significant digits, or more where rounding would hide a difference from 1.

    Examples
    --------
    >>> format_ratio(2.61), format_ratio(0.947), format_ratio(1.496), format_ratio(13.4)
    ('2.6x', '0.95x', '1.5x', '13x')
    >>> format_ratio(1.04), format_ratio(1.0), format_ratio(1.000004), format_ratio(0.9999996)
    ('1.04x', '1.0x', '1.000004x', '0.9999996x')
    """
    if ratio >= 10:
        return f"{ratio:.0f}x"
    decimals = 1 if ratio >= 1 else 2
    # 1.04 must not read as 1.0, nor 0.996 as 1.00: a verdict's words follow the unrounded
    # values, so a range end that is not 1 never prints as 1 (up to double precision).
    while ratio != 1 and float(f"{ratio:.{decimals}f}") == 1 and decimals < 17:
        decimals += 1
    return f"{ratio:.{decimals}f}x"


@dataclass(frozen=True)
class Ratio:
    """How many times faster one timing is than another, with its spread.

    Attributes
    ----------
    value : float
        The median speedup (the other's time / this one's time): above 1 it is faster.
    low, high : float
        The 10th and 90th percentiles of the speedup over the rounds.
    rounds : int
        How many rounds it is computed from.
    paired : bool
        True when the two were timed in the same rounds (:func:`compare`) and
        the speedup was computed round by round; False when it comes from the
        two timings' own spreads (a wider, conservative range).

    Examples
    --------
    >>> r = Ratio(value=2.5, low=2.2, high=2.9, rounds=10, paired=True)
    >>> format_ratio(r.value), r.low > 1  # faster even in the slowest tenth of the rounds
    ('2.5x', True)
    """

    value: float
    low: float
    high: float
    rounds: int
    paired: bool


def speedup(x: Timing, y: Timing) -> Ratio:
    """How many times faster ``x`` is than ``y`` (``y``'s time / ``x``'s time), with its spread.

    When both were timed together by :func:`compare` (same number of rounds),
    the ratio is taken round by round, so a burst of background load that
    slowed one round of both cancels out. Otherwise the range is the
    conservative ``y.low / x.high`` to ``y.high / x.low``.

    Parameters
    ----------
    x, y : Timing
        The two timings, ideally from one :func:`compare` call.

    Returns
    -------
    Ratio

    Examples
    --------
    >>> fast = Timing.from_samples("vmap", [1.0, 1.0, 2.0])  # a busy third round
    >>> slow = Timing.from_samples("loop", [2.0, 2.0, 4.0])
    >>> speedup(fast, slow)
    Ratio(value=2.0, low=2.0, high=2.0, rounds=3, paired=True)
    """
    if x.samples and len(x.samples) == len(y.samples):
        ratios = [b / a for a, b in zip(x.samples, y.samples)]
        return Ratio(
            statistics.median(ratios),
            _quantile(ratios, _LOW),
            _quantile(ratios, _HIGH),
            len(ratios),
            True,
        )
    return Ratio(y.median / x.median, y.low / x.high, y.high / x.low, min(x.runs, y.runs), False)


def verdict(
    x: Timing,
    y: Timing,
    *,
    x_name: str | None = None,
    y_name: str | None = None,
    margin: float = 1.05,
) -> str:
    """A sentence comparing ``x`` with ``y``, computed from the two timings and their spread.

    ``x`` is called faster only when its whole speedup range (see
    :func:`speedup`: the 10th to the 90th percentile over the rounds) lies
    above 1 *and* its median exceeds ``margin``; slower only when the range
    lies below 1 and the median is below ``1 / margin``. Otherwise the two are
    "too close to call": the range straddles 1, or the median differs from 1
    by less than the margin; the sentence then gives the median and the range.
    The thresholds apply to the unrounded values, and the printed numbers
    always agree with the words.

    Parameters
    ----------
    x, y : Timing
        The two timings, ideally from one :func:`compare` call.
    x_name, y_name : str, optional
        How to name them in the sentence (default: their labels).
    margin : float, default 1.05
        The smallest speedup worth a "faster" (and its inverse for "slower").

    Returns
    -------
    str
        ``"<x> is 2.6x faster than <y> (2.4x to 2.8x over 10 rounds)"``,
        ``"<x> is 1.5x slower than <y> (...)"`` or
        ``"<x> vs <y>: too close to call (speedup 0.97x, 0.92x to 1.1x over 10 rounds)"``.

    Examples
    --------
    >>> loop = Timing.from_samples("loop", [4.0, 4.2, 3.9, 8.0])
    >>> vmap = Timing.from_samples("vmap", [1.5, 1.6, 1.4, 3.1])  # a busy 4th round, for both
    >>> verdict(vmap, loop)
    'vmap is 2.6x faster than loop (2.6x to 2.8x over 4 rounds)'
    >>> verdict(loop, vmap, x_name="the loop")
    'the loop is 2.6x slower than vmap (2.6x to 2.7x over 4 rounds)'
    >>> verdict(Timing.from_samples("a", [1.0, 1.1]), Timing.from_samples("b", [1.1, 1.0]))
    'a vs b: too close to call (speedup 1.005x, 0.93x to 1.1x over 2 rounds)'
    """
    x_name = x.label if x_name is None else x_name
    y_name = y.label if y_name is None else y_name
    r = speedup(x, y)
    over = f"over {r.rounds} round{'s' if r.rounds != 1 else ''}"

    def span(low: float, high: float) -> str:
        return f"{format_ratio(low)} to {format_ratio(high)} {over}"

    if r.low > 1 and r.value > margin:
        return f"{x_name} is {format_ratio(r.value)} faster than {y_name} ({span(r.low, r.high)})"
    if r.high < 1 and r.value < 1 / margin:  # in x's time / y's time: inverse ratios, same order
        return f"{x_name} is {format_ratio(1 / r.value)} slower than {y_name} ({span(1 / r.high, 1 / r.low)})"
    return f"{x_name} vs {y_name}: too close to call (speedup {format_ratio(r.value)}, {span(r.low, r.high)})"


def _synchronized(fn: Callable[[], object], device: torch.device) -> Callable[[], None]:
    def call() -> None:
        fn()
        synchronize(device)

    return call


def _calls_per_round(timer: benchmark.Timer, seconds: float) -> int:
    """How many calls make one round last at least ``seconds`` (at least one call)."""
    number = 1
    for _ in range(3):  # one call first, then correct the estimate twice at most
        elapsed = timer.timeit(number).median * number
        if elapsed >= seconds:
            return number
        number = max(number + 1, math.ceil(number * 1.2 * seconds / max(elapsed, 1e-9)))
    return number


def compare(
    candidates: Mapping[str, Callable[[], object]],
    *,
    device: torch.device | str = "cpu",
    min_run_time: float = 0.3,
    rounds: int = 10,
    warmup: int = 2,
) -> dict[str, Timing]:
    """Time several implementations of the same thing in alternation, round after round.

    Each candidate is called ``warmup`` times (lazy initialization, allocator
    and autotuning caches), then gets a number of calls per round that makes a
    round last at least ``min_run_time / rounds`` seconds (10 ms at least).
    The rounds alternate between the candidates, starting with a different one
    each round, so load from other programs falls on all of them alike; each
    round's seconds per call are kept in :attr:`Timing.samples`. Calls run
    under :class:`torch.utils.benchmark.Timer` (single-threaded on the CPU, its
    default) and are followed by :func:`ensembling.synchronize`, so accelerator
    timings include the kernels themselves, not just their launch.

    Parameters
    ----------
    candidates : mapping of str to callable
        Label -> function of no arguments.
    device : torch.device or str, default "cpu"
        The device they run on.
    min_run_time : float, default 0.3
        Seconds spent timing *each* candidate, over all rounds.
    rounds : int, default 10
        How many rounds; the median and the spread are taken over them.
    warmup : int, default 2
        Untimed calls made first.

    Returns
    -------
    dict of str to Timing
        In the order of ``candidates``; compare two of them with :func:`verdict`.

    Examples
    --------
    >>> x = torch.randn(256, 256)
    >>> times = compare({"mm": lambda: x @ x, "add": lambda: x + x}, min_run_time=0.02, rounds=3)
    >>> list(times), [t.runs for t in times.values()], all(t.median > 0 for t in times.values())
    (['mm', 'add'], [3, 3], True)
    """
    if not candidates:
        raise ValueError("compare: no candidates; pass at least one label -> function")
    if rounds < 1:
        raise ValueError(f"compare: rounds must be at least 1, got {rounds}")
    device = torch.device(device)
    timers = {}
    for label, fn in candidates.items():
        call = _synchronized(fn, device)
        for _ in range(warmup):
            call()
        timers[label] = benchmark.Timer(stmt="call()", globals={"call": call}, label=label)
    per_round = max(min_run_time / rounds, 0.01)
    number = {label: _calls_per_round(timer, per_round) for label, timer in timers.items()}
    samples: dict[str, list[float]] = {label: [] for label in timers}
    labels = list(timers)
    for r in range(rounds):
        for label in labels[r % len(labels) :] + labels[: r % len(labels)]:
            samples[label].append(timers[label].timeit(number[label]).median)
    return {label: Timing.from_samples(label, s) for label, s in samples.items()}


def measure(
    fn: Callable[[], object],
    *,
    device: torch.device | str = "cpu",
    label: str = "",
    min_run_time: float = 0.3,
    rounds: int = 10,
    warmup: int = 2,
) -> Timing:
    """Time one callable: :func:`compare` with a single candidate.

    To compare implementations, time them together with :func:`compare`
    instead: alternating rounds keep a burst of background load from
    favouring one of them.

    Parameters
    ----------
    fn : callable
        A function of no arguments.
    device : torch.device or str, default "cpu"
        The device ``fn`` runs on.
    label : str, default ""
        A name for the result.
    min_run_time, rounds, warmup
        As for :func:`compare`.

    Returns
    -------
    Timing

    Examples
    --------
    >>> t = measure(lambda: torch.ones(64).sum(), label="sum", min_run_time=0.02, rounds=2)
    >>> t.label, t.median > 0, t.runs, len(t.samples)
    ('sum', True, 2, 2)
    """
    return compare(
        {label: fn},
        device=device,
        min_run_time=min_run_time,
        rounds=rounds,
        warmup=warmup,
    )[label]


def print_measured(*lines: str) -> None:
    """Print machine-dependent lines, each starting with :data:`MEASURED_PREFIX`.

    Use it for every line whose content depends on the hardware: timings,
    speedups, device names, and sentences computed from them. The notebook
    check masks exactly these lines, so everything else stays strictly compared.

    Parameters
    ----------
    *lines : str
        One line each, without newlines.

    Examples
    --------
    >>> print_measured("loop 1.00 ms", "vmap 0.50 ms")
    on this machine: loop 1.00 ms
    on this machine: vmap 0.50 ms
    """
    for line in lines:
        if "\n" in line:
            raise ValueError("print_measured: pass one line per argument, without newlines")
        print(MEASURED_PREFIX + line)
