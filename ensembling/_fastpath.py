"""The fast path: a member that is a chain of (Embedding,) Linear / Dropout / element-wise / reshape steps, as products.

:meth:`FastPath.plan` reads the chain into typed steps once (``_chain.py``);
:meth:`FastPath.run` executes them on ``[members, rows, features]`` activations
with :func:`torch.baddbmm`: the same results as ``vmap``, without its
per-layer overhead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._chain import ActivationStep, DropoutStep, EmbeddingStep, LinearStep, ReshapeStep, Step, chain_steps
from ._errors import EnsembleError
from ._state import StackedState, identity

__all__ = ["FastPath"]


@dataclass(frozen=True)
class _Operands:
    """One Linear step's stacked tensors, and the views its batched product takes."""

    weight: Tensor  # [members, out, in]
    bias: Tensor | None  # [members, out]
    product_weight: Tensor  # weight.mT ([members, in, out]), or the weight itself when transposed
    product_bias: Tensor | None  # bias as [members, 1, out], or [members, out, 1] when transposed


def _operands(weight: Tensor, bias: Tensor | None, transposed: bool) -> _Operands:
    if transposed:
        return _Operands(weight, bias, weight, None if bias is None else bias.unsqueeze(2))
    return _Operands(weight, bias, weight.mT, None if bias is None else bias.unsqueeze(1))


class _RowsProduct(torch.autograd.Function):
    """``baddbmm(bias[:, None], h, weight.mT)`` under autograd, with the weight's gradient made in its own layout.

    Autograd's formula for ``baddbmm`` makes the weight's gradient as the
    transpose of a contiguous ``[members, in, out]`` product, which
    ``AccumulateGrad`` then copies into the weight's layout (80 us for 100
    members of 32 x 32 on one CPU thread, where the product itself takes 50);
    here it is ``grad.mT @ h``, which comes out in that layout. Written in the classic
    ``forward(ctx, ...)`` form: with ``setup_context``, ``Function.apply`` binds
    the arguments through ``inspect.signature`` on every call (about 50 us per
    layer, measured). The backward is made of differentiable operations
    (gradients of gradients work) and ``jvp`` gives forward-mode AD; under
    ``torch.func`` transforms and ``torch.compile`` plain ``baddbmm`` runs
    instead (see :func:`_product`).
    """

    @staticmethod
    def forward(ctx: Any, h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(h, weight)
        ctx.save_for_forward(h, weight)
        return torch.bmm(h, weight.mT) if bias is None else torch.baddbmm(bias.unsqueeze(1), h, weight.mT)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        h, weight = ctx.saved_tensors
        need_h, need_weight, need_bias = ctx.needs_input_grad
        return (
            torch.bmm(grad, weight) if need_h else None,
            torch.bmm(grad.mT, h) if need_weight else None,  # [members, out, in]: the weight's layout
            grad.sum(1) if need_bias else None,
        )

    @staticmethod
    def jvp(ctx: Any, h_t: Tensor | None, weight_t: Tensor | None, bias_t: Tensor | None) -> Tensor:
        h, weight = ctx.saved_tensors
        out = torch.zeros(h.shape[0], h.shape[1], weight.shape[1], dtype=h.dtype, device=h.device)
        if bias_t is not None:
            out = out + bias_t.unsqueeze(1)
        if h_t is not None:
            out = torch.baddbmm(out, h_t, weight.mT)
        if weight_t is not None:
            out = torch.baddbmm(out, h, weight_t.mT)
        return out


_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: True)


def _product(h: Tensor, ops: _Operands) -> Tensor:
    """One rows-layout Linear for every member: ``h`` ``[members, rows, in]`` -> ``[members, rows, out]``."""
    weight, bias = ops.weight, ops.bias
    if (
        torch.is_grad_enabled()
        and (weight.requires_grad or h.requires_grad or (bias is not None and bias.requires_grad))
        and not torch.compiler.is_compiling()
        and not _transforms_active()  # torch.func needs setup_context, whose apply costs more than it saves
    ):
        return _RowsProduct.apply(h, weight, bias)
    return torch.bmm(h, ops.product_weight) if bias is None else torch.baddbmm(ops.product_bias, h, ops.product_weight)


