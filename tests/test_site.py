"""The built HTML site (``make docs``): it works offline, every card has a real thumbnail, the API page is whole.

These tests read ``docs/_build/html``; they are skipped when the site has not
been built (CI and the README's quick start build it before testing).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "docs" / "_build" / "html"
PAGES = sorted(SITE.rglob("*.html")) if SITE.exists() else []

pytestmark = pytest.mark.skipif(not (SITE / "index.html").exists(), reason="the site is not built (make docs)")


@pytest.mark.parametrize("page", [p for p in PAGES if "_static" not in p.parts and "_modules" not in p.parts], ids=lambda p: str(p.relative_to(SITE)))
def test_pages_load_nothing_from_the_network(page: Path) -> None:
    """Scripts, stylesheets and images are local files: the site (MathJax included) works offline."""
    html = page.read_text(encoding="utf-8")
    remote = re.findall(r'<(?:script|img)[^>]*\ssrc="(https?://[^"]+)"', html)
    remote += re.findall(r'<link[^>]*\shref="(https?://[^"]+)"[^>]*rel="(?:stylesheet|preload)"', html)
    remote += re.findall(r'<link[^>]*rel="(?:stylesheet|preload)"[^>]*\shref="(https?://[^"]+)"', html)
    assert not remote, remote


def test_math_renders_with_the_bundled_mathjax() -> None:
    """The page with equations loads MathJax from _static, and the file is there."""
    page = SITE / "tutorials" / "2_in_practice" / "plot_05_uncertainty.html"
    sources = re.findall(r'<script[^>]*src="([^"]*mathjax[^"]*)"', page.read_text(encoding="utf-8"), flags=re.I)
    assert sources, "no MathJax script on the page with math"
    for source in sources:
        assert (page.parent / source.split("?")[0]).resolve().is_file(), source


def test_every_tutorial_card_has_a_figure_of_its_own() -> None:
    """No gallery card shows sphinx-gallery's placeholder image."""
    index = (SITE / "tutorials" / "index.html").read_text(encoding="utf-8")
    thumbnails = re.findall(r'<img[^>]*src="([^"]*thumb[^"]*)"', index)
    assert len(thumbnails) == len(list((ROOT / "gallery").rglob("plot_*.py")))
    assert not [t for t in thumbnails if "no_image" in t], thumbnails


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


@pytest.mark.parametrize("page", sorted((SITE / "generated").glob("*.html")) if SITE.exists() else [], ids=lambda p: p.stem)
def test_api_pages_hide_internals(page: Path) -> None:
    """No private constructor argument, no torch.nn hook, no docstring inherited from str."""
    text = re.sub(r"<[^>]+>", " ", page.read_text(encoding="utf-8"))
    assert "_members=" not in text
    assert "extra_repr" not in text and "Return the extra representation" not in text
    assert "str(object=" not in text
