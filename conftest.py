"""Repository-wide pytest configuration for the notebook check.

``pytest --nbval notebooks/`` must work with no extra flags from any working
directory, so the nbval options live here rather than on the command line.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
SANITIZE = ROOT / "notebooks" / "nbval_sanitize.cfg"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    option = config.option
    if not hasattr(option, "nbval_sanitize_with"):  # nbval is not installed
        return
    if option.nbval_sanitize_with is None:
        option.nbval_sanitize_with = str(SANITIZE)
    # Run the notebooks in the interpreter running pytest (the project's
    # environment), not whatever "python3" kernel happens to be registered.
    if not option.nbval_kernel_name:
        option.nbval_current_env = True
    if getattr(option, "nbval", False):
        as_on_another_machine()
    build_matplotlib_font_cache()


def as_on_another_machine() -> None:
    """Run the notebook kernels the way a reader's machine may differ from the one that stored the outputs.

    A shell may export ``MPLBACKEND=Agg`` (each notebook's first cell,
    ``%matplotlib inline``, overrides it), a matplotlibrc may set another figure
    dpi (figure sizes are sanitized), and ``PYTHONWARNINGS=always`` shows
    warnings that are otherwise hidden (none may appear). The kernels inherit
    these; pytest itself is unaffected (it read its warning filters at start).
    """
    rc_dir = Path(tempfile.mkdtemp(prefix="ensembling-nbval-rc-"))
    (rc_dir / "matplotlibrc").write_text("figure.dpi: 150\n")
    os.environ.update({"MPLBACKEND": "Agg", "MATPLOTLIBRC": str(rc_dir), "PYTHONWARNINGS": "always"})


def build_matplotlib_font_cache() -> None:
    """Build matplotlib's font cache now, if it is missing, rather than inside a notebook.

    On a machine where matplotlib has never run, its first import prints
    "Matplotlib is building the font cache" to stderr: in a notebook cell that
    is an output the stored notebook does not have, and nbval would fail.
    """
    try:
        import matplotlib.font_manager  # noqa: F401  (importing it builds the cache)
    except ImportError:
        pass
