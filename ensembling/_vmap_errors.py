"""What ``torch.vmap`` raises, said in the user's terms: the layer, the input, the way out.

``vmap``'s own messages name the function it mapped (``member_forward``, an
internal closure) and options ``Ensemble`` does not have (``out_dims``).
:func:`translate` turns each kind into an :class:`~ensembling.EnsembleError` that
names the layer whose code failed (found in the traceback), the inputs split
across members, and what to do instead.
"""

from __future__ import annotations

import os
import re
from types import TracebackType
from typing import Any

from torch import nn

from ._errors import EnsembleError
from ._init import is_torch_nn_class

__all__ = ["translate"]

_TORCH_DIR = os.sep + "torch" + os.sep
_ENSEMBLING_DIR = os.path.dirname(os.path.abspath(__file__))


def _frames(tb: TracebackType | None) -> list[Any]:
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return frames


def _where(err: BaseException, runner: nn.Module) -> str:
    """' in layer NAME (Class), at file:line in function' from the innermost frames of the model's code."""
    names = {id(m): name for name, m in runner.named_modules()}
    layer, line = None, None
    for frame in _frames(err.__traceback__):
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            layer = f"{names[id(owner)] or '<root>'} ({type(owner).__name__})"
        path = frame.f_code.co_filename
        if _TORCH_DIR not in path and not path.startswith(_ENSEMBLING_DIR):
            parts = path.split(os.sep)
            line = f"{os.sep.join(parts[-2:])}:{frame.f_lineno} in {frame.f_code.co_name}"
    text = f" in layer {layer}" if layer else ""
    return text + (f", at {line}" if line else "")


def _split_inputs(inputs: list[str]) -> str:
    if not inputs:
        return " No input is split in this call: the value comes from the members' parameters or buffers."
    return f" The inputs split across members in this call: {', '.join(inputs)}."


_HINTS = {
    "_ignore_causal_mask_sdpa": " transformers reads the mask's values here to decide whether SDPA may skip "
    'it; a model built with attn_implementation="eager" does not, and takes one mask per member.',
    "_ignore_bidirectional_mask_sdpa": " transformers reads the mask's values here to decide whether it may "
    "skip it, whatever the attention implementation: this model takes only a mask shared by the members.",
}


def _data_dependent(err: BaseException, runner: nn.Module, inputs: list[str]) -> str:
    what = "calls .item() (or int(), float()) on" if ".item()" in str(err) else "branches (if, while, bool()) on"
    frames = _frames(err.__traceback__)
    hint = next((_HINTS[f.f_code.co_name] for f in reversed(frames) if f.f_code.co_name in _HINTS), "")
    return (
        f"Ensemble: the members cannot run as one vectorized call: the forward{_where(err, runner)} {what} "
        f"a tensor whose value differs from member to member, which torch.vmap cannot do (data-dependent "
        f"control flow).{_split_inputs(inputs)}{hint} Give that input to every member alike (in_dims None for "
        "it, e.g. one attention_mask for all), rewrite the branch with tensor operations (torch.where), or "
        "run the members one by one: torch.stack([m(x) for m in ens.unstack()])."
    )


def _unbatchable(err: BaseException, runner: nn.Module) -> str:
    """Explain a missing batching rule: the operator, the layers that likely called it, the ways out."""
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


def _generic(err: BaseException, runner: nn.Module, inputs: list[str]) -> str:
    text = re.sub(r"vmap\(\w+(, [^)]*)?\)", "vmap", str(err))
    text = text.replace("`member_forward`", "the member's forward").replace("member_forward", "the member's forward")
    text = re.sub(r"\s*Did you mean to set out_dims[^.]*\.", "", text)
    text = re.sub(r"\bout_dims\b", "the outputs' member dimension", text)
    return (
        f"Ensemble: torch.vmap could not run the members as one call{_where(err, runner)}: {text}"
        f"{_split_inputs(inputs)} Check which inputs in_dims splits, or run the members one by one: "
        "torch.stack([m(x) for m in ens.unstack()])."
    )


def translate(err: BaseException, runner: nn.Module, inputs: list[str]) -> EnsembleError | None:
    """The :class:`EnsembleError` for what ``vmap`` raised, or None when the error is not vmap's."""
    text = str(err)
    if "atching rule not implemented" in text:
        return EnsembleError(_unbatchable(err, runner))
    if "data-dependent control flow" in text or "calling .item()" in text:
        return EnsembleError(_data_dependent(err, runner, inputs))
    if "vmap" in text or "member_forward" in text or "out_dims" in text:
        return EnsembleError(_generic(err, runner, inputs))
    return None
