"""How members that are not on the fast path run: vectorized, or back to back; chosen by measuring.

Two strategies give the loop's answer:

* ``"vectorized"``: one :func:`torch.vmap` over the runner, the architecture
  with vectorizable stand-ins, holding the batched state (``_vmap.py``);
* ``"loop"``: the members one after another through the *original*
  architecture (a copy per member, :class:`Shells`), so each runs torch's
  own fused kernels (oneDNN / cuDNN RNNs, native attention, MKLDNN
  convolutions). Member ``i`` reads views ``stacked.unbind(0)[i]``: gradients
  flow into the stacked parameters through one stack in backward, and
  in-place buffer updates (BatchNorm running statistics) land in the stacked
  buffers, exactly as in the loop.

With ``strategy="auto"`` a planner (``_planner.py``) measures both on the
first calls of each input signature and keeps the faster. Under
:func:`torch.compile` nothing is measured: the cached or forced choice runs,
``"vectorized"`` by default.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ._errors import EnsembleError
from ._planner import SCALARS, Planner, describe_call, measured, signature
from ._state import Places, identity

__all__ = [
    "Shells", "describe_plan", "loop_forward", "plan_summary", "run_fast", "run_strategy", "shells_of",
    "stack_outputs",
]  # fmt: skip


def _slice(value: Any, dim: Any, index: int) -> Any:
    """Member ``index``'s part of one input: ``value`` itself if shared, else each tensor's slice along ``dim``."""
    if dim is None:
        return value
    return tree_map(lambda t: t.select(dim, index) if isinstance(t, Tensor) else t, value)


def stack_outputs(outputs: list[Any]) -> Any:
    """The members' outputs as one: every tensor leaf stacked along a new leading member dimension."""
    first = outputs[0]
    if isinstance(first, Tensor):
        return torch.stack(outputs)
    if type(first) in (tuple, list) and all(
        type(out) is type(first) and len(out) == len(first) and all(isinstance(t, Tensor) for t in out)
        for out in outputs
    ):  # an RNN's (output, state), attention's (output, weights): stacked without pytree's bookkeeping
        return type(first)(map(torch.stack, zip(*outputs)))
    leaves, spec = tree_flatten(first)
    flat = [tree_flatten(out) for out in outputs]
    for i, (_, other) in enumerate(flat):
        if other != spec:
            shape = lambda out: tree_map(lambda leaf: type(leaf).__name__, out)  # noqa: E731
            raise EnsembleError(
                f"Ensemble: member {i} returned {shape(outputs[i])} but member 0 returned {shape(first)}: "
                "outputs of different structures cannot be stacked; return the same structure from every member."
            )
    columns = [column for column, _ in flat]
    stacked = [
        torch.stack([column[k] for column in columns]) if isinstance(leaf, Tensor) else leaf
        for k, leaf in enumerate(leaves)
    ]
    return tree_unflatten(stacked, spec)


class Shells:
    """One copy of the architecture per member (meta tensors, no memory) whose tensor slots take member views.

    Pointing a copy's ``_parameters`` / ``_buffers`` entries at member ``i``'s
    views is a dictionary assignment per tensor, where
    :func:`torch.func.functional_call` re-registers every tensor on every call
    (about a millisecond per member for a small transformer). Without autograd
    the views stay bound between calls: they are made again only when a
    stacked tensor was replaced (``.to()``, ``load_state_dict(assign=True)``),
    so a steady no-grad call costs what the plain loop costs. With autograd,
    each call binds fresh views, so gradients reach the stacked parameters.
    """

    def __init__(self, template: nn.Module, aliases: dict[str, list[str]], buffers: list[str], n: int) -> None:
        self.template, self.aliases, self.buffer_names = template, aliases, buffers
        self.modules = [copy.deepcopy(template) for _ in range(n)]
        self.places = [Places(m, aliases, buffers) for m in self.modules]
        self.rnn_names = [f"nn.{type(m).__name__}" for m in template.modules() if isinstance(m, nn.RNNBase)]
        self.bound: tuple[Any, ...] | None = None  # identity of the stacked tensors the no-grad views were made of

    def __reduce__(self) -> tuple[Any, ...]:
        # Copies and pickles start unbound: the views belong to this ensemble's tensors (and its autograd graph).
        return (Shells, (self.template, self.aliases, self.buffer_names, len(self.modules)))

    def bind(self, params: dict[str, Tensor], buffers: dict[str, Tensor], keep: bool) -> None:
        """Point every copy at its member's views of ``params`` / ``buffers``; ``keep``: views for later calls too."""
        tensors = (*params.values(), *buffers.values())
        if keep:
            key = identity(tensors)
            if key == self.bound:
                return
        self.bound = None
        with torch.set_grad_enabled(not keep and torch.is_grad_enabled()):
            views = [t.unbind(0) for t in tensors]  # one UnbindBackward per parameter; buffer updates reach the stack
        for i, places in enumerate(self.places):
            places.assign(v[i] for v in views)
        if keep:
            self.bound = key

    def run(self, i: int, args: tuple, kwargs: dict, views: tuple[Tensor, ...] | None = None) -> Any:
        """Member ``i``'s forward on the views bound last, or on ``views`` for this call only.

        With ``views`` the copy holds its previous tensors again after: the form
        :func:`torch.compile` traces, with no identity checks and no state left behind.
        """
        module = self.modules[i]
        if module.training != self.template.training:
            module.train(self.template.training)
        if views is None:
            return module(*args, **kwargs)
        return self.places[i].run(module, views, args, kwargs)


