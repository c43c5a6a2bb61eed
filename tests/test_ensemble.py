"""ensembling.Ensemble: construction, inference, members, state, training, errors."""

from __future__ import annotations

import copy
import io
import math
import pickle
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from ensembling import Ensemble, EnsembleError, ensemble_loss

# ----------------------------------------------------------------------------- the model zoo


class MLP(nn.Module):
    """A custom class: forward uses F.relu, so Ensemble takes the vmap path."""

    def __init__(self, in_features: int = 12, hidden: int = 16, out: int = 5):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 1, 6, 6)
        return self.fc(F.relu(self.conv(x)).flatten(1))


class WithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 8, bias=False)  # BatchNorm removes any bias it would add
        self.bn = nn.BatchNorm1d(8)
        self.out = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.bn(self.fc(x))))


def sequential_mlp() -> nn.Sequential:
    """Linear/ReLU/Dropout only: Ensemble takes the baddbmm fast path."""
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Dropout(0.25), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 5))


ZOO: dict[str, Callable[[], nn.Module]] = {
    "linear": lambda: nn.Linear(12, 5),
    "mlp": MLP,
    "sequential": sequential_mlp,
    "cnn": CNN,
    "batchnorm": WithBatchNorm,
    "dropout": lambda: nn.Sequential(nn.Linear(12, 16), nn.Dropout(0.5), nn.Linear(16, 5), nn.Sigmoid()),
}


def inputs(kind: str, *lead: int) -> torch.Tensor:
    features = 36 if kind == "cnn" else 12
    return torch.randn(*lead, features)


