"""The vmap path: every member's forward as one ``torch.vmap`` over the runner, and its errors.

Inside ``vmap`` the runner holds the batched state by one dictionary assignment
per tensor (``_state.Places``), the same rebinding ``functional_call`` does
without its walk over the module tree; under ``torch.compile``,
``functional_call`` itself, which it traces.

:class:`VmapRunner` checks which inputs are split across members
(:func:`check_in_dims`: positional and keyword inputs, by index or by name),
keeps one vmapped member function per (``in_dims``, ``randomness``,
``chunk_size``) and runs it under the attention settings that ``vmap`` can
batch. Inputs and outputs that are not tensors (caches, ``None``, strings) cross
``vmap`` taken apart by :mod:`._outputs`. Whatever ``vmap`` raises becomes an
:class:`~ensembling.EnsembleError` in the user's terms (:mod:`._vmap_errors`).
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils.rnn import PackedSequence

from ._errors import EnsembleError
from ._layers import attention_context
from ._outputs import Spec, differs, flatten, has_objects, rebuild
from ._state import Places
from ._vmap_errors import translate

__all__ = ["InDims", "VmapRunner", "check_in_dims"]

InDims = int | None | tuple[Any, ...] | list[Any] | dict[int | str, Any]

# Objects an ensemble returned (caches): their tensors have a member dimension, so they are
# split across the members when fed back, unless in_dims says otherwise.
_RETURNED: weakref.WeakSet[Any] = weakref.WeakSet()


def _label(key: int | str, names: tuple[str, ...] = ()) -> str:
    if isinstance(key, str):
        return f"keyword input '{key}'"
    return f"positional input {key}"


def _named(position: int, names: tuple[str, ...]) -> str:
    return f" ({names[position]})" if position < len(names) else ""


def _check_leaf(leaf: Tensor, label: str, dim: int, num_members: int) -> None:
    if leaf.dim() == 0 or not -leaf.dim() <= dim < leaf.dim():
        raise EnsembleError(
            f"Ensemble: {label} has shape {list(leaf.shape)}, which has no dimension {dim} to split "
            f"across the {num_members} members; give it in_dims None to give every member the same input."
        )
    if leaf.shape[dim] != num_members:
        raise EnsembleError(
            f"Ensemble: {label} has {leaf.shape[dim]} entries along dimension {dim} (shape "
            f"{list(leaf.shape)}), but with in_dims={dim} it needs one per member: {num_members}. "
            "Give it in_dims None to give every member the same input, or stack one input per member "
            "along that dimension."
        )


def _check_split(value: Any, label: str, dim: Any, num_members: int) -> None:
    if not isinstance(dim, int) or isinstance(dim, bool):
        return  # None (shared) or a nested in_dims, which vmap checks
    leaves = [value] if isinstance(value, Tensor) else flatten(value)[0]
    if not leaves:
        raise EnsembleError(
            f"Ensemble: {label} ({type(value).__name__}) holds no tensor to split across the "
            f"members, but in_dims gives it dimension {dim}; give it None."
        )
    for leaf in leaves:
        _check_leaf(leaf, label, dim, num_members)


def _dims_from_dict(
    in_dims: dict[Any, Any], args: tuple[Any, ...], kwargs: Mapping[str, Any], names: tuple[str, ...]
) -> tuple[list[Any], dict[str, Any]]:
    dims: list[Any] = [None] * len(args)
    kw_dims: dict[str, Any] = {}
    for key, dim in in_dims.items():
        if isinstance(key, str) and key in kwargs:
            kw_dims[key] = dim
        elif isinstance(key, str) and key in names[: len(args)]:
            dims[names.index(key)] = dim
        elif isinstance(key, int) and not isinstance(key, bool) and -len(args) <= key < len(args):
            dims[key] = dim
        else:
            given = [f"{i}{_named(i, names)}" for i in range(len(args))]
            raise EnsembleError(
                f"Ensemble: in_dims names the input {key!r}, which this call does not have; it has "
                f"positional inputs {given or 'none'} and keyword inputs {list(kwargs) or 'none'}. "
                "Key in_dims by position (0, 1, ...) or by keyword name."
            )
    return dims, kw_dims


def check_in_dims(
    args: tuple[Any, ...],
    in_dims: InDims,
    num_members: int,
    kwargs: Mapping[str, Any] | None = None,
    names: tuple[str, ...] = (),
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The split dimension of every positional input, and of the keyword inputs split across members.

    ``in_dims`` is an int or None (every positional input; keywords shared), a tuple
    (one entry per positional input), or a dict keyed by position or by name (the
    keyword's, or the forward's parameter name of a positional input); inputs it does
    not name are shared. Objects an ensemble returned (its caches) default to 0.
    Every split tensor is checked against the member count.
    """
    if not kwargs and (in_dims is None or type(in_dims) is int) and all(type(a) is Tensor for a in args):
        if in_dims is not None:  # the common call, checked quickly: plain tensors, one in_dims for all
            for i, arg in enumerate(args):
                ndim = arg.dim()
                if not (ndim and -ndim <= in_dims < ndim and arg.shape[in_dims] == num_members):
                    _check_leaf(arg, _label(i, names), in_dims, num_members)  # raises, naming the input
        return (in_dims,) * len(args), {}
    kwargs = kwargs or {}
    explicit: set[int | str] = set()
    if isinstance(in_dims, dict):
        dims, kw_dims = _dims_from_dict(in_dims, args, kwargs, names)
        explicit = {names.index(k) if k in names and k not in kwargs else k for k in in_dims}
        explicit = {k % len(args) if isinstance(k, int) else k for k in explicit}
    elif isinstance(in_dims, (int, type(None))) and not isinstance(in_dims, bool):
        dims, kw_dims = [in_dims] * len(args), {}
        explicit = set(range(len(args))) if in_dims is not None else set()
    elif isinstance(in_dims, (tuple, list)):
        if len(in_dims) != len(args):
            raise EnsembleError(
                f"Ensemble: in_dims has {len(in_dims)} entries but {len(args)} positional inputs were "
                "given; pass one entry per positional input (None = shared), or a dict keyed by "
                "position or keyword name, e.g. in_dims={'attention_mask': 0}."
            )
        dims, kw_dims, explicit = list(in_dims), {}, set(range(len(args)))
    else:
        raise EnsembleError(
            f"Ensemble: in_dims must be an int, None, a tuple with one entry per positional input, or a "
            f"dict keyed by position or keyword name, got {type(in_dims).__name__}."
        )
    for key, value in [*enumerate(args), *kwargs.items()]:
        dim = dims[key] if isinstance(key, int) else kw_dims.get(key)
        if dim is None and _is_returned(value):
            if key in explicit:
                raise EnsembleError(
                    f"Ensemble: {_label(key, names)} is a {type(value).__name__} this ensemble returned, "
                    "with one entry per member, but in_dims gives it None (shared); give it 0 or leave "
                    "it out of in_dims."
                )
            dim = 0
            if isinstance(key, int):
                dims[key] = 0
            else:
                kw_dims[key] = 0
        _check_split(value, _label(key, names), dim, num_members)
    return tuple(dims), {k: d for k, d in kw_dims.items() if d is not None}


