"""ensembling.optim: per-member hyperparameters train each member exactly as torch.optim trains it alone."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import ensembling.optim as eopt
from ensembling import Ensemble, EnsembleError, ensemble_loss

N, STEPS = 4, 20
LR = [0.05, 0.01, 0.002, 0.1]


def _member() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def _setup(n: int = N) -> tuple[Ensemble, list[nn.Module], torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    # A forced strategy: "auto" picks the fast path's activation layout by timing, and two
    # layouts round differently in the last bit, which the exact comparisons here would see.
    ens = Ensemble(_member, n, dtype=torch.float64, seed=0, strategy="vectorized")
    g = torch.Generator().manual_seed(1)
    X = torch.randn(STEPS, n, 16, 5, generator=g, dtype=torch.float64)
    Y = torch.randn(STEPS, n, 16, 3, generator=g, dtype=torch.float64)
    return ens, ens.unstack(), X, Y


def _step_both(ens: Ensemble, opt: Any, members: list[nn.Module], opts: list[Any], x: Tensor, y: Tensor) -> None:
    """One training step of the ensemble (per-member inputs x[i]) and of every member alone, on the same data."""
    opt.zero_grad()
    ensemble_loss((ens(x, in_dims=0) - y) ** 2).backward()
    opt.step()
    for i, (m, o) in enumerate(zip(members, opts)):
        o.zero_grad()
        ((m(x[i]) - y[i]) ** 2).mean().backward()
        o.step()


def _member_values(kwargs: dict[str, Any], i: int) -> dict[str, Any]:
    """Member ``i``'s own hyperparameters from per-member keyword arguments."""
    out = {}
    for k, v in kwargs.items():
        if k == "betas":
            out[k] = tuple(b[i] if isinstance(b, list) else b for b in v)
        else:
            out[k] = v[i] if isinstance(v, list) else v
    return out


def _train_both(ours: type, theirs: type, kwargs: dict[str, Any], steps: int = STEPS,
                schedule: Callable[[torch.optim.Optimizer, Any], Any] | None = None):  # fmt: skip
    ens, members, X, Y = _setup()
    opt = ours(ens.parameters(), **kwargs)
    opts = [theirs(m.parameters(), **_member_values(kwargs, i)) for i, m in enumerate(members)]
    scheds = [schedule(o, i) for i, o in enumerate([opt, *opts])] if schedule else []
    for t in range(steps):
        _step_both(ens, opt, members, opts, X[t], Y[t])
        for s in scheds:
            s.step()
    return ens, members, opt, opts


def _assert_members_equal(ens: Ensemble, members: list[nn.Module]) -> None:
    stacked = ens.named_stacked_parameters()
    for i, m in enumerate(members):
        for name, p in m.named_parameters():
            torch.testing.assert_close(stacked[name][i], p, rtol=1e-12, atol=1e-14, msg=f"member {i} {name}")


SGD_CASES = [
    {"lr": LR},
    {"lr": 0.05, "momentum": [0.0, 0.5, 0.9, 0.99]},
    {"lr": LR, "momentum": [0.9, 0.5, 0.0, 0.8], "dampening": [0.1, 0.0, 0.5, 0.3]},
    {"lr": LR, "momentum": [0.9, 0.5, 0.7, 0.8], "nesterov": True},
    {"lr": 0.05, "weight_decay": [0.0, 0.1, 0.01, 0.5], "momentum": 0.9},
    {"lr": LR, "weight_decay": [0.0, 0.1, 0.01, 0.5], "maximize": True},
    {"lr": 0.03, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01},
]
ADAM_CASES = [
    {"lr": LR},
    {"lr": 0.01, "betas": ([0.9, 0.8, 0.5, 0.0], 0.999)},
    {"lr": 0.01, "betas": (0.9, [0.999, 0.99, 0.9, 0.5])},
    {"lr": LR, "eps": [1e-8, 1e-3, 1e-1, 0.0]},
    {"lr": LR, "weight_decay": [0.0, 0.1, 0.01, 0.5]},
    {"lr": LR, "weight_decay": [0.0, 0.1, 0.01, 0.5], "amsgrad": True},
    {"lr": LR, "betas": ([0.9, 0.8, 0.5, 0.7], [0.999, 0.99, 0.9, 0.5]), "weight_decay": 0.1, "maximize": True},
    {"lr": 0.01, "weight_decay": 0.05},
    {"lr": [0.0, 0.01, 0.002, 0.1], "eps": [0.0, 1e-8, 0.0, 1e-3]},  # lr 0: no division by a zero step size
]


