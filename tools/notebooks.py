"""Generate ``notebooks/<name>.ipynb`` from ``gallery/<name>.py``, executed.

The gallery scripts are the single source of truth. Each one is converted with
Sphinx-Gallery's own parser and notebook writer, cleaned exactly as the docs
build cleans it (ignore blocks and ``# sphinx_gallery_`` config comments
removed, with the options from ``docs/conf.py``), so a stored notebook has the
same cells as the "Download Jupyter notebook" link of its docs page. It is
then executed with nbclient and written atomically.

A notebook is regenerated only when its inputs changed: the script, the
``ensembling`` package, ``docs/conf.py`` or this file. Their digest is stored
in the notebook's metadata, so running this twice leaves every file
byte-identical, while a library change re-executes every page.

Usage::

    python tools/notebooks.py                 # regenerate what is stale
    python tools/notebooks.py --check         # exit 1 if anything is stale
    python tools/notebooks.py --force NAME    # re-execute one page regardless
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import runpy
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nbformat

ROOT = Path(__file__).resolve().parent.parent
GALLERY = ROOT / "gallery"
NOTEBOOKS = ROOT / "notebooks"
CONF = ROOT / "docs" / "conf.py"
PACKAGE = ROOT / "ensembling"
METADATA_KEY = "ensembling"
KERNEL_TIMEOUT_S = 600


def gallery_scripts() -> list[Path]:
    """Every tutorial script, in reading order (subfolders are gallery sections)."""
    return sorted(GALLERY.rglob("plot_*.py"))


def notebook_path(script: Path) -> Path:
    return NOTEBOOKS / (script.stem + ".ipynb")


def gallery_conf() -> dict[str, Any]:
    """Sphinx-Gallery's defaults updated with the options in docs/conf.py."""
    from sphinx_gallery.gen_gallery import DEFAULT_GALLERY_CONF

    conf = copy.deepcopy(DEFAULT_GALLERY_CONF)
    conf.update(runpy.run_path(str(CONF))["sphinx_gallery_conf"])
    return conf


def convert(script: Path, conf: dict[str, Any] | None = None) -> nbformat.NotebookNode:
    """The unexecuted notebook the docs build would offer for ``script``."""
    from sphinx_gallery import notebook
    from sphinx_gallery import py_source_parser as parser

    conf = gallery_conf() if conf is None else conf  # runs docs/conf.py, which wraps notebook.jupyter_notebook
    _, blocks = parser.split_code_and_text_blocks(str(script))
    # The same steps, in the same order, as sphinx_gallery.gen_rst._clean_script_blocks.
    blocks = [parser.Block(label, parser.remove_ignore_blocks(content), lineno) for label, content, lineno in blocks]
    if conf["remove_config_comments"]:
        blocks = [
            parser.Block(label, parser.remove_config_comments(content), lineno) for label, content, lineno in blocks
        ]
    if blocks[-1].content.isspace():
        blocks = blocks[:-1]
    target_dir = CONF.parent / conf["gallery_dirs"] / script.parent.relative_to(GALLERY)
    # sphinx-gallery stores sources as lists of lines; reading the JSON back
    # through nbformat gives the canonical in-memory form (strings).
    return nbformat.reads(json.dumps(notebook.jupyter_notebook(blocks, conf, target_dir)), as_version=4)


def inputs_digest(script: Path) -> str:
    """SHA-256 over everything that can change what a notebook shows."""
    digest = hashlib.sha256()
    inputs = [script, CONF, Path(__file__).resolve(), *sorted(PACKAGE.rglob("*.py"))]
    for path in inputs:
        digest.update(path.relative_to(ROOT).as_posix().encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()


def cells_signature(notebook: nbformat.NotebookNode) -> list[tuple[str, str]]:
    """What must agree between a script and its notebook: cell types and sources."""
    return [(cell.cell_type, "".join(cell.source)) for cell in notebook.cells]


def stale_reason(script: Path, conf: dict[str, Any]) -> str | None:
    """Why ``script``'s notebook must be regenerated, or None when it is current."""
    path = notebook_path(script)
    if not path.exists():
        return "no notebook"
    stored = nbformat.read(path, as_version=4)
    meta = stored.metadata.get(METADATA_KEY, {})
    if meta.get("inputs_sha256") != inputs_digest(script):
        return "script, package, docs/conf.py or generator changed"
    if cells_signature(stored) != cells_signature(convert(script, conf)):
        return "cells differ from the script"
    return None


def execute(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Run every cell in a fresh kernel of this interpreter, from notebooks/."""
    import matplotlib.font_manager  # noqa: F401  builds matplotlib's font cache here, not in a cell's stderr
    from nbclient import NotebookClient

    client = NotebookClient(
        notebook,
        timeout=KERNEL_TIMEOUT_S,
        kernel_name="python3",
        record_timing=False,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()
    return notebook


def write_atomically(notebook: nbformat.NotebookNode, path: Path) -> None:
    """Write to a temporary file beside ``path``, then rename it over ``path``."""
    text = nbformat.writes(notebook, version=4)
    if not text.endswith("\n"):
        text += "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".ipynb.tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def generate(script: Path, conf: dict[str, Any]) -> None:
    notebook = convert(script, conf)
    notebook.metadata[METADATA_KEY] = {
        "generated_from": script.relative_to(GALLERY.parent).as_posix(),
        "generator": "tools/notebooks.py (do not edit by hand: edit the script and run `make notebooks`)",
        "inputs_sha256": inputs_digest(script),
    }
    execute(notebook)
    write_atomically(notebook, notebook_path(script))


def orphans() -> list[Path]:
    """Stored notebooks whose gallery script no longer exists."""
    expected = {notebook_path(script) for script in gallery_scripts()}
    return sorted(p for p in NOTEBOOKS.glob("*.ipynb") if p not in expected)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="script stems to consider (default: all)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="only report stale notebooks")
    mode.add_argument("--force", action="store_true", help="re-execute even if current")
    args = parser.parse_args(argv)

    scripts = gallery_scripts()
    if args.names:
        known = {s.stem: s for s in scripts}
        unknown = [n for n in args.names if n.removesuffix(".py") not in known]
        if unknown:
            parser.error(f"no gallery script named {unknown}; known: {sorted(known)}")
        scripts = [known[n.removesuffix(".py")] for n in args.names]

    conf = gallery_conf()
    problems = []
    for script in scripts:
        reason = "forced" if args.force else stale_reason(script, conf)
        name = notebook_path(script).relative_to(ROOT)
        if reason is None:
            print(f"current   {name}")
            continue
        if args.check:
            problems.append(f"{name}: {reason}")
            print(f"STALE     {name} ({reason})")
            continue
        start = time.perf_counter()
        print(f"executing {name} ({reason}) ...", flush=True)
        generate(script, conf)
        print(f"wrote     {name} in {time.perf_counter() - start:.1f} s", flush=True)

    for orphan in orphans():
        if args.check:
            problems.append(f"{orphan.relative_to(ROOT)}: no gallery script")
            print(f"ORPHAN    {orphan.relative_to(ROOT)}")
        else:
            orphan.unlink()
            print(f"removed   {orphan.relative_to(ROOT)} (its script is gone)")

    if problems:
        print("\nStored notebooks are out of date; run `make notebooks` and commit them:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