def _linear(h: Tensor, ops: _Operands, pending: bool, transposed: bool) -> Tensor:
    """One Linear layer for every member; ``pending``: ``h`` is still one input shared by all."""
    weight, bias = ops.weight, ops.bias
    n = weight.shape[0]
    if pending and transposed:
        # One large product for all members: [n * out, in] @ [in, rows].
        flat = weight.reshape(-1, weight.shape[2])
        h = torch.mm(flat, h[0]) if bias is None else torch.addmm(bias.reshape(-1, 1), flat, h[0])
        return h.view(n, weight.shape[1], -1)
    if transposed:
        return torch.bmm(weight, h) if bias is None else torch.baddbmm(ops.product_bias, weight, h)
    return _product(h.expand(n, -1, -1) if pending else h, ops)


def _reshape(h: Tensor, step: ReshapeStep, lead: tuple[int, ...], transposed: bool) -> tuple[Tensor, tuple[int, ...]]:
    """Apply ``step`` to every member's ``[*lead, features]`` activation held as ``h`` ``[members, rows, features]``."""
    if step.method == "flatten":  # x.flatten(1) of an input that is already [batch, features]: nothing to do
        ndim = len(lead) + 1
        start, end = (d % ndim if -ndim <= d < ndim else None for d in step.args)
        if start is not None and start == end:
            return h, lead
    rows = h.mT if transposed else h
    out = step.apply(rows.reshape(rows.shape[0], *lead, rows.shape[2]))
    if out.dim() < 2:
        raise EnsembleError(
            f"Ensemble: {step.method}{step.args} leaves each member a scalar; the fast path needs features."
        )
    rows = out.reshape(out.shape[0], -1, out.shape[-1])
    return (rows.mT if transposed else rows), tuple(out.shape[1:-1])


def _embedding(x: Tensor, step: EmbeddingStep, shared: bool, n: int) -> tuple[Tensor, tuple[int, ...]]:
    """Every member's lookup of ids ``x`` (``[*lead]`` shared, or ``[n, *lead]``) as ``[members, rows, dim]``."""
    if x.dtype not in (torch.int64, torch.int32):
        raise EnsembleError(
            f"Ensemble: layer {step.name!r} (nn.Embedding) takes int64 or int32 token ids; got a {x.dtype} input."
        )
    weight = step.weight.get()  # [members, vocabulary, dim]
    lead = tuple(x.shape if shared else x.shape[1:])
    try:
        if shared:
            out = weight.index_select(1, x.reshape(-1))
        else:
            ids = x.reshape(n, -1, 1).long()
            out = torch.gather(weight, 1, ids.expand(-1, -1, weight.shape[2]))
    except (IndexError, RuntimeError):
        vocabulary = weight.shape[1]
        outside = x[(x < 0) | (x >= vocabulary)]
        if not outside.numel():
            raise  # not an id out of range: torch's own error is the precise one
        raise EnsembleError(
            f"Ensemble: layer {step.name!r} (nn.Embedding) has {vocabulary} rows, so ids must lie in "
            f"[0, {vocabulary - 1}]; the input holds id {outside[0].item()}."
        ) from None
    if step.padding_idx is not None and torch.is_grad_enabled() and weight.requires_grad:
        padding = (x == step.padding_idx).reshape(1 if shared else n, -1, 1)
        out = torch.where(padding, out.detach(), out)  # the same values; no gradient for the padding row
    return out, lead


def _dropout(h: Tensor, p: float, training: bool, randomness: str) -> Tensor:
    if not training or p == 0.0:
        return h
    if randomness == "error":
        raise EnsembleError(
            "Ensemble: the members use dropout in training mode but randomness='error'; "
            "call ens.eval(), or pass randomness='different' (own masks per member) or 'same'."
        )
    if randomness == "different":
        return F.dropout(h, p, training=True)
    if p == 1.0:
        return torch.zeros_like(h)
    mask = torch.empty(h.shape[1:], dtype=h.dtype, device=h.device).bernoulli_(1 - p)
    return h * (mask / (1 - p))


