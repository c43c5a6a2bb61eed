"""Outputs that are not tensors, per-member keyword inputs, and vmap's errors in user terms (issue 14, 2-4).

Small torch-only models cover dicts, tuples, ``None``, ints, strings and a custom
cache-like object; the transformers cases (tiny GPT-2, Llama and T5 from configs,
random init, nothing downloaded) run when transformers imports, and are skipped
with the reason otherwise.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from ensembling import Ensemble, EnsembleError

N, BATCH, FEATURES = 4, 3, 5


class DictOut(nn.Module):
    """Returns a dict of a tensor and non-tensor fields."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(FEATURES, 2)

    def forward(self, x: Tensor) -> dict[str, Any]:
        return {"y": self.lin(x), "none": None, "count": 3, "name": "dict-out", "pair": (self.lin(x).sum(), None)}


class Masked(nn.Module):
    """Takes a keyword mask."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(FEATURES, 2)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.lin(x if mask is None else x * mask)


class Cache:
    """A cache-like object, unknown to torch's pytrees: a list of tensors and a step counter."""

    def __init__(self) -> None:
        self.states: list[Tensor] = []
        self.steps = 0


class Cached(nn.Module):
    """Appends its hidden state to the cache and reads the mean of what it holds."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(FEATURES, FEATURES)

    def forward(self, x: Tensor, cache: Cache | None = None) -> tuple[Tensor, Cache]:
        cache = Cache() if cache is None else cache
        cache.states.append(self.lin(x))
        cache.steps += 1
        return torch.stack(cache.states).mean(0), cache


class Branchy(nn.Module):
    """Branches on a mask's values (data-dependent control flow)."""

    def __init__(self, item: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(FEATURES, 2)
        self.item = item

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is not None and (mask.sum().item() > 0 if self.item else mask.sum() > 0):
            x = x * mask
        return self.lin(x)


class Counter(nn.Module):
    """Returns how often its forward ran, a Python int: differs between chunks of members."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(FEATURES, 2)
        self.calls = 0

    def forward(self, x: Tensor) -> tuple[Tensor, int]:
        self.calls += 1
        return self.lin(x), self.calls


def test_dict_output_with_none_int_str_comes_back() -> None:
    """Tensors in a dict gain the member dimension; None, ints and strings come back as they are."""
    ens = Ensemble(DictOut, N)
    x = torch.randn(BATCH, FEATURES)
    out = ens(x)
    assert (out["none"], out["count"], out["name"]) == (None, 3, "dict-out")
    assert out["pair"][1] is None and out["pair"][0].shape == (N,)
    torch.testing.assert_close(out["y"], torch.stack([m(x)["y"] for m in ens.unstack()]))


def test_gradients_flow_through_a_dict_output() -> None:
    """A loss on a dict output field gives every member its own gradient, as the loop does."""
    ens = Ensemble(DictOut, N)
    x = torch.randn(BATCH, FEATURES)
    ens(x)["y"].pow(2).sum().backward()
    for i, member in enumerate(ens.unstack()):
        member(x)["y"].pow(2).sum().backward()
        torch.testing.assert_close(ens.stacked.lin.weight.grad[i], member.lin.weight.grad)


def test_custom_cache_comes_back_per_member_and_feeds_the_next_call() -> None:
    """A cache object is returned with one slice per member and, fed back, equals each member's own steps."""
    ens = Ensemble(Cached, N)
    xs = torch.randn(3, BATCH, FEATURES)
    out, cache = ens(xs[0])
    for x in xs[1:]:
        out, cache = ens(x, cache=cache)
    assert type(cache) is Cache and cache.steps == 3 and cache.states[0].shape == (N, BATCH, FEATURES)
    for i, member in enumerate(ens.unstack()):
        ref, ref_cache = member(xs[0])
        for x in xs[1:]:
            ref, ref_cache = member(x, cache=ref_cache)
        torch.testing.assert_close(out[i], ref)


def test_returned_cache_marked_shared_is_refused() -> None:
    """A cache this ensemble returned, given in_dims None explicitly, is refused with the fix."""
    ens = Ensemble(Cached, N)
    x = torch.randn(BATCH, FEATURES)
    _, cache = ens(x)
    with pytest.raises(EnsembleError, match=r"keyword input 'cache' is a Cache this ensemble returned.*give it 0"):
        ens(x, cache=cache, in_dims={"cache": None})


def test_non_tensor_fields_that_differ_between_members_are_refused() -> None:
    """An int that differs between (chunks of) members raises an EnsembleError naming the output field."""
    ens = Ensemble(Counter, N)
    with pytest.raises(EnsembleError, match=r"disagree on the output field output\[1\]: 1 .* 2"):
        ens(torch.randn(BATCH, FEATURES), chunk_size=2)


@pytest.mark.parametrize(
    "call",
    ["keyword", "keyword-by-name-positional", "positional-index"],
)
def test_per_member_keyword_input_equals_the_loop(call: str) -> None:
    """in_dims as a dict splits a keyword (or a positional input by name or index); the rest is shared."""
    ens = Ensemble(Masked, N)
    x, masks = torch.randn(BATCH, FEATURES), torch.randint(0, 2, (N, BATCH, FEATURES)).float()
    if call == "keyword":
        out = ens(x, mask=masks, in_dims={"mask": 0})
    elif call == "keyword-by-name-positional":
        out = ens(x, masks, in_dims={"mask": 0})
    else:
        out = ens(x, masks, in_dims={1: 0})
    torch.testing.assert_close(out, torch.stack([m(x, mask=masks[i]) for i, m in enumerate(ens.unstack())]))


def test_keyword_inputs_stay_shared_without_a_dict() -> None:
    """An int in_dims splits the positional inputs only; keywords stay shared, as in torch.vmap."""
    ens = Ensemble(Masked, N)
    xs, mask = torch.randn(N, BATCH, FEATURES), torch.randint(0, 2, (BATCH, FEATURES)).float()
    out = ens(xs, mask=mask, in_dims=0)
    torch.testing.assert_close(out, torch.stack([m(xs[i], mask=mask) for i, m in enumerate(ens.unstack())]))


def test_keyword_with_wrong_member_count_is_named() -> None:
    """A split keyword input with the wrong member count raises an EnsembleError naming the keyword."""
    ens = Ensemble(Masked, N)
    with pytest.raises(EnsembleError, match=r"keyword input 'mask' has 3 entries along dimension 0 .* 4"):
        ens(torch.randn(BATCH, FEATURES), mask=torch.ones(3, BATCH, FEATURES), in_dims={"mask": 0})


def test_in_dims_key_naming_no_input_is_refused() -> None:
    """An in_dims key that names no input of the call lists the inputs the call has."""
    ens = Ensemble(Masked, N)
    with pytest.raises(EnsembleError, match=r"names the input 'maks'.*positional inputs \['0 \(x\)'\].*\['mask'\]"):
        ens(torch.randn(BATCH, FEATURES), mask=torch.ones(BATCH, FEATURES), in_dims={"maks": 0})


@pytest.mark.parametrize("item", [False, True], ids=["if", "item"])
def test_data_dependent_control_flow_is_explained(item: bool) -> None:
    """vmap's data-dependent control-flow and .item() errors become EnsembleErrors naming layer and input."""
    ens = Ensemble(lambda: Branchy(item), N)
    masks = torch.ones(N, BATCH, FEATURES)
    with pytest.raises(EnsembleError) as info:
        ens(torch.randn(BATCH, FEATURES), mask=masks, in_dims={"mask": 0})
    text = str(info.value)
    assert "<root> (Branchy)" in text and "keyword input 'mask'" in text and "in_dims None" in text
    assert ".item()" in text if item else "branches" in text
    assert "member_forward" not in text and "out_dims" not in text
    assert isinstance(info.value.__cause__, RuntimeError)


# ------------------------------------------------------------------ transformers


def _transformers() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import library_zoo

        library_zoo.import_torchvision()  # a CUDA torchvision wheel beside CPU torch breaks transformers' import
        import transformers
    except ImportError as err:
        pytest.skip(f"transformers is not installed ({err}); pip install transformers")
    transformers.logging.set_verbosity_error()
    return transformers


def _lm(kind: str, attn: str = "sdpa") -> nn.Module:
    tf = _transformers()
    if kind == "gpt2":
        config = tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, attn_implementation=attn)
        return tf.GPT2LMHeadModel(config).eval()
    config = tf.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=100, attn_implementation=attn,
    )  # fmt: skip
    return tf.LlamaForCausalLM(config).eval()


