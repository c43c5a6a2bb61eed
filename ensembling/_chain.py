"""Reading a member into typed steps: the chain the fast path runs, if the member is one.

:func:`chain_steps` reads an ``nn.Sequential``, or any module whose
``torch.fx`` trace is a single chain, into steps: Linear layers, Dropout,
element-wise functions, reshapes of a member's own dimensions
(``x.flatten(1)``, ``x.view(x.size(0), -1)``, ``nn.Flatten``, ``transpose``,
...) as :class:`ReshapeStep` s that act on the dimensions after the member
dimension, reductions over them (``x.mean(dim=1)``, ``x.sum(-2)``) as
:class:`ReduceStep` s, and an ``nn.Embedding`` as the first step (a
bag-of-embeddings model). ``_fastpath.py`` runs them.
"""

from __future__ import annotations

import functools
import inspect
import operator
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from ._errors import EnsembleError
from ._state import Slot, StackedState

__all__ = [
    "ActivationStep", "DropoutStep", "EmbeddingStep", "LinearStep", "ReduceStep", "ReshapeStep", "Step", "chain_steps",
]  # fmt: skip

# Stateless element-wise modules: applying them to a [members, rows, features]
# tensor is the same as applying them to each member's [rows, features] slice.
_ELEMENTWISE = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish,
    nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
)  # fmt: skip
# Element-wise functions a traced forward may apply between Linear layers.
_ELEMENTWISE_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.tanh, F.sigmoid,
    F.hardtanh, F.hardsigmoid, F.hardswish, F.softplus, F.softsign, F.tanhshrink, F.logsigmoid,
}  # fmt: skip
_ELEMENTWISE_BUILTINS = {torch.relu, torch.tanh, torch.sigmoid}  # no extra arguments allowed
_ELEMENTWISE_METHODS = {"relu", "tanh", "sigmoid"}

Layer = tuple[str, "nn.Module | Callable[[Tensor], Tensor]"]


@dataclass(frozen=True)
class LinearStep:
    """``h @ weight.mT + bias`` for every member at once."""

    name: str
    weight: Slot  # [members, out, in]
    bias: Slot | None  # [members, out]


@dataclass(frozen=True)
class EmbeddingStep:
    """``weight[ids]`` for every member at once: the chain's first step, on integer ids."""

    name: str
    weight: Slot  # [members, vocabulary, dim]
    padding_idx: int | None  # that row gets no gradient, as in nn.Embedding


@dataclass(frozen=True)
class DropoutStep:
    p: float


@dataclass(frozen=True)
class ActivationStep:
    fn: Callable[[Tensor], Tensor]
    relu: bool = False  # may then run in place on the path's own intermediate


@dataclass(frozen=True)
class SizeOf:
    """``x.size(dim)`` (or ``x.shape[dim]``) of one member's activation, read when the step runs."""

    dim: int


# Per-member reshapes, by method name: the names of their arguments after the tensor
# (None: a variable number of dims / sizes, as for ``view(*shape)``), and defaults.
_RESHAPE_ARGS: dict[str, tuple[tuple[str, ...] | None, tuple[Any, ...]]] = {
    "flatten": (("start_dim", "end_dim"), (0, -1)),
    "unflatten": (("dim", "sizes"), ()),
    "transpose": (("dim0", "dim1"), ()),
    "swapaxes": (("axis0", "axis1"), ()),
    "swapdims": (("dim0", "dim1"), ()),
    "squeeze": (("dim",), ()),
    "unsqueeze": (("dim",), ()),
    "contiguous": ((), ()),
    "view": (None, ()),
    "reshape": (None, ()),
    "permute": (None, ()),
}
_RESHAPE_FUNCTIONS = {
    torch.flatten: "flatten", torch.unflatten: "unflatten", torch.transpose: "transpose", torch.swapaxes: "swapaxes",
    torch.swapdims: "swapdims", torch.squeeze: "squeeze", torch.unsqueeze: "unsqueeze", torch.reshape: "reshape",
    torch.permute: "permute",
}  # fmt: skip


def _dim(d: int, ndim: int, step: ReshapeStep) -> int:
    """Member dimension ``d`` (of ``ndim``) as a dimension of the stacked ``[members, ...]`` tensor."""
    if not -ndim <= d < ndim:
        raise EnsembleError(
            f"Ensemble: {step.method}{step.args} refers to dimension {d}, but one member's activation there has "
            f"{ndim} dimensions."
        )
    return d % ndim + 1


