"""Timing, verdict and plotting helpers (correctness only: no speed is asserted here)."""

from __future__ import annotations

import re

import matplotlib
import pytest
import torch

from ensembling import tutorial
from ensembling.tutorial import Timing
from ensembling.tutorial.timing import format_ratio, format_seconds

matplotlib.use("Agg")


def test_measure_calls_the_function_and_reports_positive_times() -> None:
    """measure() runs the callable (warm-up plus timed rounds) and returns a Timing with its samples."""
    calls = []
    timing = tutorial.measure(lambda: calls.append(1), label="append", min_run_time=0.01, rounds=3)
    assert timing.label == "append"
    assert timing.median > 0 and timing.iqr >= 0 and timing.runs == 3 == len(timing.samples)
    assert timing.low <= timing.median <= timing.high
    assert len(calls) > 2  # two warm-up calls, then the timed rounds


def test_compare_keeps_the_order_of_the_candidates() -> None:
    """compare() returns one Timing per candidate, in the given order."""
    x = torch.ones(8)
    times = tutorial.compare({"b": lambda: x + 1, "a": lambda: x * 2}, min_run_time=0.01, rounds=2)
    assert list(times) == ["b", "a"]
    assert [t.label for t in times.values()] == ["b", "a"]


def test_compare_interleaves_the_candidates_round_after_round() -> None:
    """Rounds alternate between candidates, each round starting with the next one."""
    log: list[str] = []
    candidates = {name: (lambda name=name: log.append(name)) for name in "abc"}
    times = tutorial.compare(candidates, min_run_time=0.0, rounds=4, warmup=0)
    assert [t.runs for t in times.values()] == [4, 4, 4]
    runs = [name for i, name in enumerate(log) if i == 0 or log[i - 1] != name]  # collapse repeats
    timed = runs[-12:]  # after the calibration calls: 4 rounds of 3 blocks
    assert timed == list("abcbcacababc")


def test_compare_spends_at_least_ten_milliseconds_per_round() -> None:
    """Each round of a fast callable is long enough to measure (>= 10 ms of calls)."""
    calls = []
    timing = tutorial.measure(lambda: calls.append(1), min_run_time=0.0, rounds=2, warmup=0)
    assert min(timing.samples) * len(calls) / 3 >= 0.01 * 0.5  # calls spread over calibration + 2 rounds


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (2.5, "2.50 s"),
        (0.25, "250 ms"),
        (0.0123, "12.3 ms"),
        (1.5e-3, "1.50 ms"),
        (4.5e-6, "4.50 us"),
        (3e-8, "30.0 ns"),
    ],
)
def test_format_seconds_picks_a_readable_unit(seconds: float, text: str) -> None:
    """Durations print with a unit that keeps about three significant digits."""
    assert format_seconds(seconds) == text
    assert str(Timing("x", seconds, 0.0, 1)) == text


def test_print_measured_prefixes_every_line(capsys: pytest.CaptureFixture[str]) -> None:
    """Each machine-dependent line starts with the prefix the notebook check masks."""
    tutorial.print_measured("a", "b")
    assert capsys.readouterr().out == "on this machine: a\non this machine: b\n"
    with pytest.raises(ValueError, match="one line per argument"):
        tutorial.print_measured("two\nlines")


def test_plot_timings_annotates_speedups_over_the_baseline() -> None:
    """Each non-baseline bar is labelled with baseline time / its time."""
    results = {
        "small": {
            "loop": Timing("loop", 4e-3, 0, 3),
            "vmap": Timing("vmap", 1e-3, 0, 3),
        },
        "large": {
            "loop": Timing("loop", 1e-3, 0, 3),
            "vmap": Timing("vmap", 2e-3, 0, 3),
        },
    }
    ax = tutorial.plot_timings(results, baseline="loop", title="t")
    assert [t.get_text() for t in ax.texts] == ["4.0x", "0.50x"]
    assert ax.get_yscale() == "log" and ax.get_title() == "t"


def test_plot_timings_rejects_inconsistent_results() -> None:
    """Mismatched methods, a missing baseline and empty results raise clearly."""
    t = Timing("x", 1e-3, 0, 1)
    with pytest.raises(ValueError, match="empty"):
        tutorial.plot_timings({}, baseline="loop")
    with pytest.raises(ValueError, match=re.escape("configuration 'b' times ['loop']")):
        tutorial.plot_timings({"a": {"loop": t, "vmap": t}, "b": {"loop": t}}, baseline="loop")
    with pytest.raises(ValueError, match="baseline 'fast'"):
        tutorial.plot_timings({"a": {"loop": t}}, baseline="fast")


def _timing(label: str, samples: list[float]) -> Timing:
    return Timing.from_samples(label, samples)


