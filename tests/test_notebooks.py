"""The gallery -> notebook pipeline: stored notebooks match their scripts, the
nbval check is strict where it must be and masks only what it should, and the
generator never leaves a half-written file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import nbformat
import pytest

from conftest import ROOT

SANITIZE = ROOT / "notebooks" / "nbval_sanitize.cfg"
SCRIPTS = sorted(ROOT.joinpath("gallery").rglob("plot_*.py"))


def test_there_is_at_least_one_tutorial() -> None:
    """The gallery is not empty (otherwise every check below would pass vacuously)."""
    assert SCRIPTS


def test_every_script_has_a_notebook_and_every_notebook_a_script(notebooks_tool: ModuleType) -> None:
    """gallery/plot_*.py and notebooks/*.ipynb correspond one to one, by name."""
    scripts = {s.stem for s in notebooks_tool.gallery_scripts()}
    stored = {p.stem for p in (ROOT / "notebooks").glob("*.ipynb")}
    assert scripts - stored == set(), "scripts without a notebook: run `make notebooks`"
    assert stored - scripts == set(), "notebooks without a script: delete them or run `make notebooks`"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_stored_notebook_has_the_scripts_cells(script: Path, notebooks_tool: ModuleType) -> None:
    """Each stored notebook has exactly the cells the converter makes from its script."""
    stored = nbformat.read(notebooks_tool.notebook_path(script), as_version=4)
    expected = notebooks_tool.convert(script)
    assert notebooks_tool.cells_signature(stored) == notebooks_tool.cells_signature(expected), (
        f"{script.name} and its notebook drifted apart: run `make notebooks`"
    )


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_stored_notebook_is_current_and_executed(script: Path, notebooks_tool: ModuleType) -> None:
    """Each notebook was executed from the current script, package and generator, without errors."""
    stored = nbformat.read(notebooks_tool.notebook_path(script), as_version=4)
    meta = stored.metadata[notebooks_tool.METADATA_KEY]
    assert meta["generated_from"] == script.relative_to(ROOT).as_posix()
    assert meta["inputs_sha256"] == notebooks_tool.inputs_digest(script), (
        f"{script.name}, the ensembling package or the generator changed since the "
        "notebook was executed: run `make notebooks`"
    )
    code = [c for c in stored.cells if c.cell_type == "code"]
    assert code and all(c.execution_count is not None for c in code)
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]


def _docs_download(script: Path) -> Path | None:
    downloads = ROOT / "docs" / "_build" / "html" / "_downloads"
    found = sorted(downloads.glob(f"*/{script.stem}.ipynb")) if downloads.exists() else []
    return found[0] if found else None


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_stored_notebook_equals_the_docs_download(script: Path, notebooks_tool: ModuleType) -> None:
    """After `make docs`, the page's "Download Jupyter notebook" has the stored notebook's cells."""
    download = _docs_download(script)
    if download is None:
        pytest.skip("docs not built: run `make docs` first (CI does)")
    stored = nbformat.read(notebooks_tool.notebook_path(script), as_version=4)
    offered = nbformat.read(download, as_version=4)
    assert notebooks_tool.cells_signature(stored) == notebooks_tool.cells_signature(offered)


def test_generator_is_idempotent(notebooks_tool: ModuleType) -> None:
    """With nothing changed, the generator executes nothing and rewrites no byte."""
    before = {p: p.read_bytes() for p in (ROOT / "notebooks").glob("*.ipynb")}
    assert notebooks_tool.main(["--check"]) == 0
    assert notebooks_tool.main([]) == 0
    assert {p: p.read_bytes() for p in (ROOT / "notebooks").glob("*.ipynb")} == before


def _sanitize(text: str) -> str:
    from nbval.plugin import get_sanitize_patterns

    for regex, replacement in get_sanitize_patterns(SANITIZE.read_text()):
        text = re.sub(regex, replacement, text)
    return text


def test_sanitize_rules_mask_only_machine_dependent_text() -> None:
    """Measured lines, warning paths, addresses and figure pixel sizes are masked; nothing else is touched."""
    assert len(re.findall(r"(?m)^regex: ", SANITIZE.read_text())) == 4  # every rule parsed
    fresh = (
        "shapes [10, 128, 784]\n"
        "on this machine: loop 2.11 ms, vmap 2.15 ms\n"
        "/opt/env/site-packages/functorch/_src/vmap.py:12: FutureWarning: deprecated\n"
        "<object at 0x7f3a2b1c0d90>\n"
        "<Figure size 1350x540 with 3 Axes>\n"
    )
    stored = (
        "shapes [10, 128, 784]\n"
        "on this machine: loop 9.99 s, vmap 1.00 us\n"
        "/tmp/ipykernel_4242/123.py:12: FutureWarning: deprecated\n"
        "<object at 0x55d0c0ffee00>\n"
        "<Figure size 900x360 with 3 Axes>\n"
    )
    assert _sanitize(fresh) == _sanitize(stored)
    # ... but a change in any compared text still shows.
    assert _sanitize(fresh.replace("784", "785")) != _sanitize(stored)
    assert _sanitize(fresh.replace("deprecated", "removed")) != _sanitize(stored)
    assert _sanitize(fresh.replace("3 Axes", "2 Axes")) != _sanitize(stored)
    assert _sanitize("measured: 1 ms") == "measured: 1 ms"  # the prefix must be exact


