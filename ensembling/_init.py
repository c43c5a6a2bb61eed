"""Building the members of ``Ensemble(factory, n)``: independent draws from the law of ``factory()``.

:func:`make_prototype` calls the factory once, recording what the call does to each
tensor (:mod:`._record`). The members are then built in one of two ways, both giving
member values distributed exactly as separate ``factory()`` calls:

- replay: every tensor the call drew was written only by self-contained in-place ops
  (``uniform_``, ``normal_``, ``nn.init.kaiming_uniform_``, ``w[0].zero_()`` ...), so
  those writes are replayed on the stacked tensors, in the recorded order, under
  ``vmap(randomness="different")`` (:func:`draw_members`: fan-in and fan-out from one
  member's shape) or member after member under each member's seed
  (:func:`draw_seeded_members`); tensors no draw reached are the same in every call
  and are copied;
- separate calls: otherwise (a tensor computed from others, ``orthogonal_``, a drawn
  value read into Python, a replay vmap cannot run ...), ``factory()`` is called once
  per member (under the member's seed on the seeded path) and the results are stacked.
"""

from __future__ import annotations

import random
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._errors import EnsembleError
from ._record import ELEMENTWISE, OVERWRITES, Plan, Step, record_factory

__all__ = ["draw_members", "draw_seeded_members", "is_torch_nn_class", "make_prototype", "member_seed"]

State = dict[str, Tensor]


