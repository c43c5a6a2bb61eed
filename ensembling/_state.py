"""The ensemble's stacked state: where it is registered, how one member is rebuilt, which checkpoints fit.

Each parameter and buffer of the member architecture is stored once, stacked
along a new leading member dimension, under ``ens.stacked`` at the member's
own dotted path (``stacked.fc1.weight`` for ``fc1.weight``). ``requires_grad``
travels on the stacked tensors themselves.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._errors import EnsembleError

__all__ = ["Places", "Slot", "StackedState", "check_checkpoint", "identity", "meta_copy"]


class _Stack(nn.Module):
    """Holds stacked tensors at the same dotted paths as in the member (``fc1.weight``)."""

    def extra_repr(self) -> str:
        items = [*self._parameters.items(), *self._buffers.items()]
        return ", ".join(f"{name}: {list(t.shape)}" for name, t in items if t is not None)


@dataclass(frozen=True)
class Slot:
    """Where one stacked tensor lives: ``container.<table>[attr]`` (read at each use: ``.to()`` replaces it)."""

    name: str  # the member's dotted name, e.g. "fc1.weight"
    container: nn.Module
    attr: str
    table: str = "_parameters"  # or "_buffers"

    def get(self) -> Tensor:
        return self.container.__dict__[self.table][self.attr]  # a dictionary read, not Module.__getattr__


def meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers live on the ``meta`` device.

    Unlike ``copy.deepcopy(module).to("meta")`` it copies no data, and it keeps
    tied (shared) parameters tied.
    """
    memo: dict[int, Any] = {}
    for m in module.modules():
        for p in m._parameters.values():
            if p is not None and id(p) not in memo:
                memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for b in m._buffers.values():
            if b is not None and id(b) not in memo:
                memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


