"""Recording what one ``factory()`` call does to each tensor, so that it can be replayed per member.

:func:`record_factory` calls the factory under a :class:`torch.overrides.TorchFunctionMode`
that follows every storage the call creates or writes (a storage, not a tensor object:
``p.data.normal_()`` and ``nn.Parameter(torch.empty(...))`` write the storage the final
parameter ends up with). For each storage it keeps

- whether its value depends on a random draw (the generator's state moved during an op
  that wrote it, the op took a ``torch.Generator``, or it was computed from such a
  storage), and
- while every write is *self-contained* (an in-place op whose only tensor is the one it
  writes, all other arguments Python values: ``uniform_``, ``normal_``, ``fill_``,
  ``mul_``, ``w[0].zero_()``, ``nn.init.kaiming_uniform_`` ...), the list of those writes:
  replaying them on each member's slice, with per-member randomness, draws from exactly
  the law of the factory call.

:meth:`Recorder.plan` turns this into a :class:`Plan` for the module the call returned:
the draws to replay, or the reason members must come from separate ``factory()`` calls
(a tensor computed from other tensors, ``copy_`` from a drawn tensor, ``orthogonal_``,
a drawn value read into Python, memory shared between tensors ...).
"""

from __future__ import annotations

import random
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

__all__ = ["ELEMENTWISE", "OVERWRITES", "Plan", "Step", "record_factory"]

# Ops that return only metadata (or views the mode then sees written): never a write, never a data read.
_METADATA = frozenset(
    "size dim ndimension numel nelement shape ndim dtype device layout stride storage_offset is_contiguous "
    "is_floating_point is_complex is_signed requires_grad is_leaf grad_fn data_ptr element_size itemsize "
    "nbytes __len__ is_sparse is_cuda is_cpu is_meta is_quantized is_nested is_mkldnn is_mps is_xpu names "
    "_version __hash__ get_device requires_grad_ retain_grad retains_grad name output_nr __iter__ "
    "is_inference _set_grad_enabled".split()
)
_INPLACE_DUNDERS = frozenset(
    "__setitem__ __iadd__ __isub__ __imul__ __itruediv__ __ifloordiv__ __imod__ __ipow__ __iand__ __ior__ "
    "__ixor__ __ilshift__ __irshift__".split()
)
# In-place Tensor methods that change metadata or storage rather than values: never replayed.
_NOT_REPLAYED = frozenset("set_ resize_ resize_as_ as_strided_ copy_ share_memory_ detach_ t_ transpose_".split())
# torch.nn.init functions whose replay under vmap (randomness="different") is that function per member, by
# name: the originals, replayed also where a library's guard (transformers.initialization) stands in for them.
_INIT_REPLAYED = {
    name: getattr(nn.init, name)
    for name in "uniform_ normal_ trunc_normal_ constant_ ones_ zeros_ xavier_uniform_ xavier_normal_ "
    "kaiming_uniform_ kaiming_normal_".split()
}
_INIT_MODULES = frozenset({"torch.nn.init", "transformers.initialization"})
# Writes that set every element of the view they write, whatever it held.
OVERWRITES = frozenset(
    list(_INIT_REPLAYED.values())
    + [getattr(Tensor, name) for name in "uniform_ normal_ fill_ zero_ random_ exponential_ log_normal_ cauchy_ "
       "geometric_".split()]
)  # fmt: skip
# Writes whose law on an element does not depend on the tensor's shape: replayed on all members at once, no vmap.
ELEMENTWISE = frozenset(
    [_INIT_REPLAYED[name] for name in "uniform_ normal_ trunc_normal_ constant_ ones_ zeros_".split()]
    + [getattr(Tensor, name) for name in "uniform_ normal_ fill_ zero_ random_ bernoulli_ exponential_ "
       "log_normal_ cauchy_ geometric_ mul_ add_ sub_ div_ clamp_ clamp_min_ clamp_max_ erfinv_ abs_ neg_ "
       "exp_ sqrt_ pow_ __imul__ __iadd__ __isub__ __itruediv__".split()]
)  # fmt: skip
# Creation ops with no tensor input, as the in-place op that gives the same law on a fresh tensor.
_CREATION: dict[str, Callable[[tuple, dict], tuple[Callable, tuple]] | None] = {
    "empty": None, "empty_like": None, "new_empty": None,
    "zeros": lambda a, k: (Tensor.zero_, ()), "zeros_like": lambda a, k: (Tensor.zero_, ()),
    "new_zeros": lambda a, k: (Tensor.zero_, ()),
    "ones": lambda a, k: (Tensor.fill_, (1,)), "ones_like": lambda a, k: (Tensor.fill_, (1,)),
    "new_ones": lambda a, k: (Tensor.fill_, (1,)),
    "full": lambda a, k: (Tensor.fill_, (k.get("fill_value", a[1] if len(a) > 1 else None),)),
    "full_like": lambda a, k: (Tensor.fill_, (k.get("fill_value", a[1] if len(a) > 1 else None),)),
    "new_full": lambda a, k: (Tensor.fill_, (k.get("fill_value", a[2] if len(a) > 2 else None),)),
    "randn": lambda a, k: (Tensor.normal_, ()), "randn_like": lambda a, k: (Tensor.normal_, ()),
    "rand": lambda a, k: (Tensor.uniform_, ()), "rand_like": lambda a, k: (Tensor.uniform_, ()),
}  # fmt: skip
_FROM_METADATA = frozenset(n for n in _CREATION if n.endswith("_like") or n.startswith("new_"))
_RANDOM_NAME = re.compile(
    r"rand|normal|uniform|bernoulli|multinomial|poisson|exponential|geometric|cauchy|dropout|rrelu|sparse_"
    r"|orthogonal|kaiming|xavier"
)


