"""ensembling.distributed on real gloo process groups (2-3 local processes, bounded timeouts)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from ensembling import Ensemble, EnsembleError
from ensembling.distributed import ShardedEnsemble, load_ensemble, shard_members
from ensembling.launcher import launch
from ensembling.tutorial.digits import digits_data, digits_member, train_digits

pytestmark = pytest.mark.slow
TIMEOUT_S = 20.0


def member() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(4, 6, generator=g), torch.randn(10, 4, 6, generator=g)


# ---- workers (module-level, so spawned processes can import them) ----------------


def predict_worker(rank: int, world_size: int) -> dict:
    sharded = ShardedEnsemble(member, 10, seed=1)
    x, xs = inputs()
    return {
        "members": sharded.members,
        "shared": sharded.predict(x),
        "per_member": sharded.predict(xs, in_dims=0),
        "mean": sharded.predict(x, reduce="mean"),
        "whole": sharded.gather_ensemble().state_dict(),
    }


def train_and_save_worker(rank: int, world_size: int, path: str) -> dict:
    sharded = ShardedEnsemble(digits_member, 5, seed=3)
    train_digits(sharded, 5, steps=15, seed=3)
    sharded.save(path)
    return {"state": sharded.gather_ensemble().state_dict()}


def load_worker(rank: int, world_size: int, path: str, members: int) -> dict:
    sharded = ShardedEnsemble(digits_member, members, seed=99)  # different init: load must overwrite it
    sharded.load(path)
    return {"members": sharded.members, "state": sharded.gather_ensemble().state_dict()}


def too_many_ranks_worker(rank: int, world_size: int) -> None:
    ShardedEnsemble(member, 2, seed=0)


def failing_rank_worker(rank: int, world_size: int) -> None:
    sharded = ShardedEnsemble(member, 4, seed=0)
    if rank == 1:
        raise RuntimeError("rank 1 crashed before the gather")
    sharded.predict(torch.ones(2, 6))


# ---- tests ---------------------------------------------------------------------


def test_shard_members_covers_every_member_once() -> None:
    """Shards are contiguous, balanced to within one member, and cover 0..n-1 exactly once."""
    for n in range(1, 12):
        for world in range(1, n + 1):
            shards = [shard_members(n, world, r) for r in range(world)]
            assert [i for s in shards for i in s] == list(range(n))
            assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_shards_gather_to_the_single_process_ensemble() -> None:
    """10 members over 3 ranks: gathered predictions and state equal Ensemble(factory, 10, seed=1)."""
    results = launch(predict_worker, 3, timeout_s=TIMEOUT_S)
    assert [r["members"] for r in results] == [range(0, 4), range(4, 7), range(7, 10)]
    single = Ensemble(member, 10, seed=1)
    x, xs = inputs()
    with torch.no_grad():
        expected_shared, expected_per_member = single(x), single(xs, in_dims=0)
    for r in results:  # every rank has the full, member-ordered result
        torch.testing.assert_close(r["shared"], expected_shared)
        torch.testing.assert_close(r["per_member"], expected_per_member)
        torch.testing.assert_close(r["mean"], expected_shared.mean(0))
        for name, value in single.state_dict().items():
            assert torch.equal(r["whole"][name], value), name


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, torch.Tensor]]:
    """5 digits members trained on 2 ranks and saved (one launch for the tests that read it): path, state."""
    path = str(tmp_path_factory.mktemp("sharded") / "ckpt")
    return path, launch(train_and_save_worker, 2, path, timeout_s=TIMEOUT_S)[0]["state"]


def test_sharded_training_equals_single_process_training_and_checkpoints_reshard(
    checkpoint: tuple[str, dict[str, torch.Tensor]],
) -> None:
    """Train on 2 ranks == train in one process; the checkpoint loads on 3 ranks and in one process."""
    path, trained = checkpoint
    single = train_digits(Ensemble(digits_member, 5, seed=3), 5, steps=15, seed=3)
    for name, value in single.state_dict().items():
        torch.testing.assert_close(trained[name], value, rtol=1e-5, atol=1e-6, msg=name)

    resharded = launch(load_worker, 3, path, 5, timeout_s=TIMEOUT_S)
    assert [r["members"] for r in resharded] == [range(0, 2), range(2, 4), range(4, 5)]
    loaded = load_ensemble(Ensemble(digits_member, 5, seed=7), path)
    for name, value in trained.items():
        assert torch.equal(resharded[0]["state"][name], value), name
        assert torch.equal(loaded.state_dict()[name], value), name
    _, _, X_test, _ = digits_data()
    assert loaded(X_test).shape == (5, len(X_test), 10)


def test_checkpoint_with_a_different_member_count_is_refused_on_every_rank(
    checkpoint: tuple[str, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    """Loading 5 saved members into a 6-member ensemble fails clearly, on each rank and in one process."""
    path, _ = checkpoint
    with pytest.raises(EnsembleError) as info:
        launch(load_worker, 2, path, 6, timeout_s=TIMEOUT_S)
    for rank in (0, 1):
        assert f"rank {rank}: EnsembleError: ShardedEnsemble.load: the checkpoint" in str(info.value)
    assert "holds 5 members, but this ensemble has 6" in str(info.value)
    with pytest.raises(EnsembleError, match="holds 5 members, but the ensemble has 6"):
        load_ensemble(Ensemble(digits_member, 6), path)
    with pytest.raises(EnsembleError, match="not a sharded-ensemble checkpoint"):
        load_ensemble(Ensemble(digits_member, 6), str(tmp_path / "missing"))


def test_more_ranks_than_members_is_a_clear_error_on_every_rank() -> None:
    """3 ranks for 2 members: every rank raises before any collective, so nothing hangs."""
    with pytest.raises(EnsembleError) as info:
        launch(too_many_ranks_worker, 3, timeout_s=TIMEOUT_S)
    for rank in range(3):
        assert f"rank {rank}: EnsembleError: shard_members: 3 ranks for 2 members would leave 1 rank(s)" in str(
            info.value
        )


def test_a_failing_rank_gives_a_clear_error_on_the_others_not_a_hang() -> None:
    """Rank 1 crashes; rank 0's gather fails within the timeout with an error that says why."""
    with pytest.raises(EnsembleError) as info:
        launch(failing_rank_worker, 2, timeout_s=5.0)
    message = str(info.value)
    assert "2 of 2 ranks failed" in message
    assert "rank 1 crashed before the gather" in message
    assert "ShardedEnsemble.gather failed on rank 0" in message


def test_sharded_ensemble_needs_an_initialized_process_group() -> None:
    """Without init_process_group the error says what to do."""
    with pytest.raises(EnsembleError, match="init_process_group"):
        ShardedEnsemble(member, 4, seed=0)


def test_launch_refuses_a_worker_new_processes_cannot_import() -> None:
    """A function defined locally (or in __main__) is refused up front, with the fix."""

    def local_worker(rank: int, world_size: int) -> None:
        return None

    with pytest.raises(EnsembleError, match="move it to a module"):
        launch(local_worker, 2)