@dataclass(frozen=True)
class ReshapeStep:
    """A reshape of each member's activation (``x.flatten(1)``, ``x.view(x.size(0), -1)``, ``x.transpose(1, 2)``).

    ``args`` are the member's own dims or sizes (ints, :class:`SizeOf`, tuples of them);
    :meth:`apply` shifts them past the leading member dimension.
    """

    method: str
    args: tuple[Any, ...]

    def _size(self, entry: Any, h: Tensor) -> Any:
        if isinstance(entry, SizeOf):
            return h.shape[_dim(entry.dim, h.dim() - 1, self)]
        return tuple(self._size(e, h) for e in entry) if isinstance(entry, tuple) else entry

    def apply(self, h: Tensor) -> Tensor:
        """``h`` ``[members, *member_shape]`` -> ``[members, *reshaped member_shape]``."""
        ndim, m, args = h.dim() - 1, self.method, self._size(self.args, h)
        if m in ("view", "reshape"):
            return getattr(h, m)(h.shape[0], *args)
        if m == "contiguous":
            return h.contiguous()
        if m == "unsqueeze":
            return h.unsqueeze(_dim(args[0], ndim + 1, self))
        if m == "unflatten":
            return h.unflatten(_dim(args[0], ndim, self), args[1])
        dims = [_dim(d, ndim, self) for d in (args[0] if m == "squeeze" and isinstance(args[0], tuple) else args)]
        if m == "flatten":
            return h.flatten(*dims) if ndim else h.reshape(h.shape[0], 1)
        if m == "permute":
            return h.permute(0, *dims)
        return h.squeeze(tuple(dims)) if m == "squeeze" else h.transpose(*dims)


@dataclass(frozen=True)
class ReduceStep(ReshapeStep):
    """A reduction over a member's own dimensions: ``x.mean(dim=1)``, ``x.sum((1, 2), keepdim=True)``.

    ``args`` are ``(dims, keepdim)``; ``method`` is ``mean``, ``sum``, ``amax`` or ``amin``.
    """

    def apply(self, h: Tensor) -> Tensor:
        dims, keepdim = self.args
        ndim = h.dim() - 1
        shifted = tuple(_dim(d, ndim, self) for d in (dims if isinstance(dims, tuple) else (dims,)))
        return getattr(h, self.method)(shifted, keepdim=keepdim)


_REDUCTIONS = {"mean", "sum", "amax", "amin"}
_REDUCTION_FUNCTIONS = {torch.mean: "mean", torch.sum: "sum", torch.amax: "amax", torch.amin: "amin"}


def _reduce_step(method: str, extra: tuple[Any, ...], kwargs: dict[str, Any]) -> ReduceStep | None:
    """A reduction call of a trace as a typed step; None without explicit dims or with other arguments (dtype)."""
    if len(extra) > 2 or set(kwargs) - {"dim", "keepdim"}:
        return None
    bound = dict(zip(("dim", "keepdim"), extra)) | kwargs
    dims, keepdim = bound.get("dim"), bound.get("keepdim", False)
    dims = tuple(dims) if isinstance(dims, list) else dims
    entries = dims if isinstance(dims, tuple) else (dims,)
    if not entries or not all(type(d) is int for d in entries) or type(keepdim) is not bool:
        return None  # a reduction over everything (no dim) leaves no features
    return ReduceStep(method, (dims, keepdim))


def _is_size_or_shape(value: Any) -> bool:
    if isinstance(value, tuple):
        return all(_is_size_or_shape(v) for v in value)
    return isinstance(value, SizeOf) or (isinstance(value, int) and not isinstance(value, bool))


def _reshape_step(method: str, extra: tuple[Any, ...], kwargs: dict[str, Any]) -> ReshapeStep | None:
    """A reshape call of a trace (``flatten(x, 1)``, ``x.view(-1, 784)``) as a typed step, or None if unsupported."""
    names, defaults = _RESHAPE_ARGS[method]
    if names is None:  # view(*shape) / view(shape), permute(*dims) / permute(dims)
        if kwargs:
            return None
        args = tuple(extra[0]) if len(extra) == 1 and isinstance(extra[0], (tuple, list)) else tuple(extra)
    else:
        if len(extra) > len(names) or set(kwargs) - set(names):
            return None
        bound = dict(zip(names, extra)) | kwargs
        filled = [*[None] * (len(names) - len(defaults)), *defaults]
        args = tuple(bound.get(name, default) for name, default in zip(names, filled))
        args = tuple(tuple(a) if isinstance(a, list) else a for a in args)
    if method == "squeeze" and not args:
        return None
    return ReshapeStep(method, args) if _is_size_or_shape(args) else None


