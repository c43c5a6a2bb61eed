"""Models from transformers, timm and torchvision ensemble like a loop over their members (issue 14).

Needs the ``zoo`` extra (see ``tests/library_zoo.py`` for the install route); skipped
with the reason when a package is missing. Behaviour the core does not have yet is
marked ``xfail(strict=True)``: it turns into a failure, to be un-marked, when it lands.
"""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

import library_zoo as zoo
import pytest
import torch
from torch import Tensor, nn

from ensembling import Ensemble, EnsembleError, tolerances

MISSING = zoo.missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"library zoo: {MISSING}")

N = 4
N_TRAIN = 2  # the float64 train check: two members show that gradients and statistics stay apart
NAMES = list(zoo.MODELS)
LMS = [name for name, m in zoo.MODELS.items() if m.causal_lm]
SEEDED = ["gpt2", "vit", "mobilenet_v3_small"]  # one per library, on the seeded path too (Conv1D, cls_token)
F32 = tolerances(torch.float32)
F64 = tolerances(torch.float64)
# Bonferroni: a false alarm anywhere in the zoo (~700 tensors) stays below ~1e-3.
ALPHA = 1e-6
KS_SAMPLE = 20_000


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Any:
    """Toy models gain nothing from intra-op threads; on CI's 2 cores they only spin (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def xfail(reason: str) -> Any:
    return pytest.mark.xfail(strict=True, reason=f"issue 14: {reason}")


@cache
def members(name: str) -> tuple[nn.Module, ...]:
    """Four members of ``name`` in eval mode, seeded (shared by the tests: never mutate them)."""
    torch.manual_seed(sum(map(ord, name)))
    return tuple(zoo.MODELS[name].factory().eval() for _ in range(N))


@cache
def ensemble(name: str) -> Ensemble:
    """``Ensemble.from_modules(members(name))`` (shared by the tests: never mutate it)."""
    return Ensemble.from_modules(members(name))


def reference_factory(name: str) -> Any:
    """The library's named model (ResNet-18 for the smaller ResNet the runs use), else the factory."""
    zm = zoo.MODELS[name]
    return zm.reference or zm.factory


@cache
def drawn(name: str, seed: int | None) -> Ensemble:
    """``Ensemble(reference_factory(name), N, seed=seed)`` (shared: never mutate it)."""
    torch.manual_seed(6)
    return Ensemble(reference_factory(name), N, seed=seed)


@cache
def draws(name: str) -> tuple[nn.Module, ...]:
    """``N`` independent ``reference_factory(name)()`` calls (shared: never mutate them)."""
    torch.manual_seed(7)
    factory = reference_factory(name)
    return tuple(factory() for _ in range(N))


def loop(name: str, args_of: Any, modules: tuple[nn.Module, ...] | None = None) -> Tensor:
    """The members' selected outputs, one after another, stacked: ``[N, ...]``."""
    zm = zoo.MODELS[name]
    modules = members(name) if modules is None else modules
    return torch.stack([zm.select(m(*args_of(i), **zm.kwargs)) for i, m in enumerate(modules)])


@pytest.mark.parametrize("name", NAMES)
def test_construct(name: str) -> None:
    """Ensemble(factory, 4) and from_modules give every member the factory's parameter names and shapes."""
    ens, one = drawn(name, None), draws(name)[0]
    shapes = {k: (N, *p.shape) for k, p in one.named_parameters()}
    assert {k: tuple(p.shape) for k, p in ens.named_stacked_parameters().items()} == shapes
    assert len(ens) == N and ens.member_class is type(one)
    stacked = ensemble(name).named_stacked_parameters()
    for i, m in enumerate(members(name)):
        for k, p in m.named_parameters():
            assert torch.equal(stacked[k][i], p), (name, i, k)


@pytest.mark.parametrize("name", NAMES)
def test_eval_forward_shared_input(name: str) -> None:
    """In eval mode, one input shared by all members gives the loop's outputs."""
    zm = zoo.MODELS[name]
    args = zm.inputs(torch.Generator().manual_seed(0), ())
    with torch.no_grad():
        got = zm.select(ensemble(name)(*args, **zm.kwargs))
        torch.testing.assert_close(got, loop(name, lambda i: args), **F32)


@pytest.mark.parametrize("name", NAMES)
def test_eval_forward_per_member_inputs(name: str) -> None:
    """In eval mode, per-member inputs (in_dims=0) give each member its own slice, as the loop does."""
    zm = zoo.MODELS[name]
    xs = zm.inputs(torch.Generator().manual_seed(1), (N,))
    with torch.no_grad():
        got = zm.select(ensemble(name)(*xs, in_dims=zoo.in_dims_for(xs), **zm.kwargs))
        torch.testing.assert_close(got, loop(name, lambda i: zoo.member_args(xs, i)), **F32)