def _greedy(model: Any, ids: Tensor, steps: int, member_dim: bool) -> Tensor:
    out, tokens = model(ids), []
    for _ in range(steps):
        tokens.append(out.logits[..., -1, :].argmax(-1))
        kwargs = {"in_dims": 0} if member_dim else {}
        out = model(tokens[-1][..., None], past_key_values=out.past_key_values, **kwargs)
    return torch.stack(tokens, -1)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_greedy_decoding_with_the_cache_equals_each_member(kind: str) -> None:
    """The DynamicCache comes back per member; fed back, the ensemble decodes each member's own tokens."""
    torch.manual_seed(0)
    ens = Ensemble(lambda: _lm(kind), N).eval()
    ids = torch.randint(0, 100, (2, 6))
    with torch.no_grad():
        out = ens(ids)
        assert type(out.past_key_values).__name__ == "DynamicCache"
        assert out.past_key_values.layers[0].keys.shape[0] == N
        got = _greedy(ens, ids, 4, member_dim=True)
        expected = torch.stack([_greedy(m, ids, 4, member_dim=False) for m in ens.unstack()])
    assert torch.equal(got, expected)


def test_t5_encoder_decoder_cache_decodes_like_each_member() -> None:
    """T5's EncoderDecoderCache comes back per member and feeds the next decoding step."""
    tf = _transformers()
    config = tf.T5Config(
        d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2, vocab_size=100, decoder_start_token_id=0
    )
    torch.manual_seed(0)
    ens = Ensemble(lambda: tf.T5ForConditionalGeneration(config).eval(), N).eval()
    src, start = torch.randint(0, 100, (2, 6)), torch.zeros(2, 1, dtype=torch.long)

    def decode(model: Any, member_dim: bool) -> Tensor:
        out = model(input_ids=src, decoder_input_ids=start)
        tokens = []
        for _ in range(3):
            tokens.append(out.logits[..., -1, :].argmax(-1))
            extra = {"in_dims": {"decoder_input_ids": 0}} if member_dim else {}
            out = model(input_ids=src, decoder_input_ids=tokens[-1][..., None], past_key_values=out.past_key_values,
                        **extra)  # fmt: skip
        return torch.stack(tokens, -1)

    with torch.no_grad():
        assert type(ens(input_ids=src, decoder_input_ids=start).past_key_values).__name__ == "EncoderDecoderCache"
        got = decode(ens, True)
        expected = torch.stack([decode(m, False) for m in ens.unstack()])
    assert torch.equal(got, expected)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_per_member_attention_mask_with_eager_attention_equals_the_loop(kind: str) -> None:
    """With eager attention, a per-member attention_mask keyword gives each member its own mask."""
    torch.manual_seed(0)
    ens = Ensemble(lambda: _lm(kind, "eager"), N).eval()
    ids, masks = torch.randint(0, 100, (2, 6)), torch.ones(N, 2, 6, dtype=torch.long)
    for i in range(N):
        masks[i, :, 6 - i :] = 0
    with torch.no_grad():
        got = ens(ids, attention_mask=masks, in_dims={"attention_mask": 0}).logits
        ref = torch.stack([m(ids, attention_mask=masks[i]).logits for i, m in enumerate(ens.unstack())])
    torch.testing.assert_close(got, ref)


def test_per_member_attention_mask_under_sdpa_is_explained() -> None:
    """Under SDPA, transformers reads a per-member mask's values: the error names the mask and the way out."""
    ens = Ensemble(lambda: _lm("gpt2"), N).eval()
    ids, masks = torch.randint(0, 100, (2, 6)), torch.ones(N, 2, 6, dtype=torch.long)
    with pytest.raises(EnsembleError) as info, torch.no_grad():
        ens(ids, attention_mask=masks, in_dims={"attention_mask": 0})
    text = str(info.value)
    assert "keyword input 'attention_mask'" in text and 'attn_implementation="eager"' in text
    assert "GPT2Model" in text and "member_forward" not in text
