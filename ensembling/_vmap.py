"""The vmap path: every member's forward as one ``torch.vmap`` over ``functional_call``, and its errors.

:class:`VmapRunner` keeps one vmapped member function per (``in_dims``,
``randomness``, ``chunk_size``) and runs it under the attention settings that
``vmap`` can batch. What ``vmap`` raises for a layer it cannot batch becomes an
:class:`~ensembling.EnsembleError` naming the layers that likely called it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils.rnn import PackedSequence
from torch.utils._pytree import tree_flatten

from ._errors import EnsembleError
from ._init import is_torch_nn_class
from ._layers import attention_context

__all__ = ["InDims", "VmapRunner", "check_in_dims"]

InDims = int | None | tuple[Any, ...] | list[Any]


def _check_leaf(leaf: Tensor, position: int, dim: int, num_members: int) -> None:
    if leaf.dim() == 0 or not -leaf.dim() <= dim < leaf.dim():
        raise EnsembleError(
            f"Ensemble: positional input {position} has shape {list(leaf.shape)}, which has "
            f"no dimension {dim} to split across the {num_members} members; pass "
            "in_dims=None to give every member the same input."
        )
    if leaf.shape[dim] != num_members:
        raise EnsembleError(
            f"Ensemble: positional input {position} has {leaf.shape[dim]} entries along "
            f"dimension {dim} (shape {list(leaf.shape)}), but with in_dims={dim} it needs "
            f"one per member: {num_members}. Pass in_dims=None to give every member "
            "the same input, or stack one input per member along that dimension."
        )


def check_in_dims(args: tuple[Any, ...], in_dims: InDims, num_members: int) -> tuple[Any, ...]:
    """One ``in_dims`` entry per positional input, each split dimension checked against the member count."""
    if isinstance(in_dims, (int, type(None))):
        dims = (in_dims,) * len(args)
    elif isinstance(in_dims, (tuple, list)):
        if len(in_dims) != len(args):
            raise EnsembleError(
                f"Ensemble: in_dims has {len(in_dims)} entries but {len(args)} positional "
                "inputs were given; pass one entry per positional input (None = shared)."
            )
        dims = tuple(in_dims)
    else:
        raise EnsembleError(
            f"Ensemble: in_dims must be an int, None, or a tuple with one entry per positional "
            f"input, got {type(in_dims).__name__}."
        )
    for position, (arg, dim) in enumerate(zip(args, dims)):
        if not isinstance(dim, int) or isinstance(dim, bool):
            continue
        for leaf in [arg] if isinstance(arg, Tensor) else tree_flatten(arg)[0]:
            if isinstance(leaf, Tensor):
                _check_leaf(leaf, position, dim, num_members)
    return dims


def _unbatchable_message(err: RuntimeError, runner: nn.Module) -> str:
    """Explain a vmap failure: the operator, the layers that likely called it, the ways out."""
    text = str(err)
    op = text[text.find("aten::") :].split()[0].rstrip(".") if "aten::" in text else "an operator"
    suspects = [
        f"{name or '<root>'} ({type(module).__name__})"
        for name, module in runner.named_modules()
        if isinstance(module, (nn.RNNBase, nn.RNNCellBase))  # the ones make_runner could not replace
    ] or [
        f"{name or '<root>'} ({type(module).__name__})"
        for name, module in runner.named_modules()
        if not is_torch_nn_class(module)
    ]
    where = f" It is called by the forward of {', '.join(suspects)}." if suspects else ""
    return (
        f"Ensemble: torch.vmap has no batching rule for {op}, so the members cannot run as one "
        f"batched call.{where} Ensemble substitutes vectorized versions for torch's own RNN, GRU, "
        "LSTM and attention layers, but not for a subclass with its own forward or for custom "
        "code. Write that part with operations vmap batches (matmul, F.linear, element-wise ops), "
        "or run the members one by one: torch.stack([m(x) for m in ens.unstack()])."
    )


class VmapRunner:
    """Runs the members through ``runner`` (the architecture with vectorizable stand-ins) under ``torch.vmap``."""

    def __init__(self, runner: nn.Module) -> None:
        self.runner = runner
        self.cache: dict[Any, Callable[..., Any]] = {}

    def __getstate__(self) -> dict[str, Any]:
        # The cached closures hold this runner: never share or pickle them.
        return {"runner": self.runner, "cache": {}}

    def _batched(self, dims: tuple[Any, ...], randomness: str, chunk_size: int | None) -> Callable[..., Any]:
        key: Any = (dims, randomness, chunk_size)
        compiling = torch.compiler.is_compiling()
        try:
            # (torch.compile traces the vmap anyway; a cache it reads would make it recompile when filled.)
            batched = None if compiling else self.cache.get(key)
        except TypeError:  # nested in_dims (lists) are not hashable: build it for this call
            key, batched = None, None
        if batched is None:
            runner = self.runner

            def member_forward(p: dict, b: dict, *member_args: Any, **member_kwargs: Any) -> Any:
                """One member's forward pass: the architecture run with one slice of the state."""
                return functional_call(runner, (p, b), member_args, member_kwargs)

            batched = torch.vmap(member_forward, in_dims=(0, 0, *dims), randomness=randomness, chunk_size=chunk_size)
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
    ) -> Any:
        if any(isinstance(a, PackedSequence) for a in (*args, *kwargs.values())):
            raise EnsembleError(
                "Ensemble: got a PackedSequence, which cannot be split across members; pass the "
                "padded tensor instead (and use the lengths to pick each sequence's last output)."
            )
        batched = self._batched(dims, randomness, chunk_size)
        try:
            with attention_context(device):
                return batched(params, buffers, *args, **kwargs)
        except RuntimeError as err:
            if "atching rule not implemented" not in str(err):
                raise
            raise EnsembleError(_unbatchable_message(err, self.runner)) from err