class FastPath:
    """The typed steps of a chain member, planned once, and how to run them."""

    def __init__(self, steps: list[Step]) -> None:
        self.steps = steps
        # The chain without its bookkeeping, where it is that simple; by training mode (dropout).
        self.plain = {mode: _plain(steps, mode) for mode in (False, True)}
        self.linears = [step for step in steps if isinstance(step, LinearStep)]
        # Where each Linear's weight and bias (if any) live: (the module's parameter table, name).
        # The table outlives a replaced tensor (load_state_dict(assign=True)): reading it is always current.
        slots = [slot for step in self.linears for slot in (step.weight, step.bias) if slot is not None]
        self.places = [(slot.container.__dict__[slot.table], slot.attr) for slot in slots]
        self.kept: tuple[Any, list[_Operands]] | None = None  # operands of calls without autograd, and their key
        # Above about a million elements per stacked weight, copying a transposed
        # gradient (and allocating fresh memory for it every step) costs more than
        # the transposed layout's slightly slower small products; see run().
        self.weights_are_large = any(s.weight.get().numel() >= 2**20 for s in self.linears)

    @classmethod
    def plan(cls, template: nn.Module, state: StackedState) -> FastPath | None:
        """The steps for ``template`` reading the stacked tensors of ``state``, or None if it is no chain."""
        steps = chain_steps(template, state)
        return None if steps is None else cls(steps)

    def run(self, x: Tensor, shared: bool, n: int, training: bool, randomness: str, transposed: bool) -> Tensor:
        """The chain for every member: ``x`` ``[rows..., in]`` (shared) or ``[n, rows..., in]`` -> ``[n, ..., out]``.

        Activations are normally kept as ``[members, rows, features]`` and each
        layer is ``baddbmm(bias, h, weight.mT)``. With ``transposed`` (autograd
        records and the stacked weights are large) they are kept as
        ``[members, features, rows]`` and each layer is ``baddbmm(bias, weight, h)``:
        the weight gradient then comes out in the weight's own layout, so
        autograd keeps it instead of copying it into a fresh allocation every
        step. A shared input's first layer is then one ``addmm`` over all members.

        Everything but the products is per-call overhead, which matters for
        small members (the products of 100 members of 8 x 32 x 32 take ~200 us):
        a plain chain (see :class:`_Plain`) skips this loop's bookkeeping.
        """
        plain = self.plain[training]
        if plain is not None and not transposed:
            h = _plain_input(x, shared, n, plain.flattens)
            if h is not None:
                return self._run_plain(h, x, plain.after)
        operands = iter(self.operands(transposed))
        steps = self.steps
        if isinstance(steps[0], EmbeddingStep):  # ids in, [members, rows, dim] out
            rows, lead = _embedding(x, steps[0], shared, n)
            steps, pending, fresh = steps[1:], False, True
        else:
            if x.dim() == 0:
                raise EnsembleError("Ensemble: the input is a scalar; the member's first layer needs features.")
            lead = tuple(x.shape[:-1] if shared else x.shape[1:-1])  # one member's activation: [*lead, features]
            rows = x.reshape(1 if shared else n, -1, x.shape[-1])
            pending = shared  # h still has a member dimension of 1, meaning "the same for all"
            fresh = False  # may h be modified in place (is it our own intermediate, not the input)?
        h = rows.mT if transposed else rows
        for step in steps:
            if isinstance(step, LinearStep):
                ops = next(operands)
                _check_features(h, ops, step, x, transposed)
                h, pending, fresh = _linear(h, ops, pending, transposed), False, True
            elif isinstance(step, ReshapeStep):
                h, lead = _reshape(h, step, lead, transposed)
            elif isinstance(step, DropoutStep):
                if pending and training and randomness == "different":
                    h, pending = h.expand(n, -1, -1), False  # every member draws its own mask
                dropped = _dropout(h, step.p, training, randomness)
                fresh = fresh or dropped is not h
                h = dropped
            elif step.relu:
                h = torch.relu_(h) if fresh else torch.relu(h)
            else:
                h, fresh = step.fn(h), True
        if transposed:
            h = h.mT.contiguous()
        return h if h.shape[1:-1] == lead else h.reshape(n, *lead, h.shape[-1])

    def _run_plain(self, h: Tensor, x: Tensor, after: list[list[Callable[[Tensor], Tensor]]]) -> Tensor:
        """The plain chain on ``h`` ``[members, rows, in]`` (``x``: the call's input, for errors)."""
        for layer, ops, fns in zip(self.linears, self.operands(False), after):
            try:
                h = _product(h, ops)
            except RuntimeError:
                _check_features(h, ops, layer, x, False)
                raise
            for fn in fns:  # on the product just made: relu may run in place
                h = fn(h)
        return h

    def operands(self, transposed: bool) -> list[_Operands]:
        """Each Linear step's tensors and product views; kept between calls that autograd does not record.

        The kept views follow in-place changes of the stacked tensors (an
        optimizer step, ``load_state_dict``); they are made again when a stacked
        tensor is replaced (``.to()``, ``load_state_dict(assign=True)``, a new
        ``.data``): see :func:`~ensembling._state.identity`.
        """
        tensors = [table[name] for table, name in self.places]
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self._make(tensors, transposed)
        key = (transposed, *identity(tensors))
        if self.kept is None or self.kept[0] != key:
            self.kept = (key, self._make(tensors, transposed))
        return self.kept[1]

    def _make(self, tensors: list[Tensor], transposed: bool) -> list[_Operands]:
        made, present = [], iter(tensors)
        for step in self.linears:
            weight = next(present)
            made.append(_operands(weight, None if step.bias is None else next(present), transposed))
        return made

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "kept": None}  # views of this ensemble's tensors: copies make their own


