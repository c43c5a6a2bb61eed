"""Ensemble(factory, n): members distributed exactly as n independent factory() calls, for any factory.

Each law test draws the members of an ensemble (vectorized and seeded paths) and as
many independent ``factory()`` calls, and compares them tensor by tensor: the pooled
values (mean, std and a two-sample Kolmogorov-Smirnov test), the per-member means (a
second KS test: copies of one draw, or a different scale per member, fail it), and
which tensors are equal within a member (``TransformerEncoder`` starts its layers
identical). KS thresholds are Bonferroni-corrected over a model's tests; all draws are
seeded, so a result never changes between runs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import pytest
import torch
from scipy.stats import ks_2samp
from torch import nn

from ensembling import Ensemble
from ensembling._record import record_factory

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: every model here is built from a config

MEMBERS = 24
FAMILY_ALPHA = 1e-3  # chance of a false alarm per model and path, before the Bonferroni split

# ----------------------------------------------------------------------------- models


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 32), nn.Linear(32, 5)


class CNNWithBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 4)


class XavierInit(nn.Module):
    """nn.init.xavier_uniform_ after the layer's own reset_parameters: another law than nn.Linear's."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 24)
        nn.init.xavier_uniform_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)


class RandnParameter(nn.Module):
    """A parameter no reset_parameters() covers, computed from another tensor (timm's cls_token style)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.token = nn.Parameter(torch.randn(4, 8) * 0.02)


class Orthogonal(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 12)
        nn.init.orthogonal_(self.fc.weight)


class ApplyInit(nn.Module):
    """A Hugging Face-style _init_weights through self.apply: normal(0, 0.02), zero biases, padding row zero."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc, self.ln = nn.Embedding(50, 16, padding_idx=0), nn.Linear(16, 16), nn.LayerNorm(16)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=0.02)
        if isinstance(module, nn.Linear):
            module.bias.data.zero_()
        if isinstance(module, nn.Embedding):
            module.weight.data[module.padding_idx].zero_()