@pytest.mark.parametrize("name", NAMES)
def test_train_float64_outputs_gradients_and_buffers(name: str) -> None:
    """A float64 train-mode step gives the loop's outputs, every member's gradients and BatchNorm statistics."""
    zm = zoo.MODELS[name]
    loop_members = tuple(copy.deepcopy(m).double().train() for m in members(name)[:N_TRAIN])
    ens = Ensemble.from_modules(copy.deepcopy(loop_members))
    make = zm.train_inputs or zm.inputs
    args = tuple(
        a.double() if isinstance(a, Tensor) and a.is_floating_point() else a
        for a in make(torch.Generator().manual_seed(2), ())
    )
    out = zm.select(ens(*args, **zm.kwargs))
    ref = loop(name, lambda i: args, loop_members)
    torch.testing.assert_close(out, ref, **F64)
    weights = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (out * weights).sum().backward()
    (ref * weights).sum().backward()
    stacked = ens.named_stacked_parameters()
    for i, m in enumerate(loop_members):
        for k, p in m.named_parameters():
            assert (p.grad is None) == (stacked[k].grad is None), (name, k)
            if p.grad is not None:
                torch.testing.assert_close(stacked[k].grad[i], p.grad, **F64, msg=f"{name}: member {i} {k}")
        for k, b in m.named_buffers():
            torch.testing.assert_close(ens.named_stacked_buffers()[k][i], b, **F64, msg=f"{name}: {i} {k}")
    assert any(True for _ in loop_members[0].buffers()) or not zm.has_batchnorm


@pytest.mark.parametrize("name", NAMES)
def test_getitem_is_member(name: str) -> None:
    """ens[i] is member i: the same class, state and outputs."""
    zm = zoo.MODELS[name]
    ens = ensemble(name)
    args = zm.inputs(torch.Generator().manual_seed(4), ())
    for i in (N - 1,):
        copy_i, m = ens[i], members(name)[i]
        assert type(copy_i) is type(m)
        ref = m.state_dict()
        assert copy_i.state_dict().keys() == ref.keys()
        for k, v in copy_i.state_dict().items():
            assert torch.equal(v, ref[k]), (name, i, k)
        with torch.no_grad():
            torch.testing.assert_close(
                zm.select(copy_i.eval()(*args, **zm.kwargs)), zm.select(m(*args, **zm.kwargs)), **F32
            )


# ---------------------------------------------------------------- initialization


def init_mismatches(factory: Any, ens: Ensemble, draws: list[nn.Module]) -> list[str]:
    """Parameters whose ensemble members are not distributed like independent ``factory()`` draws."""
    from scipy.stats import ks_2samp

    stacked = ens.named_stacked_parameters()
    bad = []
    for k, p0 in draws[0].named_parameters():
        ref = torch.stack([d.get_parameter(k).detach() for d in draws]).double()
        got = stacked[k].detach().double()
        distinct = any(not torch.equal(ref[0], r) for r in ref[1:])
        if distinct and all(torch.equal(got[0], g) for g in got[1:]):
            bad.append(f"{k}: every member identical, but factory() draws differ")
        elif not distinct and not torch.equal(got, ref):
            bad.append(f"{k}: factory() always gives the same values; members differ from them")
        elif distinct and ref.numel() >= 8:
            pvalue = ks_2samp(got.flatten()[:KS_SAMPLE].numpy(), ref.flatten()[:KS_SAMPLE].numpy()).pvalue
            if pvalue < ALPHA:
                bad.append(
                    f"{k}: mean/std {got.mean():.3g}/{got.std():.3g} vs factory() "
                    f"{ref.mean():.3g}/{ref.std():.3g} (KS p={pvalue:.1e})"
                )
    return bad


class TorchDefaults(nn.Module):
    """A control: layers on torch's own initializers only (what the vectorized init replays)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 32)
        self.conv = nn.Conv1d(32, 32, 3)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 10)


def test_init_statistics_control_passes_on_torch_defaults() -> None:
    """The init test raises no false alarm when the member uses torch's defaults (the test is sound)."""
    torch.manual_seed(5)
    ens = Ensemble(TorchDefaults, N)
    draws = [TorchDefaults() for _ in range(N)]
    assert init_mismatches(TorchDefaults, ens, draws) == []


