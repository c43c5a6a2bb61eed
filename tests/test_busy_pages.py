"""The speed pages run to the end on a busy CPU, and what they print about speed agrees with itself.

A reader's machine is rarely idle. The pages that time things are executed as
scripts, all at once, while two more processes spin on the CPU (so each page
also competes with the others: on a 2-core machine that is heavy load, and it
keeps the test's wall time close to the pages' total CPU time divided by the
cores); then every verdict each page printed
(``ensembling.tutorial.verdict``) is parsed and its words are checked against
its own numbers: "faster" / "slower" only with a whole range beyond 1,
"too close to call" only with a range that reaches 1.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ensembling.tutorial import MEASURED_PREFIX

ROOT = Path(__file__).resolve().parents[1]
# The pages whose point is a speed comparison, and every later page that prints a verdict.
SPEED_PAGES = sorted(
    page
    for page in ROOT.glob("gallery/*/plot_*.py")
    if page.stem[:8] in ("plot_01_", "plot_07_", "plot_08_")
    or (int(page.stem[5:7]) >= 10 and "verdict(" in page.read_text(encoding="utf-8"))
)
BUSY = 2  # spinning processes: as many as CI's cores

_NUMBER = r"(\d+(?:\.\d+)?)x"
_DECIDED = re.compile(rf"is {_NUMBER} (faster|slower) than .+? \({_NUMBER} to {_NUMBER} over (\d+) rounds?\)")
_UNDECIDED = re.compile(rf": too close to call \(speedup {_NUMBER}, {_NUMBER} to {_NUMBER} over (\d+) rounds?\)")


@contextmanager
def busy_cpu() -> Iterator[None]:
    """Competing processes that spin on the CPU while the block runs; always killed."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(BUSY)]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


@pytest.fixture(scope="module")
def page_runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[int, str, str]]:
    """The selected speed pages run as scripts, concurrently, under busy_cpu: stem -> (return code, stdout, stderr)."""
    selected = [page for page in SPEED_PAGES if any(page.stem in item.nodeid for item in request.session.items)]
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONWARNINGS": "ignore"}
    logs = tmp_path_factory.mktemp("busy_pages")
    runs: dict[str, subprocess.Popen] = {}
    with busy_cpu():
        try:
            for page in selected:
                out, err = (open(logs / f"{page.stem}.{kind}", "w") for kind in ("out", "err"))
                with out, err:
                    runs[page.stem] = subprocess.Popen(
                        [sys.executable, page.name], cwd=page.parent, env=env, stdout=out, stderr=err
                    )
            codes = {stem: run.wait(timeout=900) for stem, run in runs.items()}
        finally:
            for run in runs.values():
                if run.poll() is None:
                    run.kill()
                    run.wait()
    return {
        stem: (code, (logs / f"{stem}.out").read_text(), (logs / f"{stem}.err").read_text())
        for stem, code in codes.items()
    }


def check_verdict(line: str) -> bool:
    """Assert that every verdict in one printed line agrees with its numbers; False if it holds none."""
    found = False
    for decided in _DECIDED.finditer(line):
        value, word, low, high, _ = decided.groups()
        value, low, high = float(value), float(low), float(high)
        assert value > 1 and low > 1, f"'{word}' with a ratio or range end at or below 1x: {line}"
        assert low <= value <= high, f"the median lies outside its own range: {line}"
        found = True
    for undecided in _UNDECIDED.finditer(line):
        value, low, high = (float(n) for n in undecided.groups()[:3])
        assert low <= value <= high, f"the median lies outside its own range: {line}"
        straddles, small = low <= 1 <= high, 0.95 <= value <= 1.1  # 1.05 may print as 1.1
        assert straddles or small, f"'too close to call' with a range clear of 1x and a clear median: {line}"
        found = True
    return found


@pytest.mark.parametrize(
    ("line", "verdict"),
    [
        ("a: vmap is 2.6x faster than the loop (2.4x to 2.8x over 10 rounds)", True),
        ("vmap vs the loop: too close to call (speedup 0.97x, 0.92x to 1.1x over 10 rounds)", True),
        ("vmap vs the loop: too close to call (speedup 1.03x, 1.01x to 1.04x over 10 rounds)", True),
        ("loop 1.00 ms, vmap 0.50 ms", False),
        (
            "a is 1.3x slower than b (1.2x to 1.7x over 5 rounds); "
            "c is 6.4x slower than a (5.0x to 7.0x over 5 rounds)",
            True,
        ),
    ],
)
def test_check_verdict_reads_the_pages_sentences(line: str, verdict: bool) -> None:
    """The parser recognises consistent verdicts and ignores other lines."""
    assert check_verdict(line) is verdict


@pytest.mark.parametrize(
    "line",
    [
        "vmap is 1.5x faster than the loop (0.9x to 2.1x over 10 rounds)",  # range reaches below 1
        "vmap is 1.0x faster than the loop (1.0x to 1.1x over 10 rounds)",  # rounds to 1
        "vmap vs the loop: too close to call (speedup 1.6x, 1.4x to 1.9x over 10 rounds)",  # clear of 1
        "a is 2.0x faster than b (1.5x to 2.5x over 5 rounds); c is 2.0x faster than a (0.9x to 3.0x over 5 rounds)",
    ],
)
def test_check_verdict_catches_words_that_contradict_the_numbers(line: str) -> None:
    """A verdict whose words disagree with its printed numbers fails the check."""
    with pytest.raises(AssertionError):
        check_verdict(line)


@pytest.mark.slow
@pytest.mark.parametrize("page", SPEED_PAGES, ids=lambda page: page.stem)
def test_speed_page_runs_on_a_busy_cpu_and_agrees_with_itself(
    page: Path, page_runs: dict[str, tuple[int, str, str]]
) -> None:
    """The page completes under CPU load; its verdicts agree with their numbers; no bare True/False claims."""
    code, stdout, stderr = page_runs[page.stem]
    assert code == 0, f"{page.name} failed under load:\n{stderr[-3000:]}"
    lines = stdout.splitlines()
    measured = [line[len(MEASURED_PREFIX) :] for line in lines if line.startswith(MEASURED_PREFIX)]
    verdicts = [line for line in measured if check_verdict(line)]
    assert verdicts, f"{page.name} printed no verdict computed from its timings"
    for line in lines:
        assert not re.search(r"(:|=)\s*(True|False)$", line), f"a bare True/False claim: {line!r}"
        assert "about as fast" not in line, f"a verdict that ignores the spread: {line!r}"