@dataclass(frozen=True)
class Step:
    """One self-contained write: ``func(view, *args, **kwargs)`` on the view at ``offset``/``shape``/``stride``."""

    seq: int
    func: Callable[..., Any]
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def apply(self, view: Tensor) -> None:
        self.func(view, *self.args, **self.kwargs)


@dataclass
class Plan:
    """How to build the members: replay ``steps`` (name, step relative to that tensor), or ``fallback``'s reason."""

    steps: list[tuple[str, Step]]
    fallback: str | None = None
    foreign_rng: bool = False  # factory() drew from Python's or NumPy's global generator


@dataclass
class _Lineage:
    storage: Any  # the UntypedStorage, kept alive so that its address is not reused for another one
    random: bool = False
    steps: list[Step] | None = field(default_factory=list)
    why: str = ""  # the op that made the steps unreplayable


def _op_name(func: Callable) -> str:
    owner = getattr(func, "__self__", None)
    if getattr(func, "__name__", "") in ("__get__", "__set__") and owner is not None:
        return getattr(owner, "__name__", "")
    return getattr(func, "__name__", "")


def _key(t: Tensor) -> int:
    return t.untyped_storage()._cdata


def _rng_state() -> list[Tensor]:
    states = [torch.default_generator.get_state()]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states += [g.get_state() for g in torch.cuda.default_generators]
    return states


def _target(args: tuple, kwargs: dict) -> tuple[Tensor | None, tuple, dict]:
    """The tensor an op writes in place (first positional, or ``tensor=`` as nn.init passes it), and the rest."""
    if args and isinstance(args[0], Tensor):
        return args[0], tuple(args[1:]), dict(kwargs)
    for key in ("tensor", "input", "self"):
        if not args and isinstance(kwargs.get(key), Tensor):
            return kwargs[key], (), {k: v for k, v in kwargs.items() if k != key}
    return None, tuple(args), dict(kwargs)


def _replayed(func: Callable, name: str) -> Callable | None:
    """The function that replays ``func``'s in-place write on a member's view, or None if it cannot."""
    if name in _INIT_REPLAYED and getattr(func, "__module__", None) in _INIT_MODULES:
        return _INIT_REPLAYED[name]
    inplace = (name.endswith("_") and not name.startswith("_")) or name in _INPLACE_DUNDERS
    return func if inplace and name not in _NOT_REPLAYED and getattr(Tensor, name, None) is func else None


