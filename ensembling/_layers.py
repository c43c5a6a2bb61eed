"""Vectorizable stand-ins for the ``torch.nn`` layers that ``torch.vmap`` cannot batch.

``torch.vmap`` has no batching rule for the fused recurrent kernels
(``aten::lstm``, ``aten::gru``, ``aten::rnn_tanh``, ``aten::rnn_relu``, and
``aten::lstm_cell`` and friends), and
the eval-mode fast paths of ``nn.MultiheadAttention`` and the transformer
layers have no derivative under it. :class:`~ensembling.Ensemble` therefore runs
members through a private copy of the architecture (the *runner*) in which:

* every ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` (and their ``*Cell`` forms,
  with :func:`cell_forward`) computes its recurrence with
  :func:`rnn_forward`: the input projection of all time steps is one batched
  product, and each step is one product with the hidden weights plus the
  gate arithmetic, so ``vmap`` turns them into products over all members at
  once (the same gate equations as the fused kernels, in the same order);
* an ``nn.Embedding`` with ``padding_idx`` keeps that row's gradient at zero
  in every member (:func:`embedding_forward`; ``vmap``'s own embedding
  backward does not when each member has its own indices);
* the attention fast paths are switched off for the call
  (:func:`attention_settings`), and on devices whose fused attention kernels
  have no batching rule (the CPU's, MPS's) attention runs on the
  ``scaled_dot_product_attention`` math backend: batched matrix products.

Nothing here loops over members.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ._errors import EnsembleError
from ._state import meta_copy

__all__ = [
    "attention_context",
    "attention_settings",
    "cell_forward",
    "describe_stand_ins",
    "embedding_forward",
    "make_runner",
    "rnn_forward",
]


def _is_batched(module: nn.Module, input: Tensor, batched_dims: int) -> bool:
    """Whether one member's ``input`` has a batch dimension (``batched_dims`` of them) or not (one fewer)."""
    if input.dim() not in (batched_dims - 1, batched_dims):
        raise EnsembleError(
            f"Ensemble: {type(module).__name__} expects a {batched_dims - 1}-D or {batched_dims}-D input "
            f"per member, got shape {list(input.shape)}."
        )
    return input.dim() == batched_dims