def make_members(kind: str, n: int = 4, seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [ZOO[kind]() for _ in range(n)]


def loop(models: list[nn.Module], x: torch.Tensor, per_member: bool) -> torch.Tensor:
    return torch.stack([m(x[i] if per_member else x) for i, m in enumerate(models)])


TOL = {"rtol": 1e-5, "atol": 1e-5}


# ----------------------------------------------------------------------------- construction


@pytest.mark.parametrize("kind", list(ZOO))
def test_from_modules_stacks_copies_bit_for_bit(kind: str) -> None:
    """Each stacked tensor is exactly torch.stack of the members' tensors, registered on the ensemble."""
    models = make_members(kind)
    ens = Ensemble.from_modules(models)
    assert len(ens) == 4 and ens.member_class is type(models[0])
    stacked = ens.named_stacked_parameters()
    assert list(stacked) == [name for name, _ in models[0].named_parameters()]
    for name, value in stacked.items():
        assert isinstance(value, nn.Parameter) and value.requires_grad
        assert torch.equal(value, torch.stack([m.get_parameter(name) for m in models]))
    for name, value in ens.named_stacked_buffers().items():
        assert torch.equal(value, torch.stack([m.get_buffer(name) for m in models]))
    assert {id(p) for p in ens.parameters()} == {id(p) for p in stacked.values()}


def test_from_modules_does_not_alias_the_members() -> None:
    """Changing the ensemble leaves the source modules alone, and vice versa."""
    models = make_members("mlp")
    ens = Ensemble.from_modules(models)
    before = models[1].fc1.weight.detach().clone()
    with torch.no_grad():
        ens.stacked.fc1.weight.add_(1)
        models[2].fc1.weight.add_(5)
    assert torch.equal(models[1].fc1.weight, before)
    assert not torch.equal(ens.stacked.fc1.weight[2], models[2].fc1.weight)


def test_frozen_parameters_stay_frozen() -> None:
    """requires_grad=False on a member parameter gives a frozen stacked parameter."""
    models = make_members("mlp")
    for m in models:
        m.fc1.requires_grad_(False)
    ens = Ensemble.from_modules(models)
    assert not ens.stacked.fc1.weight.requires_grad and ens.stacked.fc2.weight.requires_grad
    assert not ens[0].fc1.weight.requires_grad


def test_vectorized_init_calls_the_factory_twice_not_n_times() -> None:
    """Ensemble(factory, n) of replayable inits builds two modules (recorded call, determinism check), not n."""
    calls = []

    def factory() -> nn.Module:
        calls.append(1)
        return MLP()

    ens = Ensemble(factory, 50)
    assert len(calls) == 2 and len(ens) == 50


@pytest.mark.parametrize(
    ("factory", "name", "bound"),
    [
        (lambda: nn.Linear(784, 128), "weight", 1 / math.sqrt(784)),  # kaiming_uniform(a=sqrt 5)
        (lambda: nn.Linear(784, 128), "bias", 1 / math.sqrt(784)),
        (lambda: nn.Sequential(nn.Linear(8, 400), nn.Linear(400, 3)), "1.weight", 1 / math.sqrt(400)),
        (lambda: nn.Conv2d(3, 16, 5), "weight", 1 / math.sqrt(3 * 5 * 5)),
    ],
)
def test_vectorized_init_uses_each_layers_own_fan_in(factory, name: str, bound: float) -> None:
    """Members are uniform(-b, b) with b from one member's fan-in, not the stacked shape."""
    torch.manual_seed(0)
    values = Ensemble(factory, 20).named_stacked_parameters()[name].detach()
    assert values.abs().max() <= bound
    assert values.abs().max() > 0.98 * bound  # the whole range is used
    for member in values:  # each member alone has the uniform distribution's variance b^2 / 3
        assert member.var().item() == pytest.approx(bound**2 / 3, rel=0.25 if member.numel() < 500 else 0.08)
    assert not torch.equal(values[0], values[1])


def test_vectorized_init_matches_the_factorys_distribution_for_every_layer_kind() -> None:
    """Embedding ~ N(0, 1), LayerNorm = ones/zeros, BatchNorm stats reset, attention re-drawn per member."""

    def factory() -> nn.Module:
        return nn.ModuleDict({
            "emb": nn.Embedding(500, 16), "ln": nn.LayerNorm(16), "bn": nn.BatchNorm1d(16),
            "attn": nn.MultiheadAttention(16, 2),
        })  # fmt: skip

    torch.manual_seed(0)
    ens = Ensemble(factory, 8)
    state = {**ens.named_stacked_parameters(), **ens.named_stacked_buffers()}
    emb = state["emb.weight"].detach()
    assert emb.mean().abs() < 0.03 and emb.std().item() == pytest.approx(1.0, rel=0.05)
    assert torch.equal(state["ln.weight"], torch.ones(8, 16)) and torch.equal(state["ln.bias"], torch.zeros(8, 16))
    assert torch.equal(state["bn.running_var"], torch.ones(8, 16))
    assert torch.equal(state["bn.num_batches_tracked"], torch.zeros(8, dtype=torch.long))
    attn = state["attn.in_proj_weight"]  # initialized by MultiheadAttention._reset_parameters
    assert not torch.equal(attn[0], attn[1])


def test_vectorized_init_is_reproducible_with_manual_seed() -> None:
    """The same seed gives the same members."""
    torch.manual_seed(7)
    a = Ensemble(MLP, 5).state_dict()
    torch.manual_seed(7)
    b = Ensemble(MLP, 5).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_parameters_without_reset_parameters_follow_the_factory() -> None:
    """A constant parameter no reset_parameters() covers is the same constant in every member, without a warning."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.scale = nn.Parameter(torch.full((3,), 0.5))

        def forward(self, x):
            return self.fc(x) * self.scale

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ens = Ensemble(Scaled, 4)
    assert torch.equal(ens.stacked.scale, torch.full((4, 3), 0.5))
    assert not torch.equal(ens.stacked.fc.weight[0], ens.stacked.fc.weight[1])


def test_device_and_dtype_arguments() -> None:
    """device= and dtype= place and convert the stacked state."""
    ens = Ensemble(MLP, 3, dtype=torch.float64, device="cpu")
    assert {p.dtype for p in ens.parameters()} == {torch.float64}
    assert ens(torch.randn(2, 12, dtype=torch.float64)).dtype == torch.float64


# ----------------------------------------------------------------------------- inference


@pytest.mark.parametrize("kind", list(ZOO))
@pytest.mark.parametrize("per_member", [False, True], ids=["shared", "per-member"])
def test_forward_equals_the_loop(kind: str, per_member: bool) -> None:
    """ens(x) and ens(xs, in_dims=0) equal a loop over the members (eval mode)."""
    models = [m.eval() for m in make_members(kind)]
    ens = Ensemble.from_modules(models)
    x = inputs(kind, 4, 7) if per_member else inputs(kind, 7)
    with torch.no_grad():
        got = ens(x, in_dims=0 if per_member else None)
        torch.testing.assert_close(got, loop(models, x, per_member), **TOL)


@pytest.mark.parametrize("per_member", [False, True], ids=["shared", "per-member"])
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "autograd"])
def test_fast_path_equals_vmap_path(per_member: bool, grad: bool) -> None:
    """The baddbmm path gives the vmap path's outputs and gradients, extra leading dims included."""
    models = [m.eval() for m in make_members("sequential")]
    fast, slow = Ensemble.from_modules(models), Ensemble.from_modules(models, fast_path=False)
    assert "path=baddbmm" in repr(fast) and "path=vmap" in repr(slow)
    x = inputs("sequential", 4, 3, 2) if per_member else inputs("sequential", 3, 2)
    with torch.set_grad_enabled(grad):
        a, b = fast(x, in_dims=0 if per_member else None), slow(x, in_dims=0 if per_member else None)
    assert a.shape == (4, 3, 2, 5) and a.is_contiguous()
    torch.testing.assert_close(a, b, **TOL)
    if grad:
        a.square().sum().backward()
        b.square().sum().backward()
        for p, q in zip(fast.parameters(), slow.parameters()):
            torch.testing.assert_close(p.grad, q.grad, **TOL)


def test_fast_path_with_large_weights_uses_the_transposed_layout_correctly() -> None:
    """Above a million weight elements the training layout changes; results must not."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 4)) for _ in range(20)]
    fast, slow = Ensemble.from_modules(models), Ensemble.from_modules(models, fast_path=False)
    assert fast._fast.weights_are_large
    for x, in_dims in ((torch.randn(6, 300), None), (torch.randn(20, 6, 300), 0)):
        fast.zero_grad(), slow.zero_grad()
        a, b = fast(x, in_dims=in_dims), slow(x, in_dims=in_dims)
        torch.testing.assert_close(a, b, **TOL)
        a.sum().backward()
        b.sum().backward()
        assert fast.named_stacked_parameters()["0.weight"].grad.is_contiguous()
        for p, q in zip(fast.parameters(), slow.parameters()):
            torch.testing.assert_close(p.grad, q.grad, **TOL)


class FlattenMLP(nn.Module):
    """The seed tutorial's MLP: its forward starts with ``x.flatten(start_dim=1)``."""

    def __init__(self, in_features: int = 12, hidden: int = 16):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(in_features, hidden), nn.Linear(hidden, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x.flatten(start_dim=1))))


