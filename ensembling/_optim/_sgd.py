"""SGD with per-member hyperparameters."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from .._errors import EnsembleError
from ._adam import PerMember, _is_zero
from ._base import MemberOptimizer
from ._ops import Host, add_scaled, host, mul_
from ._values import check_range

__all__ = ["SGD"]


class SGD(MemberOptimizer):
    """:class:`torch.optim.SGD` over stacked parameters, with one hyperparameter value per member if wanted.

    ``lr``, ``momentum``, ``dampening`` and ``weight_decay`` are each one
    number for all members or one per member (a sequence or 1-D tensor of
    ``num_members`` numbers); member ``i`` trains exactly as a separate model
    under ``torch.optim.SGD`` with member ``i``'s values. Members with
    ``momentum=0`` take plain SGD steps even when others use momentum.

    Parameters
    ----------
    params
        The stacked parameters (``ens.parameters()``) or param groups.
    lr, momentum, dampening, weight_decay
        As for :class:`torch.optim.SGD`, or one value per member (all >= 0).
    nesterov, maximize, foreach
        As for torch (``foreach`` is accepted and ignored). Nesterov needs every
        member's momentum > 0 and dampening 0.

    Raises
    ------
    EnsembleError
        For a per-member sequence of the wrong length, a parameter whose
        leading dimension is not the member count, or a value out of range.

    Examples
    --------
    >>> import torch
    >>> from ensembling import Ensemble
    >>> from ensembling.optim import SGD
    >>> ens = Ensemble(lambda: torch.nn.Linear(2, 1), 3)  # 3 members
    >>> opt = SGD(ens.parameters(), lr=0.1, momentum=[0.0, 0.5, 0.9])  # one momentum per member
    >>> ens(torch.ones(4, 2)).sum().backward()  # outputs [3, 4, 1]
    >>> opt.step()
    >>> opt.state[ens.named_stacked_parameters()["weight"]]["momentum_buffer"].shape  # stacked, like the weight
    torch.Size([3, 1, 2])
    """

    _per_member = ("lr", "momentum", "dampening", "weight_decay")

    def __init__(
        self,
        params: Iterable[Any],
        lr: PerMember = 1e-3,
        momentum: PerMember = 0.0,
        dampening: PerMember = 0.0,
        weight_decay: PerMember = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
            "fused": fused,
            "differentiable": False,
        }
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        for key in self._per_member:
            check_range("SGD", key, group[key], 0.0)
        if group["nesterov"]:
            momentum, dampening = host(group["momentum"]), host(group["dampening"])
            if not bool(torch.all(torch.as_tensor(momentum) > 0)) or not _is_zero(dampening):
                raise EnsembleError(
                    "SGD: nesterov=True needs momentum > 0 and dampening 0 for every member; "
                    f"got momentum {group['momentum']} and dampening {group['dampening']}."
                )

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One optimization step for every member (``closure`` as for torch)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, dampening, wd = (host(self._value(group, k)) for k in self._per_member)
            buckets: dict[Any, list[Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError("SGD: sparse gradients are not supported.")
                    buckets.setdefault((p.device, p.dtype), []).append(p)
            for params in buckets.values():
                self._update(params, lr, momentum, dampening, wd, group)
        return loss

    def _update(
        self, params: list[Tensor], lr: Host, momentum: Host, dampening: Host, wd: Host, group: dict[str, Any]
    ) -> None:
        """torch's SGD update on one bucket of parameters (same device and dtype)."""
        grads = [p.grad for p in params]
        if group["maximize"]:
            grads = list(torch._foreach_neg(grads))
        if not _is_zero(wd):
            grads = add_scaled(grads, params, wd, inplace=group["maximize"])
        if not _is_zero(momentum):
            if isinstance(momentum, Tensor) and isinstance(dampening, Tensor | float):
                dampening = torch.where(momentum == 0, 0.0, torch.as_tensor(dampening, dtype=torch.float64))
            states = [self.state[p] for p in params]
            fresh = [i for i, s in enumerate(states) if s.get("momentum_buffer") is None]
            for i in fresh:
                states[i]["momentum_buffer"] = grads[i].detach().clone()
            old = [i for i in range(len(params)) if i not in set(fresh)]
            if old:
                bufs = [states[i]["momentum_buffer"] for i in old]
                mul_(bufs, momentum)
                add_scaled(bufs, [grads[i] for i in old], 1 - dampening, inplace=True)
            bufs = [s["momentum_buffer"] for s in states]
            grads = add_scaled(grads, bufs, momentum, inplace=False) if group["nesterov"] else bufs
        add_scaled(params, grads, lr * -1, inplace=True)
