"""The reader's path: a notebook downloaded from the built site installs what it needs, then runs.

A reader downloads a page's notebook and opens it in a fresh Jupyter (or Colab)
kernel that has torch and nothing else. Its first cell (``_first_notebook_cell``
in docs/conf.py) finds the page's modules missing and runs
``%pip install "ensembling[tutorials]==<release>"``. Here a wheel built from
this checkout stands in for the package index: pip sees it through
``PIP_FIND_LINKS``, while the extras (matplotlib, scikit-learn) come from
whatever index pip is configured with (so the test needs the package index, as
CI has). The notebook is a copy of the site's download, in a folder outside the
repository, run by a kernel of a fresh virtual environment. One page is
enough: the first cell is the same on every page but the Hugging Face one,
which adds the ``huggingface`` extra (tests/test_notebooks.py checks each
stored first cell), and plot_04 imports the package, matplotlib and
scikit-learn; every page is executed elsewhere anyway (the docs build, nbval,
the busy-CPU run). The test also checks that transformers is *not* installed
(it was half of pip's time). Measured on a 2-core machine: 22-32 s for the
wheel and the environment, then 50-60 s for the install from the package
index and the page (70-84 s while every page also installed transformers).
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nbformat
import pytest

import ensembling
from conftest import ROOT, copy_checkout

DOWNLOADS = ROOT / "docs" / "_build" / "html" / "_downloads"
# plot_04 needs the package, matplotlib and scikit-learn.
PAGES = ["plot_04_training_an_ensemble"]
# What a first cell may look for (import names), and the distributions that provide them;
# plot_04's installs the first three (the Hugging Face page's, all five).
EXTRAS = ("ensembling", "matplotlib", "sklearn", "transformers", "ipywidgets")
DISTRIBUTIONS = ("ensembling", "matplotlib", "scikit-learn", "transformers", "ipywidgets")
INSTALLED = EXTRAS[:3]
INSTALL_LINE = f'%pip install "ensembling[tutorials]=={ensembling.__version__}"'

# Runs inside the reader's environment: execute a notebook as Jupyter would, with
# its own "python3" kernel, from the notebook's folder; keep the outputs on failure.
RUNNER = """
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

source, executed = map(Path, sys.argv[1:3])
notebook = nbformat.read(source, as_version=4)
client = NotebookClient(notebook, timeout=900, kernel_name="python3",
                        resources={"metadata": {"path": str(source.parent)}})
try:
    client.execute()
finally:
    nbformat.write(notebook, executed)
"""


def _download(stem: str) -> Path | None:
    """The newest "Download Jupyter notebook" file of page ``stem`` in the built site."""
    found = DOWNLOADS.glob(f"*/{stem}.ipynb") if DOWNLOADS.exists() else []
    return max(found, key=lambda path: path.stat().st_mtime, default=None)


def _run(*command: str | Path, cwd: Path, **kwargs) -> subprocess.CompletedProcess[str]:
    """Run a command from ``cwd`` (never the checkout: its ``ensembling`` is importable); fail with its stderr."""
    result = subprocess.run([str(c) for c in command], cwd=cwd, check=False, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, (
        f"{' '.join(map(str, command))[:300]}: exit {result.returncode}\n{result.stderr[-4000:]}"
    )
    return result


def _pip(python: Path, *args: str, cwd: Path) -> None:
    """Run this interpreter's pip on the environment of ``python``."""
    _run(sys.executable, "-m", "pip", "--python", python, *args, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of this checkout (the build writes into its source tree)."""
    work = tmp_path_factory.mktemp("wheel")
    source = copy_checkout(work / "source")
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", work / "dist", source, cwd=work, timeout=600)
    (built,) = (work / "dist").glob("ensembling-*.whl")
    return built


@pytest.fixture(scope="module")
def reader_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with only torch (this interpreter's version) and a Jupyter kernel."""
    import torch

    home = tmp_path_factory.mktemp("reader")
    _run(sys.executable, "-m", "venv", "--without-pip", home / "venv", cwd=home, timeout=120)
    python = home / "venv" / "bin" / "python"
    # The same torch release as here, without its local tag (+cpu): on CI the CPU wheel on
    # local disk; elsewhere pip's configured index decides which build (PyPI's Linux one is
    # CUDA). No bytecode compilation: it is most of an install's time and changes nothing.
    torch_release = torch.__version__.split("+")[0]
    _pip(python, "install", "--no-compile", "pip", f"torch=={torch_release}", "ipykernel", "nbclient", cwd=home)
    return python


def _reader_env(python: Path, wheel: Path, home: Path) -> dict[str, str]:
    """The reader's shell: the fresh environment first on PATH, the wheel as a find-links source.

    Nothing of this checkout's environment leaks in (no PYTHONPATH, no activated
    environment), and Jupyter/IPython read their configuration from an empty folder.
    """
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "CONDA_PREFIX"}}
    env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"
    env["PIP_FIND_LINKS"] = f"{wheel.parent} {env.get('PIP_FIND_LINKS', '')}".strip()
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_COMPILE"] = "1"  # bytecode compilation is most of an install's time and changes nothing here
    for name in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "IPYTHONDIR"):
        env[name] = str(home / name.lower())
    env.pop("JUPYTER_PATH", None)
    return env