def _probe_notebooks(folder: Path) -> dict[str, list[str]]:
    """Write the notebooks that probe the project's nbval set-up into ``folder``; name -> the cells that must fail.

    * ``tampered``: plot_01's stored notebook with one strictly compared output
      changed (its first plain printed line). Only that cell may fail: every
      other cell, the measured lines and the figures included, must pass.
    * ``measured`` / ``plain``: one cell printing a plain line and a measured
      line; the stored measured line differs from any fresh one (masked, passes),
      and in ``plain`` the plain line differs too (compared, fails).
    * ``settings``: prints the kernel's MPLBACKEND, PYTHONWARNINGS and figure dpi;
      conftest.py must give it Agg, always and 150 (the stored figures of the
      tampered notebook are dpi 100, so they pass only through the sanitize rule).
    """
    from ensembling.tutorial import MEASURED_PREFIX

    def probe(code: str, printed: str) -> nbformat.NotebookNode:
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell(code)]
        nb.cells[0].outputs = [nbformat.v4.new_output("stream", name="stdout", text=printed)]
        nb.cells[0].execution_count = 1
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        return nb

    stored = ROOT / "notebooks" / f"{SCRIPTS[0].stem}.ipynb"
    tampered = nbformat.read(stored, as_version=4)
    code = [cell for cell in tampered.cells if cell.cell_type == "code"]  # nbval's "Cell N" counts these
    changed = [
        index
        for index, cell in enumerate(code)
        for output in cell.outputs[:1]
        if output.output_type == "stream" and "[" in output.text and MEASURED_PREFIX not in output.text
    ][:1]
    assert changed, "plot_01 prints no plain line with a shape"
    output = code[changed[0]].outputs[0]
    output.text = output.text.replace("[", "[1", 1)
    assert any("<Figure size " in str(cell.get("outputs", "")) for cell in tampered.cells), "plot_01 has no figure"

    measuring = "import time, ensembling.tutorial\nprint('shape [3, 4]')\n" + (
        "ensembling.tutorial.print_measured(f'took {time.perf_counter_ns()} ns')"
    )
    notebooks = {
        "tampered": tampered,
        "measured": probe(measuring, f"shape [3, 4]\n{MEASURED_PREFIX}took 12345 ns\n"),
        "plain": probe(measuring, f"shape [3, 5]\n{MEASURED_PREFIX}took 12345 ns\n"),
        "settings": probe(
            "import os, matplotlib\n"
            "print(os.environ.get('MPLBACKEND'), os.environ.get('PYTHONWARNINGS'), matplotlib.rcParams['figure.dpi'])",
            "Agg always 150.0\n",
        ),
    }
    for name, nb in notebooks.items():
        nbformat.write(nb, folder / f"{name}.ipynb")
    return {"tampered": [f"Cell {changed[0]}"], "measured": [], "plain": ["Cell 0"], "settings": []}


