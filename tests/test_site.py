"""The built HTML site (``make docs``): it works offline, every card has a real thumbnail, the API page is whole,
PyTorch names link to the PyTorch docs.

The site tests read ``docs/_build/html``; they are skipped when the site has not
been built (CI and the README's quick start build it before testing). The test of
the stored PyTorch inventory (``docs/_inventories/torch.inv``) always runs.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "docs" / "_build" / "html"
PAGES = sorted(SITE.rglob("*.html")) if SITE.exists() else []

needs_site = pytest.mark.skipif(not (SITE / "index.html").exists(), reason="the site is not built (make docs)")


@needs_site
@pytest.mark.parametrize(
    "page",
    [p for p in PAGES if "_static" not in p.parts and "_modules" not in p.parts],
    ids=lambda p: str(p.relative_to(SITE)),
)
def test_pages_load_nothing_from_the_network(page: Path) -> None:
    """Scripts, stylesheets and images are local files: the site (MathJax included) works offline."""
    html = page.read_text(encoding="utf-8")
    remote = re.findall(r'<(?:script|img)[^>]*\ssrc="(https?://[^"]+)"', html)
    remote += re.findall(r'<link[^>]*\shref="(https?://[^"]+)"[^>]*rel="(?:stylesheet|preload)"', html)
    remote += re.findall(r'<link[^>]*rel="(?:stylesheet|preload)"[^>]*\shref="(https?://[^"]+)"', html)
    assert not remote, remote


@needs_site
def test_math_renders_with_the_bundled_mathjax() -> None:
    """The page with equations loads MathJax from _static, and the file is there."""
    page = SITE / "tutorials" / "2_in_practice" / "plot_05_uncertainty.html"
    sources = re.findall(
        r'<script[^>]*src="([^"]*mathjax[^"]*)"', page.read_text(encoding="utf-8"), flags=re.IGNORECASE
    )
    assert sources, "no MathJax script on the page with math"
    for source in sources:
        assert (page.parent / source.split("?")[0]).resolve().is_file(), source


@needs_site
def test_every_tutorial_card_has_a_figure_of_its_own() -> None:
    """No gallery card shows sphinx-gallery's placeholder image."""
    index = (SITE / "tutorials" / "index.html").read_text(encoding="utf-8")
    thumbnails = re.findall(r'<img[^>]*src="([^"]*thumb[^"]*)"', index)
    assert len(thumbnails) == len(list((ROOT / "gallery").rglob("plot_*.py")))
    assert not [t for t in thumbnails if "no_image" in t], thumbnails


@needs_site
def test_api_has_a_page_per_object_with_the_tutorials_using_it() -> None:
    """The API index links a page per object; Ensemble's lists its methods and the tutorials using it."""
    index = (SITE / "api.html").read_text(encoding="utf-8")
    assert 'href="generated/ensembling.Ensemble.html' in index
    assert 'href="generated/ensembling.legacy.combine_state_for_ensemble.html' in index
    page = (SITE / "generated" / "ensembling.Ensemble.html").read_text(encoding="utf-8")
    text = re.sub(r"<[^>]+>", " ", page)
    assert "Tutorials using" in text and page.count("sphx-glr-thumbcontainer") >= 3
    for method in ("from_modules", "forward", "__getitem__", "unstack", "load_state_dict"):
        assert f'id="ensembling.Ensemble.{method}"' in page, method


@needs_site
@pytest.mark.parametrize(
    "page", sorted((SITE / "generated").glob("*.html")) if SITE.exists() else [], ids=lambda p: p.stem
)
def test_api_pages_hide_internals(page: Path) -> None:
    """No private constructor argument, no torch.nn hook, no docstring inherited from str."""
    text = re.sub(r"<[^>]+>", " ", page.read_text(encoding="utf-8"))
    assert "_members=" not in text
    assert "extra_repr" not in text and "Return the extra representation" not in text
    assert "str(object=" not in text


TORCH_DOCS = "https://docs.pytorch.org/docs/stable/"
LINKED_IN_PLOT_01 = ("torch.vmap", "torch.func.stack_module_state", "torch.func.functional_call")


@needs_site
@pytest.mark.parametrize("name", LINKED_IN_PLOT_01)
def test_plot_01_links_torch_names_to_the_pytorch_docs(name: str) -> None:
    """plot_01 links each torch.func name to its docs.pytorch.org page, in the prose and in the code."""
    page = (SITE / "tutorials" / "1_vectorizing" / "plot_01_mlp_ensembling.html").read_text(encoding="utf-8")
    href = f'href="{TORCH_DOCS}generated/{name}.html#{name}"'
    links = re.findall(rf'<a class="([^"]*)" {re.escape(href)}', page)
    assert any("sphx-glr-backref" not in c for c in links), f"{name} is not linked in the prose"
    assert any("sphx-glr-backref" in c for c in links), f"{name} is not linked in the code"


def _inventory_tool():
    spec = importlib.util.spec_from_file_location("torch_inventory", ROOT / "tools" / "torch_inventory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stored_torch_inventory_is_current() -> None:
    """docs/_inventories/torch.inv is what tools/torch_inventory.py makes from the installed torch."""
    tool = _inventory_tool()
    stored = tool.read(tool.TARGET)
    for name in LINKED_IN_PLOT_01:
        assert stored["py:function"][name] == f"{TORCH_DOCS}generated/{name}.html#{name}"
    assert stored["py:class"]["torch.nn.Linear"] == f"{TORCH_DOCS}generated/torch.nn.Linear.html#torch.nn.Linear"
    if tool.header_version(tool.TARGET) != tool.torch_docs_version():
        pytest.skip(f"the inventory is for torch {tool.header_version(tool.TARGET)}, not the installed one")
    fresh = {role: {} for role in stored}
    for name, role, uri, anchor in tool.entries():
        fresh.setdefault(f"py:{role}", {})[name] = f"{TORCH_DOCS}{uri}#{anchor}"
    assert fresh == stored, "stale: run tools/torch_inventory.py"


@needs_site
def test_no_card_thumbnail_is_a_thin_strip() -> None:
    """Every card's thumbnail fills its box enough to read: its drawing is at most 3 times wider than tall."""
    from PIL import Image, ImageChops

    index = SITE / "tutorials" / "index.html"
    sources = re.findall(r'<img[^>]*src="([^"]*thumb[^"]*)"', index.read_text(encoding="utf-8"))
    strips = {}
    for source in sources:
        image = Image.open(index.parent / source).convert("RGB")
        box = ImageChops.difference(image, Image.new("RGB", image.size, "white")).getbbox()
        if box and (box[2] - box[0]) > 3 * (box[3] - box[1]):
            strips[source] = box
    assert not strips, f"thin-strip thumbnails (give the page a dedicated one, tools/thumbnails.py): {strips}"
