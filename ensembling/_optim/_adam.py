"""Adam and AdamW with per-member hyperparameters."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._base import MemberOptimizer
from ._ops import Host, add_, add_scaled, div_, host, lerp_, mul_, scaled
from ._values import check_range

__all__ = ["Adam", "AdamW"]

PerMember = float | Sequence[float] | Tensor


class Adam(MemberOptimizer):
    """:class:`torch.optim.Adam` over stacked parameters, with one hyperparameter value per member if wanted.

    Every parameter is stacked, ``[num_members, ...]``; member ``i`` is slice
    ``i`` of each. ``lr``, ``betas`` (each entry), ``eps`` and ``weight_decay``
    are each either one number for all members or a sequence or 1-D tensor of
    ``num_members`` numbers. Member ``i`` trains exactly as a separate model
    under ``torch.optim.Adam`` with member ``i``'s values (same operations, in
    the same order, so float64 runs agree to rounding). The step runs on
    foreach kernels; shared values take torch's scalar path.

    Parameters
    ----------
    params
        The stacked parameters (``ens.parameters()``) or param groups, as for torch.
    lr, betas, eps, weight_decay
        As for :class:`torch.optim.Adam`, or one value per member. ``lr``,
        ``eps`` and ``weight_decay`` must be >= 0 and betas in ``[0, 1)``.
    amsgrad, maximize, decoupled_weight_decay, foreach
        As for torch (``foreach`` is accepted and ignored: the step always uses
        foreach kernels). ``fused=True`` is refused.

    Raises
    ------
    EnsembleError
        For a per-member sequence of the wrong length, a parameter whose
        leading dimension is not the member count, or a value out of range.

    Examples
    --------
    >>> import torch
    >>> from ensembling import Ensemble
    >>> from ensembling.optim import Adam
    >>> ens = Ensemble(lambda: torch.nn.Linear(3, 1), 4)  # 4 members
    >>> opt = Adam(ens.parameters(), lr=[1e-1, 1e-2, 1e-3, 1e-4])  # one lr per member
    >>> opt.param_groups[0]["lr"]
    MemberValues([0.1000, 0.0100, 0.0010, 0.0001], dtype=torch.float64)
    >>> ens(torch.randn(8, 3)).sum().backward()  # logits [4, 8, 1]
    >>> opt.step()
    """

    _per_member = ("lr", "betas", "eps", "weight_decay")

    def __init__(
        self,
        params: Iterable[Any],
        lr: PerMember = 1e-3,
        betas: tuple[PerMember, PerMember] = (0.9, 0.999),
        eps: PerMember = 1e-8,
        weight_decay: PerMember = 0.0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "fused": fused,
            "capturable": False,
            "differentiable": False,
            "decoupled_weight_decay": decoupled_weight_decay,
        }
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        name = type(self).__name__
        check_range(name, "lr", group["lr"], 0.0)
        check_range(name, "eps", group["eps"], 0.0)
        check_range(name, "weight_decay", group["weight_decay"], 0.0)
        check_range(name, "betas[0]", group["betas"][0], 0.0, 1.0)
        check_range(name, "betas[1]", group["betas"][1], 0.0, 1.0)

    def _init_state(self, p: Tensor, amsgrad: bool) -> float:
        """Create ``p``'s state on first use (torch's layout), count the step, return the new step."""
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if amsgrad:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        return float(state["step"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One optimization step for every member (``closure`` as for torch)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            amsgrad = group["amsgrad"]
            buckets: dict[Any, list[Tensor]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError(f"{type(self).__name__}: sparse gradients are not supported.")
                    buckets.setdefault((p.device, p.dtype, self._init_state(p, amsgrad)), []).append(p)
            lr, eps, wd = (host(self._value(group, k)) for k in ("lr", "eps", "weight_decay"))
            betas = group["betas"] = tuple(self._normalize(f"betas[{k}]", b) for k, b in enumerate(group["betas"]))
            b1, b2 = host(betas[0]), host(betas[1])
            for (_, _, step), params in buckets.items():
                self._update(params, step, lr, b1, b2, eps, wd, group)
        return loss

    def _update(
        self,
        params: list[Tensor],
        step: float,
        lr: Host,
        b1: Host,
        b2: Host,
        eps: Host,
        wd: Host,
        group: dict[str, Any],
    ) -> None:
        """torch's Adam update (single-tensor order of operations) on one bucket of parameters."""
        grads = [p.grad for p in params]
        state = [self.state[p] for p in params]
        exp_avgs = [s["exp_avg"] for s in state]
        exp_avg_sqs = [s["exp_avg_sq"] for s in state]
        if group["maximize"]:
            grads = list(torch._foreach_neg(grads))
        if not _is_zero(wd):
            if group["decoupled_weight_decay"]:
                mul_(params, 1 - lr * wd)
            else:
                grads = add_scaled(grads, params, wd, inplace=group["maximize"])
        lerp_(exp_avgs, grads, 1 - b1)
        mul_(exp_avg_sqs, b2)
        if isinstance(b2, float):
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - b2)
        else:
            torch._foreach_addcmul_(exp_avg_sqs, scaled(grads, 1 - b2), grads)
        del grads
        step_size = (lr / (1 - b1**step)) * -1
        bias_correction2_sqrt = (1 - b2**step) ** 0.5
        if group["amsgrad"]:
            maxima = [s["max_exp_avg_sq"] for s in state]
            torch._foreach_maximum_(maxima, exp_avg_sqs)
            denom = list(torch._foreach_sqrt(maxima))
        else:
            denom = list(torch._foreach_sqrt(exp_avg_sqs))
        if isinstance(step_size, float):
            div_(denom, bias_correction2_sqrt)
            add_(denom, eps)
            torch._foreach_addcdiv_(params, exp_avgs, denom, step_size)
        elif bool((step_size == 0).any()):  # a member with lr 0: no division by its step size
            div_(denom, bias_correction2_sqrt)
            add_(denom, eps)
            torch._foreach_addcdiv_(params, scaled(exp_avgs, step_size), denom)
        else:  # fold the per-member step size into the denominator: no extra pass, no allocation
            div_(denom, bias_correction2_sqrt * step_size)
            add_(denom, eps / step_size)
            torch._foreach_addcdiv_(params, exp_avgs, denom)


