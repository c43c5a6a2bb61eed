"""Inputs and outputs that are not tensors, through ``torch.vmap``.

``torch.vmap`` maps pytrees of tensors only. A member that returns a cache object
(transformers' ``DynamicCache``, held inside a ``ModelOutput``), ``None``, an int or
a string, or that takes such a cache back in, goes through :func:`flatten`: the
object is taken apart into its tensors and a :class:`Spec` that remembers
everything else, the tensors cross ``vmap``, and :func:`rebuild` puts a new object
of the same class together around them. Containers ``torch.utils._pytree`` knows
(tuples, lists, dicts, named tuples, registered classes such as ``ModelOutput``
subclasses) are taken apart by it; any other object holding tensors in its
``__dict__`` (a cache, a layer of a cache) attribute by attribute.
"""

from __future__ import annotations

import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch.utils._pytree as pytree
from torch import Tensor, nn

__all__ = ["Spec", "differs", "flatten", "has_objects", "rebuild"]


@dataclass(frozen=True, eq=False)
class Spec:
    """How to rebuild one value: ``kind`` is "tensor", "const", "pytree" or "object".

    ``value`` is the constant ("const"), the one-level ``TreeSpec`` ("pytree") or the
    class ("object"); ``names`` and ``children`` are the fields and their specs.
    """

    kind: str
    value: Any = None
    names: tuple[str, ...] = ()
    children: tuple[Spec, ...] = ()


TENSOR = Spec("tensor")
_OPAQUE = (type, types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.ModuleType, nn.Module)


def _field_names(obj: Any, count: int) -> tuple[str, ...]:
    if isinstance(obj, Mapping) and len(obj) == count:
        return tuple(str(k) for k in obj)
    fields = getattr(obj, "_fields", None)  # a named tuple
    if isinstance(fields, tuple) and len(fields) == count:
        return tuple(str(f) for f in fields)
    return tuple(f"[{i}]" for i in range(count))


def _flatten(obj: Any, leaves: list[Tensor], seen: set[int]) -> Spec:
    if isinstance(obj, Tensor):
        leaves.append(obj)
        return TENSOR
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, *_OPAQUE)) or id(obj) in seen:
        return Spec("const", obj)
    seen = seen | {id(obj)}
    if pytree._get_node_type(obj) in pytree.SUPPORTED_NODES:
        children, treespec = pytree.tree_flatten(obj, is_leaf=lambda x: x is not obj)  # one level
        specs = tuple(_flatten(child, leaves, seen) for child in children)
        return Spec("pytree", treespec, _field_names(obj, len(children)), specs)
    attrs = getattr(obj, "__dict__", None)
    if isinstance(attrs, dict):
        start = len(leaves)
        specs = tuple(_flatten(value, leaves, seen) for value in attrs.values())
        if len(leaves) > start:  # an object holding tensors: rebuilt around the batched ones
            return Spec("object", type(obj), tuple(attrs), specs)
    return Spec("const", obj)


def flatten(obj: Any) -> tuple[list[Tensor], Spec]:
    """The tensors inside ``obj`` (depth first) and the spec that rebuilds ``obj`` around them."""
    leaves: list[Tensor] = []
    return leaves, _flatten(obj, leaves, set())


def has_objects(obj: Any) -> bool:
    """Whether ``obj`` holds anything but tensors in containers ``torch.vmap`` maps itself."""
    return not isinstance(obj, Tensor) and not all(isinstance(leaf, Tensor) for leaf in pytree.tree_leaves(obj))


def _rebuild(spec: Spec, tensors: Iterator[Tensor], made: list[Any]) -> Any:
    if spec.kind == "tensor":
        return next(tensors)
    if spec.kind == "const":
        return spec.value
    children = [_rebuild(child, tensors, made) for child in spec.children]
    if spec.kind == "pytree":
        return pytree.tree_unflatten(children, spec.value)
    obj = spec.value.__new__(spec.value)
    obj.__dict__.update(zip(spec.names, children))
    made.append(obj)
    return obj


def rebuild(spec: Spec, tensors: list[Tensor] | tuple[Tensor, ...]) -> tuple[Any, list[Any]]:
    """``obj`` rebuilt from its spec and (new) tensors, and the objects made on the way."""
    made: list[Any] = []
    return _rebuild(spec, iter(tensors), made), made


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:  # a value with no truth (an array) or a failing __eq__: only identity counts
        return False


def differs(a: Spec, b: Spec, path: str = "output") -> tuple[str, Any, Any] | None:
    """The first field where two specs differ, with the two values, or None when they agree."""
    if a.kind != b.kind or a.names != b.names or len(a.children) != len(b.children):
        return path, a.value if a.kind == "const" else a.kind, b.value if b.kind == "const" else b.kind
    if a.kind == "const":
        return None if _same(a.value, b.value) else (path, a.value, b.value)
    if a.kind == "object" and a.value is not b.value:
        return path, a.value, b.value
    for name, ca, cb in zip(a.names, a.children, b.children):
        sub = f"{path}{name}" if name.startswith("[") else f"{path}.{name}"
        found = differs(ca, cb, sub)
        if found is not None:
            return found
    return None