def _is_returned(value: Any) -> bool:
    try:
        return value in _RETURNED
    except TypeError:  # not weak-referenceable (a tensor, a tuple): never one of ours
        return False


class _Channel:
    """What one call passes around ``vmap``: the specs of the taken-apart inputs, those of the outputs."""

    def __init__(self, arg_specs: tuple[Spec | None, ...], kwarg_specs: dict[str, Spec | None]) -> None:
        self.arg_specs = arg_specs
        self.kwarg_specs = kwarg_specs
        self.out_specs: list[Spec] = []


def _pack(value: Any, dim: Any) -> tuple[Any, Spec | None]:
    """A split input that vmap cannot map itself (it holds objects) as its tensors and spec."""
    if isinstance(dim, int) and has_objects(value):
        leaves, spec = flatten(value)
        return leaves, spec
    return value, None


def _unpack(value: Any, spec: Spec | None) -> Any:
    return value if spec is None else rebuild(spec, value)[0]


def _positional_names(runner: nn.Module) -> tuple[str, ...]:
    try:
        params = inspect.signature(runner.forward).parameters.values()
    except (TypeError, ValueError):
        return ()
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in params if p.kind in kinds)


class VmapRunner:
    """Runs the members through ``runner`` (the architecture with vectorizable stand-ins) under ``torch.vmap``.

    ``aliases`` maps each stacked parameter's name to all its names in the
    member (tied weights), ``buffers`` lists the stacked buffers' names, in the
    order the state is passed.
    """

    def __init__(self, runner: nn.Module, aliases: Mapping[str, list[str]], buffers: list[str]) -> None:
        self.runner = runner
        self.names = _positional_names(runner)
        self.places = Places(runner, aliases, buffers)
        self.cache: dict[Any, Callable[..., Any]] = {}

    def __getstate__(self) -> dict[str, Any]:
        # The cached closures hold this runner: never share or pickle them. (The places keep
        # pointing into the copied runner: copy and pickle keep shared references shared.)
        return {**self.__dict__, "cache": {}}

    def check(
        self, args: tuple[Any, ...], kwargs: Mapping[str, Any], in_dims: InDims, num_members: int
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """:func:`check_in_dims` with the names of the member's positional inputs."""
        return check_in_dims(args, in_dims, num_members, kwargs, self.names)

    def _batched(
        self, dims: tuple[Any, ...], kw_dims: dict[str, Any], randomness: str, chunk_size: int | None
    ) -> Callable[..., Any]:
        key: Any = (dims, tuple(kw_dims.items()), randomness, chunk_size)
        compiling = torch.compiler.is_compiling()
        try:
            # (torch.compile traces the vmap anyway; a cache it reads would make it recompile when filled.)
            batched = None if compiling else self.cache.get(key)
        except TypeError:  # nested in_dims (lists) are not hashable: build it for this call
            key, batched = None, None
        if batched is None:
            runner, places = self.runner, self.places

            def member_forward(state: tuple, channel: _Channel, args: tuple, split: dict, **shared: Any) -> Any:
                """One member's forward pass: the architecture run with one slice of the state."""
                args = tuple(_unpack(a, s) for a, s in zip(args, channel.arg_specs))
                split = {k: _unpack(v, channel.kwarg_specs[k]) for k, v in split.items()}
                if compiling:  # the form torch.compile traces
                    n = len(places.param_names)
                    p, b = dict(zip(places.param_names, state[:n])), dict(zip(places.buffer_names, state[n:]))
                    out = functional_call(runner, (p, b), args, {**shared, **split})
                else:
                    out = places.run(runner, state, args, {**shared, **split})
                if isinstance(out, Tensor) or not has_objects(out):
                    return out
                leaves, spec = flatten(out)
                channel.out_specs.append(spec)
                return tuple(leaves)

            in_dims = (0, None, dims, kw_dims)
            batched = torch.vmap(member_forward, in_dims=in_dims, randomness=randomness, chunk_size=chunk_size)
            if key is not None and not compiling:
                self.cache[key] = batched
        return batched

    def __call__(
        self,
        params: Mapping[str, Tensor],
        buffers: Mapping[str, Tensor],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        dims: tuple[Any, ...],
        randomness: str,
        chunk_size: int | None,
        device: torch.device,
        kw_dims: dict[str, Any] | None = None,
    ) -> Any:
        kw_dims = kw_dims or {}
        if any(isinstance(a, PackedSequence) for a in (*args, *kwargs.values())):
            raise EnsembleError(
                "Ensemble: got a PackedSequence, which cannot be split across members; pass the "
                "padded tensor instead (and use the lengths to pick each sequence's last output)."
            )
        packed = [_pack(a, d) for a, d in zip(args, dims)]
        split = {k: _pack(kwargs[k], d) for k, d in kw_dims.items()}
        shared = {k: v for k, v in kwargs.items() if k not in kw_dims}
        channel = _Channel(tuple(s for _, s in packed), {k: s for k, (_, s) in split.items()})
        batched = self._batched(dims, kw_dims, randomness, chunk_size)
        try:
            with attention_context(device):
                member_args, member_split = tuple(a for a, _ in packed), {k: v for k, (v, _) in split.items()}
                state = (*params.values(), *buffers.values())
                out = batched(state, channel, member_args, member_split, **shared)
        except (RuntimeError, ValueError) as err:
            if isinstance(err, EnsembleError):
                raise
            _check_agreement(channel.out_specs)
            inputs = [_label(i, self.names) + _named(i, self.names) for i, d in enumerate(dims) if d is not None]
            inputs += [_label(k, self.names) for k in kw_dims]
            translated = translate(err, self.runner, inputs)
            if translated is None:
                raise
            raise translated from err
        if not channel.out_specs:
            return out
        _check_agreement(channel.out_specs)
        result, made = rebuild(channel.out_specs[0], out)
        for obj in made:
            try:
                _RETURNED.add(obj)
            except TypeError:
                pass
        return result


def _check_agreement(specs: list[Spec]) -> None:
    """Non-tensor outputs come back as they are only when every chunk of members returned the same."""
    for spec in specs[1:]:
        found = differs(specs[0], spec)
        if found is not None:
            path, first, other = found
            raise EnsembleError(
                f"Ensemble: the members disagree on the output field {path}: {first!r} for some, "
                f"{other!r} for others. Only tensors can differ per member; return this field as a "
                "tensor, or run the members one by one: [m(x) for m in ens.unstack()]."
            )
