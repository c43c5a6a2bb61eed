"""Every standard layer family ensembles: outputs, gradients and state equal the loop, vectorized."""

from __future__ import annotations

import copy
import pickle
import warnings
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from ensembling import Ensemble, EnsembleError
from ensembling._layers import rnn_forward
from ensembling._zoo import ARCHITECTURES, Architecture

MEMBERS, BATCH = 3, 4
# float32 on the CPU; the loop may run fused kernels (mkldnn RNNs, the native
# transformer fast path) whose sums are ordered differently from the batched ones.
TOL = {"rtol": 2e-5, "atol": 2e-5}
DETERMINISTIC = [name for name, a in ARCHITECTURES.items() if not a.random_in_training]


def _members(arch: Architecture, train: bool) -> list[nn.Module]:
    torch.manual_seed(0)
    return [arch.factory().train(train) for _ in range(MEMBERS)]


def _inputs(arch: Architecture, per_member: bool) -> tuple[Tensor, ...]:
    return arch.inputs((MEMBERS,) if per_member else (), BATCH, torch.Generator().manual_seed(1))


def _leaves(output: object) -> list[Tensor]:
    return [t for t in tree_flatten(output)[0] if isinstance(t, Tensor)]


def _setup(name: str, train: bool, per_member: bool) -> tuple[list[nn.Module], Ensemble, tuple[Tensor, ...]]:
    """Members of architecture ``name``, their ensemble and a batch of inputs."""
    arch = ARCHITECTURES[name]
    models = _members(arch, train)
    return models, Ensemble.from_modules(models), _inputs(arch, per_member)


def _loop(models: list[nn.Module], args: tuple[Tensor, ...], per_member: bool) -> list[Tensor]:
    """Run each member alone; stack each output leaf along a new member dimension."""
    outputs = [_leaves(m(*(a[i] for a in args) if per_member else args)) for i, m in enumerate(models)]
    return [torch.stack(leaf) for leaf in zip(*outputs)]


@pytest.fixture(autouse=True)
def no_fallback_loops() -> Iterator[None]:
    """vmap warns when it falls back to a per-member loop; here that is a failure."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*atching rule not implemented.*")
        warnings.filterwarnings("error", message=".*performance drop.*")
        yield


@pytest.mark.parametrize("per_member", [False, True], ids=["shared", "per-member"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_forward_equals_the_loop(name: str, train: bool, per_member: bool) -> None:
    """Outputs (every leaf: LSTM states, attention weights) and updated buffers equal the loop's."""
    models, ens, args = _setup(name, train, per_member)
    with torch.no_grad():  # lets the loop take the fused inference kernels
        expected = _loop(models, args, per_member)
        got = _leaves(ens(*args, in_dims=0 if per_member else None))
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **TOL)
    for key, stacked in ens.named_stacked_buffers().items():  # BatchNorm running statistics
        torch.testing.assert_close(stacked, torch.stack([m.get_buffer(key) for m in models]), **TOL)


