"""Repository-wide pytest configuration for the notebook check.

``pytest --nbval notebooks/`` must work with no extra flags from any working
directory, so the nbval options live here rather than on the command line.
"""

from __future__ import annotations

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
    build_matplotlib_font_cache()


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