@dataclass(frozen=True)
class _Plain:
    """A chain that is, after flattens of its input, Linear layers each followed by element-wise steps."""

    flattens: tuple[tuple[int, int], ...]  # each leading flatten's (start_dim, end_dim), in a member's dims
    after: list[list[Callable[[Tensor], Tensor]]]  # the element-wise steps after each Linear


def _plain(steps: list[Step], training: bool) -> _Plain | None:
    """``steps`` as a :class:`_Plain` chain in this training mode (dropout is then a no-op), or None."""
    flattens: list[tuple[int, int]] = []
    after: list[list[Callable[[Tensor], Tensor]]] = []
    for step in steps:
        if isinstance(step, LinearStep):
            after.append([])
        elif isinstance(step, ActivationStep) and after:  # never on the caller's input: in place is safe
            after[-1].append(torch.relu_ if step.relu else step.fn)
        elif isinstance(step, DropoutStep) and (not training or step.p == 0.0):
            continue
        elif type(step) is ReshapeStep and step.method == "flatten" and not after:
            flattens.append(step.args)
        else:  # an embedding, other reshapes, dropout in training, an activation before any Linear
            return None
    return _Plain(tuple(flattens), after) if after else None


def _plain_input(x: Tensor, shared: bool, n: int, flattens: tuple[tuple[int, int], ...]) -> Tensor | None:
    """``x`` after the leading flattens as ``[members, rows, features]``, or None where a member's
    activation would not be ``[rows, features]`` (the general loop then runs, and explains bad input)."""
    lead = 0 if shared else 1
    ndim = x.dim() - lead  # of one member's input
    for start, end in flattens:
        if not (-ndim <= start < ndim and -ndim <= end < ndim) or start % ndim > end % ndim:
            return None
        start, end = start % ndim, end % ndim
        x = x.flatten(start + lead, end + lead)  # x itself when start == end
        ndim -= end - start
    if ndim != 2:
        return None
    return x.expand(n, -1, -1) if shared else x


def _check_features(h: Tensor, ops: _Operands, step: LinearStep, x: Tensor, transposed: bool) -> None:
    """Raise the precise error if a layer's input ``h`` has the wrong width."""
    features = h.shape[1] if transposed else h.shape[-1]
    if features != ops.weight.shape[2]:
        raise EnsembleError(
            f"Ensemble: layer {step.name!r} expects {ops.weight.shape[2]} input features, got "
            f"{features} (input shape {list(x.shape)})."
        ) from None
