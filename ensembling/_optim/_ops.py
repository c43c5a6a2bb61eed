"""Foreach operations whose scalar may be one value per member (``[n]``, broadcast as ``[n, 1, ...]``)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._values import Value, broadcast, is_shared, scalar

Host = float | Tensor
"""A per-member quantity on the host: a float shared by all members, or a float64 CPU tensor ``[n]``."""


def host(value: Value) -> Host:
    """A group's value as a float when every member shares it, else as a plain float64 CPU tensor ``[n]``."""
    if isinstance(value, Tensor):
        if is_shared(value):
            return scalar(value)  # type: ignore[arg-type]
        with torch._C.DisableTorchFunctionSubclass():
            return value.as_subclass(Tensor)
    return value


def on(x: Host, like: Tensor) -> list[Tensor] | float:
    """``x`` ready for a foreach op on tensors like ``like``: a float, or ``[n, 1, ...]`` views on its device."""
    if isinstance(x, float):
        return x
    return x.to(device=like.device, dtype=like.dtype, non_blocking=True)  # type: ignore[return-value]


def views(x: float | Tensor, tensors: list[Tensor]) -> float | list[Tensor]:
    return x if isinstance(x, float) else broadcast(x, tensors)


def mul_(tensors: list[Tensor], x: Host) -> None:
    """``t *= x`` for every tensor (``x`` per member or shared)."""
    torch._foreach_mul_(tensors, views(on(x, tensors[0]), tensors))  # type: ignore[arg-type]


def scaled(tensors: list[Tensor], x: Host) -> list[Tensor]:
    """``x * t`` for every tensor, as new tensors."""
    return list(torch._foreach_mul(tensors, views(on(x, tensors[0]), tensors)))  # type: ignore[arg-type]


def add_scaled(tensors: list[Tensor], others: list[Tensor], x: Host, inplace: bool) -> list[Tensor]:
    """``t + x * o`` (torch's ``t.add(o, alpha=x)``), in place or as new tensors."""
    if isinstance(x, float):
        if inplace:
            torch._foreach_add_(tensors, others, alpha=x)
            return tensors
        return list(torch._foreach_add(tensors, others, alpha=x))
    xs = views(on(x, tensors[0]), tensors)
    if inplace:
        torch._foreach_addcmul_(tensors, others, xs)  # type: ignore[arg-type]
        return tensors
    return list(torch._foreach_addcmul(tensors, others, xs))  # type: ignore[arg-type]


def lerp_(tensors: list[Tensor], ends: list[Tensor], weight: Host) -> None:
    """``t.lerp_(end, weight)`` for every tensor."""
    torch._foreach_lerp_(tensors, ends, views(on(weight, tensors[0]), tensors))  # type: ignore[arg-type]


def div_(tensors: list[Tensor], x: Host) -> None:
    """``t /= x`` for every tensor."""
    torch._foreach_div_(tensors, views(on(x, tensors[0]), tensors))  # type: ignore[arg-type]


def add_(tensors: list[Tensor], x: Host) -> None:
    """``t += x`` for every tensor."""
    torch._foreach_add_(tensors, views(on(x, tensors[0]), tensors))  # type: ignore[arg-type]