class Recorder(TorchFunctionMode):
    """Follows each storage through one ``factory()`` call (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.lineages: dict[int, _Lineage] = {}
        self.problem: str | None = None
        self._seq = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _op_name(func)
        if name in _METADATA or self.problem is not None:
            return func(*args, **kwargs)
        leaves = tree_flatten((args, kwargs))[0]
        tensors = [x for x in leaves if isinstance(x, Tensor)]
        try:
            versions = [t._version for t in tensors]
            for t in tensors:
                self._lineage(t)
            before = _rng_state()
        except Exception as err:  # inference tensors, tensors without storage ...
            self.problem = f"{name} took a tensor whose writes cannot be followed ({type(err).__name__}: {err})"
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        try:
            drew = any(not torch.equal(a, b) for a, b in zip(before, _rng_state()))
            drew = drew or bool(_RANDOM_NAME.search(name)) or any(isinstance(x, torch.Generator) for x in leaves)
            self._observe(func, name, args, kwargs, tensors, versions, drew, out)
        except Exception as err:
            self.problem = f"recording {name} failed ({type(err).__name__}: {err})"
        return out

    def _lineage(self, t: Tensor, **fresh: Any) -> _Lineage:
        """The lineage of ``t``'s storage; one first seen here existed before (its steps are unknown)."""
        key = _key(t)
        if key not in self.lineages or fresh:
            self.lineages[key] = _Lineage(t.untyped_storage(), **({"steps": None} | fresh))
        return self.lineages[key]

    def _step(self, func: Callable, args: tuple, view: Tensor, kwargs: dict) -> Step:
        self._seq += 1
        return Step(self._seq, func, view.storage_offset(), tuple(view.shape), view.stride(), view.dtype, args, kwargs)

    def _observe(self, func, name, args, kwargs, tensors, versions, drew, out) -> None:
        written = [t for t, v in zip(tensors, versions) if t._version != v]
        outs = [x for x in tree_flatten(out)[0] if isinstance(x, Tensor)]
        created = [t for t in outs if _key(t) not in self.lineages]
        sources = [] if name in _FROM_METADATA else tensors
        from_random = any(self._lineage(t).random for t in sources)
        if not outs and from_random and out is not None and out is not NotImplemented:
            self.problem = f"factory() reads drawn values into Python ({name})"
            return
        generator = any(isinstance(x, torch.Generator) for x in tree_flatten((args, kwargs))[0])
        target, rest, options = _target(args, kwargs)
        if (
            target is not None and len(tensors) == 1 and len(written) == 1 and written[0] is target
            and not created and not generator and _replayed(func, name) is not None
        ):  # fmt: skip
            lineage = self._lineage(target)
            lineage.random = lineage.random or drew
            if lineage.steps is not None:
                lineage.steps.append(self._step(_replayed(func, name), rest, target, options))
            return
        for t in written:
            lineage = self._lineage(t)
            lineage.random, lineage.steps, lineage.why = lineage.random or drew or from_random, None, name
        fresh = name in _CREATION and not sources and not generator and len(created) == 1
        for t in created:
            steps = None
            if fresh:
                make = _CREATION[name]
                steps = [] if make is None else [self._step(*make(args, kwargs), t, {})]
            self._lineage(t, random=drew or from_random, steps=steps, why=name)

    def plan(self, module: nn.Module) -> Plan:
        """What to replay for each of ``module``'s parameters and buffers, or why it cannot be."""
        if self.problem is not None:
            return Plan([], self.problem)
        finals = [*module.named_parameters(), *module.named_buffers()]
        sharing: dict[int, list[str]] = {}
        for name, t in finals:
            sharing.setdefault(_key(t), []).append(name)
        steps: list[tuple[str, Step]] = []
        for name, t in finals:
            lineage = self.lineages.get(_key(t))
            if lineage is None or not lineage.random:
                continue  # deterministic: every factory() call gives the same values
            if lineage.steps is None:
                return Plan([], f"{name!r} is computed from other tensors (by {lineage.why or 'an op'})")
            if len(sharing[_key(t)]) > 1:
                return Plan([], f"{sharing[_key(t)]} share memory, so their draws are not independent")
            if not t.is_contiguous():
                return Plan([], f"{name!r} is not contiguous")
            for step in lineage.steps:
                relative = _relative(step, t)
                if relative is None:
                    return Plan([], f"{name!r} is written through a view that reaches beyond it")
                if relative.shape and 0 in relative.shape:
                    continue
                steps.append((name, relative))
        return Plan(sorted(steps, key=lambda s: s[1].seq))


def _relative(step: Step, t: Tensor) -> Step | None:
    """``step`` with its offset counted from ``t``'s first element; ``None`` if it writes outside ``t``."""
    if step.dtype != t.dtype:
        return None
    offset = step.offset - t.storage_offset()
    low = offset + sum(min(0, (n - 1) * s) for n, s in zip(step.shape, step.stride) if n > 0)
    high = offset + sum(max(0, (n - 1) * s) for n, s in zip(step.shape, step.stride) if n > 0)
    if 0 in step.shape:
        return replace(step, offset=0)
    return replace(step, offset=offset) if low >= 0 and high < t.numel() else None


def _foreign_states() -> tuple:
    numpy = sys.modules.get("numpy")
    state = numpy.random.get_state()[1].tobytes() if numpy is not None else None
    return random.getstate(), state


def record_factory(factory: Callable[[], Any]) -> tuple[Any, Plan]:
    """Call ``factory()`` once under the recorder; return what it returned and the plan for its tensors."""
    foreign = _foreign_states()
    recorder = Recorder()
    with recorder:
        module = factory()
    if not isinstance(module, nn.Module):
        return module, Plan([], "factory() did not return a module")
    plan = recorder.plan(module)
    if _foreign_states() != foreign:
        plan = Plan([], "factory() draws from Python's random module or NumPy's global generator", foreign_rng=True)
    return module, plan