@pytest.mark.parametrize(
    ("name", "seed"),
    [pytest.param(n, None, id=f"{n}-vectorized") for n in NAMES]
    + [pytest.param(n, 0, id=f"{n}-seeded") for n in SEEDED],
)
def test_init_statistics_match_factory(name: str, seed: int | None) -> None:
    """Members of Ensemble(factory, 4) are distributed as independent factory() draws, tensor by tensor."""
    bad = init_mismatches(reference_factory(name), drawn(name, seed), list(draws(name)))
    assert not bad, f"{name}: {len(bad)} parameters:\n" + "\n".join(bad[:10])


# ---------------------------------------------------------------- transformers' extras


@pytest.mark.parametrize("name", [*LMS, "t5"])
def test_default_call_returns_per_member_cache(name: str) -> None:
    """The default call (use_cache=True) returns the loop's logits and a per-member cache."""
    zm = zoo.MODELS[name]
    args = zm.inputs(torch.Generator().manual_seed(7), ())
    with torch.no_grad():
        out = ensemble(name)(*args)
        torch.testing.assert_close(out.logits, loop(name, lambda i: args), **F32)
    assert out.past_key_values is not None


@pytest.mark.parametrize("name", LMS)
def test_greedy_decoding_matches_each_member(name: str) -> None:
    """Greedy decoding of the ensemble, feeding its cache back, gives each member's own tokens."""
    steps = 3
    (prompt,) = zoo.token_ids(torch.Generator().manual_seed(8), ())
    expected = []
    with torch.no_grad():
        for m in members(name):
            out, tokens = m(prompt, use_cache=True), []
            for _ in range(steps):
                tokens.append(out.logits[:, -1].argmax(-1))
                out = m(tokens[-1][:, None], past_key_values=out.past_key_values, use_cache=True)
            expected.append(torch.stack(tokens, -1))
        out, tokens = ensemble(name)(prompt, use_cache=True), []
        for _ in range(steps):
            tokens.append(out.logits[:, :, -1].argmax(-1))  # [N, BATCH]
            out = ensemble(name)(tokens[-1][..., None], in_dims=0, past_key_values=out.past_key_values, use_cache=True)
    assert torch.equal(torch.stack(tokens, -1), torch.stack(expected))


SDPA_MASK = (
    "transformers' SDPA mask code reads a per-member mask's values (vmap: data-dependent control flow, "
    "raised as an EnsembleError naming attention_mask); GPT-2 and Llama built with eager attention take "
    "per-member masks (tests/test_outputs_and_kwargs.py)"
)


def padding_masks() -> Tensor:
    """``[N, BATCH, SEQ]`` attention masks: member i pads the last i positions."""
    masks = torch.ones(N, zoo.BATCH, zoo.SEQ, dtype=torch.long)
    for i in range(N):
        masks[i, :, zoo.SEQ - i :] = 0
    return masks


@pytest.mark.parametrize("name", [pytest.param(n, marks=xfail(SDPA_MASK)) for n in ("bert", "gpt2", "llama")])
def test_per_member_attention_mask_keyword(name: str) -> None:
    """A per-member attention_mask passed as a keyword gives each member its own mask, as the loop does."""
    zm = zoo.MODELS[name]
    args, masks = zm.inputs(torch.Generator().manual_seed(9), ()), padding_masks()
    with torch.no_grad():
        got = zm.select(zoo.per_member_keyword_call(ensemble(name), args, attention_mask=masks, **zm.kwargs))
        ref = torch.stack(
            [zm.select(m(*args, attention_mask=masks[i], **zm.kwargs)) for i, m in enumerate(members(name))]
        )
    torch.testing.assert_close(got, ref, **F32)


@pytest.mark.parametrize("name", ["bert", "distilbert"])  # attention_mask is their 2nd positional input
def test_per_member_attention_mask_positional_works_or_explains(name: str) -> None:
    """A per-member mask passed by position either equals the loop or raises an EnsembleError naming it."""
    zm = zoo.MODELS[name]
    (ids,), masks = zm.inputs(torch.Generator().manual_seed(10), ()), padding_masks()
    try:
        with torch.no_grad():
            got = zm.select(ensemble(name)(ids, masks, in_dims=(None, 0), **zm.kwargs))
    except EnsembleError as err:
        assert "attention_mask" in str(err) and "member_forward" not in str(err)
        return
    ref = torch.stack([zm.select(m(ids, masks[i], **zm.kwargs)) for i, m in enumerate(members(name))])
    torch.testing.assert_close(got, ref, **F32)
