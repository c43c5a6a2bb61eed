"""Timing and plotting helpers (correctness only: no speed is asserted here)."""

from __future__ import annotations

import re

import matplotlib
import pytest
import torch

import ensembling
from ensembling import Timing
from ensembling._bench import format_seconds

matplotlib.use("Agg")


def test_measure_calls_the_function_and_reports_positive_times() -> None:
    """measure() runs the callable (warm-up plus timed blocks) and returns a Timing."""
    calls = []
    timing = ensembling.measure(lambda: calls.append(1), label="append", min_run_time=0.01)
    assert timing.label == "append"
    assert timing.median > 0 and timing.iqr >= 0 and timing.runs >= 1
    assert len(calls) > 2  # two warm-up calls, then at least one timed block


def test_compare_keeps_the_order_of_the_candidates() -> None:
    """compare() returns one Timing per candidate, in the given order."""
    x = torch.ones(8)
    times = ensembling.compare({"b": lambda: x + 1, "a": lambda: x * 2}, min_run_time=0.01)
    assert list(times) == ["b", "a"]
    assert [t.label for t in times.values()] == ["b", "a"]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(2.5, "2.50 s"), (0.25, "250 ms"), (0.0123, "12.3 ms"), (1.5e-3, "1.50 ms"), (4.5e-6, "4.50 us"), (3e-8, "30.0 ns")],
)
def test_format_seconds_picks_a_readable_unit(seconds: float, text: str) -> None:
    """Durations print with a unit that keeps about three significant digits."""
    assert format_seconds(seconds) == text
    assert str(Timing("x", seconds, 0.0, 1)) == text


def test_print_measured_prefixes_every_line(capsys: pytest.CaptureFixture[str]) -> None:
    """Each machine-dependent line starts with the prefix the notebook check masks."""
    ensembling.print_measured("a", "b")
    assert capsys.readouterr().out == "on this machine: a\non this machine: b\n"
    with pytest.raises(ValueError, match="one line per argument"):
        ensembling.print_measured("two\nlines")


def test_plot_timings_annotates_speedups_over_the_baseline() -> None:
    """Each non-baseline bar is labelled with baseline time / its time."""
    results = {
        "small": {"loop": Timing("loop", 4e-3, 0, 3), "vmap": Timing("vmap", 1e-3, 0, 3)},
        "large": {"loop": Timing("loop", 1e-3, 0, 3), "vmap": Timing("vmap", 2e-3, 0, 3)},
    }
    ax = ensembling.plot_timings(results, baseline="loop", title="t")
    assert [t.get_text() for t in ax.texts] == ["4.0x", "0.5x"]
    assert ax.get_yscale() == "log" and ax.get_title() == "t"


def test_plot_timings_rejects_inconsistent_results() -> None:
    """Mismatched methods, a missing baseline and empty results raise clearly."""
    t = Timing("x", 1e-3, 0, 1)
    with pytest.raises(ValueError, match="empty"):
        ensembling.plot_timings({}, baseline="loop")
    with pytest.raises(ValueError, match=re.escape("configuration 'b' times ['loop']")):
        ensembling.plot_timings({"a": {"loop": t, "vmap": t}, "b": {"loop": t}}, baseline="loop")
    with pytest.raises(ValueError, match="baseline 'fast'"):
        ensembling.plot_timings({"a": {"loop": t}}, baseline="fast")