def test_speedup_pairs_the_rounds_so_a_busy_round_cancels() -> None:
    """A round slowed for both candidates leaves the paired speedup unchanged."""
    fast = _timing("vmap", [1.0, 1.0, 1.0, 5.0])  # round 4: the machine was busy
    slow = _timing("loop", [2.0, 2.0, 2.0, 10.0])
    ratio = tutorial.speedup(fast, slow)
    assert ratio.paired and ratio.value == ratio.low == ratio.high == 2.0 and ratio.rounds == 4


def test_speedup_without_paired_rounds_uses_the_conservative_range() -> None:
    """Timings from separate runs get the range y.low / x.high .. y.high / x.low."""
    x = _timing("x", [1.0, 2.0])
    y = Timing("y", 4.0, 0.0, 1)
    ratio = tutorial.speedup(x, y)
    assert not ratio.paired
    assert ratio.value == pytest.approx(4.0 / 1.5)
    assert ratio.low == pytest.approx(4.0 / x.high) and ratio.high == pytest.approx(4.0 / x.low)


@pytest.mark.parametrize(
    ("fast", "slow", "words"),
    [
        (
            [1.0] * 5,
            [2.6] * 5,
            "vmap is 2.6x faster than the loop (2.6x to 2.6x over 5 rounds)",
        ),
        (
            [1.0] * 5,
            [1.496] * 5,
            "vmap is 1.5x faster than the loop (1.5x to 1.5x over 5 rounds)",
        ),
        (
            [1.5] * 5,
            [1.0] * 5,
            "vmap is 1.5x slower than the loop (1.5x to 1.5x over 5 rounds)",
        ),
        (
            [1.0, 1.0, 1.0],
            [0.9, 1.2, 1.05],
            "vmap vs the loop: too close to call (speedup 1.1x, 0.93x to 1.2x",
        ),
        (
            [1.0] * 3,
            [1.04] * 3,
            "vmap vs the loop: too close to call (speedup 1.04x, 1.04x to 1.04x",
        ),
        (  # slower in every round, but by less than the 5% margin
            [1.04] * 3,
            [1.0] * 3,
            "vmap vs the loop: too close to call (speedup 0.96x, 0.96x to 0.96x",
        ),
        (  # the whole range below 1, the median clear of the margin: slower, not "too close"
            [1.0] * 5,
            [0.76, 0.8, 0.85, 0.9, 0.95],
            "vmap is 1.2x slower than the loop (1.1x to 1.3x over 5 rounds)",
        ),
    ],
)
def test_verdict_words_follow_the_numbers(fast: list[float], slow: list[float], words: str) -> None:
    """Faster / slower / too close to call is decided on unrounded values and their spread."""
    text = tutorial.verdict(_timing("vmap", fast), _timing("loop", slow), y_name="the loop")
    assert text.startswith(words)


def test_verdict_calls_it_too_close_when_the_spread_straddles_one() -> None:
    """A median speedup of 1.5x whose rounds range from below 1 to above is not called faster."""
    fast = _timing("a", [1.0] * 5)
    slow = _timing("b", [0.8, 0.9, 1.5, 1.6, 2.2])
    assert tutorial.speedup(fast, slow).value == 1.5
    assert "too close to call" in tutorial.verdict(fast, slow)


@pytest.mark.parametrize("ratio", [1.0501, 1.2, 1.496, 1.5, 1.95, 2.6, 9.96, 12.0])  # above the 5% margin
def test_verdict_never_prints_a_ratio_that_contradicts_its_words(ratio: float) -> None:
    """'faster' always prints ratios above 1, 'slower' too (never '1.0x faster' or '1.00x slower')."""
    faster = tutorial.verdict(_timing("a", [1.0] * 3), _timing("b", [ratio] * 3))
    slower = tutorial.verdict(_timing("b", [ratio] * 3), _timing("a", [1.0] * 3))
    for text, word in ((faster, "faster"), (slower, "slower")):
        assert word in text
        numbers = [float(n) for n in re.findall(r"(\d+(?:\.\d+)?)x", text)]
        assert len(numbers) == 3 and min(numbers) > 1, text


@pytest.mark.parametrize(
    ("ratio", "text"),
    [(2.61, "2.6x"), (0.947, "0.95x"), (1.04, "1.04x"), (0.996, "0.996x"), (1.00003, "1.00003x")],
)
def test_format_ratio_keeps_a_difference_from_one_visible(ratio: float, text: str) -> None:
    """Ratios print with two significant digits, more only where rounding would show 1."""
    assert format_ratio(ratio) == text


def test_a_range_end_just_beyond_one_never_prints_as_one() -> None:
    """A decided verdict whose range end is 1.00003 prints it as such (CI once printed '1.0000x slower')."""
    loop = _timing("loop", [1.0] * 10)
    ens = _timing("Ensemble", [1.00003] * 2 + [1.1] * 8)
    text = tutorial.verdict(ens, loop)
    assert "slower" in text
    numbers = [float(n) for n in re.findall(r"(\d+(?:\.\d+)?)x", text)]
    assert min(numbers) > 1, text