class KaimingLoop(nn.Module):
    """torchvision's ResNet init: a loop over modules with kaiming_normal_(mode="fan_out")."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.conv2 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


def _transformer_encoder() -> nn.Module:
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32), 2, enable_nested_tensor=False)


PLAIN: dict[str, Callable[[], nn.Module]] = {
    "mlp": MLP,
    "cnn_batchnorm": CNNWithBatchNorm,
    "lstm": lambda: nn.LSTM(6, 10, num_layers=2),
    "transformer_encoder": _transformer_encoder,
}
CUSTOM: dict[str, Callable[[], nn.Module]] = {
    "xavier_in_init": XavierInit,
    "randn_times_0.02": RandnParameter,
    "orthogonal": Orthogonal,
    "apply_init_weights": ApplyInit,
    "kaiming_loop": KaimingLoop,
}


def _libraries() -> None:
    """Make torchvision importable (transformers' and timm's model modules import it), or skip."""
    from library_zoo import import_torchvision  # the CPU-torch workaround for the torchvision wheel

    try:
        import_torchvision()
    except Exception as err:
        pytest.skip(f"torchvision cannot be imported here: {type(err).__name__}: {err}")


def _transformers_model(name: str) -> Callable[[], nn.Module]:
    _libraries()
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e .[zoo])")
    small = {"vocab_size": 100, "max_position_embeddings": 64}
    configs = {
        "bert": lambda: transformers.BertModel(
            transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, **small)),
        "gpt2": lambda: transformers.GPT2LMHeadModel(
            transformers.GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=2)),
        "llama": lambda: transformers.LlamaForCausalLM(
            transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=2, **small)),
    }  # fmt: skip
    return configs[name]


def _timm_vit() -> Callable[[], nn.Module]:
    _libraries()
    try:
        import timm
    except Exception as err:  # ImportError, or torchvision failing to load its operators
        pytest.skip(f"timm cannot be imported here: {type(err).__name__}: {err}")
    return lambda: timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
        num_classes=10,
    )  # fmt: skip


# ----------------------------------------------------------------------------- comparison


def _ensemble_state(factory: Callable[[], nn.Module], path: str, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    ens = Ensemble(factory, MEMBERS, seed=seed if path == "seeded" else None)
    return {k: v.detach() for k, v in {**ens.named_stacked_parameters(), **ens.named_stacked_buffers()}.items()}


def _reference_state(factory: Callable[[], nn.Module], seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed + 1)
    models = [factory() for _ in range(MEMBERS)]
    names = [name for name, _ in [*models[0].named_parameters(), *models[0].named_buffers()]]
    return {
        name: torch.stack([dict([*m.named_parameters(), *m.named_buffers()])[name].detach() for m in models])
        for name in names
    }


def _sample(values: torch.Tensor, limit: int = 4000) -> torch.Tensor:
    """At most ``limit`` pooled values: the same positions in every member (the members are the iid part)."""
    per_member = values.reshape(len(values), -1)
    keep = max(1, limit // len(values))
    if per_member.shape[1] > keep:
        positions = torch.randperm(per_member.shape[1], generator=torch.Generator().manual_seed(0))[:keep]
        per_member = per_member[:, positions]
    return per_member.flatten().double()


def _equal_pattern(state: dict[str, torch.Tensor]) -> set[tuple[str, str]]:
    """Pairs of same-shape tensors equal in every member (cloned layers, tied weights)."""
    names = [n for n, t in state.items() if t.is_floating_point() and t[0].numel() > 1]
    return {
        (a, b)
        for i, a in enumerate(names)
        for b in names[i + 1 :]
        if state[a].shape == state[b].shape and torch.equal(state[a], state[b])
    }


def assert_same_law(factory: Callable[[], nn.Module], path: str, seed: int = 0) -> None:
    ours, ref = _ensemble_state(factory, path, seed), _reference_state(factory, seed)
    assert ours.keys() == ref.keys()
    floating = [n for n, t in ref.items() if t.is_floating_point() and t[0].numel() > 0]
    threshold = FAMILY_ALPHA / (2 * len(floating))  # Bonferroni over both KS tests of every tensor
    for name, t in ref.items():
        if name not in floating:
            assert torch.equal(ours[name], t), f"{name}: not the factory's value"
            continue
        a, b = _sample(ours[name]), _sample(t)
        spread = b.std().item()
        if spread == 0:  # a constant in every call (zeros, ones, running statistics)
            assert torch.equal(a, b), f"{name}: the factory gives the constant {b[0].item()}, the ensemble not"
            continue
        tolerance = 6 * spread / math.sqrt(len(b))
        assert abs(a.mean() - b.mean()).item() < tolerance * math.sqrt(2), f"{name}: mean {a.mean()} vs {b.mean()}"
        assert abs(a.std() - b.std()).item() < 2 * tolerance, f"{name}: std {a.std():.4g} vs {spread:.4g}"
        p_values = (
            ks_2samp(a.numpy(), b.numpy()).pvalue,
            ks_2samp(ours[name].flatten(1).double().mean(1).numpy(), t.flatten(1).double().mean(1).numpy()).pvalue,
        )
        assert min(p_values) > threshold, f"{name}: KS p-values {p_values} (threshold {threshold:.2g})"
    assert _equal_pattern(ours) == _equal_pattern(ref), "tensors equal within a member differ from the factory's"


# ----------------------------------------------------------------------------- the law


@pytest.mark.parametrize("path", ["vectorized", "seeded"])
@pytest.mark.parametrize("name", list(PLAIN))
def test_plain_torch_nn_models_follow_the_factorys_law(name: str, path: str) -> None:
    """Members of torch.nn models (MLP, CNN + BatchNorm, LSTM, TransformerEncoder) have factory()'s law."""
    assert_same_law(PLAIN[name], path)


@pytest.mark.parametrize("path", ["vectorized", "seeded"])
@pytest.mark.parametrize("name", list(CUSTOM))
def test_custom_inits_follow_the_factorys_law(name: str, path: str) -> None:
    """Inits in __init__ (xavier, randn * 0.02, orthogonal_, self.apply, kaiming loops) keep factory()'s law."""
    assert_same_law(CUSTOM[name], path)


