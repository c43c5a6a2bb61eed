"""Write ``docs/_inventories/torch.inv``: an intersphinx inventory of the PyTorch docs, made offline.

Intersphinx links names such as ``:func:`torch.vmap``` (and sphinx-gallery the
same names in code blocks) by reading the ``objects.inv`` a project publishes.
The docs build runs without network, so this script makes that file from the
installed torch instead: it walks torch's public names and writes them with
Sphinx's own inventory writer, at the addresses docs.pytorch.org/docs/stable
uses for them:

* one page per object, ``generated/<name>.html#<name>``, for the namespaces the
  PyTorch docs list with autosummary (``torch``, ``torch.nn``,
  ``torch.nn.functional``, ``torch.func``, ``torch.Tensor`` methods,
  ``torch.optim``, ``torch.cuda``, ``torch.linalg``, ...); the methods of a
  ``torch.nn`` or optimizer class are anchors on its class page;
* an anchor on one page, ``<page>.html#<name>``, for the namespaces documented
  with automodule (``torch.utils.data`` on ``data.html``, ``torch.testing``,
  ``torch.distributed``, ``torch.backends``, ``torch.utils.benchmark``, ...).

Only names with a docstring are written (torch leaves its undocumented
internals without one). Run it after changing the pinned torch version::

    .venv/bin/python tools/torch_inventory.py           # rewrite the file
    .venv/bin/python tools/torch_inventory.py --check   # exit 1 if it is stale
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch
from sphinx.util.inventory import InventoryFile

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "docs" / "_inventories" / "torch.inv"
BASE_URL = "https://docs.pytorch.org/docs/stable/"

# (fullname, role, uri relative to BASE_URL, anchor) as Sphinx's writer wants them.
Entry = tuple[str, str, str, str]

# Module pages: the anchor Sphinx's automodule writes is ``module-<name>``.
MODULE_PAGES = {
    "torch": "torch",
    "torch.nn": "nn",
    "torch.nn.functional": "nn.functional",
    "torch.nn.init": "nn.init",
    "torch.func": "func.api",
    "torch.optim": "optim",
    "torch.autograd": "autograd",
    "torch.cuda": "cuda",
    "torch.linalg": "linalg",
    "torch.fft": "fft",
    "torch.random": "random",
    "torch.testing": "testing",
    "torch.utils.data": "data",
    "torch.utils.benchmark": "benchmark_utils",
    "torch.distributed": "distributed",
    "torch.distributed.checkpoint": "distributed.checkpoint",
    "torch.backends": "backends",
    "torch.compiler": "torch.compiler_api",
}
# Objects of a generated namespace documented on another page.
SPECIAL_PAGES = {
    "torch.Tensor": "tensors",
    "torch.dtype": "tensor_attributes",
    "torch.device": "tensor_attributes",
    "torch.layout": "tensor_attributes",
    "torch.memory_format": "tensor_attributes",
    "torch.Size": "size",
    "torch.finfo": "type_info",
    "torch.iinfo": "type_info",
    "torch.autocast": "amp",
    "torch.Tensor.T": "tensors",
    "torch.Tensor.H": "tensors",
    "torch.Tensor.mT": "tensors",
    "torch.Tensor.mH": "tensors",
    "torch.optim.Optimizer": "optim",
}
# Module attributes (flags) documented on backends.html.
BACKEND_FLAGS = [
    "torch.backends.cuda.matmul.allow_tf32",
    "torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction",
    "torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction",
    "torch.backends.cudnn.enabled",
    "torch.backends.cudnn.allow_tf32",
    "torch.backends.cudnn.deterministic",
    "torch.backends.cudnn.benchmark",
    "torch.backends.cudnn.benchmark_limit",
    "torch.backends.mkldnn.enabled",
]
# torch.nn.Parameter and friends are documented under torch.nn.parameter.
NN_PARAMETER_CLASSES = (
    "Parameter",
    "Buffer",
    "UninitializedParameter",
    "UninitializedBuffer",
)


def _documented(obj: object) -> bool:
    doc = getattr(obj, "__doc__", None)
    return isinstance(doc, str) and bool(doc.strip())


def _role(obj: object) -> str | None:
    """The py-domain role of a public object, or None for what is not linked."""
    if inspect.ismodule(obj):
        return None
    if inspect.isclass(obj):
        return "class"
    if callable(obj):
        return "function"
    return None


def _public(module: ModuleType, names: Iterable[str] | None = None) -> Iterator[tuple[str, object, str]]:
    """(name, object, role) of the documented public functions and classes of a module."""
    for name in sorted(names if names is not None else dir(module)):
        if name.startswith("_"):
            continue
        obj = getattr(module, name, None)
        if getattr(obj, "__module__", None) == "typing":
            continue
        role = _role(obj)
        if role is not None and _documented(obj):
            yield name, obj, role


def _own_methods(cls: type) -> Iterator[str]:
    """Public documented methods a class defines itself (its page documents ``:members:``)."""
    for name, member in sorted(vars(cls).items()):
        if not name.startswith("_") and callable(member) and _documented(member):
            yield name


def _generated(name: str, role: str) -> Entry:
    page = SPECIAL_PAGES.get(name)
    return (name, role, f"{page}.html" if page else f"generated/{name}.html", name)


def _on_page(page: str, name: str, role: str) -> Entry:
    return (name, role, f"{page}.html", name)


def _torch_top_level() -> Iterator[Entry]:
    for name, _obj, role in _public(torch, torch.__all__):
        if name != "Tensor" and name.endswith(("Tensor", "Storage")):
            continue  # legacy typed tensor and storage classes have no pages
        yield _generated(f"torch.{name}", role)
    # Classes torch documents without a Python docstring on the object.
    for name in (
        "Tensor",
        "Generator",
        "dtype",
        "device",
        "layout",
        "memory_format",
        "finfo",
        "iinfo",
        "Size",
    ):
        yield _generated(f"torch.{name}", "class")


def _tensor() -> Iterator[Entry]:
    """torch.Tensor's methods (one generated page each) and attributes."""
    for name in sorted(dir(torch.Tensor)):
        member = inspect.getattr_static(torch.Tensor, name, None)
        if name.startswith("_") or not _documented(member):
            continue
        role = "method" if callable(member) else "attribute"
        yield _generated(f"torch.Tensor.{name}", role)


