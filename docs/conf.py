"""Sphinx configuration: the tutorials (sphinx-gallery) and the API reference."""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # document the working tree, installed or not

import ensembling  # noqa: E402

project = "ensembling"
author = "The ensembling developers"
copyright = "2026, the ensembling developers"
release = ensembling.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.extlinks",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx_gallery.gen_gallery",
]

# No intersphinx: the docs build runs without internet. PyTorch names link to
# the PyTorch docs through these roles instead, e.g. :torchapi:`torch.vmap`.
extlinks = {
    "torchapi": ("https://docs.pytorch.org/docs/stable/generated/%s.html", "%s"),
    "torchdoc": ("https://docs.pytorch.org/docs/stable/%s.html", "%s"),
}

autosummary_generate = True
autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_numpy_docstring = True
napoleon_google_docstring = False
napoleon_use_rtype = False

exclude_patterns = ["_build", "tutorials/*.ipynb", "tutorials/*.py", "tutorials/*.zip"]
templates_path: list[str] = []
html_static_path: list[str] = []

html_theme = "pydata_sphinx_theme"
html_title = "ensembling"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc", "sg_download_links", "sg_launcher_links"],
}
html_sidebars = {"index": []}

# Every tutorial is executed on each build (``run_stale_examples``), so a change
# to the library is always reflected on the pages: no stale cached outputs.
# A failing example fails the build (sphinx-gallery's default); so does any
# warning, because the Makefile passes ``-W``.
sphinx_gallery_conf = {
    "examples_dirs": "../gallery",  # relative to this folder, as sphinx-gallery expects
    "gallery_dirs": "tutorials",
    "filename_pattern": os.environ.get("GALLERY_PATTERN", r"/plot_"),
    "run_stale_examples": True,
    "remove_config_comments": True,
    "within_subsection_order": "FileNameSortKey",
    "download_all_examples": True,
    "show_memory": False,
    "reset_modules": ("matplotlib",),
    "matplotlib_animations": False,
    "min_reported_time": 0,
    "image_srcset": [],
}

# sphinx-gallery writes the execution-time table outside the gallery; it is
# build output, not part of the site's navigation.
suppress_warnings: list[str] = []
