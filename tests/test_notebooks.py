"""The gallery -> notebook pipeline: stored notebooks match their scripts, the
nbval check is strict where it must be and masks only what it should, and the
generator never leaves a half-written file."""

from __future__ import annotations

import json
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


def _run_nbval(notebook: Path) -> subprocess.CompletedProcess[str]:
    """Run the project's notebook check on one notebook, in a subprocess.

    The notebook lives outside the repository, so the repository's conftest.py
    (which configures nbval) is loaded explicitly as a plugin.
    """
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--nbval",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "conftest",
            "--rootdir",
            str(ROOT),
            str(notebook),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )


@pytest.mark.slow
def test_nbval_fails_when_a_stored_output_is_wrong(tmp_path: Path) -> None:
    """Changing one strictly compared stored output makes `pytest --nbval` fail on that cell."""
    source = ROOT / "notebooks" / f"{SCRIPTS[0].stem}.ipynb"
    nb = json.loads(source.read_text())
    tampered = 0
    for cell in nb["cells"]:
        for output in cell.get("outputs", []):
            text = "".join(output.get("text", ""))
            if output.get("output_type") == "stream" and "[" in text and "on this machine" not in text:
                output["text"] = text.replace("[", "[1", 1)
                tampered += 1
                break
        if tampered:
            break
    assert tampered == 1
    target = tmp_path / source.name
    target.write_text(json.dumps(nb))
    result = _run_nbval(target)
    assert result.returncode == 1, result.stdout[-3000:]
    assert "1 failed" in result.stdout


@pytest.mark.slow
def test_nbval_masks_measured_lines_but_compares_the_rest(tmp_path: Path, notebooks_tool: ModuleType) -> None:
    """A measured line that differs passes; the same cell with a different plain line fails."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(
            "import time, ensembling.tutorial\n"
            "print('shape [3, 4]')\n"
            "ensembling.tutorial.print_measured(f'took {time.perf_counter_ns()} ns')"
        )
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebooks_tool.execute(nb)
    good = tmp_path / "measured.ipynb"
    nbformat.write(nb, good)
    first = _run_nbval(good)
    assert first.returncode == 0, first.stdout[-3000:]

    nb.cells[0].outputs[0].text = nb.cells[0].outputs[0].text.replace("[3, 4]", "[3, 5]")
    bad = tmp_path / "plain.ipynb"
    nbformat.write(nb, bad)
    second = _run_nbval(bad)
    assert second.returncode == 1, second.stdout[-3000:]


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


@pytest.mark.slow
def test_nbval_runs_the_kernels_with_a_reader_machines_settings(tmp_path: Path) -> None:
    """``pytest --nbval`` (conftest.py) gives the kernels MPLBACKEND=Agg, dpi 150 and PYTHONWARNINGS=always.

    Every notebook is checked that way by the test command itself; here one
    notebook with figures proves the settings reach its kernel: its stored
    figure (dpi 100) and the kernel's (dpi 150) differ in pixel size, which only
    the sanitize rule for figure sizes lets pass.
    """
    probe = nbformat.v4.new_notebook()
    probe.cells = [
        nbformat.v4.new_code_cell(
            "import os, matplotlib\n"
            "print(os.environ.get('MPLBACKEND'), os.environ.get('PYTHONWARNINGS'), matplotlib.rcParams['figure.dpi'])"
        )
    ]
    probe.cells[0].outputs = [nbformat.v4.new_output("stream", name="stdout", text="Agg always 150.0\n")]
    probe.cells[0].execution_count = 1
    probe.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    target = tmp_path / "settings.ipynb"
    nbformat.write(probe, target)
    figures = ROOT / "notebooks" / "plot_01_mlp_ensembling.ipynb"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval", "-q", "-p", "no:cacheprovider", str(target), str(figures)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.stem)
def test_notebook_prose_has_no_raw_sphinx_roles(path: Path) -> None:
    """Markdown cells show inline code, not literal :func:`...` roles (only math is converted by Jupyter)."""
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            assert not re.search(r":(?:[a-z]+:)?[a-z]+:`", cell.source), cell.source[:300]


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.stem)
def test_notebooks_start_by_showing_figures_inline(path: Path) -> None:
    """The first cell installs what is missing and runs %matplotlib inline (MPLBACKEND=Agg cannot hide the figures).

    Where everything is installed it prints nothing: no pip output, and no
    warning from an import (it once imported transformers, whose tqdm printed
    "IProgress not found" with the path of the maintainer's environment).
    """
    import ensembling

    first = nbformat.read(path, as_version=4).cells[0]
    assert first.cell_type == "code" and first.source.splitlines()[-1] == "%matplotlib inline"
    assert f'%pip install "ensembling[tutorials]=={ensembling.__version__}"' in first.source
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