def _class_and_methods(cls: type, fullname: str, method_page: str | None = None) -> Iterator[Entry]:
    """A class on its own page with its methods as anchors there (or pages of their own)."""
    entry = _generated(fullname, "class")
    yield entry
    for method in _own_methods(cls):
        name = f"{fullname}.{method}"
        yield (_generated(name, "method") if method_page == "generated" else (name, "method", entry[2], name))


def _nn() -> Iterator[Entry]:
    for name, cls, role in _public(torch.nn):
        if role != "class":
            continue
        fullname = f"torch.nn.parameter.{name}" if name in NN_PARAMETER_CLASSES else f"torch.nn.{name}"
        entries = list(_class_and_methods(cls, fullname))
        yield from entries
        if name in NN_PARAMETER_CLASSES:  # the name users write, at the same address
            yield from ((n.replace(".parameter.", ".", 1), r, u, a) for n, r, u, a in entries)
    functional = torch.nn.functional
    for name, obj, role in _public(functional):
        own = getattr(obj, "__module__", "").startswith(("torch.nn.functional", "torch._C._nn"))
        if role == "function" and (own or getattr(torch, name, None) is obj):  # or a torch op F re-exports
            yield _generated(f"torch.nn.functional.{name}", role)
    for name, obj, role in _public(torch.nn.init):
        if getattr(obj, "__module__", None) == "torch.nn.init":
            yield _on_page("nn.init", f"torch.nn.init.{name}", role)
    for name, _obj, role in _public(torch.nn.utils, torch.nn.utils.__all__):
        yield _generated(f"torch.nn.utils.{name}", role)


def _optim() -> Iterator[Entry]:
    for name, cls, role in _public(torch.optim, torch.optim.__all__):
        if role != "class":
            continue
        generated = "generated" if cls is torch.optim.Optimizer else None
        yield from _class_and_methods(cls, f"torch.optim.{name}", method_page=generated)
    schedulers = torch.optim.lr_scheduler
    for name, cls, role in _public(schedulers):
        if role == "class" and issubclass(cls, schedulers.LRScheduler):
            yield from _class_and_methods(cls, f"torch.optim.lr_scheduler.{name}")


def _generated_namespace(module_name: str, names: Iterable[str] | None = None) -> Iterator[Entry]:
    module = importlib.import_module(module_name)
    for name, _obj, role in _public(module, names if names is not None else getattr(module, "__all__", None)):
        yield _generated(f"{module_name}.{name}", role)


def _page_namespace(module_name: str, names: Iterable[str] | None = None) -> Iterator[Entry]:
    """Objects documented on their module's page (automodule), with their methods."""
    module = importlib.import_module(module_name)
    page = MODULE_PAGES[module_name]
    for name, obj, role in _public(module, names if names is not None else getattr(module, "__all__", None)):
        fullname = f"{module_name}.{name}"
        yield _on_page(page, fullname, role)
        if role == "class":
            yield from (_on_page(page, f"{fullname}.{m}", "method") for m in _own_methods(obj))  # type: ignore[arg-type]


