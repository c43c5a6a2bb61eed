"""Timing helpers for the tutorials and the benchmark: measured live, side by side."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.utils.benchmark as benchmark

from ._device import synchronize

__all__ = ["MEASURED_PREFIX", "Timing", "compare", "measure", "print_measured"]

#: Every printed line whose content depends on the machine (timings, device
#: names, ratios) starts with this prefix. The notebook check replaces the rest
#: of such a line with a placeholder (see ``notebooks/nbval_sanitize.cfg``); every
#: other line is compared exactly.
MEASURED_PREFIX = "on this machine: "


@dataclass(frozen=True)
class Timing:
    """The result of timing one callable.

    Attributes
    ----------
    label : str
        What was timed.
    median : float
        Median seconds per call.
    iqr : float
        Interquartile range of the per-call times, in seconds.
    runs : int
        How many timed blocks the median is taken over.

    Examples
    --------
    >>> t = Timing("loop", median=0.0021, iqr=0.0001, runs=12)
    >>> str(t)  # the median, with a readable unit
    '2.10 ms'
    """

    label: str
    median: float
    iqr: float
    runs: int

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


def measure(
    fn: Callable[[], object],
    *,
    device: torch.device | str = "cpu",
    label: str = "",
    min_run_time: float = 0.2,
    warmup: int = 2,
) -> Timing:
    """Time ``fn()`` with :mod:`torch.utils.benchmark`, synchronizing ``device``.

    ``fn`` is called ``warmup`` times first (lazy initialization, allocator
    and autotuning caches), then :meth:`torch.utils.benchmark.Timer.blocked_autorange`
    runs it in blocks for at least ``min_run_time`` seconds. Each call is
    followed by :func:`ensembling.synchronize`, so accelerator timings include
    the kernels themselves, not just their launch.

    Parameters
    ----------
    fn : callable
        A function of no arguments.
    device : torch.device or str, default "cpu"
        The device ``fn`` runs on.
    label : str, default ""
        A name for the result.
    min_run_time : float, default 0.2
        Seconds to spend measuring (more gives a steadier median).
    warmup : int, default 2
        Untimed calls made first.

    Returns
    -------
    Timing

    Examples
    --------
    >>> t = measure(lambda: torch.ones(64).sum(), label="sum", min_run_time=0.01)
    >>> t.label, t.median > 0, t.runs >= 1
    ('sum', True, True)
    """
    device = torch.device(device)

    def call() -> None:
        fn()
        synchronize(device)

    for _ in range(warmup):
        call()
    timer = benchmark.Timer(stmt="call()", globals={"call": call}, label=label)
    result = timer.blocked_autorange(min_run_time=min_run_time)
    return Timing(label=label, median=result.median, iqr=result.iqr, runs=len(result.times))


def compare(
    candidates: Mapping[str, Callable[[], object]],
    *,
    device: torch.device | str = "cpu",
    min_run_time: float = 0.2,
) -> dict[str, Timing]:
    """Time several implementations of the same thing, one after another, in one run.

    Parameters
    ----------
    candidates : mapping of str to callable
        Label -> function of no arguments.
    device : torch.device or str, default "cpu"
        The device they run on.
    min_run_time : float, default 0.2
        Seconds spent on *each* candidate.

    Returns
    -------
    dict of str to Timing
        In the order of ``candidates``.

    Examples
    --------
    >>> x = torch.randn(256, 256)
    >>> times = compare({"mm": lambda: x @ x, "add": lambda: x + x}, min_run_time=0.01)
    >>> list(times), all(t.median > 0 for t in times.values())
    (['mm', 'add'], True)
    """
    return {
        label: measure(fn, device=device, label=label, min_run_time=min_run_time)
        for label, fn in candidates.items()
    }


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
