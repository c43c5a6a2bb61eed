"""Let a CUDA torchvision wheel import beside a CPU-only torch (development environments only).

PyPI's torchvision wheel for Linux is a CUDA build. Beside the CPU build of the
same torch its compiled operators cannot load; torchvision tolerates that
everywhere except two ``register_fake("torchvision::nms" / "qnms")`` calls,
which raise ``operator torchvision::nms does not exist`` -- and transformers and
timm import torchvision whenever it is installed, so they fail too.

``tools/ensure_env.py`` installs this file into the environment's
site-packages, with a ``.pth`` line that registers :class:`_Finder`, only when
that exact failure happens. The finder does nothing at interpreter start: the
first ``import torchvision`` defines the two operator schemas (no kernels; no
model the project uses calls them) and then lets the normal import proceed.
The ``ensembling`` package never depends on this.
"""

from __future__ import annotations

import importlib.abc
import sys
from typing import Any

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_KEEP: list[Any] = []  # the torch.library fragment must outlive the import


class _Finder(importlib.abc.MetaPathFinder):
    """Before the first ``import torchvision``, define the operator schemas its import registers fakes for."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname != "torchvision" or _KEEP:
            return None
        import torch

        lib = torch.library.Library("torchvision", "FRAGMENT")
        for schema in _SCHEMAS:
            try:
                lib.define(schema)
            except RuntimeError:  # already defined (a working build got there first)
                pass
        _KEEP.append(lib)
        return None  # the ordinary finders import torchvision itself


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