def _distributed() -> Iterator[Entry]:
    import torch.distributed as dist

    for name, obj, role in _public(dist):
        if getattr(obj, "__module__", "") in (
            "torch.distributed.distributed_c10d",
            "torch._C._distributed_c10d",
        ):
            yield _on_page("distributed", f"torch.distributed.{name}", role)


def _backends() -> Iterator[Entry]:
    for sub in (
        "cpu",
        "cuda",
        "cudnn",
        "mha",
        "mkl",
        "mkldnn",
        "mps",
        "nnpack",
        "openmp",
        "opt_einsum",
    ):
        module_name = f"torch.backends.{sub}"
        module = importlib.import_module(module_name)
        yield (
            "torch.backends." + sub,
            "module",
            "backends.html",
            f"module-{module_name}",
        )
        for name, obj, role in _public(module):
            if role == "function" and getattr(obj, "__module__", None) == module_name:
                yield _on_page("backends", f"{module_name}.{name}", role)
    yield from (_on_page("backends", flag, "attribute") for flag in BACKEND_FLAGS)


def entries() -> list[Entry]:
    """Every inventory entry, from the installed torch."""
    import torch.utils.benchmark  # noqa: F401  (imported so its names can be walked)

    with warnings.catch_warnings():  # deprecated aliases (torch.distributed.reduce_op) warn when touched
        warnings.simplefilter("ignore", FutureWarning)
        return _entries()


def _entries() -> list[Entry]:
    found: list[Entry] = [(name, "module", f"{page}.html", f"module-{name}") for name, page in MODULE_PAGES.items()]
    found += [
        *_torch_top_level(),
        *_tensor(),
        *_nn(),
        *_optim(),
        *_distributed(),
        *_backends(),
    ]
    for namespace in (
        "torch.func",
        "torch.cuda",
        "torch.linalg",
        "torch.fft",
        "torch.compiler",
    ):
        found += _generated_namespace(namespace)
    found += _generated_namespace("torch.autograd", ["backward", "grad"])
    found += _page_namespace("torch.utils.data")
    found += _page_namespace("torch.testing", ["assert_close", "make_tensor"])
    found += _page_namespace("torch.random")
    found += _page_namespace("torch.distributed.checkpoint")
    found += _page_namespace("torch.utils.benchmark", ["Timer", "Measurement", "Compare"])
    unique = {(name, role): (name, role, uri, anchor) for name, role, uri, anchor in found}
    return sorted(unique.values())


def torch_docs_version() -> str:
    """The installed torch's release (``2.13.0+cpu`` gives ``2.13.0``)."""
    return torch.__version__.split("+")[0]


class _Domain:
    """The part of a Sphinx domain that ``InventoryFile.dump`` reads."""

    def __init__(self, name: str, objects: list[tuple[str, str, str, str, str, int]]) -> None:
        self.name = name
        self._objects = objects

    def get_objects(self) -> Iterator[tuple[str, str, str, str, str, int]]:
        return iter(self._objects)


def write(path: Path, found: list[Entry]) -> None:
    """Write the entries with Sphinx's inventory writer (no Sphinx project needed)."""
    objects = [(name, name, role, uri, anchor, 1) for name, role, uri, anchor in found]
    domains = SimpleNamespace(sorted=lambda: [_Domain("py", objects)])
    env = SimpleNamespace(
        config=SimpleNamespace(project="PyTorch", version=torch_docs_version()),
        domains=domains,
    )
    builder = SimpleNamespace(get_target_uri=lambda docname: docname)
    path.parent.mkdir(parents=True, exist_ok=True)
    InventoryFile.dump(path, env, builder)  # type: ignore[arg-type]


def read(path: Path) -> dict[str, dict[str, str]]:
    """{role: {name: uri}} of an inventory file, as intersphinx reads it."""
    inventory = InventoryFile.loads(path.read_bytes(), uri=BASE_URL)
    return {role: {name: item.uri for name, item in items.items()} for role, items in inventory.data.items()}


def header_version(path: Path) -> str:
    """The torch version an inventory file was made from (its ``# Version:`` line)."""
    head = path.read_bytes().split(b"\n", 3)
    return head[2].decode().removeprefix("# Version: ").strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="compare with the stored file instead of writing it",
    )
    args = parser.parse_args(argv)
    found = entries()
    if not args.check:
        write(TARGET, found)
        print(f"wrote {len(found)} entries for torch {torch_docs_version()} to {TARGET.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "torch.inv"
        write(fresh, found)
        same = TARGET.exists() and read(fresh) == read(TARGET)
    if not same:
        print(
            f"{TARGET.relative_to(ROOT)} is stale: run tools/torch_inventory.py",
            file=sys.stderr,
        )
        return 1
    print(f"{TARGET.relative_to(ROOT)} is current ({len(found)} entries)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