def _importable(python: Path, cwd: Path) -> list[str]:
    """Which of the modules the first cell looks for the environment of ``python`` can find."""
    probe = f"import importlib.util as u; print(' '.join(m for m in {EXTRAS!r} if u.find_spec(m)))"
    return _run(python, "-c", probe, cwd=cwd).stdout.split()


def _installed_package_hashes(python: Path, cwd: Path) -> set[tuple[str, str]]:
    """(path, hash) of the ensembling package files pip installed in that environment."""
    probe = "import importlib.metadata as m; print(m.distribution('ensembling').read_text('RECORD'))"
    record = _run(python, "-c", probe, cwd=cwd).stdout
    return {
        (row[0], row[1])
        for row in csv.reader(record.splitlines())
        if row and row[0].startswith("ensembling/") and row[1]
    }


def _wheel_package_hashes(wheel: Path) -> set[tuple[str, str]]:
    """(path, hash) of the ensembling package files in the wheel."""
    with zipfile.ZipFile(wheel) as archive:
        (record,) = [name for name in archive.namelist() if name.endswith(".dist-info/RECORD")]
        rows = csv.reader(archive.read(record).decode().splitlines())
        return {(row[0], row[1]) for row in rows if row and row[0].startswith("ensembling/") and row[1]}


def test_the_package_version_is_the_release_version() -> None:
    """pyproject.toml's version is ensembling.__version__, the release the notebooks' first cell installs."""
    declared = re.search(r'(?m)^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text())
    assert declared is not None and declared.group(1) == ensembling.__version__


def test_the_site_offers_the_sanitize_file() -> None:
    """The landing page links notebooks/nbval_sanitize.cfg as a download (nbval on a notebook outside the clone)."""
    if not (ROOT / "docs" / "_build" / "html" / "index.html").exists():
        pytest.skip("site not built: run `make docs` first (CI does)")
    offered = list(DOWNLOADS.glob("*/nbval_sanitize.cfg"))
    assert offered, "docs/index.rst no longer links nbval_sanitize.cfg as a :download:"
    source = (ROOT / "notebooks" / "nbval_sanitize.cfg").read_bytes()
    assert max(offered, key=lambda path: path.stat().st_mtime).read_bytes() == source
    assert "nbval_sanitize.cfg" in (ROOT / "docs" / "_build" / "html" / "index.html").read_text(encoding="utf-8")


@pytest.mark.slow
@pytest.mark.parametrize("stem", PAGES)
def test_downloaded_notebook_installs_itself_and_runs(
    stem: str, wheel: Path, reader_python: Path, tmp_path: Path
) -> None:
    """A site notebook in a kernel with only torch installs the package (the wheel) and its extras, then runs."""
    download = _download(stem)
    if download is None:
        pytest.skip(f"site not built (no {stem}.ipynb under {DOWNLOADS}): run `make docs` first (CI does)")
    first = nbformat.read(download, as_version=4).cells[0].source
    assert INSTALL_LINE in first, f"{download} predates docs/conf.py's first cell: rebuild the site (`make docs`)"

    folder = tmp_path / "Downloads"  # outside the repository: nothing of the checkout is importable
    folder.mkdir()
    assert not folder.resolve().is_relative_to(ROOT)
    notebook = Path(shutil.copy(download, folder))
    # Each page starts from an environment without the package and its extras.
    _pip(reader_python, "uninstall", "--yes", *DISTRIBUTIONS, cwd=folder)
    assert _importable(reader_python, folder) == []

    executed = tmp_path / "executed.ipynb"
    env = _reader_env(reader_python, wheel, tmp_path)
    _run(reader_python, "-c", RUNNER, notebook, executed, cwd=folder, env=env, timeout=1200)

    cells = [cell for cell in nbformat.read(executed, as_version=4).cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in cells)
    assert not [output for cell in cells for output in cell.outputs if output.output_type == "error"]
    install_output = "".join(output.get("text", "") for output in cells[0].outputs)
    assert f"ensembling-{ensembling.__version__}" in install_output, install_output[-2000:]
    assert _importable(reader_python, folder) == list(INSTALLED)  # not transformers: this page does not need it
    assert _installed_package_hashes(reader_python, folder) == _wheel_package_hashes(wheel)  # this checkout's wheel
