"""Building the members of ``Ensemble(factory, n)``: the prototype, then ``n`` initial values per tensor.

:func:`make_prototype` calls the factory once. The members' values are then
drawn either all together (:func:`draw_members`: every submodule's
``reset_parameters()`` under ``vmap(randomness="different")``) or one member
after another from per-member seeds (:func:`draw_seeded_members`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ._errors import EnsembleError
from ._state import meta_copy

__all__ = ["draw_members", "draw_seeded_members", "is_torch_nn_class", "make_prototype", "member_seed"]

State = dict[str, Tensor]


def is_torch_nn_class(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.nn.")


def _reset_method(module: nn.Module) -> Callable[[], None] | None:
    for name in ("reset_parameters", "_reset_parameters"):
        method = getattr(module, name, None)
        if callable(method):
            return method
    return None


def _post_order(module: nn.Module) -> Iterator[nn.Module]:
    """Children before parents: the order in which constructors initialize."""
    for child in module.children():
        yield from _post_order(child)
    yield module


class _Resetter(nn.Module):
    """Calls every ``reset_parameters`` of ``inner``; functional_call swaps the state in."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self) -> Tensor:
        for module in _post_order(self.inner):
            reset = _reset_method(module)
            if reset is not None:
                reset()
        return torch.zeros(())


def _check_arguments(factory: object, num_members: object, seed: object) -> None:
    if isinstance(num_members, bool) or not isinstance(num_members, int):
        raise EnsembleError(
            f"Ensemble: num_members must be an int, got {type(num_members).__name__}; "
            "call Ensemble(factory, 10), for example."
        )
    if num_members < 1:
        raise EnsembleError(f"Ensemble: num_members must be at least 1, got {num_members}.")
    if isinstance(factory, nn.Module):
        raise EnsembleError(
            "Ensemble: the first argument is a module instance, but it must be a factory "
            "that builds one (a class or a lambda). To stack existing modules, use "
            "Ensemble.from_modules(modules)."
        )
    if not callable(factory):
        raise EnsembleError(f"Ensemble: factory must be callable, got {type(factory).__name__}.")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise EnsembleError(f"Ensemble: seed must be an int or None, got {type(seed).__name__}.")


def make_prototype(
    factory: Callable[[], nn.Module],
    num_members: int,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    seed: int | None,
) -> nn.Module:
    """Check the constructor's arguments and call ``factory()`` once (leaving the global RNG alone if seeded)."""
    _check_arguments(factory, num_members, seed)
    if seed is not None:
        # A seeded ensemble leaves the global generators alone: the CPU's, and the
        # current CUDA device's if CUDA is in use (never every GPU, nor starting CUDA).
        cuda = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=cuda):
            prototype = factory()
    else:
        prototype = factory()
    if not isinstance(prototype, nn.Module):
        raise EnsembleError(f"Ensemble: factory() returned a {type(prototype).__name__}, not an nn.Module.")
    if device is not None or dtype is not None:
        prototype = prototype.to(device=device, dtype=dtype)
    return prototype


def member_seed(seed: int, member: int) -> int:
    """The seed member ``member`` of an ``Ensemble(..., seed=seed)`` is initialized from.

    Examples
    --------
    >>> member_seed(0, 0) != member_seed(0, 1) != member_seed(1, 0)
    True
    """
    return (seed * 1_000_003 + member * 7_919 + 0x5EED) % 2**63


def _warn_uncovered(prototype: nn.Module, n: int) -> None:
    uncovered = [
        f"{prefix}.{name}".lstrip(".")
        for prefix, module in prototype.named_modules()
        if _reset_method(module) is None
        for name, p in module._parameters.items()
        if p is not None and p.is_floating_point()
    ]
    if uncovered and n > 1:
        warnings.warn(
            f"Ensemble: {uncovered} belong to modules without reset_parameters(), so every "
            "member starts with the values of one factory() call. Give those modules a "
            "reset_parameters() method to draw them per member, or build the members "
            "yourself and use Ensemble.from_modules([factory() for _ in range(n)]).",
            stacklevel=5,
        )


