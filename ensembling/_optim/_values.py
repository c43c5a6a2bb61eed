"""Per-member hyperparameter values: validation, storage and broadcasting."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._errors import EnsembleError

__all__ = ["MemberValues", "Value", "as_value", "broadcast", "check_range", "is_shared", "scalar"]


class MemberValues(Tensor):
    """A 1-D float64 CPU tensor holding one hyperparameter value per member.

    It is what a param group stores for a per-member hyperparameter
    (``group["lr"]``, ``group["weight_decay"]``, each entry of ``group["betas"]``,
    ...). It is an ordinary tensor for arithmetic (``lr * 0.5``, ``lr - eta_min``
    give ``MemberValues``), so torch's learning-rate schedulers work on it; its
    ``fill_`` also accepts one value per member, which is how the schedulers
    write a new learning rate into a group that holds a tensor.

    Examples
    --------
    >>> lr = MemberValues.of([0.1, 0.01, 0.001])  # [3], float64, on the CPU
    >>> lr * 0.5
    MemberValues([0.0500, 0.0050, 0.0005], dtype=torch.float64)
    >>> lr.fill_(torch.tensor([1.0, 2.0, 3.0])).tolist()  # one value per member
    [1.0, 2.0, 3.0]
    """

    @staticmethod
    def of(values: Sequence[float] | Tensor) -> MemberValues:
        """``values`` as a fresh 1-D float64 CPU ``MemberValues``."""
        plain = torch.as_tensor(values, dtype=torch.float64).detach().to("cpu").clone().reshape(-1)
        return plain.as_subclass(MemberValues)

    def fill_(self, value: Any) -> MemberValues:  # type: ignore[override]
        if isinstance(value, Tensor) and value.dim() > 0:
            with torch._C.DisableTorchFunctionSubclass():
                if value.numel() != self.numel():
                    raise EnsembleError(
                        f"MemberValues.fill_: got {value.numel()} values for {self.numel()} members; "
                        "pass one value, or one per member."
                    )
                self.copy_(value.detach().reshape(self.shape))
            return self
        return super().fill_(value)

    def __format__(self, format_spec: str) -> str:
        if self.dim() == 0:
            return format(self.item(), format_spec)
        return super().__format__(format_spec)

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        with torch._C.DisableTorchFunctionSubclass():
            return "MemberValues" + repr(self.as_subclass(Tensor))[len("tensor") :]


Value = float | MemberValues
"""A hyperparameter as a param group holds it: one float for every member, or one value per member."""


def as_value(owner: str, name: str, value: Any, num_members: int) -> Value:
    """Normalize ``value`` (a number, a 1-element tensor, a sequence or a 1-D tensor) to a :data:`Value`."""
    if isinstance(value, bool):
        raise EnsembleError(f"{owner}: {name} must be a number or one number per member, got a bool ({value}).")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, Tensor):
        if value.dim() == 0 or (value.dim() == 1 and value.numel() == 1 and num_members != 1):
            return float(value.item())
        values = value
    elif isinstance(value, Sequence) and not isinstance(value, str):
        values = torch.as_tensor([float(v) for v in value], dtype=torch.float64)
    else:
        raise EnsembleError(
            f"{owner}: {name} must be a number, a sequence or a 1-D tensor with one value per member; "
            f"got {type(value).__name__}."
        )
    if values.dim() != 1 or values.numel() != num_members:
        raise EnsembleError(
            f"{owner}: {name} has {values.numel()} values (shape {list(values.shape)}) but the ensemble has "
            f"{num_members} members (the leading dimension of every parameter); pass one value per member "
            "or a single number for all."
        )
    if isinstance(values, MemberValues) and values.dtype == torch.float64 and values.device.type == "cpu":
        return values
    return MemberValues.of(values)


def check_range(
    owner: str, name: str, value: Value, low: float, high: float = math.inf, *, closed: bool = False
) -> None:
    """Raise :class:`EnsembleError` naming the first member whose ``value`` is outside ``[low, high)``.

    With ``closed=True`` the interval is ``[low, high]``.
    """
    values = value.tolist() if isinstance(value, Tensor) else [value]
    for i, v in enumerate(values):
        if not (low <= v < high or (closed and v == high)) or math.isnan(v):
            where = f" for member {i}" if isinstance(value, Tensor) else ""
            bound = "]" if closed else ")"
            raise EnsembleError(f"{owner}: invalid {name} {v}{where}; expected a value in [{low}, {high}{bound}.")


def is_shared(value: Value) -> bool:
    """Whether every member has the same value (then the scalar fast path applies)."""
    if not isinstance(value, Tensor):
        return True
    with torch._C.DisableTorchFunctionSubclass():
        return bool((value == value[0]).all())


def scalar(value: Value) -> float:
    """The one value of a shared :data:`Value`."""
    if isinstance(value, Tensor):
        with torch._C.DisableTorchFunctionSubclass():
            return float(value[0])
    return value


def broadcast(vector: Tensor, tensors: list[Tensor]) -> list[Tensor]:
    """Views of ``vector`` (``[n]``) shaped ``[n, 1, ..., 1]`` to broadcast against each of ``tensors``."""
    views: dict[int, Tensor] = {}
    out = []
    for t in tensors:
        view = views.get(t.dim())
        if view is None:
            view = views[t.dim()] = vector.view(-1, *([1] * (t.dim() - 1)))
        out.append(view)
    return out