class Reshaping(nn.Module):
    """Transpose, view with a read size, reshape with x.shape, unsqueeze: every reshape kind between Linears."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(3 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [batch, 4, 3] -> [batch, 1, 5]
        h = torch.tanh(self.fc1(x.transpose(1, 2)))  # [batch, 3, 6]
        h = h.view(h.size(0), -1)
        h = h.reshape(h.shape[0], 18)
        return torch.flatten(self.fc2(h).unsqueeze(-1), 1).unsqueeze(1)


RESHAPING = {
    "seed MLP": (lambda: FlattenMLP(12), (3, 1, 3, 4)),
    "reshapes": (Reshaping, (3, 4, 3)),
    "nn.Flatten": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.Unflatten(1, (2, 3))), (3, 3, 4)),
    "large": (lambda: FlattenMLP(1200, 900), (3, 2, 600)),  # the transposed training layout
    # Plain chains (Linear, element-wise) after input flattens run a shorter loop; these are its edges:
    "seed MLP, flat input": (lambda: FlattenMLP(12), (3, 12)),  # flatten(1) of [batch, 12]: nothing to do
    "flatten leaving 3 dims": (lambda: nn.Sequential(nn.Flatten(-2), nn.Linear(12, 5), nn.GELU()), (2, 3, 3, 4)),
    "activation first": (lambda: nn.Sequential(nn.GELU(), nn.Linear(12, 6, bias=False), nn.Tanh()), (3, 12)),
    "dropout, eval": (
        lambda: nn.Sequential(nn.Linear(12, 6), nn.Dropout(0.5), nn.ReLU(), nn.Linear(6, 5)).eval(),
        (3, 12),
    ),
}


def _fast_path_equals_the_loop(factory, x: torch.Tensor, per_member: bool) -> tuple[Ensemble, list[nn.Module]]:
    """Four members of ``factory`` on the baddbmm path: outputs, then gradients of a weighted sum, equal the loop's."""
    torch.manual_seed(0)
    models = [factory() for _ in range(4)]
    ens = Ensemble.from_modules(models)
    assert "path=baddbmm" in repr(ens)
    got = ens(x, in_dims=0 if per_member else None)
    expected = loop(models, x, per_member)
    torch.testing.assert_close(got, expected, **TOL)
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1))
    (got * weights).sum().backward()
    (expected * weights).sum().backward()
    for key, stacked in ens.named_stacked_parameters().items():
        torch.testing.assert_close(stacked.grad, torch.stack([m.get_parameter(key).grad for m in models]), **TOL)
    with torch.no_grad():  # the no-grad form (kept operands) too
        torch.testing.assert_close(ens(x, in_dims=0 if per_member else None), expected, **TOL)
    return ens, models


@pytest.mark.parametrize("per_member", [False, True], ids=["shared", "per-member"])
@pytest.mark.parametrize("kind", list(RESHAPING))
def test_fast_path_runs_reshapes_of_member_dims(kind: str, per_member: bool) -> None:
    """flatten / view / reshape / transpose between Linears stay on the baddbmm path and equal the loop."""
    factory, shape = RESHAPING[kind]
    torch.manual_seed(2)
    _fast_path_equals_the_loop(factory, torch.randn(4, *shape) if per_member else torch.randn(*shape), per_member)


class Pooled(nn.Module):
    """A Linear over a sequence, then a reduction over the sequence (``how``), then a Linear."""

    def __init__(self, how: str):
        super().__init__()
        self.how, self.fc1, self.fc2 = how, nn.Linear(4, 6), nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [batch, seq, 4] -> [batch, 5] or [batch, 1, 5]
        h = torch.tanh(self.fc1(x))
        if self.how == "mean":
            h = h.mean(dim=1)
        elif self.how == "sum keepdim":
            h = torch.sum(h, (1,), keepdim=True)
        else:
            h = h.amax(-2)
        return self.fc2(h)