@pytest.mark.parametrize("per_member", [False, True], ids=["shared", "per-member"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_gradients_equal_the_loop(name: str, train: bool, per_member: bool) -> None:
    """Each member's parameter gradients equal those of the member trained alone."""
    models, ens, args = _setup(name, train, per_member)
    outputs = _leaves(ens(*args, in_dims=0 if per_member else None))
    gen = torch.Generator().manual_seed(2)
    weights = [torch.randn(o.shape, generator=gen) for o in outputs]  # a loss that mixes every output
    sum((o * w).sum() for o, w in zip(outputs, weights) if o.is_floating_point()).backward()
    for i, model in enumerate(models):
        member_args = tuple(a[i] for a in args) if per_member else args
        member_out = _leaves(model(*member_args))
        sum((o * w[i]).sum() for o, w in zip(member_out, weights) if o.is_floating_point()).backward()
    for key, stacked in ens.named_stacked_parameters().items():
        expected = torch.stack([m.get_parameter(key).grad for m in models])
        torch.testing.assert_close(stacked.grad, expected, **TOL, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_vectorized_initialization_gives_distinct_finite_members(name: str) -> None:
    """Ensemble(factory, n) draws each member on its own; nothing is left uninitialized."""
    torch.manual_seed(0)
    ens = Ensemble(ARCHITECTURES[name].factory, MEMBERS)
    for key, stacked in ens.named_stacked_parameters().items():
        assert torch.isfinite(stacked).all(), key
        if stacked[0].numel() > 1 and stacked.std() > 0:
            assert not torch.equal(stacked[0], stacked[1]), f"{key} is the same in members 0 and 1"


@pytest.mark.parametrize("name", ["dropout", "lstm_dropout"])
def test_training_mode_randomness_is_per_member_and_correctly_scaled(name: str) -> None:
    """With dropout active, members draw their own masks; the loss of a masked unit is exact."""
    arch = ARCHITECTURES[name]
    ens = Ensemble.from_modules(_members(arch, train=True))
    (x,) = _inputs(arch, per_member=False)
    with torch.no_grad():
        torch.manual_seed(3)
        out = _leaves(ens(x))[0]
        assert not torch.equal(out[0], out[1])  # different masks
        again = _leaves(ens(x, randomness="same"))[0]
        ens.eval()
        clean = _leaves(ens(x))[0]
    assert not torch.allclose(out, clean)
    if name == "dropout":  # Linear -> Dropout -> Linear: the mean effect cancels out over many draws
        torch.manual_seed(4)
        ens.train()
        with torch.no_grad():
            mean = torch.stack([ens(x) for _ in range(400)]).mean(0)
        torch.testing.assert_close(mean, clean, rtol=0.15, atol=0.15)
    assert again.shape == out.shape


def test_rnn_forward_matches_torch_for_initial_states_and_unbatched_input() -> None:
    """The unrolled recurrence equals torch's kernels with hx given, and for [time, features] input."""
    torch.manual_seed(0)
    for module in (
        nn.LSTM(3, 5, num_layers=2, proj_size=2, bidirectional=True),
        nn.GRU(3, 5, num_layers=2),
        nn.RNN(3, 5, nonlinearity="relu"),
    ):
        x = torch.randn(7, 4, 3)
        out, state = module(x)
        torch.testing.assert_close(rnn_forward(module, x, state), module(x, state), **TOL)
        torch.testing.assert_close(rnn_forward(module, x[:, 0]), module(x[:, 0]), **TOL)
        assert out.shape[0] == 7


def test_lstm_with_initial_state_per_member() -> None:
    """Each member gets its own (h0, c0): in_dims apply inside tuples too."""
    arch = ARCHITECTURES["lstm_2layers"]
    models = _members(arch, train=False)
    ens = Ensemble.from_modules(models)
    x = torch.randn(MEMBERS, BATCH, 5, 4)
    h0, c0 = torch.randn(MEMBERS, 2, BATCH, 6), torch.randn(MEMBERS, 2, BATCH, 6)
    out, (h, c) = ens(x, (h0, c0), in_dims=0)
    for i, m in enumerate(models):
        ref_out, (ref_h, ref_c) = m(x[i], (h0[i], c0[i]))
        torch.testing.assert_close(out[i], ref_out, **TOL)
        torch.testing.assert_close(c[i], ref_c, **TOL)


def test_transformer_encoder_with_masks() -> None:
    """Causal and padding masks (shared keyword inputs) give the loop's result at every unpadded position."""
    models = _members(ARCHITECTURES["transformer_encoder_layer"], train=False)
    ens = Ensemble.from_modules(models)
    x = torch.randn(BATCH, 5, 8)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    padding = torch.zeros(BATCH, 5)
    padding[0, -2:] = float("-inf")
    with torch.no_grad():
        got = ens(x, src_mask=causal, src_key_padding_mask=padding)
        expected = torch.stack([m(x, src_mask=causal, src_key_padding_mask=padding) for m in models])
    torch.testing.assert_close(got, expected, **TOL)


def test_attention_settings_are_restored() -> None:
    """The global attention switches Ensemble turns off for a call are back afterwards."""
    before = (torch.backends.mha.get_fastpath_enabled(), torch.backends.cuda.flash_sdp_enabled())
    ens = Ensemble.from_modules(_members(ARCHITECTURES["transformer_encoder_layer"], train=False))
    ens(torch.randn(2, 5, 8))
    with pytest.raises(EnsembleError):
        ens(torch.randn(2, 5, 8), in_dims=0)
    assert (torch.backends.mha.get_fastpath_enabled(), torch.backends.cuda.flash_sdp_enabled()) == before


def test_packed_sequences_are_refused_with_the_fix() -> None:
    """A PackedSequence cannot be split across members: EnsembleError says to pass the padded tensor."""
    ens = Ensemble(lambda: nn.GRU(3, 4), 2)
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(5, 2, 3), torch.tensor([5, 3]))
    with pytest.raises(EnsembleError, match="PackedSequence.*padded tensor"):
        ens(packed)


def test_an_operator_vmap_cannot_batch_is_reported_with_the_layer() -> None:
    """A subclass with its own forward calling the fused kernel: EnsembleError names the layer and the way out."""

    class MyLSTM(nn.LSTM):
        def forward(self, x: Tensor) -> Tensor:  # calls torch's fused kernel, which vmap cannot batch
            return super().forward(x)[0]

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = MyLSTM(3, 4)

        def forward(self, x: Tensor) -> Tensor:
            return self.rnn(x)

    ens = Ensemble(Model, 2)
    with pytest.raises(EnsembleError, match=r"aten::lstm.*rnn \(MyLSTM\).*unstack"):
        ens(torch.randn(5, 2, 3))


def test_members_and_copies_keep_torchs_own_layers() -> None:
    """ens[i], deepcopy and pickle work; members are plain modules running torch's own kernels."""
    models = _members(ARCHITECTURES["lstm_2layers"], train=False)
    ens = Ensemble.from_modules(models)
    member = ens[1]
    assert type(member) is nn.LSTM and type(ens._runner) is not nn.LSTM
    x = torch.randn(BATCH, 5, 4)
    for clone in (copy.deepcopy(ens), pickle.loads(pickle.dumps(ens))):
        torch.testing.assert_close(clone(x)[0], ens(x)[0])
    torch.testing.assert_close(member(x)[0], models[1](x)[0])


# ------------------------------------------------------------------ inputs the torch.func APIs accept


def test_from_modules_accepts_a_module_list_and_a_generator() -> None:
    """An nn.ModuleList and a generator of modules stack like a list (torch.func accepts both)."""
    torch.manual_seed(0)
    models = [nn.Linear(3, 2) for _ in range(3)]
    reference = Ensemble.from_modules(models)
    for source in (nn.ModuleList(models), (m for m in models), tuple(models)):
        ens = Ensemble.from_modules(source)
        assert len(ens) == 3 and torch.equal(ens.stacked.weight, reference.stacked.weight)
    with pytest.raises(EnsembleError, match="empty"):
        Ensemble.from_modules(m for m in [])
    with pytest.raises(EnsembleError, match="single Sequential"):
        Ensemble.from_modules(nn.Sequential(nn.Linear(3, 2)))
    with pytest.raises(EnsembleError, match=r"ModuleDict.*list\(d.values\(\)\)"):
        Ensemble.from_modules(nn.ModuleDict({"a": nn.Linear(3, 2)}))


def test_legacy_api_accepts_a_module_list_and_a_generator() -> None:
    """combine_state_for_ensemble takes an nn.ModuleList and a generator too."""
    from ensembling.legacy import combine_state_for_ensemble

    models = [nn.Linear(3, 2) for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for source in (nn.ModuleList(models), iter(models)):
            _, params, _ = combine_state_for_ensemble(source)
            assert params[0].shape == (3, 2, 3)


def test_an_initializer_that_writes_nothing_never_leaves_uninitialized_memory() -> None:
    """A layer whose later reset_parameters() writes nothing: members drawn as factory() draws them, never garbage."""

    class Once(nn.Linear):
        """Initializes in its constructor only; later resets write nothing."""

        def reset_parameters(self) -> None:
            if not getattr(self, "_done", False):
                super().reset_parameters()
                self._done = True

    Once.__module__ = "torch.nn.modules.linear"  # pose as a torch.nn layer
    for seed in (None, 5):
        torch.manual_seed(0)
        ens = Ensemble(lambda: Once(3, 4), 4, seed=seed)
        weight = ens.stacked.weight
        assert torch.isfinite(weight).all() and weight.abs().max() <= 1 / 3**0.5
        assert not any(torch.equal(weight[0], weight[i]) for i in range(1, 4))  # independent draws


def test_fast_layers_recognized_in_custom_classes_match_vmap() -> None:
    """A custom MLP class (forward with F.relu / torch.tanh) gets the batched-product path, with vmap's results."""

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)
            self.drop = nn.Dropout(0.5)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc3(torch.tanh(self.drop(F.relu(self.fc2(F.gelu(self.fc1(x)))))))

    torch.manual_seed(0)
    fast = Ensemble(MLP, 4).eval()
    slow = copy.deepcopy(fast)
    slow.fast_path = False
    assert "path=baddbmm" in repr(fast) and "path=vmap" in repr(slow)
    for args, in_dims in (((torch.randn(5, 6),), None), ((torch.randn(4, 5, 6),), 0)):
        out = fast(*args, in_dims=in_dims)
        ref = slow(*args, in_dims=in_dims)
        torch.testing.assert_close(out, ref, **TOL)
        out.square().sum().backward()
        ref.square().sum().backward()
    for (name, a), (_, b) in zip(fast.named_parameters(), slow.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, **TOL, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------ torch.compile


class _CustomMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x)))


