"""Sphinx configuration: the tutorials (sphinx-gallery) and the API reference."""

from __future__ import annotations

import json
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
    "sphinx.ext.intersphinx",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx_gallery.gen_gallery",
    # MathJax copied into _static (the math of the uncertainty page renders offline).
    "sphinx-mathjax-offline",
]

# PyTorch names (:func:`torch.vmap`, :class:`torch.nn.Linear`, and the same
# names in tutorial code, through sphinx-gallery) link to the PyTorch docs by
# intersphinx. The build runs without internet, so the inventory is a stored
# file, made from the installed torch by tools/torch_inventory.py.
intersphinx_mapping = {
    "torch": ("https://docs.pytorch.org/docs/stable/", str(DOCS / "_inventories" / "torch.inv")),
}

autosummary_generate = True
autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
    # nn.Module's repr hook, documented by torch: not part of this package's API.
    "exclude-members": "extra_repr",
}
napoleon_numpy_docstring = True
napoleon_google_docstring = False
napoleon_use_rtype = False

exclude_patterns = ["_build", "tutorials/*.ipynb", "tutorials/*.py", "tutorials/*.zip"]
templates_path = ["_templates"]  # autosummary: one page per object, with the tutorials using it
html_static_path = ["_static"]
html_css_files = ["custom.css"]

html_theme = "pydata_sphinx_theme"
html_title = "ensembling"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc", "sg_download_links", "sg_launcher_links"],
}
# No left sidebar on the landing page, the tutorial pages and the API pages:
# their code runs to 100 columns and needs the width (the top bar and
# breadcrumbs still navigate; the gallery index keeps its section list).
html_sidebars = {"index": [], "tutorials/*/plot_*": [], "api": [], "generated/*": []}


def _first_notebook_cell(version: str, huggingface: bool = False) -> str:
    """The first cell of a notebook: install what its page needs where it is missing, then figures inline.

    In a fresh Jupyter or Colab kernel that has only torch, some of the modules
    are missing and the cell installs this docs build's release of the package
    with the extras that page needs: ``tutorials`` (matplotlib, scikit-learn) on
    every page, and ``huggingface`` (transformers, ipywidgets) on a page that
    imports transformers (``_notebook_for_page``), so the other pages' readers
    do not wait for it (half of the install on a 2-core machine, 53 s against
    29 s). pip keeps the kernel's torch. The cell looks the modules up without
    importing them: importing transformers costs seconds, and in a kernel
    without ipywidgets it prints tqdm's "IProgress not found" warning.
    Where everything is installed (the stored notebooks, nbval) it prints nothing
    (tests/test_notebooks.py checks that of every stored notebook).
    tests/test_reader_install.py runs a downloaded notebook through this path.
    """
    modules = ["ensembling", "matplotlib", "sklearn", *(["transformers", "ipywidgets"] if huggingface else [])]
    names = "ensembling, matplotlib, scikit-learn" + (", transformers, ipywidgets" if huggingface else "")
    extras = "tutorials,huggingface" if huggingface else "tutorials"
    return (
        "# Installs what this page needs where it is missing (a fresh Jupyter or Colab\n"
        f"# kernel with torch): {names}.\n"
        "from importlib.util import find_spec\n"
        "\n"
        f"needed = {json.dumps(modules)}\n"
        "if not all(map(find_spec, needed)):\n"
        f'    %pip install "ensembling[{extras}]=={version}"\n'
        "%matplotlib inline"
    )


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
    # No execution-time pages: they are build statistics, not content, and they
    # load their table scripts from CDNs (the site must work offline).
    "write_computation_times": False,
    "image_srcset": [],
    # The downloaded notebooks (and the stored ones, which equal them) start with
    # this cell: it installs what the page needs where it is missing, and shows
    # figures inline whatever MPLBACKEND the reader's shell sets.
    "first_notebook_cell": _first_notebook_cell(release),
    # "Examples using ..." on the API page: which tutorials use each object.
    "backreferences_dir": "generated/backreferences",
    "doc_module": ("ensembling",),
}

suppress_warnings: list[str] = []


# Notebooks: sphinx-gallery turns the prose into Markdown but leaves Sphinx roles
# such as :func:`torch.vmap` as literal text (it rewrites only :ref:, into a bare
# label). Roles become inline code first; a reference to another tutorial becomes
# its notebook's file name, and a titled reference its title. This file is also
# run by tools/notebooks.py, so the stored notebooks get the same cells.
import re  # noqa: E402

import sphinx_gallery.notebook  # noqa: E402

_ROLE = re.compile(r":(?:[a-z]+:)?([a-z]+):`([^`]+)`")
_TUTORIAL_LABEL = re.compile(r"^sphx_glr_tutorials_.*?_(plot_\w+)\.py$")


def _role_to_markdown(match: re.Match[str]) -> str:
    role, content = match.groups()
    if role == "math":  # sphinx-gallery converts math itself
        return match.group(0)
    titled = re.fullmatch(r"(.*?)\s*<([^>]+)>", content, flags=re.S)
    if titled:
        return titled.group(1) if role == "ref" else f"`{titled.group(1)}`"
    if role == "ref":
        tutorial = _TUTORIAL_LABEL.match(content)
        return f"`{tutorial.group(1)}.ipynb`" if tutorial else content
    return f"`{content.lstrip('~').rsplit('.', 1)[-1] if content.startswith('~') else content}`"


def _rst2md_with_roles(text: str, *args, **kwargs) -> str:
    return _rst2md(_ROLE.sub(_role_to_markdown, text), *args, **kwargs)


if not getattr(sphinx_gallery.notebook.rst2md, "rewrites_roles", False):
    _rst2md = sphinx_gallery.notebook.rst2md
    _rst2md_with_roles.rewrites_roles = True  # type: ignore[attr-defined]
    sphinx_gallery.notebook.rst2md = _rst2md_with_roles


# The first cell installs what its page imports: a page that imports transformers
# gets the ``huggingface`` extra too (see _first_notebook_cell). sphinx-gallery
# takes one first cell for every page, so its notebook writer is wrapped, where
# the docs build (gen_rst) and tools/notebooks.py (notebook) look it up.
import sphinx_gallery.gen_rst  # noqa: E402

_IMPORTS_TRANSFORMERS = re.compile(r"^(?:from|import) transformers\b", re.M)


def _notebook_for_page(script_blocks, gallery_conf, target_dir):
    """sphinx-gallery's jupyter_notebook, with the first cell of the page's own needs."""
    code = "\n".join(block.content for block in script_blocks if block.type == "code")
    huggingface = _IMPORTS_TRANSFORMERS.search(code) is not None
    conf = {**gallery_conf, "first_notebook_cell": _first_notebook_cell(release, huggingface)}
    return _jupyter_notebook(script_blocks, conf, target_dir)


if not getattr(sphinx_gallery.notebook.jupyter_notebook, "per_page_first_cell", False):
    _jupyter_notebook = sphinx_gallery.notebook.jupyter_notebook
    _notebook_for_page.per_page_first_cell = True  # type: ignore[attr-defined]
    sphinx_gallery.notebook.jupyter_notebook = _notebook_for_page
    sphinx_gallery.gen_rst.jupyter_notebook = _notebook_for_page
