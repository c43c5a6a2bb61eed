"""ensembling._strategy and _planner: every strategy gives the loop's answer; auto measures per signature, visibly."""

from __future__ import annotations

import copy
from collections import namedtuple
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from ensembling import Ensemble, EnsembleError
from ensembling._strategy import stack_outputs
from ensembling._zoo import ARCHITECTURES

MEMBERS, BATCH = 3, 4
TOL = {"rtol": 2e-5, "atol": 2e-5}
DETERMINISTIC = [name for name, a in ARCHITECTURES.items() if not a.random_in_training]


def _leaves(output: object) -> list[Tensor]:
    return [t for t in tree_flatten(output)[0] if isinstance(t, Tensor)]


def _setup(name: str, train: bool, per_member: bool, strategy: str):
    """Members of architecture ``name``, their ensemble under ``strategy`` and a batch of inputs."""
    arch = ARCHITECTURES[name]
    torch.manual_seed(0)
    models = [arch.factory().train(train) for _ in range(MEMBERS)]
    args = arch.inputs((MEMBERS,) if per_member else (), BATCH, torch.Generator().manual_seed(1))
    return models, Ensemble.from_modules(models, strategy=strategy), args


def _member_args(args: tuple[Tensor, ...], i: int, per_member: bool) -> tuple[Tensor, ...]:
    return tuple(a[i] for a in args) if per_member else args