def rnn_forward(module: nn.RNNBase, input: Tensor, hx: Tensor | tuple[Tensor, Tensor] | None = None) -> Any:
    """``module(input, hx)`` for an ``nn.RNN``, ``nn.GRU`` or ``nn.LSTM``, from vmappable operations.

    Supports everything the module's own forward does except packed
    sequences (:class:`~ensembling.Ensemble` refuses those before the call):
    several layers, both directions, ``batch_first``, no bias,
    inter-layer dropout in training mode, ``proj_size`` (LSTM), the ``relu``
    nonlinearity (RNN), an initial state, and unbatched ``[time, features]``
    input.

    Shapes (``D`` = 2 if bidirectional else 1, ``H_out`` = ``proj_size`` or
    ``hidden_size``): input ``[T, B, F]`` (``[B, T, F]`` with ``batch_first``,
    ``[T, F]`` unbatched) gives output ``[T, B, D * H_out]`` and final states
    ``[num_layers * D, B, H_out]`` (cell state ``[num_layers * D, B, hidden_size]``).
    """
    mode = module.mode
    lstm = mode == "LSTM"
    batched = _is_batched(module, input, 3)
    if not batched:
        input = input.unsqueeze(1)
    elif module.batch_first:
        input = input.transpose(0, 1)
    steps, batch = input.shape[0], input.shape[1]
    directions = 2 if module.bidirectional else 1
    out_size = module.proj_size if lstm and module.proj_size > 0 else module.hidden_size
    if hx is None:
        h0 = input.new_zeros(module.num_layers * directions, batch, out_size)
        c0 = input.new_zeros(module.num_layers * directions, batch, module.hidden_size) if lstm else None
    else:
        h0, c0 = hx if lstm else (hx, None)
        if not batched:
            h0 = h0.unsqueeze(1)
            c0 = c0.unsqueeze(1) if c0 is not None else None
    final_h, final_c = [], []
    layer_input = input
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(directions):
            suffix = f"_l{layer}{'_reverse' if direction else ''}"
            w_ih, w_hh = getattr(module, f"weight_ih{suffix}"), getattr(module, f"weight_hh{suffix}")
            b_ih = getattr(module, f"bias_ih{suffix}") if module.bias else None
            b_hh = getattr(module, f"bias_hh{suffix}") if module.bias else None
            w_hr = getattr(module, f"weight_hr{suffix}") if lstm and module.proj_size > 0 else None
            index = layer * directions + direction
            h = h0[index]
            c = c0[index] if lstm else None
            # The input's contribution to every gate at every step: one product. The
            # hidden bias joins it there, except for the GRU's candidate gate, which
            # multiplies it by the reset gate.
            gru = mode == "GRU"
            both = b_ih + b_hh if b_ih is not None and not gru else b_ih
            # (A 2-D product on [T * B, F]: F.linear on the 3-D batched tensor fails under
            # torch.compile with dynamic shapes.)
            flat = layer_input.reshape(steps * batch, layer_input.shape[-1])
            gates_in = (torch.mm(flat, w_ih.t()) if both is None else torch.addmm(both, flat, w_ih.t())).view(
                steps, batch, -1
            )
            w_hh_t = w_hh.t()
            order = range(steps - 1, -1, -1) if direction else range(steps)
            ys: list[Tensor | None] = [None] * steps
            hidden = module.hidden_size
            for t in order:
                if lstm:
                    gates = torch.addmm(gates_in[t], h, w_hh_t)  # [B, 4 * hidden]: i, f, g, o
                    act = torch.sigmoid(gates)  # (the g slice is not used)
                    g = torch.tanh(gates[:, 2 * hidden : 3 * hidden])
                    c = torch.addcmul(act[:, hidden : 2 * hidden] * c, act[:, :hidden], g)
                    h = act[:, 3 * hidden :] * torch.tanh(c)
                    if w_hr is not None:
                        h = h @ w_hr.t()
                elif gru:
                    gates_h = torch.mm(h, w_hh_t) if b_hh is None else torch.addmm(b_hh, h, w_hh_t)
                    rz = torch.sigmoid(gates_in[t, :, : 2 * hidden] + gates_h[:, : 2 * hidden])
                    r, z = rz[:, :hidden], rz[:, hidden:]
                    n = torch.tanh(torch.addcmul(gates_in[t, :, 2 * hidden :], r, gates_h[:, 2 * hidden :]))
                    h = n + z * (h - n)  # (1 - z) * n + z * h
                elif mode == "RNN_TANH":
                    h = torch.tanh(torch.addmm(gates_in[t], h, w_hh_t))
                else:  # RNN_RELU
                    h = torch.relu(torch.addmm(gates_in[t], h, w_hh_t))
                ys[t] = h
            outputs.append(torch.stack(ys))  # type: ignore[arg-type]
            final_h.append(h)
            if lstm:
                final_c.append(c)
        layer_input = outputs[0] if directions == 1 else torch.cat(outputs, dim=-1)
        if module.dropout > 0 and module.training and layer < module.num_layers - 1:
            layer_input = F.dropout(layer_input, module.dropout, training=True)
    output = layer_input
    h_n = torch.stack(final_h)
    c_n = torch.stack(final_c) if lstm else None
    if not batched:
        output, h_n = output.squeeze(1), h_n.squeeze(1)
        c_n = c_n.squeeze(1) if c_n is not None else None
    elif module.batch_first:
        output = output.transpose(0, 1)
    return (output, (h_n, c_n)) if lstm else (output, h_n)