def _allocate(prototype: nn.Module, n: int) -> tuple[State, State, dict[str, int]]:
    """Stacked tensors for ``n`` members, not yet drawn.

    A tensor that a ``torch.nn`` layer's own initializer is about to
    overwrite is only allocated (no copy); every other tensor holds the
    prototype's values. The third result maps each allocated-only tensor to
    its version counter, for :func:`_fill_unwritten` to check afterwards.
    """
    fully_reset: set[int] = set()  # ids of tensors a torch.nn layer's reset overwrites
    for module in prototype.modules():
        if is_torch_nn_class(module) and _reset_method(module) is not None:
            fully_reset.update(id(t) for t in module._parameters.values() if t is not None)
            fully_reset.update(id(t) for t in module._buffers.values() if t is not None)
    _warn_uncovered(prototype, n)

    def stacked(t: Tensor) -> Tensor:
        if id(t) in fully_reset:  # about to be overwritten: skip copying
            return torch.empty((n, *t.shape), dtype=t.dtype, device=t.device)
        return t.detach().unsqueeze(0).expand(n, *t.shape).clone()

    with torch.no_grad():
        params = {name: stacked(p) for name, p in prototype.named_parameters()}
        buffers = {name: stacked(b) for name, b in prototype.named_buffers()}
    named = [*prototype.named_parameters(), *prototype.named_buffers()]
    allocated = {**params, **buffers}
    versions = {name: allocated[name]._version for name, t in named if id(t) in fully_reset}
    return params, buffers, versions


def _with_grad_flags(prototype: nn.Module, params: State) -> State:
    """Give each drawn stacked parameter the prototype's ``requires_grad`` (the flag travels on the tensor)."""
    for name, p in prototype.named_parameters():
        params[name].requires_grad_(p.requires_grad)
    return params


def _fill_unwritten(prototype: nn.Module, stacked: Mapping[str, Tensor], versions: Mapping[str, int]) -> None:
    """Give every allocated-only tensor that no initializer wrote the prototype's values.

    A ``torch.nn`` layer's ``reset_parameters()`` normally overwrites all of its
    tensors, so they are allocated without a copy. One that writes through a
    computed attribute instead (the hook-based ``torch.nn.utils.weight_norm``,
    for instance) leaves them untouched: the version counter says so, and they
    get the values of the one ``factory()`` call instead of uninitialized memory.
    """
    unwritten = [name for name, version in versions.items() if stacked[name]._version == version]
    if not unwritten:
        return
    state = {**dict(prototype.named_parameters()), **dict(prototype.named_buffers())}
    for name in unwritten:
        stacked[name].copy_(state[name].detach().expand_as(stacked[name]))
    if len(next(iter(stacked.values()))) > 1:
        warnings.warn(
            f"Ensemble: the initializers of {unwritten} did not write them, so every member "
            "starts with the values of one factory() call. Build the members yourself and use "
            "Ensemble.from_modules([factory() for _ in range(n)]) to draw them per member.",
            stacklevel=4,
        )


def draw_members(prototype: nn.Module, n: int) -> tuple[State, State]:
    """Draw ``n`` independent initializations with one vmapped pass of the initializers."""
    params, buffers, versions = _allocate(prototype, n)
    state = {**params, **buffers}
    with torch.no_grad():
        if any(_reset_method(m) is not None for m in prototype.modules()):
            resetter = _Resetter(meta_copy(prototype))
            inner = {f"inner.{k}": v for k, v in state.items()}
            try:
                torch.vmap(lambda s: functional_call(resetter, s, ()), randomness="different")(inner)
            except Exception as err:  # an initializer vmap cannot batch
                raise EnsembleError(
                    f"Ensemble: running the members' reset_parameters() under torch.vmap failed "
                    f"({type(err).__name__}: {err}). Build the members yourself and use "
                    "Ensemble.from_modules([factory() for _ in range(n)]) instead."
                ) from err
        _fill_unwritten(prototype, state, versions)
    return _with_grad_flags(prototype, params), buffers


def draw_seeded_members(prototype: nn.Module, seed: int, members: range) -> tuple[State, State]:
    """Initialize member ``i`` from its own seed, derived from ``(seed, i)`` only.

    The members are drawn one after another (into views of the stacked
    tensors: no module is built), each under ``torch.manual_seed`` of its own
    seed, with the global random state restored afterwards. So member ``i``
    is the same whatever the number of members or the process that builds it,
    which is what sharding an ensemble across processes needs.
    """
    params, buffers, versions = _allocate(prototype, len(members))
    state = {**params, **buffers}
    resetter = _Resetter(meta_copy(prototype))
    device = next(iter(state.values())).device
    fork = {"devices": [device] if device.type == "cuda" else [], "device_type": device.type}
    with torch.no_grad():
        for k, member in enumerate(members):
            with torch.random.fork_rng(**fork):
                torch.manual_seed(member_seed(seed, member))
                functional_call(resetter, {f"inner.{name}": v[k] for name, v in state.items()}, ())
        _fill_unwritten(prototype, state, versions)
    return _with_grad_flags(prototype, params), buffers