@pytest.mark.parametrize("per_member", [False, True], ids=["shared", "per-member"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_loop_strategy_equals_the_loop(name: str, train: bool, per_member: bool) -> None:
    """strategy='loop': outputs, parameter gradients and updated buffers equal the members run alone."""
    models, ens, args = _setup(name, train, per_member, "loop")
    outputs = _leaves(ens(*args, in_dims=0 if per_member else None))
    gen = torch.Generator().manual_seed(2)
    weights = [torch.randn(o.shape, generator=gen) for o in outputs]
    sum((o * w).sum() for o, w in zip(outputs, weights) if o.is_floating_point()).backward()
    for i, model in enumerate(models):
        expected = _leaves(model(*_member_args(args, i, per_member)))
        for got, want in zip(outputs, expected):
            torch.testing.assert_close(got[i], want, **TOL)
        sum((o * w[i]).sum() for o, w in zip(expected, weights) if o.is_floating_point()).backward()
    for key, stacked in ens.named_stacked_parameters().items():
        if stacked.grad is not None or models[0].get_parameter(key).grad is not None:
            want = torch.stack([m.get_parameter(key).grad for m in models])
            torch.testing.assert_close(stacked.grad, want, **TOL, msg=lambda m: f"{key}: {m}")
    for key, stacked in ens.named_stacked_buffers().items():  # BatchNorm running statistics, in place
        torch.testing.assert_close(stacked, torch.stack([m.get_buffer(key) for m in models]), **TOL)


def test_loop_strategy_gives_one_stack_in_backward() -> None:
    """Each stacked parameter gets its gradient through a single unbind, not one indexing op per member."""
    ens = Ensemble(lambda: nn.GRU(3, 4), 5, strategy="loop")
    out, _ = ens(torch.randn(6, 2, 3))
    seen, stack = set(), [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            stack += [f for f, _ in fn.next_functions]
    readers = [fn for fn in seen if any(type(f).__name__ == "AccumulateGrad" for f, _ in fn.next_functions)]
    assert [type(fn).__name__ for fn in readers] == ["UnbindBackward0"] * len(ens.named_stacked_parameters())


def test_loop_gradients_of_gradients_and_unused_parameters() -> None:
    """create_graph=True gives the loop's gradients of gradients; unused rows get zeros; outside uses add up."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)) for _ in range(3)]
    ens = Ensemble.from_modules(models, strategy="loop")
    x = torch.randn(4, 3)
    grads = torch.autograd.grad(ens(x).square().sum(), list(ens.parameters()), create_graph=True)
    penalty = sum(g.square().sum() for g in grads)
    penalty.backward()
    for i, model in enumerate(models):
        member_grads = torch.autograd.grad(model(x).square().sum(), list(model.parameters()), create_graph=True)
        sum(g.square().sum() for g in member_grads).backward()
        for (key, stacked), p in zip(ens.named_stacked_parameters().items(), model.parameters()):
            torch.testing.assert_close(stacked.grad[i], p.grad, **TOL, msg=lambda m: f"{key}: {m}")
    ens.zero_grad(set_to_none=True)
    ens(x)[:, :, 0].sum().backward()  # the last layer's second row is used by no output
    last = ens.stacked.get_parameter("2.weight").grad
    assert torch.all(last[:, 1] == 0) and torch.all(last[:, 0] != 0)
    ens.zero_grad(set_to_none=True)
    (ens(x).sum() * 0 + ens.stacked.get_parameter("0.bias").sum()).backward()
    torch.testing.assert_close(ens.stacked.get_parameter("0.bias").grad, torch.ones(3, 5))


def test_auto_measures_then_caches_one_choice_per_signature() -> None:
    """The first calls of a signature alternate strategies; then one choice is kept, shown by plan() and the repr."""
    torch.manual_seed(0)
    ens = Ensemble(lambda: nn.LSTM(3, 5, batch_first=True), 4)
    models = ens.unstack()
    x = torch.randn(2, 7, 3)
    with torch.no_grad():
        for _ in range(12):
            torch.testing.assert_close(ens(x)[0], torch.stack([m(x)[0] for m in models]), **TOL)
    (plan,) = ens._planner.plans.values()
    assert plan.choice in ("vectorized", "loop")
    assert len(plan.times["vectorized"]) == len(plan.times["loop"]) == 5  # 1 warm-up + 4 timed each
    text = ens.plan()
    assert "([2, 7, 3] float32 cpu (shared)), train, no grad -> " + plan.choice in text
    assert f"plan: {plan.choice} for 1 input signature" in repr(ens)
    with torch.no_grad():
        ens(torch.randn(3, 7, 3))  # a new shape: a new signature, measured on its own
    assert len(ens._planner.plans) == 2 and "measuring" in ens.plan()


def test_auto_times_training_calls_through_the_backward_pass() -> None:
    """With autograd recording, a call is timed until the next call, so backward and the step count."""
    ens = Ensemble(lambda: nn.GRU(3, 4), 3)
    x = torch.randn(5, 2, 3)
    for _ in range(11):
        ens(x)[0].sum().backward()
    (plan,) = ens._planner.plans.values()
    assert plan.choice in ("vectorized", "loop")
    assert all(t > 0 for ts in plan.times.values() for t in ts)


class _Clock:
    """A fake ``time.perf_counter``: each strategy's call advances it by that strategy's current cost."""

    def __init__(self) -> None:
        self.now, self.cost, self.ran = 0.0, {"vectorized": 1.0, "loop": 1.0}, []

    def __call__(self) -> float:
        return self.now

    def runner(self, name: str):
        def run() -> Tensor:
            self.now += self.cost[name]
            self.ran.append(name)
            return torch.zeros(2)

        return run


def _auto_calls(monkeypatch: pytest.MonkeyPatch) -> tuple[_Clock, Any, Callable[[], None]]:
    """A planner on a fake clock, and a call of one input signature through it (strategy='auto')."""
    import ensembling._planner as planning
    import ensembling._strategy as module

    clock = _Clock()
    monkeypatch.setattr(planning.time, "perf_counter", clock)
    planner, x = planning.Planner(), torch.zeros(3)

    def call() -> None:
        vectorized, loop = clock.runner("vectorized"), clock.runner("loop")
        module.run_members(planner, "auto", (False, False, None), (x,), {}, (None,), {}, vectorized, loop, x.device)

    return clock, planner, call


def test_auto_measures_a_choice_again_so_a_choice_made_under_load_does_not_stay(monkeypatch) -> None:
    """Measured again after 50, 200, 800, ... steady calls, or later where the candidates measured far apart:
    the choice follows changed conditions, and on steady conditions the other strategy runs a small, shrinking
    share of the calls."""
    clock, planner, call = _auto_calls(monkeypatch)
    clock.cost["loop"] = 3.0  # the first calls: the loop strategy suffers from a burst of load
    for _ in range(10):
        call()
    (plan,) = planner.plans.values()
    assert plan.choice == "vectorized" and clock.ran.count("loop") == 5
    # 3x apart: a check costs 5 loop calls, 10 vectorized calls' worth of extra time, which is 5 % of
    # 200 steady calls: the first check comes after 200 calls, not 50.
    assert plan.recheck_after == 200
    clock.cost.update(vectorized=2.0, loop=1.0)  # the burst is over: the loop is the faster after all
    for _ in range(200):
        call()
    assert clock.ran[-200:] == ["vectorized"] * 200  # steady: the choice runs
    call()
    assert "vectorized, measuring again" in plan.summary()
    for _ in range(9):
        call()
    assert plan.choice == "loop" and plan.previous == "vectorized" and "-> loop (measured:" in plan.summary()
    clock.ran.clear()
    for _ in range(200 + 10 + 800 + 10):  # steady conditions: two more checks, each 5 calls of the slower
        call()
    assert clock.ran.count("vectorized") == 10 and plan.choice == "loop"
    assert plan.recheck_after == 50 * 4**3


def test_auto_measures_a_far_slower_candidate_again_rarely(monkeypatch) -> None:
    """A candidate measured 10x slower is measured again after 900 steady calls (its 5 calls in a check then
    cost 5 % of those calls' time), not after 50, where they would double the average time per call."""
    clock, planner, call = _auto_calls(monkeypatch)
    clock.cost["loop"] = 10.0
    for _ in range(10):
        call()
    (plan,) = planner.plans.values()
    assert plan.choice == "vectorized" and plan.recheck_after == 900
    clock.ran.clear()
    start = clock.now
    for _ in range(900 + 10):  # 900 steady calls, then the check
        call()
    assert clock.ran[:900] == ["vectorized"] * 900 and clock.ran.count("loop") == 5
    extra = clock.now - start - 910 * clock.cost["vectorized"]  # over running the choice every time
    assert extra <= 0.05 * 900 * clock.cost["vectorized"]
    assert plan.choice == "vectorized" and plan.recheck_after == 900  # max(200, 900)


@pytest.mark.parametrize("strategy", ["vectorized", "loop"])
def test_forced_strategies_are_honoured(strategy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A forced strategy runs on every call (no measuring), also for a Linear chain when it is 'loop'."""
    calls: list[str] = []
    import ensembling._strategy as module

    original = module.loop_forward
    monkeypatch.setattr(module, "loop_forward", lambda *a: calls.append("loop") or original(*a))
    ens = Ensemble(lambda: nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)), 2, strategy=strategy)
    for _ in range(10):
        ens(torch.randn(5, 3))
    assert calls == (["loop"] * 10 if strategy == "loop" else [])
    assert f"strategy={strategy!r}" in repr(ens) and f"{strategy} (forced)" in ens.plan()
    assert ens.__dict__.get("_planner") is None or not ens._planner.plans
    chain = Ensemble(lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU()), 2, strategy=strategy)
    chain(torch.randn(5, 3))
    assert ("path=baddbmm" in repr(chain)) is (strategy == "vectorized")


def test_strategy_is_validated_and_kept_by_the_other_setters() -> None:
    """A bad strategy is an EnsembleError naming the choices; changing randomness keeps the strategy."""
    with pytest.raises(EnsembleError, match="strategy must be one of 'auto', 'vectorized', 'loop'; got 'fast'"):
        Ensemble(lambda: nn.Linear(2, 2), 2, strategy="fast")
    ens = Ensemble(lambda: nn.Linear(2, 2), 2, strategy="loop")
    ens.randomness = "same"
    assert ens.strategy == "loop"
    with pytest.raises(EnsembleError, match="strategy='loop'.*randomness='same'"):
        ens(torch.randn(3, 2))
    ens.strategy = "auto"
    assert ens(torch.randn(3, 2)).shape == (2, 3, 2)


@pytest.mark.slow
def test_compiled_auto_ensemble_never_measures_and_matches_eager() -> None:
    """torch.compile(fullgraph=True) of an auto ensemble runs the vectorized path and gives the eager answer."""
    ens = Ensemble(lambda: nn.GRU(3, 4, batch_first=True), 3).eval()
    x = torch.randn(2, 5, 3)
    compiled = torch.compile(ens, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x)[0], ens(x)[0], **TOL)
    assert len(ens._planner.plans) == 1  # only the eager call planned


@pytest.mark.slow
def test_compiled_loop_ensemble_works_from_its_first_call() -> None:
    """torch.compile(fullgraph=True) of a strategy='loop' ensemble, never called eagerly, gives the eager answer;
    also when the strategy is switched to 'loop' after construction."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3)
    for switched in (False, True):
        member = lambda: nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh())  # noqa: E731
        ens = Ensemble(member, 3, strategy="auto" if switched else "loop").eval()
        if switched:
            ens.strategy = "loop"
        assert "_shells" in ens.__dict__  # made ahead of the first call
        compiled = torch.compile(ens, fullgraph=True)
        with torch.no_grad():
            got = compiled(x)
        torch.testing.assert_close(got, torch.stack([m(x) for m in ens.unstack()]), **TOL)
    rnn = Ensemble(lambda: nn.GRU(3, 4, batch_first=True), 3, strategy="loop")
    # fullgraph: dynamo reports the EnsembleError raised while tracing, with its text (the way out).
    with pytest.raises(Exception, match=r"strategy='loop' runs the member's own nn.GRU.*strategy='auto'"):
        torch.compile(rnn, fullgraph=True)(x)


def test_fast_path_training_layout_is_measured_and_gives_the_same_gradients() -> None:
    """Under autograd the baddbmm path times both activation layouts, keeps one, and equals the vmap path."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)) for _ in range(4)]
    fast, slow = Ensemble.from_modules(models), Ensemble.from_modules(models, fast_path=False)
    x = torch.randn(5, 6)
    for _ in range(11):
        fast.zero_grad(), slow.zero_grad()
        a, b = fast(x), slow(x)
        torch.testing.assert_close(a, b, **TOL)
        a.square().sum().backward()
        b.square().sum().backward()
        for p, q in zip(fast.parameters(), slow.parameters()):
            torch.testing.assert_close(p.grad, q.grad, **TOL)
    (plan,) = [p for p in fast._planner.plans.values() if p.description.startswith("baddbmm layout")]
    assert plan.choice in ("rows", "transposed") and "baddbmm layout" in fast.plan()


def test_loop_strategy_no_grad_views_follow_every_change_of_the_stacked_tensors() -> None:
    """Without autograd the loop keeps its member views between calls; every way the stacked
    tensors change (in place, .to(), a loaded checkpoint, assign=True, a new .data) still reaches the next call."""
    torch.manual_seed(0)
    ens = Ensemble(lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), 3, strategy="loop").eval()
    x = torch.randn(5, 3)

    def loop_answer() -> Tensor:
        return torch.stack([m(x.to(m[0].weight.dtype)) for m in ens.unstack()])

    with torch.no_grad():
        torch.testing.assert_close(ens(x), loop_answer())
        ens.stacked.get_submodule("0").weight.mul_(2)  # in place (an optimizer step)
        torch.testing.assert_close(ens(x), loop_answer())
        ens.double()  # .to(): the same Parameter objects, new data
        assert ens(x.double()).dtype == torch.float64
        torch.testing.assert_close(ens(x.double()), loop_answer())
        state = {k: v + 1 for k, v in ens.state_dict().items()}
        ens.load_state_dict(state)  # copied in place
        torch.testing.assert_close(ens(x.double()), loop_answer())
        ens.load_state_dict({k: v * 3 for k, v in state.items()}, assign=True)  # new tensor objects
        torch.testing.assert_close(ens(x.double()), loop_answer())
        weight = ens.stacked.get_submodule("0").weight  # [3, 4, 3]: the same memory, read column-major
        weight.data = weight.data.as_strided(weight.shape, (12, 1, 4))  # only the strides differ
        torch.testing.assert_close(ens(x.double()), loop_answer())
    ens.train()
    ens(x.double()).sum().backward()  # a training call binds views with autograd history
    copy_ = copy.deepcopy(ens)  # copies start unbound: no non-leaf views to copy
    with torch.no_grad():
        torch.testing.assert_close(copy_(x.double()), ens(x.double()))


def test_stack_outputs_keeps_every_output_structure() -> None:
    """The loop's outputs, stacked per leaf: plain tuples and lists of tensors (an RNN's (output, state)) take a
    short path; namedtuples, dicts, non-tensor leaves and nested containers keep their structure too."""
    members = range(3)
    pair = [(torch.full((2,), float(i)), torch.full((3, 1), -float(i))) for i in members]
    got = stack_outputs(pair)
    assert type(got) is tuple and [t.shape for t in got] == [(3, 2), (3, 3, 1)]
    assert torch.equal(got[1][:, 0, 0], torch.tensor([0.0, -1.0, -2.0]))
    as_list = stack_outputs([list(p) for p in pair])
    assert type(as_list) is list and all(torch.equal(a, b) for a, b in zip(as_list, got))
    Out = namedtuple("Out", ["logits", "state"])
    named = stack_outputs([Out(*p) for p in pair])
    assert type(named) is Out and torch.equal(named.state, got[1])
    with_none = stack_outputs([(p[0], None) for p in pair])  # attention without its weights
    assert with_none[1] is None and torch.equal(with_none[0], got[0])
    nested = stack_outputs([{"out": p[0], "cache": [p[1], 7]} for p in pair])
    assert torch.equal(nested["cache"][0], got[1]) and nested["cache"][1] == 7
    with pytest.raises(RuntimeError, match="stack expects each tensor to be equal size"):
        stack_outputs([(torch.zeros(2),), (torch.zeros(3),)])
    uneven = r"member 1 returned \('Tensor', 'Tensor'\) but member 0 returned \('Tensor',\)"
    with pytest.raises(EnsembleError, match=uneven):  # no leaf silently dropped
        stack_outputs([(torch.zeros(2),), (torch.zeros(2), torch.zeros(2))])