@pytest.mark.parametrize("path", ["vectorized", "seeded"])
@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_hugging_face_models_follow_the_factorys_law(name: str, path: str) -> None:
    """Tiny BERT, GPT-2 and Llama (post_init / _init_weights) keep factory()'s law: normal(0, 0.02), not std 1."""
    assert_same_law(_transformers_model(name), path)


@pytest.mark.parametrize("path", ["vectorized", "seeded"])
def test_timm_vit_follows_the_factorys_law(path: str) -> None:
    """A tiny timm ViT (trunc_normal(0.02), cls_token, pos_embed) keeps factory()'s law."""
    assert_same_law(_timm_vit(), path)


# ----------------------------------------------------------------------------- paths and properties


@pytest.mark.parametrize("factory", [MLP, CNNWithBatchNorm, PLAIN["lstm"], XavierInit, ApplyInit, KaimingLoop])
def test_self_contained_inits_are_replayed_not_rebuilt(factory: Callable[[], nn.Module]) -> None:
    """Models whose draws are in-place nn.init / Tensor ops take the vectorized replay (two factory() calls)."""
    calls = []

    def counted() -> nn.Module:
        calls.append(1)
        return factory()

    assert record_factory(factory)[1].fallback is None
    Ensemble(counted, 40)
    assert len(calls) == 2  # the recorded call and the check that copied tensors are deterministic


@pytest.mark.parametrize("factory", [_transformer_encoder, RandnParameter, Orthogonal])
def test_other_inits_are_rebuilt_by_separate_calls(factory: Callable[[], nn.Module]) -> None:
    """Cloned layers, tensors computed from others and orthogonal_ give the members of n factory() calls."""
    assert record_factory(factory)[1].fallback is not None
    torch.manual_seed(5)
    ens = Ensemble(factory, 3)
    torch.manual_seed(5)
    expected = [factory() for _ in range(3)]
    for i, member in enumerate(expected):
        for name, value in member.named_parameters():
            assert torch.equal(ens.named_stacked_parameters()[name][i], value)


@pytest.mark.parametrize("factory", [MLP, ApplyInit, RandnParameter, _transformer_encoder])
@pytest.mark.parametrize("path", ["vectorized", "seeded"])
def test_members_differ_and_are_reproducible(factory: Callable[[], nn.Module], path: str) -> None:
    """Members are not copies of each other, and the same torch.manual_seed gives the same members."""
    first, again = _ensemble_state(factory, path, 11), _ensemble_state(factory, path, 11)
    assert all(torch.equal(first[k], again[k]) for k in first)
    ref = _reference_state(factory, 11)
    for name, t in first.items():
        if t.is_floating_point() and not torch.equal(ref[name][0], ref[name][1]):
            assert not torch.equal(t[0], t[1]), f"{name}: members 0 and 1 are copies"


@pytest.mark.parametrize("factory", [MLP, ApplyInit, RandnParameter, Orthogonal])
def test_seeded_member_is_the_same_whatever_n_and_block(factory: Callable[[], nn.Module]) -> None:
    """Seeded member i does not depend on the number of members, members= blocks or the global seed."""
    torch.manual_seed(0)
    whole = Ensemble(factory, 6, seed=3).state_dict()
    torch.manual_seed(1)
    block = Ensemble(factory, 9, seed=3, members=range(2, 5)).state_dict()
    for name, t in block.items():
        assert torch.equal(t, whole[name][2:5]), name


def test_dtype_conversion_keeps_the_factorys_values() -> None:
    """dtype=float64 draws in the factory's float32 and converts: exactly factory().to(float64)'s law."""
    ens = Ensemble(XavierInit, 8, dtype=torch.float64)
    weight = ens.stacked.fc.weight.detach()
    assert weight.dtype == torch.float64
    assert torch.equal(weight.float().double(), weight)