def _size_read(node: torch.fx.Node, sizes: dict[torch.fx.Node, tuple[torch.fx.Node, Any]]) -> Any:
    """``(source, SizeOf(d))`` for ``x.size(d)`` / ``x.shape[d]`` (``(source, "shape")`` for ``x.shape``), else None."""
    args = node.args
    if node.op == "call_method" and node.target == "size" and len(args) == 2 and not node.kwargs:
        if isinstance(args[0], torch.fx.Node) and isinstance(args[1], int):
            return args[0], SizeOf(args[1])
    if node.op == "call_function" and node.target is getattr and args[1:] == ("shape",):
        return (args[0], "shape") if isinstance(args[0], torch.fx.Node) else None
    if node.op == "call_function" and node.target is operator.getitem and args[0] in sizes:
        source, what = sizes[args[0]]  # type: ignore[index]
        return (source, SizeOf(args[1])) if what == "shape" and isinstance(args[1], int) else None
    return None


Step = LinearStep | EmbeddingStep | DropoutStep | ActivationStep | ReshapeStep


def _is_fast_leaf(layer: nn.Module) -> bool:
    if type(layer) is nn.Linear:
        return True
    if type(layer) is nn.Embedding:  # a plain lookup: no renormalizing, no frequency scaling, dense gradients
        return layer.max_norm is None and not layer.scale_grad_by_freq and not layer.sparse
    stateless = not list(layer.parameters(recurse=True)) and not list(layer.buffers())
    return stateless and (type(layer) in _ELEMENTWISE or type(layer) in (nn.Dropout, nn.Flatten, nn.Unflatten))


def _chain(template: nn.Module) -> list[Layer] | None:
    """The member as a chain of Linear, Dropout, element-wise, reshape and reduction steps, or None if it is not one.

    An ``nn.Embedding`` may only come first: it turns integer ids into features.

    An ``nn.Sequential`` of such layers is read directly. Any other module
    whose leaves are all such layers (a custom MLP class, say) is traced with
    :func:`torch.fx.symbolic_trace`; it qualifies when its forward takes one
    input and applies those layers, or element-wise functions such as
    ``F.relu`` / ``torch.tanh``, one after another.
    """
    if type(template) is nn.Sequential:
        layers: list[Layer] = list(template.named_children())
        if not layers or not all(_is_fast_leaf(layer) for _, layer in layers):
            return None
    else:
        leaves = [m for m in template.modules() if not list(m.children())]
        inner_state = any(m._parameters or m._buffers for m in template.modules() if list(m.children()))
        if not leaves or not all(_is_fast_leaf(m) for m in leaves) or inner_state:
            return None
        # Tracing bakes Python control flow in, e.g. `if not self.training:`; the
        # chain must be the same in both modes, or the fast path would follow one
        # mode's steps in the other.
        was_training = template.training
        chains = [_traced_chain(template.train(mode)) for mode in (True, False)]
        template.train(was_training)
        if chains[0] is None or chains[1] is None or _signature(chains[0]) != _signature(chains[1]):
            return None
        layers = chains[0]
    if not any(isinstance(layer, nn.Linear) for _, layer in layers):
        return None
    if any(isinstance(layer, nn.Embedding) for _, layer in layers[1:]):
        return None
    return layers


def _signature(layers: list[Layer]) -> list[tuple[Any, ...]]:
    """What a chain computes, comparable between two traces: modules by name, functions by identity and arguments."""
    return [
        (name,) if isinstance(layer, nn.Module)
        else (getattr(layer, "func", layer), sorted(getattr(layer, "keywords", {}).items()))
        for name, layer in layers
    ]  # fmt: skip