@pytest.mark.parametrize("kwargs", SGD_CASES, ids=str)
def test_sgd_members_equal_torch(kwargs: dict[str, Any]) -> None:
    """SGD with per-member values gives each member torch.optim.SGD's parameters with that member's values."""
    ens, members, *_ = _train_both(eopt.SGD, torch.optim.SGD, kwargs)
    _assert_members_equal(ens, members)


@pytest.mark.parametrize("kwargs", ADAM_CASES, ids=str)
@pytest.mark.parametrize(
    "pair", [(eopt.Adam, torch.optim.Adam), (eopt.AdamW, torch.optim.AdamW)], ids=["Adam", "AdamW"]
)
def test_adam_members_equal_torch(pair: tuple[type, type], kwargs: dict[str, Any]) -> None:
    """Adam/AdamW with per-member values give each member torch's parameters with that member's values."""
    ens, members, *_ = _train_both(*pair, kwargs)
    _assert_members_equal(ens, members)


def test_tensor_values_accepted() -> None:
    """A 1-D tensor of per-member values trains like the same values as a list."""
    a, *_ = _train_both(eopt.AdamW, torch.optim.AdamW, {"lr": LR}, steps=3)
    ens, _, X, Y = _setup()
    opt = eopt.AdamW(ens.parameters(), lr=torch.tensor(LR, dtype=torch.float64))
    for t in range(3):
        opt.zero_grad()
        ((ens(X[t], in_dims=0) - Y[t]) ** 2).mean(dim=(1, 2)).sum().backward()
        opt.step()
    for name, p in a.named_stacked_parameters().items():
        torch.testing.assert_close(ens.named_stacked_parameters()[name], p, rtol=0, atol=0)


SCHEDULERS = {
    "LambdaLR": lambda o, i: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1 / (1 + t)),
    "StepLR": lambda o, i: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
    "CosineAnnealingLR": lambda o, i: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=7, eta_min=1e-4),
    "LinearLR": lambda o, i: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=8),
    "ExponentialLR": lambda o, i: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9),
    "OneCycleLR": lambda o, i: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=torch.tensor(LR, dtype=torch.float64) if i == 0 else LR[i - 1], total_steps=STEPS
    ),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("pair", [(eopt.AdamW, torch.optim.AdamW), (eopt.SGD, torch.optim.SGD)], ids=["AdamW", "SGD"])
def test_schedulers_scale_each_member(pair: tuple[type, type], name: str) -> None:
    """torch's LR schedulers scale every member's lr: members equal torch optimizers under the same scheduler."""
    kwargs = {"lr": LR, "momentum": 0.9} if pair[0] is eopt.SGD else {"lr": LR}
    ens, members, opt, opts = _train_both(*pair, kwargs, schedule=SCHEDULERS[name])
    _assert_members_equal(ens, members)
    expected = torch.tensor([o.param_groups[0]["lr"] for o in opts], dtype=torch.float64)
    torch.testing.assert_close(torch.as_tensor(opt.param_groups[0]["lr"]).as_subclass(torch.Tensor), expected)


def test_param_groups_have_their_own_values() -> None:
    """Each param group keeps its own per-member values, matching torch optimizers with the same two groups."""
    ens, members, X, Y = _setup()
    w_lr, b_lr = LR, [0.001, 0.2, 0.03, 0.004]

    def groups(named: dict[str, torch.Tensor], pick: Callable[[list[float]], Any]) -> list[dict[str, Any]]:
        return [
            {"params": [p for k, p in named.items() if k.endswith("weight")], "lr": pick(w_lr), "weight_decay": 0.1},
            {"params": [p for k, p in named.items() if k.endswith("bias")], "lr": pick(b_lr), "weight_decay": 0.0},
        ]

    opt = eopt.AdamW(groups(ens.named_stacked_parameters(), lambda v: v))
    opts = [torch.optim.AdamW(groups(dict(m.named_parameters()), lambda v, i=i: v[i])) for i, m in enumerate(members)]
    for t in range(STEPS):
        _step_both(ens, opt, members, opts, X[t], Y[t])
    _assert_members_equal(ens, members)