class BagOfWords(nn.Module):
    """Token ids -> embeddings (``padding_idx`` 0) -> mean over the sequence -> logits; optionally tied."""

    def __init__(self, vocab: int = 20, dim: int = 8, out: int | None = None, tied: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.head = nn.Linear(dim, vocab if tied else out or 3, bias=not tied)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [batch, seq] -> [batch, out]
        return self.head(self.embed(ids).mean(dim=-2))


POOLING = {
    "mean": (lambda: Pooled("mean"), (3, 7, 4), False),
    "sum keepdim": (lambda: Pooled("sum keepdim"), (3, 7, 4), False),
    "amax": (lambda: Pooled("amax"), (3, 7, 4), False),
    "bag of words": (BagOfWords, (3, 7), True),
    "tied bag of words": (lambda: BagOfWords(tied=True), (3, 7), True),
    "nn.Embedding in Sequential": (
        lambda: nn.Sequential(nn.Embedding(20, 6), nn.Flatten(), nn.Linear(42, 3)),
        (3, 7),
        True,
    ),
    "large bag of words": (lambda: BagOfWords(30, 600, 500), (3, 7), True),  # the transposed training layout
}


@pytest.mark.parametrize("per_member", [False, True], ids=["shared", "per-member"])
@pytest.mark.parametrize("kind", list(POOLING))
def test_fast_path_runs_reductions_and_an_embedding_first(kind: str, per_member: bool) -> None:
    """mean / sum / amax over member dims, and an nn.Embedding head, stay on baddbmm and equal the loop.

    The ids include the padding id, whose row gets no gradient in any member, as in nn.Embedding.
    """
    factory, shape, ids = POOLING[kind]
    torch.manual_seed(2)
    if ids:
        x = torch.randint(0, 20, (4, *shape) if per_member else shape)
        x[..., :2] = 0  # padding
    else:
        x = torch.randn(4, *shape) if per_member else torch.randn(*shape)
    ens, models = _fast_path_equals_the_loop(factory, x, per_member)
    if isinstance(models[0], BagOfWords) and models[0].head.weight is not models[0].embed.weight:
        assert not ens.named_stacked_parameters()["embed.weight"].grad[:, 0].any()


def test_fast_path_leaves_other_embeddings_and_full_reductions_to_vmap_and_explains_bad_ids() -> None:
    """max_norm / sparse embeddings and a reduction over everything stay on vmap; bad ids name the layer."""

    class Everything(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x).mean()

    for factory in (
        lambda: nn.Sequential(nn.Embedding(10, 4, max_norm=1.0), nn.Linear(4, 2)),
        lambda: nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 2)),
        Everything,
    ):
        assert "path=vmap" in repr(Ensemble(factory, 2))
    ens = Ensemble(BagOfWords, 3)
    with pytest.raises(EnsembleError, match=r"layer 'embed' \(nn.Embedding\) has 20 rows.*\[0, 19\].*id 25"):
        ens(torch.full((2, 5), 25))
    with pytest.raises(EnsembleError, match=r"layer 'embed'.*id -1"):
        ens(torch.full((3, 2, 5), -1), in_dims=0)
    with pytest.raises(EnsembleError, match=r"layer 'embed' \(nn.Embedding\) takes int64 or int32 token ids"):
        ens(torch.randn(2, 5))
    torch.testing.assert_close(ens(torch.ones(2, 5, dtype=torch.int32)), ens(torch.ones(2, 5, dtype=torch.int64)))


