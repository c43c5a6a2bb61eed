"""The release artifacts, as ``make dist`` builds them and the README's "Releasing" steps 2-3 check them.

``python -m build`` writes the sdist and, from it, the wheel (in an isolated
build environment: setuptools comes from the package index, as CI has), and
``twine check --strict`` checks both (metadata, the README as PyPI renders
it). Then what step 3 asks a maintainer to look at before an upload, which
cannot be replaced: the sdist holds the library, README, LICENSE and
pyproject.toml and no tests; the wheel holds exactly the package files git
tracks, byte for byte, plus the license; both carry ``ensembling.__version__``.
The build runs on a copy of the checkout (it writes into its source tree):
about 10 s on a 2-core machine.
"""

from __future__ import annotations

import email
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import ensembling
from conftest import ROOT, copy_checkout

VERSION = ensembling.__version__
# Beside the package, what the sdist may hold: setuptools' own files and the three the README names.
SDIST_TOP = {"PKG-INFO", "README.md", "LICENSE", "pyproject.toml", "setup.cfg", "MANIFEST.in", "ensembling.egg-info"}


def _tracked_package_files() -> dict[str, bytes]:
    """The package files git tracks (what a release must ship, and nothing else), by path."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "ensembling"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if listed.returncode != 0:
        pytest.skip("not a git checkout: the release is built from a clone")
    return {name: (ROOT / name).read_bytes() for name in listed.stdout.split("\0") if name}


def _run(*command: str | Path, cwd: Path) -> None:
    run = subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True, check=False, timeout=600)
    output = (run.stdout + run.stderr)[-4000:]
    assert run.returncode == 0, f"{' '.join(map(str, command[:4]))}: exit {run.returncode}\n{output}"


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``make dist`` on a copy of the checkout: the sdist and the wheel, both passed by ``twine check --strict``."""
    work = tmp_path_factory.mktemp("release")
    source, out = copy_checkout(work / "source"), work / "dist"
    _run(sys.executable, "-m", "build", "--outdir", out, source, cwd=work)
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    _run(sys.executable, "-m", "twine", "check", "--strict", sdist, wheel, cwd=work)
    return {"sdist": sdist, "wheel": wheel}


@pytest.mark.slow
def test_the_wheel_ships_exactly_the_tracked_package_and_the_license(dist: dict[str, Path]) -> None:
    assert dist["wheel"].name == f"ensembling-{VERSION}-py3-none-any.whl"
    info = f"ensembling-{VERSION}.dist-info"
    with zipfile.ZipFile(dist["wheel"]) as archive:
        names = set(archive.namelist())
        package = {name: archive.read(name) for name in names if not name.startswith(f"{info}/")}
        headers, description = archive.read(f"{info}/METADATA").decode("utf-8").split("\n\n", 1)
        license_text = archive.read(f"{info}/licenses/LICENSE")
    tracked = _tracked_package_files()
    assert sorted(package) == sorted(tracked), "the wheel's package files are not the ones git tracks"
    changed = [name for name, data in package.items() if data != tracked[name]]
    assert not changed, f"differ from the checkout: {changed}"
    assert license_text == (ROOT / "LICENSE").read_bytes()
    metadata = email.message_from_string(headers)
    assert (metadata["Name"], metadata["Version"]) == ("ensembling", VERSION)
    assert metadata["License-Expression"] == "BSD-3-Clause"
    assert metadata["Description-Content-Type"] == "text/markdown"
    assert description == (ROOT / "README.md").read_text(encoding="utf-8")  # PyPI's project page


@pytest.mark.slow
def test_the_sdist_is_the_library_without_the_tests(dist: dict[str, Path]) -> None:
    top = f"ensembling-{VERSION}"
    assert dist["sdist"].name == f"{top}.tar.gz"
    with tarfile.open(dist["sdist"]) as archive:
        files = {m.name.removeprefix(f"{top}/"): m for m in archive.getmembers() if m.isfile()}
        contents = {name: archive.extractfile(member).read() for name, member in files.items()}  # type: ignore[union-attr]
    outside = sorted({name.split("/")[0] for name in files} - SDIST_TOP - {"ensembling"})
    assert not outside, f"the sdist holds more than the library: {outside}"  # tests, gallery, notebooks, tools ...
    package = {name: data for name, data in contents.items() if name.startswith("ensembling/")}
    assert package == _tracked_package_files()
    for name in ("README.md", "LICENSE", "pyproject.toml"):
        assert contents[name] == (ROOT / name).read_bytes(), name