@pytest.mark.parametrize("cls", [eopt.SGD, eopt.AdamW])
def test_state_dict_round_trip(cls: type) -> None:
    """A state dict saved mid-training (weights_only load) resumes exactly: same parameters as uninterrupted."""
    kwargs = (
        {"lr": LR, "momentum": [0.9, 0.5, 0.0, 0.8]}
        if cls is eopt.SGD
        else {"lr": LR, "weight_decay": [0, 0.1, 0.2, 0.3]}
    )
    ens, _, X, Y = _setup()
    opt = cls(ens.parameters(), **kwargs)

    def run(e: Ensemble, o: torch.optim.Optimizer, steps: range) -> None:
        for t in steps:
            o.zero_grad()
            ((e(X[t], in_dims=0) - Y[t]) ** 2).mean(dim=(1, 2)).sum().backward()
            o.step()

    run(ens, opt, range(5))
    buffer = io.BytesIO()
    torch.save({"model": ens.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed, *_ = _setup()
    resumed.load_state_dict(saved["model"])
    opt2 = cls(resumed.parameters(), lr=1.0)
    opt2.load_state_dict(saved["opt"])
    assert isinstance(opt2.param_groups[0]["lr"], eopt.MemberValues)
    run(ens, opt, range(5, 10))
    run(resumed, opt2, range(5, 10))
    for name, p in ens.named_stacked_parameters().items():
        torch.testing.assert_close(resumed.named_stacked_parameters()[name], p, rtol=0, atol=0)


def test_shared_values_match_torch_on_stacked_parameters() -> None:
    """With one value for all members, the step equals torch's AdamW over the same stacked parameters."""
    ens, _, X, Y = _setup()
    twin, *_ = _setup()
    ours = eopt.AdamW(ens.parameters(), lr=0.01, weight_decay=0.1)
    theirs = torch.optim.AdamW(twin.parameters(), lr=0.01, weight_decay=0.1)
    for t in range(5):
        for e, o in ((ens, ours), (twin, theirs)):
            o.zero_grad()
            ((e(X[t], in_dims=0) - Y[t]) ** 2).mean(dim=(1, 2)).sum().backward()
            o.step()
    for name, p in twin.named_stacked_parameters().items():
        torch.testing.assert_close(ens.named_stacked_parameters()[name], p, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda ps: eopt.AdamW(ps, lr=[0.1, 0.2, 0.3]), r"lr has 3 values .* 4 members"),
        (lambda ps: eopt.SGD(ps, lr=0.1, momentum=[0.9] * 5), r"momentum has 5 values"),
        (lambda ps: eopt.Adam(ps, lr=[0.1, -0.2, 0.3, 0.4]), r"invalid lr -0.2 for member 1"),
        (lambda ps: eopt.Adam(ps, eps=-1e-8), r"invalid eps"),
        (lambda ps: eopt.AdamW(ps, betas=(0.9, [0.9, 0.99, 1.0, 0.5])), r"invalid betas\[1\] 1.0 for member 2"),
        (lambda ps: eopt.AdamW(ps, betas=([-0.1, 0.9, 0.9, 0.9], 0.99)), r"invalid betas\[0\] -0.1 for member 0"),
        (lambda ps: eopt.SGD(ps, lr=0.1, nesterov=True, momentum=[0.9, 0.0, 0.9, 0.9]), r"nesterov"),
        (lambda ps: eopt.AdamW([*ps, torch.zeros(3, 2, requires_grad=True)]), r"leading dimension 3"),
        (lambda ps: eopt.AdamW(ps, fused=True), r"fused"),
    ],
)
def test_bad_input_raises(make: Callable[[list[torch.Tensor]], Any], match: str) -> None:
    """Wrong-length values, mismatched member counts and out-of-range values raise EnsembleError naming them."""
    ens, *_ = _setup()
    with pytest.raises(EnsembleError, match=match):
        make(list(ens.parameters()))


def test_scheduler_fill_rejects_wrong_length() -> None:
    """Writing the wrong number of learning rates into a group is refused."""
    ens, *_ = _setup()
    opt = eopt.AdamW(ens.parameters(), lr=LR)
    with pytest.raises(EnsembleError, match="3 values for 4 members"):
        opt.param_groups[0]["lr"].fill_(torch.ones(3))