def test_fast_path_embedding_passes_other_lookup_errors_through(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only ids out of range become the id-range EnsembleError; any other failure of the lookup keeps its own text."""

    def failing(*args, **kwargs):
        raise RuntimeError("the lookup failed for another reason")

    ens = Ensemble(BagOfWords, 3)
    monkeypatch.setattr(torch.Tensor, "index_select", failing)
    with pytest.raises(RuntimeError, match="another reason"):
        ens(torch.ones(2, 5, dtype=torch.int64))
    monkeypatch.setattr(torch, "gather", failing)
    with pytest.raises(RuntimeError, match="another reason"):
        ens(torch.ones(3, 2, 5, dtype=torch.int64), in_dims=0)


def test_fast_path_refuses_reshapes_it_cannot_map_and_explains_bad_dims() -> None:
    """A reshape reading another tensor's size stays on vmap; a dim past the member's is an EnsembleError."""

    class SizeOfInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x).view(x.size(0), -1)  # reads the input's size after the Linear

    assert "path=vmap" in repr(Ensemble(SizeOfInput, 2))
    ens = Ensemble(lambda: nn.Sequential(nn.Flatten(-3), nn.Linear(4, 2)), 2)
    assert "path=baddbmm" in repr(ens)
    with pytest.raises(EnsembleError, match=r"flatten\(-3, -1\) refers to dimension -3.*2 dimensions"):
        ens(torch.randn(5, 4))


@pytest.mark.parametrize("member", ["plain", "flattening", "reshaping"])
def test_fast_path_no_grad_operands_follow_every_change_of_the_stacked_tensors(member: str) -> None:
    """Without autograd the fast path keeps its product views between calls; every way the stacked
    tensors change (in place, .to(), a loaded checkpoint, assign=True, a new .data) reaches the next call."""
    torch.manual_seed(0)
    layers = [nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 2, bias=False), nn.ReLU()]
    if member == "flattening":  # still plain: the input is flattened first
        layers = [nn.Flatten(), *layers]
    if member == "reshaping":  # reshapes between the layers: the general loop
        layers = [*layers[:2], nn.Unflatten(1, (2, 2)), nn.Flatten(), *layers[2:]]
    ens = Ensemble(lambda: nn.Sequential(*layers), 3)
    assert (ens._fast.plain[False] is not None) == (member != "reshaping")
    x = torch.randn(5, 2, 3) if member == "flattening" else torch.randn(5, 6)
    first = "1" if member == "flattening" else "0"  # the first Linear

    def check() -> None:
        xs = x.to(ens.stacked.get_submodule(first).weight.dtype)
        torch.testing.assert_close(ens(xs), torch.stack([m(xs) for m in ens.unstack()]))
        torch.testing.assert_close(ens(xs.expand(3, *xs.shape), in_dims=0), torch.stack([m(xs) for m in ens.unstack()]))

    with torch.no_grad():
        check()
        ens.stacked.get_submodule(first).weight.mul_(2)  # in place (an optimizer step)
        check()
        ens.double()  # .to(): the same Parameter objects, new data
        check()
        state = {k: v + 1 for k, v in ens.state_dict().items()}
        ens.load_state_dict(state)  # copied in place
        check()
        ens.load_state_dict({k: v * 3 for k, v in state.items()}, assign=True)  # new tensor objects
        check()
        weight = ens.stacked.get_submodule(first).weight
        weight.data = torch.randn_like(weight)  # the same object, new memory
        check()
        members, rows, columns = weight.shape  # the same memory, shape and dtype, read column-major:
        weight.data = weight.data.as_strided(weight.shape, (rows * columns, 1, rows))  # only the strides differ
        check()
        with torch.inference_mode():
            check()
        check()
        original = ens
        for ens in (copy.deepcopy(original), pickle.loads(pickle.dumps(original))):  # copies read their own tensors
            before = original(x.double())
            ens.stacked.get_submodule(first).weight.add_(1)
            check()
            torch.testing.assert_close(original(x.double()), before)


@pytest.mark.parametrize("member", ["plain", "reshaping"])
def test_fast_path_gradients_of_every_kind_equal_the_loops(member: str) -> None:
    """Under autograd the fast path's products make the weight gradients in the weights' own layout (a custom
    autograd.Function); gradients of gradients, input gradients, frozen layers, forward-mode AD and torch.func
    transforms (where plain baddbmm runs) all give what the members give one by one."""
    torch.manual_seed(0)
    layers = [nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2, bias=False)]
    if member == "reshaping":  # the general loop's rows layout
        layers = [*layers[:2], nn.Unflatten(1, (2, 2)), nn.Flatten(), *layers[2:]]
    models = [copy.deepcopy(nn.Sequential(*layers)).double() for _ in range(3)]
    for m in models:
        for p in m.parameters():
            p.data.normal_()
    ens = Ensemble.from_modules(models, strategy="vectorized")
    assert "path=baddbmm" in repr(ens)
    params = list(ens.parameters())
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)

    # Gradients of gradients (a gradient penalty), and the input's gradient through the shared input.
    grads = torch.autograd.grad(ens(x).square().sum(), params, create_graph=True)
    assert all(g.is_contiguous() for g in grads)  # made in the weights' layout
    (sum(g.square().sum() for g in grads) + ens(x).sum()).backward()
    x_grad, x.grad = x.grad, None
    for i, model in enumerate(models):
        member_grads = torch.autograd.grad(model(x).square().sum(), list(model.parameters()), create_graph=True)
        (sum(g.square().sum() for g in member_grads) + model(x).sum()).backward()
        for stacked, p in zip(params, model.parameters()):
            torch.testing.assert_close(stacked.grad[i], p.grad)
    torch.testing.assert_close(x_grad, x.grad)

    # A frozen first layer: no gradient for it, the others as before.
    ens.zero_grad(set_to_none=True)
    first = ens.stacked.get_submodule("0")
    first.requires_grad_(False)
    ens(x.detach()).sum().backward()
    assert first.weight.grad is None and params[-1].grad is not None
    first.requires_grad_(True)

    # Forward-mode AD, with dual tensors (the Function's jvp) and with torch.func.jvp (a transform).
    tangent = torch.randn_like(x)
    with torch.autograd.forward_ad.dual_level(), warnings.catch_warnings():
        # torch's first make_dual loads its jvp decompositions through the deprecated torch.jit.script
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)
        dual = ens(torch.autograd.forward_ad.make_dual(x.detach(), tangent))
        got = torch.autograd.forward_ad.unpack_dual(dual).tangent
    want = torch.stack([torch.func.jvp(m, (x.detach(),), (tangent,))[1] for m in models])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.func.jvp(ens, (x.detach(),), (tangent,))[1], want)

    # torch.func.grad over the ensemble's parameters.
    named = {k: v.detach() for k, v in ens.named_parameters()}
    by_func = torch.func.grad(lambda p: torch.func.functional_call(ens, p, (x.detach(),)).sum())(named)
    ens.zero_grad(set_to_none=True)
    ens(x.detach()).sum().backward()
    for name, p in ens.named_parameters():
        torch.testing.assert_close(by_func[name], p.grad)


def test_fast_path_does_not_modify_the_input() -> None:
    """In-place activations never touch the caller's tensor."""
    ens = Ensemble(lambda: nn.Sequential(nn.ReLU(), nn.Linear(4, 3), nn.ReLU()), 3)
    x = torch.randn(5, 4)
    before = x.clone()
    ens(x)
    assert torch.equal(x, before)


def test_tuple_in_dims_and_keyword_inputs() -> None:
    """in_dims per positional input; keyword inputs are shared by all members."""

    class Affine(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x, shift, *, scale=1.0):
            return self.fc(x) * scale + shift

    torch.manual_seed(0)
    members = [Affine() for _ in range(4)]
    ens = Ensemble.from_modules(members)
    xs, shift = torch.randn(4, 5, 3), torch.randn(2)
    got = ens(xs, shift, in_dims=(0, None), scale=2.0)
    want = torch.stack([m(xs[i], shift, scale=2.0) for i, m in enumerate(members)])
    torch.testing.assert_close(got, want, **TOL)


def test_chunk_size_gives_the_same_result() -> None:
    """chunk_size trades memory for speed, not results."""
    ens = Ensemble.from_modules([m.eval() for m in make_members("mlp", 6)])
    x = torch.randn(5, 12)
    torch.testing.assert_close(ens(x, chunk_size=4), ens(x), **TOL)
    chunked = Ensemble.from_modules([m.eval() for m in make_members("mlp", 6)], chunk_size=2)
    torch.testing.assert_close(chunked(x), ens(x), **TOL)
    assert "chunk_size=2" in repr(chunked)


@pytest.mark.parametrize("kind", ["dropout", "sequential"])
@pytest.mark.parametrize("fast_path", [True, False])
def test_dropout_randomness(kind: str, fast_path: bool) -> None:
    """'different': own masks per member; 'same': one mask for all; 'error': raises."""
    torch.manual_seed(0)
    member = ZOO[kind]()
    ens = Ensemble.from_modules([copy.deepcopy(member) for _ in range(4)], fast_path=fast_path)  # identical members
    x = inputs(kind, 64)
    different = ens(x)
    assert not torch.equal(different[0], different[1])
    same = ens(x, randomness="same")
    assert all(torch.equal(same[0], same[i]) for i in range(4))
    with pytest.raises(RuntimeError, match="randomness"):
        ens(x, randomness="error")
    ens.eval()
    evaluated = ens(x, randomness="error")  # no random numbers in eval mode
    assert all(torch.equal(evaluated[0], evaluated[i]) for i in range(4))


def test_batchnorm_training_updates_each_members_statistics() -> None:
    """In train mode every member updates its own running stats, as separate modules would."""
    models = make_members("batchnorm")
    reference = copy.deepcopy(models)
    ens = Ensemble.from_modules(models)
    xs = torch.randn(3, 4, 10, 12)
    for x in xs:
        out = ens(x, in_dims=0)
        torch.testing.assert_close(out, loop(reference, x, per_member=True), **TOL)
    for i, m in enumerate(reference):
        for name, buf in m.named_buffers():
            torch.testing.assert_close(ens.named_stacked_buffers()[name][i], buf, **TOL)
    assert ens.stacked.bn.num_batches_tracked.tolist() == [3, 3, 3, 3]
    ens.eval()
    [m.eval() for m in reference]
    torch.testing.assert_close(ens(xs[0], in_dims=0), loop(reference, xs[0], per_member=True), **TOL)


# ----------------------------------------------------------------------------- members


@pytest.mark.parametrize("kind", list(ZOO))
def test_getitem_is_an_independent_bit_exact_member(kind: str) -> None:
    """ens[i] has the member class, the exact values, the mode, and no link to the ensemble."""
    models = make_members(kind)
    ens = Ensemble.from_modules(models).eval()
    member = ens[2]
    assert type(member) is type(models[0]) and not member.training
    for (name, p), (_, q) in zip(member.state_dict().items(), models[2].state_dict().items()):
        assert torch.equal(p, q), name
    x = inputs(kind, 7)
    with torch.no_grad():
        torch.testing.assert_close(member(x), ens(x)[2], **TOL)
        next(member.parameters()).add_(1.0)
    assert not torch.equal(next(member.parameters()), ens[2].state_dict()[next(iter(member.state_dict()))])
    assert torch.equal(ens[-1].state_dict()[next(iter(member.state_dict()))],
                       ens[3].state_dict()[next(iter(member.state_dict()))])  # fmt: skip


def test_index_errors() -> None:
    """Out-of-range and non-integer indices raise IndexError / TypeError; an empty slice raises."""
    ens = Ensemble(MLP, 3)
    with pytest.raises(IndexError, match="member index 3 is out of range for 3 members"):
        ens[3]
    with pytest.raises(TypeError):
        ens["0"]
    with pytest.raises(EnsembleError, match="selects no members"):
        ens[5:]


def test_slicing_gives_a_smaller_ensemble() -> None:
    """ens[a:b] is a new Ensemble of copies of those members."""
    ens = Ensemble(MLP, 5)
    part = ens[1:4]
    assert isinstance(part, Ensemble) and len(part) == 3
    assert torch.equal(part.stacked.fc1.weight, ens.stacked.fc1.weight[1:4])
    assert part.stacked.fc1.weight.data_ptr() != ens.stacked.fc1.weight.data_ptr()


@pytest.mark.parametrize("kind", list(ZOO))
def test_unstack_then_from_modules_round_trips_exactly(kind: str) -> None:
    """Ensemble.from_modules(ens.unstack()) reproduces every stacked tensor bit for bit."""
    torch.manual_seed(3)
    ens = Ensemble(ZOO[kind], 5)
    again = Ensemble.from_modules(ens.unstack())
    a, b = ens.state_dict(), again.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert len(list(ens)) == 5


def test_tied_weights_stay_tied_in_members() -> None:
    """A member whose parameters are shared keeps them shared after ens[i]."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(4, 4, bias=False)
            self.dec = nn.Linear(4, 4, bias=False)
            self.dec.weight = self.enc.weight

        def forward(self, x):
            return self.dec(torch.tanh(self.enc(x)))

    torch.manual_seed(0)
    models = [Tied() for _ in range(3)]
    ens = Ensemble.from_modules(models)
    member = ens[1]
    assert member.enc.weight is member.dec.weight
    x = torch.randn(2, 4)
    torch.testing.assert_close(ens(x)[1], models[1](x), **TOL)


# ----------------------------------------------------------------------------- module protocol


def test_state_dict_save_load_round_trip() -> None:
    """state_dict -> torch.save -> torch.load(weights_only=True) -> load_state_dict restores the ensemble."""
    torch.manual_seed(0)
    ens = Ensemble(WithBatchNorm, 4)
    ens(torch.randn(4, 8, 12), in_dims=0)  # move the BatchNorm statistics
    buffer = io.BytesIO()
    torch.save(ens.state_dict(), buffer)
    buffer.seek(0)
    other = Ensemble(WithBatchNorm, 4)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    a, b = ens.state_dict(), other.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "stacked.bn.running_mean" in a


def test_load_state_dict_rejects_wrong_member_count_and_shapes() -> None:
    """A checkpoint of another size or architecture is refused before anything is copied."""
    ens = Ensemble(MLP, 4)
    before = ens.stacked.fc1.weight.detach().clone()
    with pytest.raises(
        EnsembleError, match=r"'stacked.fc1.weight' holds 3 members in the checkpoint, but this ensemble has 4"
    ):
        ens.load_state_dict(Ensemble(MLP, 3).state_dict())
    with pytest.raises(EnsembleError, match=r"'stacked.fc1.weight' has member shape \[16, 10\]"):
        ens.load_state_dict(Ensemble(lambda: MLP(in_features=10), 4).state_dict())
    with pytest.raises(EnsembleError, match=r"missing: \['stacked.fc2.bias'\]"):
        state = Ensemble(MLP, 4).state_dict()
        del state["stacked.fc2.bias"]
        ens.load_state_dict(state)
    assert torch.equal(ens.stacked.fc1.weight, before)


def test_to_train_eval_print_and_copies() -> None:
    """.to(dtype), train()/eval(), print(ens), deepcopy and pickle behave as for any module."""
    ens = Ensemble(WithBatchNorm, 3)
    ens.to(torch.float64)
    assert ens(torch.randn(5, 12, dtype=torch.float64)).dtype == torch.float64
    ens.eval()
    assert not ens.training and not ens._template.training and not ens[0].training
    ens.train()
    assert ens[0].training
    text = repr(ens)
    assert "num_members=3, member=WithBatchNorm" in text and "weight: [3, 8, 12]" in text
    ens(torch.randn(5, 12, dtype=torch.float64))  # fills the vmap cache
    clone = copy.deepcopy(ens)
    restored = pickle.loads(pickle.dumps(ens))
    x = torch.randn(5, 12, dtype=torch.float64)
    for other in (clone, restored):
        other.eval(), ens.eval()
        torch.testing.assert_close(other(x), ens(x))
        with torch.no_grad():
            other.stacked.fc.weight.add_(1)
        assert not torch.equal(other(x), ens(x))


# ----------------------------------------------------------------------------- training


def _train(models_or_ens, optimizer_factory, xs, targets, steps, ensemble: bool):
    if ensemble:
        ens = models_or_ens
        opt = optimizer_factory(ens.parameters())
        for _ in range(steps):
            opt.zero_grad()
            logits = ens(xs, in_dims=0)
            per_member = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
            ensemble_loss(per_member.view(len(ens), -1)).backward()
            opt.step()
        return ens.unstack()
    opts = [optimizer_factory(m.parameters()) for m in models_or_ens]
    for _ in range(steps):
        for i, (m, opt) in enumerate(zip(models_or_ens, opts)):
            opt.zero_grad()
            F.cross_entropy(m(xs[i]), targets[i]).backward()
            opt.step()
    return models_or_ens


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adam-fused": lambda p: torch.optim.Adam(p, lr=0.01, fused=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("kind", ["mlp", "sequential", "batchnorm"])
def test_training_equals_training_each_member_alone(optimizer: str, kind: str) -> None:
    """Summed per-member mean losses + one optimizer == each member trained alone, for 5 steps."""
    models = make_members(kind)
    if kind == "sequential":
        for m in models:
            m[2].p = 0.0  # dropout masks are random; the equivalence is about the arithmetic
    ensemble = Ensemble.from_modules(copy.deepcopy(models))
    initial = copy.deepcopy(models[0]).state_dict()
    xs, targets = torch.randn(4, 16, 12), torch.randint(0, 5, (4, 16))
    trained_alone = _train(models, OPTIMIZERS[optimizer], xs, targets, 5, ensemble=False)
    trained_together = _train(ensemble, OPTIMIZERS[optimizer], xs, targets, 5, ensemble=True)
    for alone, together in zip(trained_alone, trained_together):
        for (name, a), (_, b) in zip(alone.state_dict().items(), together.state_dict().items()):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    moved = [k for k, v in trained_alone[0].state_dict().items() if not torch.equal(v, initial[k])]
    assert moved  # the comparison is not between untrained copies


def test_gradient_norm_clipping_on_stacked_tensors_breaks_the_equivalence() -> None:
    """Documented limit: clipping the stacked gradient mixes members (here: it changes the result)."""
    models = make_members("mlp")
    ens = Ensemble.from_modules(copy.deepcopy(models))
    xs, targets = torch.randn(4, 16, 12) * 10, torch.randint(0, 5, (4, 16))
    logits = ens(xs, in_dims=0)
    ensemble_loss(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(4, -1)).backward()
    joint = ens.stacked.fc1.weight.grad.clone()
    torch.nn.utils.clip_grad_norm_(ens.parameters(), max_norm=0.1)
    per_member_norms = joint.flatten(1).norm(dim=1)
    clipped = ens.stacked.fc1.weight.grad
    # one global scale for all members: ratios between members are unchanged, so no member
    # is clipped to its own norm as separate clipping would do
    torch.testing.assert_close(clipped.flatten(1).norm(dim=1) / per_member_norms,
                               torch.full((4,), float(clipped.norm() / joint.norm())))  # fmt: skip


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("models", "match"),
    [
        ([], r"Ensemble.from_modules: got an empty list of models"),
        (nn.Linear(2, 2), r"got a single Linear, not a list"),
        ([nn.Linear(2, 2), {"weight": 1}], r"member 1 is a dict, not an nn.Module"),
        ([nn.Linear(2, 2), MLP()], r"member 1 is a MLP, but member 0 is a Linear"),
        (
            [MLP(), MLP(hidden=8)],
            r"parameter 'fc1.weight' of member 1 has shape \[8, 12\], but member 0's has \[16, 12\]",
        ),
        (
            [MLP(), MLP().double()],
            r"parameter 'fc1.weight' of member 1 has dtype torch.float64.*model.to\(torch.float32\)",
        ),
        ([MLP(), MLP().to("meta")], r"parameter 'fc1.weight' of member 1 has device meta.*model.to\('cpu'\)"),
        ([MLP(), MLP().eval()], r"member 1 is in eval mode but member 0 is in train mode"),
        ([MLP(), MLP().requires_grad_(False)], r"parameter 'fc1.weight' of member 1 has requires_grad=False"),
        ([nn.BatchNorm1d(3), nn.BatchNorm1d(3, track_running_stats=False)], r"member 1 has different buffers"),
    ],
)
def test_from_modules_errors_name_the_member_and_tensor(models, match: str) -> None:
    """Each kind of mismatch raises EnsembleError naming the member index and the parameter or buffer."""
    with pytest.raises(EnsembleError, match=match):
        Ensemble.from_modules(models)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((MLP, 0), "num_members must be at least 1, got 0"),
        ((MLP, 2.0), "num_members must be an int, got float"),
        ((MLP(), 2), "module instance, but it must be a factory"),
        ((3, 2), "factory must be callable"),
        ((lambda: 3, 2), r"factory\(\) returned a int, not an nn.Module"),
        ((nn.ReLU, 2), "ReLU has no parameters or buffers"),
    ],
)
def test_constructor_errors(args, match: str) -> None:
    """Bad constructor arguments raise EnsembleError with the fix."""
    with pytest.raises(EnsembleError, match=match):
        Ensemble(*args)


@pytest.mark.parametrize("fast_path", [True, False])
def test_wrong_member_count_in_input_is_explained(fast_path: bool) -> None:
    """in_dims=0 with the wrong leading size names the sizes, not vmap internals."""
    ens = Ensemble(sequential_mlp, 4, fast_path=fast_path)
    with pytest.raises(EnsembleError, match=r"input 0 has 3 entries along dimension 0 .* one per member: 4"):
        ens(torch.randn(3, 5, 12), in_dims=0)
    with pytest.raises(EnsembleError, match="no dimension 0"):
        ens(torch.tensor(1.0), in_dims=0)
    with pytest.raises(EnsembleError, match="in_dims has 2 entries but 1 positional"):
        ens(torch.randn(4, 5, 12), in_dims=(0, None))


def test_wrong_feature_count_on_the_fast_path_names_the_layer() -> None:
    """A wrong input width names the layer and the expected width."""
    ens = Ensemble(sequential_mlp, 2)
    with pytest.raises(EnsembleError, match=r"layer '0' expects 12 input features, got 11"):
        ens(torch.randn(5, 11))
    with pytest.raises(EnsembleError, match=r"layer '0' expects 12 input features, got 11"):
        ens(torch.randn(2, 5, 11), in_dims=0)
    with pytest.raises(EnsembleError, match=r"layer '0' expects 12 input features, got 11"):
        ens(torch.randn(3, 5, 11))  # a shared input with more dimensions: the general loop


def test_initializer_that_vmap_cannot_batch_builds_members_by_separate_calls() -> None:
    """A reset_parameters() with data-dependent control flow gives the members of separate factory() calls."""

    class Odd(nn.Linear):
        def reset_parameters(self):
            super().reset_parameters()
            with torch.no_grad():
                if self.weight.sum() > 0:  # data-dependent control flow: not replayable under vmap
                    self.weight.neg_()

    torch.manual_seed(3)
    ens = Ensemble(lambda: Odd(2, 2), 3)
    torch.manual_seed(3)
    expected = [Odd(2, 2) for _ in range(3)]
    for i, member in enumerate(expected):
        assert torch.equal(ens.stacked.weight[i], member.weight) and member.weight.sum() <= 0


# ----------------------------------------------------------------------------- properties


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    members=st.integers(1, 6),
    batch=st.integers(1, 5),
    width=st.integers(1, 9),
    per_member=st.booleans(),
    fast=st.booleans(),
)
def test_property_ensemble_equals_loop_and_round_trips(members, batch, width, per_member, fast) -> None:
    """For any sizes: the ensemble equals the loop, and unstack/from_modules is exact."""
    torch.manual_seed(members * 100 + width)
    factory = lambda: nn.Sequential(nn.Linear(width, width + 1), nn.ReLU(), nn.Linear(width + 1, 3))  # noqa: E731
    ens = Ensemble(factory, members, fast_path=fast)
    models = ens.unstack()
    x = torch.randn(members, batch, width) if per_member else torch.randn(batch, width)
    with torch.no_grad():
        torch.testing.assert_close(ens(x, in_dims=0 if per_member else None), loop(models, x, per_member), **TOL)
    again = Ensemble.from_modules(models)
    assert all(torch.equal(a, b) for a, b in zip(ens.state_dict().values(), again.state_dict().values()))


# ----------------------------------------------------------------------------- torch.compile


@pytest.mark.slow
def test_torch_compile_of_an_ensemble_matches_eager() -> None:
    """torch.compile(ens) gives the eager results (fast path, shared and per-member input)."""
    ens = Ensemble(lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), 4).eval()
    compiled = torch.compile(ens)
    x, xs = torch.randn(5, 6), torch.randn(4, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), ens(x), **TOL)
        torch.testing.assert_close(compiled(xs, in_dims=0), ens(xs, in_dims=0), **TOL)
