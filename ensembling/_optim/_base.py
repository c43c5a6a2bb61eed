"""The base class of the per-member optimizers: groups, validation, state dicts."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .._errors import EnsembleError
from ._values import MemberValues, Value, as_value

__all__ = ["MemberOptimizer"]


def _plain(value: Any) -> Any:
    """``value`` with every :class:`MemberValues` replaced by a plain tensor copy (for state dicts)."""
    if isinstance(value, MemberValues):
        with torch._C.DisableTorchFunctionSubclass():
            return value.as_subclass(Tensor).clone()
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return value


class MemberOptimizer(torch.optim.Optimizer):
    """A :class:`torch.optim.Optimizer` whose float hyperparameters may differ between members.

    Subclasses list their per-member keys in ``_per_member`` (``"betas"`` is a
    pair) and implement ``_check_group`` (value ranges) and ``step``.
    """

    _per_member: tuple[str, ...] = ()
    num_members: int

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        if defaults.get("fused"):
            raise EnsembleError(
                f"{type(self).__name__}: fused=True is not supported (torch's fused kernels take one value for "
                "all tensors); leave fused=None: the step runs on foreach kernels."
            )
        super().__init__(params, defaults)

    # ----- groups -------------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, like torch; its per-member values are checked against the member count."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        name = type(self).__name__
        for i, p in enumerate(group["params"]):
            if p.dim() == 0:
                raise EnsembleError(
                    f"{name}: parameter {i} of param group {len(self.param_groups) - 1} is a scalar (0-d); every "
                    "parameter needs a leading member dimension [num_members, ...], as an Ensemble's stacked "
                    "parameters have."
                )
            if not hasattr(self, "num_members"):
                self.num_members = p.shape[0]
            if p.shape[0] != self.num_members:
                raise EnsembleError(
                    f"{name}: parameter {i} of param group {len(self.param_groups) - 1} has leading dimension "
                    f"{p.shape[0]} (shape {list(p.shape)}) but the first parameter has {self.num_members}: the "
                    "leading dimension is the member count and must be the same for every parameter."
                )
            if p.is_complex():
                raise EnsembleError(f"{name}: parameter {i} is complex; only real parameters are supported.")
        if not hasattr(self, "num_members"):
            return
        for key in self._per_member:
            group[key] = self._normalize(key, group[key], copy=True)
        self._check_group(group)

    def _normalize(self, key: str, value: Any, copy: bool = False) -> Any:
        name = type(self).__name__
        if key == "betas":
            if not isinstance(value, (tuple, list)) or len(value) != 2:
                raise EnsembleError(f"{name}: betas must be a pair (beta1, beta2), got {value!r}.")
            return tuple(self._normalize(f"betas[{k}]", v, copy) for k, v in enumerate(value))
        out = as_value(name, key, value, self.num_members)
        return out.clone() if copy and isinstance(out, MemberValues) and out is value else out

    def _check_group(self, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _value(self, group: dict[str, Any], key: str) -> Value:
        """``group[key]`` normalized (a scheduler may have written a plain tensor or a float there)."""
        value = group[key]
        if not isinstance(value, (float, MemberValues)):
            group[key] = value = self._normalize(key, value)
        return value

    # ----- state dicts --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch's state dict, with per-member values as plain tensors (loadable with ``weights_only=True``)."""
        state = super().state_dict()
        state["param_groups"] = [{k: _plain(v) for k, v in g.items()} for g in state["param_groups"]]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by :meth:`state_dict` (or by the torch optimizer, for shared values)."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for key in self._per_member:
                group[key] = self._normalize(key, group[key], copy=True)
            if isinstance(group.get("initial_lr"), Tensor):
                group["initial_lr"] = self._normalize("initial_lr", group["initial_lr"], copy=True)
            self._check_group(group)