def loop_forward(
    shells: Shells,
    params: dict[str, Tensor],
    buffers: dict[str, Tensor],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    dims: tuple[Any, ...],
    kw_dims: dict[str, Any],
) -> Any:
    """Run the members one after another through the architecture's own forward; stack their outputs.

    ``params`` / ``buffers`` map the member's names to stacked ``[members, ...]`` tensors;
    ``dims`` / ``kw_dims`` say which inputs are split (an int: the member's slice along that dimension).
    """
    n = len(shells.modules)
    if torch.compiler.is_compiling():
        if shells.rnn_names:
            raise EnsembleError(
                f"Ensemble: strategy='loop' runs the member's own {shells.rnn_names[0]}, which torch.compile "
                "cannot trace (dynamo refuses torch's RNN modules); compile with strategy='auto' or "
                "'vectorized', whose stand-in compiles."
            )
        views = [t.unbind(0) for t in (*params.values(), *buffers.values())]
        outputs = []
        for i in range(n):
            member_args = tuple(_slice(a, d, i) for a, d in zip(args, dims))
            member_kwargs = {k: _slice(v, kw_dims.get(k), i) for k, v in kwargs.items()}
            outputs.append(shells.run(i, member_args, member_kwargs, tuple(v[i] for v in views)))
        return stack_outputs(outputs)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in params.values())
    shells.bind(params, buffers, keep=not grad)
    if not kwargs and all(d is None for d in dims):  # shared positional inputs: the plain loop
        return stack_outputs([shells.run(i, args, kwargs) for i in range(n)])
    outputs = []
    for i in range(n):
        member_args = tuple(_slice(a, d, i) for a, d in zip(args, dims))
        member_kwargs = {k: _slice(v, kw_dims.get(k), i) for k, v in kwargs.items()}
        outputs.append(shells.run(i, member_args, member_kwargs))
    return stack_outputs(outputs)


def _loopable(args: tuple[Any, ...], kwargs: dict[str, Any], dims: tuple[Any, ...], kw_dims: dict[str, Any]) -> bool:
    """Whether the loop can split these inputs: plain containers of tensors and scalars, int or None dims."""
    if not kwargs and all(type(a) is Tensor for a in args) and all(d is None or type(d) is int for d in dims):
        return True
    leaves = tree_flatten((args, kwargs))[0]
    if any(isinstance(leaf, PackedSequence) or not isinstance(leaf, (Tensor, *SCALARS)) for leaf in leaves):
        return False
    return all(d is None or (isinstance(d, int) and not isinstance(d, bool)) for d in (*dims, *kw_dims.values()))


def run_members(
    planner: Planner,
    forced: str,
    key_extra: tuple[Any, ...],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    dims: tuple[Any, ...],
    kw_dims: dict[str, Any],
    vectorized: Callable[[], Any],
    loop: Callable[[], Any],
    device: torch.device,
) -> Any:
    """Run the members with the forced strategy, or the one measured fastest for this signature."""
    if forced == "loop":
        if not _loopable(args, kwargs, dims, kw_dims):
            raise EnsembleError(
                "Ensemble: strategy='loop' cannot split these inputs (a PackedSequence, an object, or nested "
                "in_dims); use strategy='auto' or 'vectorized'."
            )
        return loop()
    if forced == "vectorized":
        return vectorized()
    key = signature(args, kwargs, dims, kw_dims, key_extra)
    known = planner.plans.get(key)
    if known is None or known.pending is None:
        planner.forget_pending()  # another signature's open training interval would time this call too
    choice = None if known is None else known.settled()
    if choice is not None:  # the steady state
        return loop() if choice == "loop" else vectorized()
    describe = lambda: describe_call(args, kwargs, dims, kw_dims, key_extra)  # noqa: E731
    name, plan = planner.choose(key, describe, _loopable(args, kwargs, dims, kw_dims))
    return measured(plan, name, {"vectorized": vectorized, "loop": loop}, device)


