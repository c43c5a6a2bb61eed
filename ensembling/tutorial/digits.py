"""The digits demo of the sharding page: data, member, training loop, worker and command line.

Run it sharded with ``torchrun --nproc-per-node 2 -m ensembling.tutorial.digits``
(gloo on CPU, NCCL on GPUs).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .._ensemble import Ensemble
from ..distributed import ShardedEnsemble

__all__ = ["demo_worker", "digits_data", "digits_member", "main", "train_digits"]


def digits_data(device: torch.device | str = "cpu", seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's bundled digits, scaled to [0, 1], with a seeded 80/20 split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(X))
    train, test = order[:cut], order[cut:]
    return (
        X[train].to(device),
        y[train].to(device),
        X[test].to(device),
        y[test].to(device),
    )


def digits_member() -> nn.Module:
    """The member of the digits demo: 64 -> 64 -> 10."""
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def train_digits(
    model: Ensemble | ShardedEnsemble,
    num_members: int,
    steps: int,
    *,
    seed: int = 0,
    lr: float = 1e-2,
    batch: int = 64,
    device: torch.device | str = "cpu",
) -> Ensemble | ShardedEnsemble:
    """Train ``model`` (single-process or sharded) on the digits, bagging half the data per member.

    The minibatch indices for *all* members come from one generator seeded
    with ``seed``, identically on every rank; a sharded model uses its rows.
    So a sharded run trains each member exactly as the single-process run does.
    """
    X_train, y_train, _, _ = digits_data(device)
    generator = torch.Generator().manual_seed(seed)
    half = len(X_train) // 2
    subsets = torch.stack([torch.randperm(len(X_train), generator=generator)[:half] for _ in range(num_members)])
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        idx = subsets.gather(1, torch.randint(half, (num_members, batch), generator=generator)).to(device)
        if isinstance(model, ShardedEnsemble):
            idx = model.local_inputs(idx)
            logits = model.local(X_train[idx], in_dims=0)
        else:
            logits = model(X_train[idx], in_dims=0)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), y_train[idx].flatten(), reduction="none")
        optimizer.zero_grad()
        loss.view(idx.shape).mean(dim=1).sum().backward()  # each member's own gradient, no all-reduce
        optimizer.step()
    return model


def demo_worker(rank: int, world_size: int, num_members: int, steps: int, seed: int) -> dict[str, Any]:
    """Train a sharded digits ensemble; return the gathered test predictions and timings (for :func:`launch`)."""
    sharded = ShardedEnsemble(digits_member, num_members, seed=seed)
    start = time.perf_counter()
    train_digits(sharded, num_members, steps, seed=seed)
    train_s = time.perf_counter() - start
    _, _, X_test, _ = digits_data()
    sharded.eval()
    with torch.no_grad():
        start = time.perf_counter()
        local = sharded(X_test)  # [this rank's members, test, 10]
        forward_s = time.perf_counter() - start
        start = time.perf_counter()
        logits = sharded.gather(local)  # [all members, test, 10], in member order
        gather_s = time.perf_counter() - start
    return {
        "members": sharded.members,
        "probs": logits.softmax(dim=-1),
        "seconds": {"train": train_s, "forward": forward_s, "gather": gather_s},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="torchrun --nproc-per-node N -m ensembling.tutorial.digits",
        description="Train a sharded ensemble on scikit-learn's digits and report its accuracy.",
    )
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=120.0, help="collective timeout, seconds")
    parser.add_argument("--checkpoint", default=None, help="directory to save the trained ensemble to")
    args = parser.parse_args(argv)

    if "RANK" not in os.environ:
        parser.error("run me under torchrun, e.g. torchrun --nproc-per-node 2 -m ensembling.tutorial.digits")
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=args.timeout),
        **({"device_id": device} if use_cuda else {}),
    )  # fmt: skip
    try:
        start = time.perf_counter()
        sharded = ShardedEnsemble(digits_member, args.members, seed=args.seed, device=device)
        print(f"[rank {sharded.rank}] {sharded.extra_repr()}, device {device}", flush=True)
        train_digits(sharded, args.members, args.steps, seed=args.seed, device=device)
        _, _, X_test, y_test = digits_data(device)
        sharded.eval()
        probs = sharded.predict(X_test).softmax(dim=-1)  # [members, test, 10], on every rank
        if args.checkpoint:
            sharded.save(args.checkpoint)
        if sharded.rank == 0:
            member_acc = (probs.argmax(-1) == y_test).float().mean(dim=1)
            ensemble_acc = (probs.mean(0).argmax(-1) == y_test).float().mean()
            print(
                f"{args.members} members on {sharded.world_size} ranks ({dist.get_backend()}), "
                f"{args.steps} steps in {time.perf_counter() - start:.1f} s: ensemble accuracy "
                f"{100 * ensemble_acc:.1f}%, members {100 * member_acc.min():.1f}-{100 * member_acc.max():.1f}% "
                f"(mean {100 * member_acc.mean():.1f}%)",
                flush=True,
            )
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
