"""Shared fixtures: the repository paths, a copy of the checkout to build from, the device, seeded generators."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

import ensembling

ROOT = Path(__file__).resolve().parent.parent


# Not needed to build the package: version control, environments, build output, the site.
NOT_COPIED = {".git", "build", "dist", "docs", "notebooks", ".make", ".hypothesis", "__pycache__"}


def copy_checkout(destination: Path) -> Path:
    """A copy of this checkout without what no build reads (building writes into its source tree)."""

    def leave_out(folder: str, names: list[str]) -> set[str]:
        return {
            n for n in names if n in NOT_COPIED or n.endswith(".egg-info") or Path(folder, n, "pyvenv.cfg").exists()
        }

    shutil.copytree(ROOT, destination, ignore=leave_out)
    return destination


def load_tool(name: str) -> ModuleType:
    """Import ``tools/<name>.py`` (the tools folder is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def notebooks_tool() -> ModuleType:
    return load_tool("notebooks")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return ensembling.default_device()


@pytest.fixture
def generator() -> torch.Generator:
    """A CPU generator with a fixed seed, so test data are the same on every run."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture(autouse=True)
def fresh_compile_caches() -> Iterator[None]:
    """After each test, forget what torch.compile compiled (13 us when nothing was).

    Every ensemble's forward is one code object, and dynamo keeps at most 8
    compiled versions of a code object (``recompile_limit``) per process: past
    that, a ``fullgraph=True`` compile fails with "Hard failure due to
    fullgraph=True" instead of its own error. Without this, whether a compile
    test passed depended on how many compiling tests ran before it.
    """
    yield
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()