def _is_zero(x: Host) -> bool:
    return bool((x == 0).all()) if isinstance(x, Tensor) else x == 0


class AdamW(Adam):
    """:class:`torch.optim.AdamW` over stacked parameters, with one hyperparameter value per member if wanted.

    :class:`Adam` with ``decoupled_weight_decay=True`` and ``weight_decay=1e-2``
    by default, as in torch. See :class:`Adam` for the arguments.

    Examples
    --------
    >>> import torch
    >>> from ensembling import Ensemble
    >>> from ensembling.optim import AdamW
    >>> ens = Ensemble(lambda: torch.nn.Linear(3, 1), 6)  # 6 members
    >>> lrs = torch.logspace(-4, -1, 3).repeat(2)  # 3 learning rates ...
    >>> wds = torch.tensor([0.0, 0.1]).repeat_interleave(3)  # ... crossed with 2 weight decays
    >>> opt = AdamW(ens.parameters(), lr=lrs, weight_decay=wds)
    >>> ens(torch.randn(8, 3)).pow(2).sum().backward()  # outputs [6, 8, 1]
    >>> opt.step()
    >>> [round(v, 4) for v in opt.param_groups[0]["lr"].tolist()]
    [0.0001, 0.0032, 0.1, 0.0001, 0.0032, 0.1]
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: PerMember = 1e-3,
        betas: tuple[PerMember, PerMember] = (0.9, 0.999),
        eps: PerMember = 1e-8,
        weight_decay: PerMember = 1e-2,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        fused: bool | None = None,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            fused=fused,
            decoupled_weight_decay=True,
        )
