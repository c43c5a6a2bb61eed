"""ensembling.sweep: per-member minibatches, copying and re-drawing members with their optimizer state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ensembling import Ensemble, EnsembleError
from ensembling.optim import SGD, AdamW
from ensembling.sweep import MemberBatches, copy_members, exploit, redraw_members

N = 4


def _data(n: int = 103) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 5, generator=g), torch.arange(n)


def test_shards_are_disjoint_and_cover_each_shard_once() -> None:
    """In 'shards' mode members see disjoint examples, and an epoch visits each member's examples once."""
    X, y = _data()
    batches = MemberBatches(X, y, num_members=N, batch_size=5, mode="shards", seed=0)
    seen = torch.cat([yb for _, yb in batches], dim=1)  # [members, epoch examples]
    assert seen.shape == (N, len(batches) * 5)
    for i in range(N):
        assert seen[i].unique().numel() == seen.shape[1]
        for j in range(i + 1, N):
            assert not set(seen[i].tolist()) & set(seen[j].tolist())


def test_batches_match_indices_and_are_reproducible() -> None:
    """Each batch is X[idx] for one [members, batch] index tensor; the same seed gives the same batches."""
    X, y = _data()
    a = list(MemberBatches(X, y, num_members=N, batch_size=8, seed=3))
    b = list(MemberBatches(X, y, num_members=N, batch_size=8, seed=3))
    c = list(MemberBatches(X, y, num_members=N, batch_size=8, seed=4))
    assert all(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(a, b))
    assert not torch.equal(a[0][1], c[0][1])
    xb, yb = a[0]
    assert xb.shape == (N, 8, 5) and torch.equal(xb, X[yb])


def test_bootstrap_pools_resample_with_replacement() -> None:
    """'bootstrap' gives each member its own resample of the whole data set, with repeats, fixed for the run."""
    X, y = _data(200)
    batches = MemberBatches(X, y, num_members=N, batch_size=10, mode="bootstrap", seed=0)
    assert batches.pools.shape == (N, 200)
    assert all(batches.pools[i].unique().numel() < 200 for i in range(N))  # some examples repeat
    assert not torch.equal(batches.pools[0], batches.pools[1])
    epoch = torch.cat([yb for _, yb in batches], dim=1)
    for i in range(N):
        assert set(epoch[i].tolist()) <= set(batches.pools[i].tolist())


def test_shared_batch_and_in_dims() -> None:
    """'shared' gives every member the same batch, usable with ens(xb, in_dims=0)."""
    X, y = _data()
    xb, _ = next(iter(MemberBatches(X, y, num_members=N, batch_size=7, mode="shared", seed=0)))
    assert xb.shape == (N, 7, 5) and all(torch.equal(xb[0], xb[i]) for i in range(N))
    ens = Ensemble(lambda: nn.Linear(5, 2), N)
    assert ens(xb, in_dims=0).shape == (N, 7, 2)


def test_batches_bad_input() -> None:
    """A batch larger than a member's pool, or an unknown mode, is refused."""
    X, y = _data(20)
    with pytest.raises(EnsembleError, match="batch_size 6"):
        MemberBatches(X, y, num_members=4, batch_size=6, mode="shards")
    with pytest.raises(EnsembleError, match="mode"):
        MemberBatches(X, y, num_members=4, batch_size=2, mode="oops")  # type: ignore[arg-type]


def _train(ens: Ensemble, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 5, generator=g)  # one batch shared by all members, so copies stay copies
    for _ in range(steps):
        opt.zero_grad()
        (ens(x) ** 2).mean(dim=(1, 2)).sum().backward()
        opt.step()


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: AdamW(ps, lr=[1e-3, 1e-2, 3e-2, 1e-1]),
        lambda ps: SGD(ps, lr=[0.1, 0.2, 0.05, 0.01], momentum=[0.9, 0.5, 0.0, 0.8]),
    ],
)
def test_copy_members_copies_weights_state_and_training(make) -> None:
    """After copy_members, dst equals src in weights, optimizer state and values, and trains identically."""
    torch.manual_seed(0)
    ens = Ensemble(lambda: nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2)), N)
    opt = make(ens.parameters())
    _train(ens, opt, 3, seed=1)
    copy_members(ens, src=[2, 1], dst=[0, 3], optimizer=opt)

    def check() -> None:
        for p in ens.parameters():
            assert torch.equal(p[0], p[2]) and torch.equal(p[3], p[1])
            for v in opt.state[p].values():
                if v.dim() > 0:
                    assert torch.equal(v[0], v[2]) and torch.equal(v[3], v[1])
        lr = opt.param_groups[0]["lr"]
        assert lr[0] == lr[2] and lr[3] == lr[1]

    check()
    _train(ens, opt, 5, seed=2)
    check()


def test_copy_members_bad_input() -> None:
    """Out-of-range members and mismatched source/destination counts are refused."""
    ens = Ensemble(lambda: nn.Linear(2, 1), N)
    with pytest.raises(EnsembleError, match="member 7 is out of range"):
        copy_members(ens, [7], [0])
    with pytest.raises(EnsembleError, match="2 sources and 1 destinations"):
        copy_members(ens, [1, 2], [0])


def test_exploit_copies_best_into_worst() -> None:
    """exploit copies the best-scoring members into the worst-scoring ones and reports which."""
    ens = Ensemble(lambda: nn.Linear(2, 1), 6)
    before = ens.named_stacked_parameters()["weight"].detach().clone()
    src, dst = exploit(ens, [0.1, 0.9, 0.5, 0.8, 0.2, 0.4], fraction=1 / 3)
    assert src.tolist() == [1, 3] and dst.tolist() == [0, 4]
    after = ens.named_stacked_parameters()["weight"]
    assert torch.equal(after[0], before[1]) and torch.equal(after[4], before[3]) and torch.equal(after[2], before[2])


def test_redraw_members_reinitializes_and_zeroes_state() -> None:
    """redraw_members gives members fresh seeded weights and zero optimizer state; the others are untouched."""
    ens = Ensemble(lambda: nn.Linear(3, 2), N)
    opt = AdamW(ens.parameters(), lr=0.01)
    _train_linear = torch.randn(4, 3)
    opt.zero_grad()
    ens(_train_linear).sum().backward()
    opt.step()
    before = ens.named_stacked_parameters()["weight"].detach().clone()
    redraw_members(ens, [1], lambda: nn.Linear(3, 2), opt, seed=5)
    torch.manual_seed(5)
    expected = nn.Linear(3, 2).weight
    w = ens.named_stacked_parameters()["weight"]
    assert torch.equal(w[1], expected) and torch.equal(w[0], before[0])
    assert not opt.state[w]["exp_avg"][1].any() and opt.state[w]["exp_avg"][0].any()