def run_strategy(
    ens: Any,
    vectorized: Callable[[], Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    dims: tuple[Any, ...],
    kw_dims: dict[str, Any] | None,
    options: Any,
) -> Any:
    """``ens``'s members on these inputs, by the strategy ``options.strategy`` forces or the planner measured."""
    kw_dims = kw_dims or {}
    state = ens._state

    def loop() -> Any:
        return loop_forward(shells_of(ens), state.params(), state.buffers(), args, kwargs, dims, kw_dims)

    forced = options.strategy
    if options.randomness != "different" and forced != "loop":
        return vectorized()  # "same" masks or "error": vmap's randomness modes, which the loop has not
    if forced == "loop" and options.randomness != "different":
        raise EnsembleError(
            f"Ensemble: strategy='loop' runs the members one by one, so it cannot give randomness="
            f"{options.randomness!r}; use randomness='different' or strategy='vectorized'."
        )
    if torch.compiler.is_compiling():  # never measure (nor touch the plan cache) inside a compiled graph
        return loop() if forced == "loop" else vectorized()
    planner = ens.__dict__.get("_planner")
    if planner is None:
        planner = Planner()
        object.__setattr__(ens, "_planner", planner)
    extra = (ens.training, torch.is_grad_enabled(), options.chunk_size)
    return run_members(planner, forced, extra, args, kwargs, dims, kw_dims, vectorized, loop, state.device())


def shells_of(ens: Any) -> Shells:
    """``ens``'s per-member copies for the loop strategy, made on first use (or ahead, for ``torch.compile``)."""
    shells = ens.__dict__.get("_shells")
    if shells is None or len(shells.modules) != ens.num_members:
        state = ens._state
        shells = Shells(ens._template, state.aliases, [slot.name for slot in state.buffer_slots], ens.num_members)
        object.__setattr__(ens, "_shells", shells)
    return shells


def describe_plan(ens: Any) -> str:
    """What runs the members of ``ens``: the fast path, the forced strategy, or the measured plan per signature."""
    options = ens._options
    lines = [f"Ensemble of {ens.num_members} {ens.member_class.__qualname__}, strategy={options.strategy!r}"]
    if ens._fast is not None and options.fast_path and options.strategy != "loop":
        steps = ", ".join(type(step).__name__.removesuffix("Step") for step in ens._fast.steps)
        lines.append(f"  one tensor input: batched products (baddbmm) over the chain [{steps}]")
    planner = ens.__dict__.get("_planner")
    described = planner.describe() if planner is not None else []
    if options.strategy != "auto":
        lines.append(f"  other calls: {options.strategy} (forced)")
    elif described:
        lines += [f"  {line}" for line in described]
    else:
        lines.append("  other calls: measured on the first calls of each input signature (none yet)")
    return "\n".join(lines)


def plan_summary(ens: Any) -> str:
    """For the repr: ``", plan: loop for 1 input signature, vectorized for 2"`` once choices are measured."""
    planner = ens.__dict__.get("_planner")
    if planner is None or ens._options.strategy != "auto":
        return ""
    counts: dict[str, int] = {}
    for plan in planner.plans.values():
        if plan.choice is not None:
            counts[plan.choice] = counts.get(plan.choice, 0) + 1
    words = [f"{name} for {k} input signature{'s' * (k > 1)}" for name, k in sorted(counts.items())]
    return f", plan: {', '.join(words)}" if words else ""


def run_fast(ens: Any, x: Tensor, shared: bool, options: Any) -> Tensor:
    """The fast path's chain on ``x``; under autograd, the activation layout measured faster per signature.

    ``rows`` keeps activations ``[members, rows, features]``; ``transposed`` keeps
    ``[members, features, rows]``, whose weight gradients need no copy into the
    weights' layout but whose products may be slower. Without measuring (forced
    strategies, ``torch.compile``) the layout follows the weights' size.
    """
    fast = ens._fast
    recording = torch.is_grad_enabled() and any(p.requires_grad for p in ens.stacked.parameters())
    if not recording or options.strategy != "auto" or torch.compiler.is_compiling():
        transposed = recording and fast.weights_are_large
        return fast.run(x, shared, ens.num_members, ens.training, options.randomness, transposed)

    def run(transposed: bool) -> Tensor:
        return fast.run(x, shared, ens.num_members, ens.training, options.randomness, transposed)

    planner = ens.__dict__.get("_planner")
    if planner is None:
        planner = Planner()
        object.__setattr__(ens, "_planner", planner)
    key = ("baddbmm", x.shape, x.dtype, x.device, shared, ens.training)
    known = planner.plans.get(key)
    if known is None or known.pending is None:
        planner.forget_pending()
    choice = None if known is None else known.settled()
    if choice is not None:
        return run(choice == "transposed")
    where = "shared" if shared else "split on dim 0"
    describe = lambda: f"baddbmm layout, ({list(x.shape)} {x.dtype} {x.device} ({where})), grad"  # noqa: E731
    names = ("transposed", "rows") if fast.weights_are_large else ("rows", "transposed")
    name, plan = planner.choose(key, describe, True, names)
    return measured(plan, name, {"rows": lambda: run(False), "transposed": lambda: run(True)}, x.device)