def _function_step(node: torch.fx.Node, extra: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """An element-wise function call of a trace as a one-argument callable, or None if it takes other inputs."""
    try:
        signature = inspect.signature(node.target)  # type: ignore[arg-type]
    except ValueError:  # a builtin (F.gelu): keyword arguments only
        if extra:
            return None
        arguments = kwargs
    else:
        try:
            arguments = dict(signature.bind(None, *extra, **kwargs).arguments)
        except TypeError:
            return None
        arguments.pop(next(iter(arguments)))  # the input itself
    arguments.pop("inplace", None)  # the fast path decides what it may overwrite
    return functools.partial(node.target, **arguments) if arguments else node.target


def _traced_chain(template: nn.Module) -> list[Layer] | None:
    """Trace ``template.forward``; return its steps if they form a single chain of fast layers and reshapes."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = torch.fx.symbolic_trace(template).graph
    except Exception:  # dynamic control flow, unsupported Python: not a chain we can read
        return None
    nodes = list(graph.nodes)
    if not nodes or nodes[0].op != "placeholder" or any(n.op == "placeholder" for n in nodes[1:]):
        return None
    previous, layers = nodes[0], []
    sizes: dict[torch.fx.Node, tuple[torch.fx.Node, Any]] = {}  # x.size(d) / x.shape[d] reads, off the chain
    for node in nodes[1:]:
        if node.op == "output":
            return layers if node.args[0] is previous else None
        read = _size_read(node, sizes)
        if read is not None:
            sizes[node] = read
            continue
        others = [n for n in node.all_input_nodes if n is not previous]
        if (
            not node.args
            or node.args[0] is not previous
            or any(sizes.get(n, (None,))[0] is not previous for n in others)
        ):
            return None
        step = _traced_step(template, node, sizes, reads_sizes=bool(others))
        if step is None:
            return None
        layers.append((node.target if node.op == "call_module" else node.name, step))  # type: ignore[arg-type]
        previous = node
    return None


def _traced_step(template: nn.Module, node: torch.fx.Node, sizes: dict, reads_sizes: bool) -> Any:
    """The layer, element-wise function or :class:`ReshapeStep` one node of a chain applies, or None."""
    extra = torch.fx.node.map_arg(node.args[1:], lambda n: sizes[n][1])
    kwargs = dict(torch.fx.node.map_arg(node.kwargs, lambda n: sizes[n][1]))
    if node.op == "call_method" and node.target in _RESHAPE_ARGS:
        return _reshape_step(node.target, extra, kwargs)  # type: ignore[arg-type]
    if node.op == "call_function" and node.target in _RESHAPE_FUNCTIONS:
        return _reshape_step(_RESHAPE_FUNCTIONS[node.target], extra, kwargs)  # type: ignore[index]
    if node.op == "call_method" and node.target in _REDUCTIONS and not reads_sizes:
        return _reduce_step(node.target, extra, kwargs)  # type: ignore[arg-type]
    if node.op == "call_function" and node.target in _REDUCTION_FUNCTIONS and not reads_sizes:
        return _reduce_step(_REDUCTION_FUNCTIONS[node.target], extra, kwargs)  # type: ignore[index]
    if reads_sizes:
        return None
    plain = not extra and not kwargs
    if node.op == "call_module" and plain:
        return template.get_submodule(node.target)  # type: ignore[arg-type]
    if node.op == "call_function" and node.target in _ELEMENTWISE_BUILTINS and plain:
        return node.target
    if node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS:
        return _function_step(node, extra, kwargs)
    if node.op == "call_method" and node.target in _ELEMENTWISE_METHODS and plain:
        return getattr(torch, node.target)  # type: ignore[arg-type]
    return None


def chain_steps(template: nn.Module, state: StackedState) -> list[Step] | None:
    """The steps of ``template`` reading the stacked tensors of ``state``, or None if it is no chain."""
    layers = _chain(template)
    if layers is None:
        return None
    slots = {alias: slot for slot in state.param_slots for alias in state.aliases[slot.name]}
    steps: list[Step] = []
    for name, layer in layers:
        if isinstance(layer, ReshapeStep):
            steps.append(layer)
        elif isinstance(layer, nn.Flatten):
            steps.append(ReshapeStep("flatten", (layer.start_dim, layer.end_dim)))
        elif isinstance(layer, nn.Unflatten):
            steps.append(ReshapeStep("unflatten", (layer.dim, tuple(layer.unflattened_size))))
        elif not isinstance(layer, nn.Module):  # an element-wise function from a traced forward
            steps.append(ActivationStep(layer, relu=layer in (torch.relu, F.relu)))
        elif isinstance(layer, nn.Linear):
            steps.append(LinearStep(name, slots[f"{name}.weight"], slots.get(f"{name}.bias")))
        elif isinstance(layer, nn.Embedding):
            steps.append(EmbeddingStep(name, slots[f"{name}.weight"], layer.padding_idx))
        elif isinstance(layer, nn.Dropout):
            steps.append(DropoutStep(layer.p))
        elif type(layer) is nn.ReLU:
            steps.append(ActivationStep(torch.relu, relu=True))
        elif type(layer) is not nn.Identity:
            steps.append(ActivationStep(layer.forward))
    return steps