@pytest.fixture(scope="module")
def nbval_outcomes(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[dict[str, list[str]], dict[str, dict[str, str]]]:
    """Run the project's notebook check once, in a subprocess, on every probe notebook.

    One ``pytest --nbval`` run (its start-up and plot_01's cells are the slow
    part) serves all the checks below. The notebooks live outside the
    repository, so the repository's conftest.py (which configures nbval) is
    loaded explicitly as a plugin, from the checkout put on the path. Returns the expectations and, per notebook,
    cell -> outcome ("PASSED", "FAILED", ...) as pytest reported them.
    """
    folder = tmp_path_factory.mktemp("nbval_probes")
    expected = _probe_notebooks(folder)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval", "-q", "-rA", "-p", "no:cacheprovider", "-p", "conftest"]
        + ["--rootdir", str(folder), *(f"{name}.ipynb" for name in expected)],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(ROOT)},
    )
    outcomes: dict[str, dict[str, str]] = {name: {} for name in expected}
    for outcome, name, cell in re.findall(r"(?m)^(PASSED|FAILED|ERROR) (\w+)\.ipynb::(Cell \d+)", result.stdout):
        outcomes[name][cell] = outcome
    assert all(outcomes.values()), f"a probe notebook was not run:\n{result.stdout[-4000:]}{result.stderr[-2000:]}"
    return expected, outcomes


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tampered", "measured", "plain", "settings"])
def test_nbval_compares_strictly_what_it_must_and_masks_only_what_it_should(
    name: str, nbval_outcomes: tuple[dict[str, list[str]], dict[str, dict[str, str]]]
) -> None:
    """Through the project's nbval set-up, each probe notebook fails exactly the cells it must, and no other.

    ``tampered``: a wrong stored output in a real page fails that one cell, and
    nothing else there (figures made at another dpi, measured lines) does;
    ``measured`` / ``plain``: a differing measured line is masked, a differing
    plain line in the same cell is not; ``settings``: the kernels run with a
    reader machine's settings (MPLBACKEND=Agg, dpi 150, PYTHONWARNINGS=always).
    """
    expected, outcomes = nbval_outcomes
    failed = sorted(cell for cell, outcome in outcomes[name].items() if outcome != "PASSED")
    assert failed == expected[name], f"{name}: {outcomes[name]}"
    if name == "tampered":
        assert len(outcomes[name]) > 10, "plot_01 was not run cell by cell"


def test_atomic_write_leaves_the_old_file_when_writing_fails(
    tmp_path: Path, notebooks_tool: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the final rename fails, the previous notebook is intact and no temporary file remains."""
    target = tmp_path / "page.ipynb"
    target.write_text("previous contents")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(notebooks_tool.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        notebooks_tool.write_atomically(nbformat.v4.new_notebook(), target)
    assert target.read_text() == "previous contents"
    assert [p.name for p in tmp_path.iterdir()] == ["page.ipynb"]


@pytest.mark.slow
def test_a_failing_script_writes_no_notebook(
    tmp_path: Path, notebooks_tool: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When a cell raises, generation fails and nothing is written."""
    gallery, out = tmp_path / "gallery", tmp_path / "notebooks"
    gallery.mkdir()
    out.mkdir()
    script = gallery / "plot_99_broken.py"
    script.write_text('"""\nBroken\n======\n\nFails.\n"""\n\n# %%\n# Boom.\nraise RuntimeError("boom")\n')
    monkeypatch.setattr(notebooks_tool, "GALLERY", gallery)
    monkeypatch.setattr(notebooks_tool, "NOTEBOOKS", out)
    monkeypatch.setattr(notebooks_tool, "inputs_digest", lambda script: "x")
    from nbclient.exceptions import CellExecutionError

    with pytest.raises(CellExecutionError, match="boom"):
        notebooks_tool.generate(script, notebooks_tool.gallery_conf())
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.stem)
def test_notebook_prose_has_no_raw_sphinx_roles(path: Path) -> None:
    """Markdown cells show inline code, not literal :func:`...` roles (only math is converted by Jupyter)."""
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            assert not re.search(r":(?:[a-z]+:)?[a-z]+:`", cell.source), cell.source[:300]


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.stem)
def test_notebooks_start_by_showing_figures_inline(path: Path) -> None:
    """The first cell installs what its page imports where it is missing and runs %matplotlib inline
    (MPLBACKEND=Agg cannot hide the figures): the huggingface extra only where the page imports transformers.

    Where everything is installed it prints nothing: no pip output, and no
    warning from an import (it once imported transformers, whose tqdm printed
    "IProgress not found" with the path of the maintainer's environment).
    """
    import ensembling

    notebook = nbformat.read(path, as_version=4)
    first = notebook.cells[0]
    code = "\n".join(cell.source for cell in notebook.cells[1:] if cell.cell_type == "code")
    extras = "tutorials,huggingface" if re.search(r"^(from|import) transformers\b", code, re.M) else "tutorials"
    assert first.cell_type == "code" and first.source.splitlines()[-1] == "%matplotlib inline"
    assert f'%pip install "ensembling[{extras}]=={ensembling.__version__}"' in first.source
    assert ('"transformers"' in first.source) is (extras != "tutorials")
    assert first.outputs == [], f"the first cell printed: {first.outputs}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_tutorial_code_fits_the_page(script: Path) -> None:
    """Code lines are at most 100 columns, the width of the tutorial pages' code column (no hidden ends)."""
    long = [
        f"{number}: {line}"
        for number, line in enumerate(script.read_text().splitlines(), start=1)
        if len(line) > 100 and not line.startswith("#")
    ]
    assert not long, long