def owner(module: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    """The submodule holding ``dotted`` and the attribute name: ``owner(m, "fc1.weight") == (m.fc1, "weight")``."""
    *path, attr = dotted.split(".")
    for part in path:
        module = module._modules[part]
    return module, attr


class Places:
    """Where each stacked tensor goes in one copy of the architecture: every name of a (tied) parameter, each buffer.

    Tensors are given in the stacked state's order: the parameters (``aliases``'
    keys, each with all its names), then ``buffers``. Putting them there is one
    dictionary assignment per name, where :func:`torch.func.functional_call`
    walks the module tree on every call.
    """

    def __init__(self, module: nn.Module, aliases: Mapping[str, list[str]], buffers: list[str]) -> None:
        self.param_names, self.buffer_names = list(aliases), list(buffers)
        where = [[(c._parameters, a) for c, a in (owner(module, alias) for alias in aliases[n])] for n in aliases]
        where += [[(c._buffers, a)] for c, a in (owner(module, name) for name in buffers)]
        self.where: list[list[tuple[dict[str, Any], str]]] = where
        self.rnns = [m for m in module.modules() if isinstance(m, nn.RNNBase)]

    def assign(self, tensors: Iterable[Tensor]) -> None:
        """Put ``tensors`` in their places (and keep the RNNs' weight lists current, as ``setattr`` would)."""
        for names, tensor in zip(self.where, tensors):
            for table, attr in names:
                table[attr] = tensor
        for rnn in self.rnns:
            rnn._flat_weights = [rnn._parameters.get(w) for w in rnn._flat_weights_names]

    def run(self, module: nn.Module, tensors: tuple[Tensor, ...], args: tuple, kwargs: dict) -> Any:
        """``module(*args, **kwargs)`` holding ``tensors``; the module holds its own tensors again after."""
        saved = [table[attr] for (table, attr), *_ in self.where]  # tied names hold one tensor
        self.assign(tensors)
        try:
            return module(*args, **kwargs)
        finally:
            self.assign(saved)


def identity(tensors: Sequence[Tensor]) -> tuple[Any, ...]:
    """What views of ``tensors`` made now stay valid for: each tensor's object, memory, shape, strides and dtype.

    In-place changes keep it; replacing a tensor or its data (``.to()``,
    ``load_state_dict(assign=True)``, an assignment to ``.data``, even one that
    only lays the same memory out differently) changes it. Inference mode is
    part of it, since views made there are inference views. Called on every call
    that reuses views, so built with ``map`` (about 4 us for six tensors).
    """
    return (
        torch.is_inference_mode_enabled(),
        *map(id, tensors),
        *map(Tensor.data_ptr, tensors),
        *map(Tensor.size, tensors),
        *map(Tensor.stride, tensors),
        *[t.dtype for t in tensors],
    )


def _container(root: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    *path, attr = dotted.split(".")
    module = root
    for part in path:
        if part not in module._modules:
            module.add_module(part, _Stack())
        module = module._modules[part]
    return module, attr


class StackedState:
    """The stacked parameters and buffers registered under one ``_Stack`` module, and how to read them.

    ``params`` and ``buffers`` map the member's names to tensors with a leading
    member dimension; the tensors are taken over without a copy, and each
    parameter keeps the ``requires_grad`` flag of the tensor given.
    """

    def __init__(self, template: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor]) -> None:
        self.module = _Stack()
        self.param_slots: list[Slot] = []
        self.buffer_slots: list[Slot] = []
        for name, value in params.items():
            container, attr = _container(self.module, name)
            container.register_parameter(attr, nn.Parameter(value.detach(), requires_grad=value.requires_grad))
            self.param_slots.append(Slot(name, container, attr))
        persistent = {
            f"{prefix}.{name}".lstrip(".")
            for prefix, module in template.named_modules()
            for name in module._buffers
            if name not in module._non_persistent_buffers_set
        }
        for name, value in buffers.items():
            container, attr = _container(self.module, name)
            container.register_buffer(attr, value.detach(), persistent=name in persistent)
            self.buffer_slots.append(Slot(name, container, attr, "_buffers"))
        # Tied parameters are stored once, under their first name; these are all their names.
        self.aliases = {
            slot.name: [
                alias for alias, p in template.named_parameters(remove_duplicate=False)
                if p is template.get_parameter(slot.name)
            ]
            for slot in self.param_slots
        }  # fmt: skip

    def params(self) -> dict[str, nn.Parameter]:
        return {slot.name: slot.get() for slot in self.param_slots}

    def buffers(self) -> dict[str, Tensor]:
        return {slot.name: slot.get() for slot in self.buffer_slots}

    def num_members(self) -> int:
        return int((self.param_slots or self.buffer_slots)[0].get().shape[0])

    def device(self) -> torch.device:
        return (self.param_slots or self.buffer_slots)[0].get().device

    def member(self, template: nn.Module, index: int) -> nn.Module:
        """Member ``index`` as an ordinary module: a copy of ``template`` holding clones of its slices."""
        module = copy.deepcopy(template)
        with torch.no_grad():
            for name, stacked in self.params().items():
                value = nn.Parameter(stacked[index].clone(), requires_grad=stacked.requires_grad)
                for alias in self.aliases[name]:
                    container, attr = owner(module, alias)
                    container._parameters[attr] = value
            for name, stacked in self.buffers().items():
                container, attr = owner(module, name)
                container._buffers[attr] = stacked[index].clone()
        return module

    def sliced(self, index: slice) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Clones of the members ``index`` selects, keeping each parameter's ``requires_grad``."""
        with torch.no_grad():
            params = {k: v[index].clone().requires_grad_(v.requires_grad) for k, v in self.params().items()}
            buffers = {k: v[index].clone() for k, v in self.buffers().items()}
        return params, buffers


def check_checkpoint(own: Mapping[str, Tensor], state_dict: Mapping[str, Any], strict: bool) -> None:
    """Raise :class:`EnsembleError` unless ``state_dict`` fits ``own``: member count, member shapes, keys."""
    for key, value in state_dict.items():
        if key not in own or not isinstance(value, Tensor):
            continue
        mine = own[key]
        if value.dim() == 0 or value.shape[0] != mine.shape[0]:
            found = "a scalar" if value.dim() == 0 else f"{value.shape[0]} members"
            raise EnsembleError(
                f"Ensemble.load_state_dict: {key!r} holds {found} in the checkpoint, but this "
                f"ensemble has {mine.shape[0]}; build an Ensemble with the checkpoint's "
                "member count (or load it into one and slice it, ens[:k])."
            )
        if value.shape[1:] != mine.shape[1:]:
            raise EnsembleError(
                f"Ensemble.load_state_dict: {key!r} has member shape {list(value.shape[1:])} in "
                f"the checkpoint but {list(mine.shape[1:])} here; the checkpoint was saved "
                "from a different member architecture."
            )
    if strict:
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        if missing or unexpected:
            raise EnsembleError(
                f"Ensemble.load_state_dict: the checkpoint does not match this ensemble "
                f"(missing: {missing}, unexpected: {unexpected}); was it saved from an "
                "Ensemble of the same member class? Pass strict=False to load the overlap."
            )