COMPILED = {
    "custom_mlp": (_CustomMLP, lambda: torch.randn(BATCH, 6)),
    "batchnorm2d_cnn": (ARCHITECTURES["batchnorm2d_cnn"].factory, lambda: torch.randn(BATCH, 2, 6, 6)),
    "lstm_forecaster": (ARCHITECTURES["lstm_forecaster"].factory, lambda: torch.randn(BATCH, 8, 1)),
    "transformer_classifier": (
        ARCHITECTURES["transformer_classifier"].factory,
        lambda: torch.randint(0, 20, (BATCH, 6)),
    ),
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(COMPILED))
def test_torch_compile_fullgraph_compiled_once(name: str, train: bool) -> None:
    """torch.compile(ens, fullgraph=True): no graph break, one compilation for repeated calls, eager's results."""
    from torch._dynamo.testing import CompileCounter

    factory, make_input = COMPILED[name]
    torch._dynamo.reset()
    torch.manual_seed(0)
    ens = Ensemble(factory, MEMBERS).train(train)
    eager = copy.deepcopy(ens)
    counter = CompileCounter()  # counts compilations, runs the graphs eagerly: fast
    compiled = torch.compile(ens, backend=counter, fullgraph=True)
    for _ in range(3):
        x = make_input()
        out, ref = compiled(x), eager(x)
        torch.testing.assert_close(out, ref, **TOL)
        out.square().sum().backward()
        ref.square().sum().backward()
    assert counter.frame_count == 1
    for (key, a), (_, b) in zip(ens.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, **TOL, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("name", list(COMPILED))
def test_torch_compile_with_dynamic_shapes(name: str) -> None:
    """A compiled ensemble with a symbolic batch size (dynamic=True, as dynamo picks after a shape change).

    It stays fullgraph and correct.
    """
    factory, _ = COMPILED[name]
    torch._dynamo.reset()
    torch.manual_seed(0)
    ens = Ensemble(factory, MEMBERS).eval()
    compiled = torch.compile(ens, backend="eager", fullgraph=True, dynamic=True)
    for batch in (4, 7):
        x = {
            "custom_mlp": lambda: torch.randn(batch, 6),
            "batchnorm2d_cnn": lambda: torch.randn(batch, 2, 6, 6),
            "lstm_forecaster": lambda: torch.randn(batch, 8, 1),
            "transformer_classifier": lambda: torch.randint(0, 20, (batch, 6)),
        }[name]()
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), ens(x), **TOL)


def test_a_forward_that_branches_on_the_mode_is_not_taken_for_a_chain() -> None:
    """A forward whose steps depend on self.training runs under vmap, and equals the loop in both modes."""

    class ModeDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: Tensor) -> Tensor:
            x = self.fc(x)
            return torch.sigmoid(x) if not self.training else x  # traced in one mode, this is a chain

    torch.manual_seed(0)
    ens = Ensemble(ModeDependent, MEMBERS)
    assert "path=vmap" in repr(ens)
    x = torch.randn(BATCH, 4)
    for train in (True, False):
        members = ens.train(train).unstack()
        torch.testing.assert_close(ens(x), torch.stack([m(x) for m in members]), **TOL)
