"""Checks that a list of modules can be stacked into one ensemble."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from ._errors import EnsembleError

__all__ = ["check_block", "check_members", "check_stacked"]


def _describe(t: torch.Tensor) -> str:
    return f"shape {list(t.shape)}, dtype {t.dtype}, device {t.device}"


def _as_list(models: Iterable[nn.Module], caller: str) -> list[nn.Module]:
    """``models`` as a non-empty list of modules, or an error saying what to pass instead."""
    if isinstance(models, (Mapping, nn.ModuleDict)):
        raise EnsembleError(f"{caller}: got a {type(models).__name__}; pass its modules as a list, list(d.values()).")
    if isinstance(models, nn.Module) and not isinstance(models, nn.ModuleList):
        raise EnsembleError(
            f"{caller}: got a single {type(models).__name__}, not a list of modules; "
            "pass a list such as [model_a, model_b] or an nn.ModuleList."
        )
    if isinstance(models, (str, bytes)):
        raise EnsembleError(f"{caller}: expected a list of nn.Module, got a {type(models).__name__}.")
    try:
        models = list(models)
    except TypeError:
        raise EnsembleError(f"{caller}: expected a list of nn.Module, got {type(models).__name__}.") from None
    if not models:
        raise EnsembleError(f"{caller}: got an empty list of models; pass at least one nn.Module.")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise EnsembleError(
                f"{caller}: member {i} is a {type(m).__name__}, not an nn.Module; "
                "pass the modules themselves (not their state_dicts or outputs)."
            )
    return models


def _check_tensor(
    caller: str, kind: str, name: str, i: int, r: torch.Tensor, t: torch.Tensor, requires_grad: bool
) -> None:
    """Member ``i``'s tensor ``t`` against member 0's ``r``: shape, dtype, device, ``requires_grad``."""
    for what, a, b, fix in (
        ("shape", r.shape, t.shape, "build every member with the same sizes"),
        ("dtype", r.dtype, t.dtype, f"convert every member, e.g. model.to({r.dtype})"),
        ("device", r.device, t.device, f"move every member to one device, e.g. model.to('{r.device}')"),
    ):
        if a != b:
            raise EnsembleError(
                f"{caller}: {kind} {name!r} of member {i} has {what} "
                f"{list(b) if what == 'shape' else b}, but member 0's has "
                f"{list(a) if what == 'shape' else a} ({_describe(t)} vs {_describe(r)}); {fix}."
            )
    if requires_grad and kind == "parameter" and r.requires_grad != t.requires_grad:
        raise EnsembleError(
            f"{caller}: parameter {name!r} of member {i} has requires_grad="
            f"{t.requires_grad}, but member 0's has requires_grad={r.requires_grad}; "
            "freeze (requires_grad_(False)) the same parameters in every member."
        )


def _check_member(caller: str, first: nn.Module, i: int, m: nn.Module, requires_grad: bool) -> None:
    """Member ``i`` against member 0: class, train/eval mode, tensor names, then each tensor."""
    if type(m) is not type(first):
        raise EnsembleError(
            f"{caller}: member {i} is a {type(m).__qualname__}, but member 0 is a "
            f"{type(first).__qualname__}; every member must be an instance of the same class."
        )
    if m.training != first.training:

        def mode(mod: nn.Module) -> str:
            return "train" if mod.training else "eval"

        raise EnsembleError(
            f"{caller}: member {i} is in {mode(m)} mode but member 0 is in {mode(first)} mode; "
            "call .train() or .eval() on every member before stacking."
        )
    for kind, ref, mine in (
        ("parameter", dict(first.named_parameters()), dict(m.named_parameters())),
        ("buffer", dict(first.named_buffers()), dict(m.named_buffers())),
    ):
        missing, extra = sorted(set(ref) - set(mine)), sorted(set(mine) - set(ref))
        if missing or extra:
            raise EnsembleError(
                f"{caller}: member {i} has different {kind}s than member 0 "
                f"(missing: {missing}, unexpected: {extra}); every member needs the same "
                "architecture and configuration."
            )
        for name, r in ref.items():
            _check_tensor(caller, kind, name, i, r, mine[name], requires_grad)


def check_members(models: Iterable[nn.Module], caller: str, requires_grad: bool = True) -> list[nn.Module]:
    """Return ``models`` as a list, or raise :class:`EnsembleError` unless they stack member for member.

    ``models`` may be any iterable of modules: a list, a tuple, an
    ``nn.ModuleList`` or a generator (consumed once, here). Every member must
    be an ``nn.Module`` of the first member's class, in the same train/eval
    mode, with the same parameter and buffer names, and each tensor must
    match the first member's in shape, dtype, device and (for parameters)
    ``requires_grad`` (unless ``requires_grad=False``: the legacy API returns
    detached stacks, so it never compared the flags). The first
    difference found is reported, with the member index and the tensor name.
    """
    models = _as_list(models, caller)
    for i, m in enumerate(models[1:], start=1):
        _check_member(caller, models[0], i, m, requires_grad)
    return models


def check_block(members: range, num_members: int, seed: int | None) -> None:
    """Raise unless ``members`` is a non-empty contiguous block of ``range(num_members)`` of a seeded ensemble."""
    if seed is None:
        raise EnsembleError(
            "Ensemble: members= builds a block of a seeded ensemble; pass seed= too, e.g. "
            "Ensemble(factory, 16, seed=0, members=range(0, 8))."
        )
    if not isinstance(members, range) or members.step != 1 or len(members) == 0:
        raise EnsembleError(f"Ensemble: members must be a non-empty range with step 1, got {members!r}.")
    if members.start < 0 or members.stop > num_members:
        raise EnsembleError(f"Ensemble: members {members} is not inside range(0, {num_members}).")


def check_stacked(member: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor]) -> None:
    """Raise unless ``params`` / ``buffers`` hold one stacked tensor per tensor of ``member``, member counts equal."""
    if not isinstance(member, nn.Module):
        raise EnsembleError(f"Ensemble.from_stacked: member must be an nn.Module, got {type(member).__name__}.")
    counts: set[int] = set()
    for kind, given, own in (
        ("parameter", params, dict(member.named_parameters())),
        ("buffer", buffers, dict(member.named_buffers())),
    ):
        missing, extra = sorted(set(own) - set(given)), sorted(set(given) - set(own))
        if missing or extra:
            raise EnsembleError(
                f"Ensemble.from_stacked: the stacked {kind}s do not match the member's "
                f"(missing: {missing}, unexpected: {extra})."
            )
        for name, t in given.items():
            if not isinstance(t, Tensor) or t.shape[1:] != own[name].shape:
                found = list(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise EnsembleError(
                    f"Ensemble.from_stacked: {kind} {name!r} is {found}, but it must be "
                    f"[num_members, {', '.join(map(str, own[name].shape))}] (the member's shape "
                    "with a leading member dimension)."
                )
            counts.add(t.shape[0])
    if len(counts) > 1:
        raise EnsembleError(
            f"Ensemble.from_stacked: the stacked tensors hold different member counts: {sorted(counts)}."
        )
