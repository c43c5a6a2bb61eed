"""The speed pages run to the end on a busy CPU, and what they print about speed agrees with itself.

A reader's machine is rarely idle. The pages that time things are executed as
scripts, all at once, and the CPU is kept oversubscribed until the last one
ends: at least one more busy process than the machine has cores (``LOAD``),
the pages themselves counting. While several pages still run they load each
other; as they finish, processes that spin on the CPU take their place, so the
last page is timed under load too. Each page runs torch on one thread
(``OMP_NUM_THREADS=1``), so a busy process is one busy thread and the load is
what ``LOAD`` says. With torch's default of one thread per core, four pages
started as eight threads on a 2-core machine, whose OpenMP workers wait for each
other at every parallel region: the same four pages took 78 s instead of 41 s
there, for no stronger check (the words are checked against the numbers
whatever they are). (The first design, two spinners on top of all the pages
from start to end, took 125-160 s on that machine.) Then every
verdict each page printed
(``ensembling.tutorial.verdict``) is parsed and its words are checked against
its own numbers: "faster" / "slower" only with a whole range beyond 1,
"too close to call" only with a range that reaches 1.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
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
# CPU-bound processes kept running while any page runs (pages + spinners): one more than
# the cores this process may use (CI has 2), capped so a big workstation is not taken over.
LOAD = min(os.cpu_count() or 2, 8) + 1

_NUMBER = r"(\d+(?:\.\d+)?)x"
_DECIDED = re.compile(rf"is {_NUMBER} (faster|slower) than .+? \({_NUMBER} to {_NUMBER} over (\d+) rounds?\)")
_UNDECIDED = re.compile(rf": too close to call \(speedup {_NUMBER}, {_NUMBER} to {_NUMBER} over (\d+) rounds?\)")


def _spinner() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def wait_under_load(runs: list[subprocess.Popen], timeout: float) -> list[subprocess.Popen]:
    """Wait for every run to end while spinners top the busy processes up to LOAD; return the (killed) spinners."""
    spinners: list[subprocess.Popen] = []
    deadline = time.monotonic() + timeout
    try:
        while running := sum(run.poll() is None for run in runs):
            while running + len(spinners) < LOAD:
                spinners.append(_spinner())
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired([run.args for run in runs], timeout)
            time.sleep(0.1)
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    return spinners


@pytest.fixture(scope="module")
def page_runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[int, str, str]]:
    """The selected speed pages run as scripts, concurrently, under load: stem -> (return code, stdout, stderr)."""
    selected = [page for page in SPEED_PAGES if any(page.stem in item.nodeid for item in request.session.items)]
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    logs = tmp_path_factory.mktemp("busy_pages")
    runs: dict[str, subprocess.Popen] = {}
    try:
        for page in selected:
            out, err = (open(logs / f"{page.stem}.{kind}", "w") for kind in ("out", "err"))
            with out, err:
                runs[page.stem] = subprocess.Popen(
                    [sys.executable, page.name], cwd=page.parent, env=env, stdout=out, stderr=err
                )
        wait_under_load(list(runs.values()), timeout=900)
        codes = {stem: run.returncode for stem, run in runs.items()}
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


def test_the_load_is_topped_up_with_spinners_while_a_page_runs_and_they_are_killed() -> None:
    """One run alone gets LOAD - 1 spinners beside it, and none of them outlives it."""
    alone = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"])
    spinners = wait_under_load([alone], timeout=60)
    assert alone.returncode == 0
    assert len(spinners) == LOAD - 1
    assert all(spinner.returncode is not None for spinner in spinners)


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