def cell_forward(module: nn.RNNCellBase, input: Tensor, hx: Tensor | tuple[Tensor, Tensor] | None = None) -> Any:
    """``module(input, hx)`` for an ``nn.RNNCell``, ``nn.GRUCell`` or ``nn.LSTMCell``, from vmappable operations.

    Input ``[B, F]`` (or unbatched ``[F]``); returns ``h`` ``[B, H]`` (LSTM: ``(h, c)``).
    """
    batched = _is_batched(module, input, 2)
    if not batched:
        input = input.unsqueeze(0)
        hx = None if hx is None else tuple(h.unsqueeze(0) for h in hx) if isinstance(hx, tuple) else hx.unsqueeze(0)
    kind = module.__dict__.get("_cell_kind") or _CELL_KINDS[type(module)]
    lstm = kind == "LSTM"
    if hx is None:
        zeros = input.new_zeros(input.shape[0], module.hidden_size)
        hx = (zeros, zeros) if lstm else zeros
    gates_in = F.linear(input, module.weight_ih, module.bias_ih)
    gates_h = F.linear(hx[0] if lstm else hx, module.weight_hh, module.bias_hh)
    if lstm:
        i, f, g, o = (gates_in + gates_h).chunk(4, dim=-1)
        c = torch.sigmoid(f) * hx[1] + torch.sigmoid(i) * torch.tanh(g)
        out: Any = (torch.sigmoid(o) * torch.tanh(c), c)
    elif kind == "GRU":
        in_r, in_z, in_n = gates_in.chunk(3, dim=-1)
        h_r, h_z, h_n = gates_h.chunk(3, dim=-1)
        r, z = torch.sigmoid(in_r + h_r), torch.sigmoid(in_z + h_z)
        n = torch.tanh(in_n + r * h_n)
        out = n + z * (hx - n)
    else:
        out = torch.tanh(gates_in + gates_h) if module.nonlinearity == "tanh" else torch.relu(gates_in + gates_h)
    if not batched:
        out = tuple(t.squeeze(0) for t in out) if lstm else out.squeeze(0)
    return out


def embedding_forward(module: nn.Embedding, input: Tensor) -> Tensor:
    """``module(input)`` for an ``nn.Embedding`` with ``padding_idx``, with the loop's gradients under vmap.

    ``vmap``'s rule for the embedding backward ignores ``padding_idx`` when
    every member has its own indices, so the padding rows would be trained.
    Here the output at padding positions is detached instead: the same values,
    and exactly no gradient for the padding row of any member.
    """
    out = F.embedding(input, module.weight, None, None, module.norm_type, module.scale_grad_by_freq, module.sparse)
    if not torch.is_grad_enabled():
        return out  # no gradient to keep out: the plain lookup
    padding = (input == module.padding_idx).unsqueeze(-1)
    return torch.where(padding, out.detach(), out)


class _Recurrent(nn.Module):
    """Takes the place of an ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` in the runner (same attributes and parameters).

    A different class, not a patched instance: ``torch.compile`` refuses to
    trace anything that is still an ``nn.RNNBase``.
    """

    def forward(self, input: Tensor, hx: Any = None) -> Any:
        return rnn_forward(self, input, hx)  # type: ignore[arg-type]


class _Cell(nn.Module):
    """Takes the place of an ``nn.RNNCell`` / ``nn.GRUCell`` / ``nn.LSTMCell`` in the runner."""

    def forward(self, input: Tensor, hx: Any = None) -> Any:
        return cell_forward(self, input, hx)  # type: ignore[arg-type]


class _Embedding(nn.Module):
    """Takes the place of an ``nn.Embedding`` with ``padding_idx`` in the runner."""

    def forward(self, input: Tensor) -> Tensor:
        return embedding_forward(self, input)  # type: ignore[arg-type]


_CELL_KINDS = {nn.LSTMCell: "LSTM", nn.GRUCell: "GRU", nn.RNNCell: "RNN"}


def make_runner(template: nn.Module) -> nn.Module:
    """A copy of ``template`` (on the meta device) with vectorizable stand-ins for the layers vmap cannot batch.

    Only torch's own classes are replaced (by changing the instance's class:
    attributes and parameters stay where they are); a subclass with a forward
    of its own is left alone, and reported by :class:`~ensembling.Ensemble` if
    ``vmap`` then fails.
    """
    runner = meta_copy(template)
    for module in runner.modules():
        kind = type(module)
        if kind in (nn.RNN, nn.GRU, nn.LSTM):
            module.__class__ = _Recurrent
            for cached in ("_flat_weights", "_flat_weight_refs"):  # for cuDNN (weakrefs: unpicklable)
                module.__dict__.pop(cached, None)
        elif kind in _CELL_KINDS:
            module._cell_kind = _CELL_KINDS[kind]
            module.__class__ = _Cell
        elif isinstance(module, nn.TransformerEncoderLayer):
            # Read only by the fused fast-path checks: 0 turns them off in a way
            # torch.compile can trace (attention_settings' global switch it cannot).
            module.activation_relu_or_gelu = 0
        elif kind is nn.Embedding and module.padding_idx is not None and module.max_norm is None:
            module.__class__ = _Embedding  # (max_norm rewrites the table in place: keep torch's forward)
    return runner