def is_torch_nn_class(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.nn.")


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


@dataclass
class _Build:
    """What :func:`make_prototype` learned, for the draw that follows: the factory, its plan, the raw values."""

    factory: Callable[[], nn.Module]
    plan: Plan
    raw: State  # the values of the recorded call, before device= / dtype= conversion


# The prototype's build, until draw_members / draw_seeded_members takes it.
_BUILDS: weakref.WeakKeyDictionary[nn.Module, _Build] = weakref.WeakKeyDictionary()


def _named_state(module: nn.Module) -> list[tuple[str, Tensor]]:
    return [*module.named_parameters(), *module.named_buffers()]


@contextmanager
def _forked_rng(seed: int | None = None, foreign: bool = False, device: torch.device | None = None) -> Iterator[None]:
    """Leave the global generators as they were (torch's on the CPU and the CUDA devices in use; with
    ``foreign``, Python's and NumPy's too); inside, seed them with ``seed`` if given."""
    cuda = {torch.cuda.current_device()} if torch.cuda.is_available() and torch.cuda.is_initialized() else set()
    if device is not None and device.type == "cuda":
        cuda.add(device.index if device.index is not None else torch.cuda.current_device())
    numpy = sys.modules.get("numpy") if foreign else None
    saved = (random.getstate(), numpy.random.get_state() if numpy is not None else None)
    with torch.random.fork_rng(devices=sorted(cuda)):
        if seed is not None:
            torch.manual_seed(seed)
            if foreign:
                random.seed(seed)
                if numpy is not None:
                    numpy.random.seed(seed % 2**32)
        try:
            yield
        finally:
            if foreign:
                random.setstate(saved[0])
                if numpy is not None:
                    numpy.random.set_state(saved[1])


def _check_deterministic(factory: Callable[[], nn.Module], plan: Plan, raw: State) -> Plan:
    """Call ``factory()`` a second time: the tensors the plan copies must come out the same.

    A safety net for draws the recorder cannot see (an op called below the Python API);
    the global generators are left as they were.
    """
    replayed = {name for name, _ in plan.steps}
    with _forked_rng(foreign=True), torch.no_grad():
        again = dict(_named_state(factory()))
    for name, t in raw.items():
        other = again.get(name)
        if name in replayed or t.numel() == 0:
            continue
        if other is None or other.shape != t.shape or not torch.equal(other.to(t.device), t):
            return Plan([], f"{name!r} differs between two factory() calls although no recorded draw wrote it")
    return plan


def make_prototype(
    factory: Callable[[], nn.Module],
    num_members: int,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    seed: int | None,
) -> nn.Module:
    """Check the constructor's arguments and call ``factory()`` once, recording it (leaving the global RNG alone
    if seeded)."""
    _check_arguments(factory, num_members, seed)
    if seed is not None:
        # A seeded ensemble leaves the global generators alone: the CPU's, and the
        # current CUDA device's if CUDA is in use (never every GPU, nor starting CUDA).
        with _forked_rng():
            prototype, plan = record_factory(factory)
    else:
        prototype, plan = record_factory(factory)
    if not isinstance(prototype, nn.Module):
        raise EnsembleError(f"Ensemble: factory() returned a {type(prototype).__name__}, not an nn.Module.")
    raw = {name: t.detach() for name, t in _named_state(prototype)}
    if plan.fallback is None and num_members > 1:
        plan = _check_deterministic(factory, plan, raw)
    if device is not None or dtype is not None:
        prototype = prototype.to(device=device, dtype=dtype)
    _BUILDS[prototype] = _Build(factory, plan, raw)
    return prototype


def member_seed(seed: int, member: int) -> int:
    """The seed member ``member`` of an ``Ensemble(..., seed=seed)`` is initialized from.

    Examples
    --------
    >>> member_seed(0, 0) != member_seed(0, 1) != member_seed(1, 0)
    True
    """
    return (seed * 1_000_003 + member * 7_919 + 0x5EED) % 2**63


def _stacked_like(prototype: nn.Module, build: _Build, n: int) -> State:
    """``[n, *shape]`` stacks in the recorded dtypes on the prototype's devices: copies of the recorded values,
    or only allocated where the first replayed write overwrites the whole tensor."""
    target = dict(_named_state(prototype))
    first: dict[str, Step] = {}
    for name, step in build.plan.steps:
        first.setdefault(name, step)
    stacked = {}
    for name, t in build.raw.items():
        step = first.get(name)
        if step is not None and step.func in OVERWRITES and _covers(step, t):
            stacked[name] = torch.empty((n, *t.shape), dtype=t.dtype, device=target[name].device)
        else:
            stacked[name] = t.to(target[name].device).unsqueeze(0).expand(n, *t.shape).clone()
    return stacked


def _covers(step: Step, t: Tensor) -> bool:
    return step.offset == 0 and step.shape == tuple(t.shape) and step.stride == t.stride()


def _view(stacked: Tensor, step: Step) -> Tensor:
    """The members' ``[n, *step.shape]`` view that ``step`` writes, in a contiguous ``[n, ...]`` stack."""
    return stacked.as_strided(
        (stacked.shape[0], *step.shape), (stacked.stride(0), *step.stride), stacked.storage_offset() + step.offset
    )


def _replay_vmapped(stacked: State, plan: Plan) -> None:
    """Every recorded write on every member at once, in the recorded order.

    Element-wise writes run on the ``[n, ...]`` view directly; the others (``kaiming_*``, ``xavier_*``, ``tril_``
    ...) under vmap with ``randomness="different"``, where fan-in and fan-out come from one member's shape.
    """
    for name, step in plan.steps:
        view = _view(stacked[name], step)
        if step.func in ELEMENTWISE:
            step.apply(view)
            continue

        def write(member: Tensor, step: Step = step) -> Tensor:
            step.apply(member)
            return torch.zeros(())

        with warnings.catch_warnings():  # vmap's "no batching rule for aten::clamp_" is only slower
            warnings.filterwarnings("ignore", message=".*performance drop because we have not yet implemented")
            torch.vmap(write, randomness="different")(view)


def _finish(prototype: nn.Module, stacked: State) -> tuple[State, State]:
    """Convert to the prototype's dtypes and split into parameters (with their ``requires_grad``) and buffers."""
    params = {}
    for name, p in prototype.named_parameters():
        params[name] = stacked[name].to(p.dtype).requires_grad_(p.requires_grad)
    buffers = {name: stacked[name].to(b.dtype) for name, b in prototype.named_buffers()}
    return params, buffers


def _member_state(build: _Build, call: int) -> State:
    """The tensors of one more ``factory()`` call, checked against the first call's names and shapes."""
    state = dict(_named_state(build.factory()))
    for name, t in build.raw.items():
        found = state.get(name)
        if found is None or found.shape != t.shape:
            got = "no such tensor" if found is None else f"shape {list(found.shape)}"
            raise EnsembleError(
                f"Ensemble: factory() call {call} built a module whose {name!r} has {got}, but the first "
                f"call's has shape {list(t.shape)}. Every call must build the same architecture; build "
                "different ones separately."
            )
    return state


def _from_calls(prototype: nn.Module, build: _Build, seeds: list[int | None], first_is_raw: bool) -> State:
    """One ``factory()`` call per member (under ``seeds[k]`` when given), stacked; the recorded call may be member 0."""
    target = dict(_named_state(prototype))
    stacked = {name: torch.empty((len(seeds), *t.shape), dtype=t.dtype, device=t.device) for name, t in target.items()}
    with torch.no_grad():
        for k, seed in enumerate(seeds):
            if k == 0 and first_is_raw:
                state = build.raw
            else:
                with _forked_rng(seed, build.plan.foreign_rng) if seed is not None else _no_fork():
                    state = _member_state(build, k)
            for name, t in stacked.items():
                t[k].copy_(state[name].detach())
    return stacked


@contextmanager
def _no_fork() -> Iterator[None]:
    yield


def draw_members(prototype: nn.Module, n: int) -> tuple[State, State]:
    """``n`` independent members from the global generator: the recorded draws replayed under vmap, or ``n`` calls."""
    build = _BUILDS.pop(prototype)
    if build.plan.fallback is None:
        stacked = _stacked_like(prototype, build, n)
        try:
            with torch.no_grad():
                _replay_vmapped(stacked, build.plan)
            return _finish(prototype, stacked)
        except Exception as err:  # an initializer vmap cannot batch: separate calls are exact too
            build.plan = Plan([], f"replaying under vmap failed ({type(err).__name__}: {err})")
    return _finish(prototype, _from_calls(prototype, build, [None] * n, first_is_raw=True))


def draw_seeded_members(prototype: nn.Module, seed: int, members: range) -> tuple[State, State]:
    """Initialize member ``i`` from its own seed, derived from ``(seed, i)`` only.

    Each member's recorded draws are replayed on its slice of the stacked
    tensors under ``torch.manual_seed`` of its own seed (or, where the plan
    says replay would not be exact, ``factory()`` is called under that seed),
    with the global random state restored afterwards. So member ``i`` is the
    same whatever the number of members or the process that builds it, which
    is what sharding an ensemble across processes needs.
    """
    build = _BUILDS.pop(prototype)
    seeds = [member_seed(seed, member) for member in members]
    if build.plan.fallback is not None:
        return _finish(prototype, _from_calls(prototype, build, seeds, first_is_raw=False))
    stacked = _stacked_like(prototype, build, len(members))
    views = [(_view(stacked[name], step), step) for name, step in build.plan.steps]
    device = next(iter(stacked.values())).device
    with torch.no_grad():
        for k, member in enumerate(seeds):
            with _forked_rng(member, device=device):
                for view, step in views:
                    step.apply(view[k])
    return _finish(prototype, stacked)