def describe_stand_ins(runner: nn.Module, device: torch.device) -> list[str]:
    """What runs in place of torch's own layers in ``runner`` on ``device``, one entry per layer.

    Examples
    --------
    >>> runner = make_runner(nn.Sequential(nn.LSTM(3, 4), nn.Embedding(9, 4, padding_idx=0)))
    >>> describe_stand_ins(runner, torch.device("cpu"))
    ['0 (LSTM): unrolled recurrence', '1 (Embedding): padding row kept out of the gradient']
    """
    found = []
    for name, module in runner.named_modules():
        label = name or "<root>"
        if isinstance(module, _Recurrent):
            kind = {"RNN_TANH": "RNN", "RNN_RELU": "RNN"}.get(module.mode, module.mode)
            found.append(f"{label} ({kind}): unrolled recurrence")
        elif isinstance(module, _Cell):
            found.append(f"{label} ({module._cell_kind}Cell): unrolled cell")
        elif isinstance(module, _Embedding):
            found.append(f"{label} (Embedding): padding row kept out of the gradient")
        elif isinstance(module, nn.MultiheadAttention):
            backend = "fused kernels" if device.type == "cuda" else "math backend"
            found.append(f"{label} (MultiheadAttention): no fast path, attention on the {backend}")
    return found


class attention_settings:
    """Attention that ``vmap`` batches, for the duration of one ensemble call.

    Switches off the fused eval-mode kernels of ``nn.MultiheadAttention`` and
    the transformer layers (they have no derivative under ``vmap``). On a
    device other than CUDA, whose fused ``scaled_dot_product_attention``
    kernels have batching rules, also switches off the fused backends, so
    attention runs on the math backend: matrix products that ``vmap`` batches.
    The previous settings are restored on exit. It costs about a microsecond,
    so it wraps every call (a custom member may call
    ``scaled_dot_product_attention`` itself).
    """

    def __init__(self, device: torch.device):
        self.fused_sdpa_off = device.type != "cuda"

    def __enter__(self) -> None:
        self.saved = (
            torch.backends.mha.get_fastpath_enabled(),
            torch.backends.cuda.flash_sdp_enabled(),
            torch.backends.cuda.mem_efficient_sdp_enabled(),
            torch.backends.cuda.cudnn_sdp_enabled(),
        )
        torch.backends.mha.set_fastpath_enabled(False)
        if self.fused_sdpa_off:
            torch.backends.cuda.enable_flash_sdp(False)
            torch.backends.cuda.enable_mem_efficient_sdp(False)
            torch.backends.cuda.enable_cudnn_sdp(False)

    def __exit__(self, *exc: object) -> None:
        fastpath, flash, efficient, cudnn = self.saved
        torch.backends.mha.set_fastpath_enabled(fastpath)
        if self.fused_sdpa_off:
            torch.backends.cuda.enable_flash_sdp(flash)
            torch.backends.cuda.enable_mem_efficient_sdp(efficient)
            torch.backends.cuda.enable_cudnn_sdp(cudnn)


def attention_context(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The attention settings for one ensemble call on ``device``, eager or under ``torch.compile``.

    Eagerly, :class:`attention_settings`. While ``torch.compile`` traces, its
    global switches cannot be traced, but ``sdpa_kernel`` can: the math backend
    off CUDA, nothing on CUDA (the runner's encoder layers already have their
    fast path off, see :func:`make_runner`).
    """
    if not torch.compiler.is_compiling():
        return attention_settings(device)
    if device.type == "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])
