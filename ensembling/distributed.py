"""Shard an ensemble's *members* across the processes of a ``torch.distributed`` group.

Each rank holds a contiguous block of members as an ordinary
:class:`~ensembling.Ensemble` and runs it with the usual vectorized code. The
members never exchange gradients (member ``i``'s loss depends only on member
``i``'s weights), so each rank trains its own members with its own optimizer;
only the data (every rank reads the same) and the predictions (gathered into
member order) travel.

* :func:`shard_members` -- which members a rank holds (uneven splits balanced);
* :class:`ShardedEnsemble` -- a rank's share, initialized exactly like member
  ``start..stop-1`` of ``Ensemble(factory, n, seed=seed)``; ``gather`` and
  ``predict`` assemble the full ``[n, ...]`` result on every rank; ``save`` and
  ``load`` use :mod:`torch.distributed.checkpoint`, with one key per member, so
  a checkpoint loads into any number of ranks and into a single-process
  :class:`~ensembling.Ensemble` (:func:`load_ensemble`);
* :func:`launch` -- run a function on ``world_size`` local processes (gloo on
  CPU) with a bounded timeout: the page, the tests and the benchmark use it;
* ``python -m ensembling.distributed`` -- train a sharded ensemble on the
  bundled digits data; run it with ``torchrun --nproc-per-node 2 -m
  ensembling.distributed`` (gloo on CPU, NCCL on GPUs).

Every collective is bounded by the process group's timeout; a failure
(another rank crashed, or never called the collective) becomes an
:class:`~ensembling.EnsembleError` that names the rank and the operation.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import pickle
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
import torch.multiprocessing as mp
from torch import Tensor, nn

from ._ensemble import Ensemble
from ._errors import EnsembleError

__all__ = ["ShardedEnsemble", "launch", "load_ensemble", "shard_members"]

_COUNT_KEY = "ensemble.num_members"


def shard_members(num_members: int, world_size: int, rank: int) -> range:
    """The contiguous block of members rank ``rank`` holds, balanced to within one.

    The first ``num_members % world_size`` ranks hold one member more.

    Parameters
    ----------
    num_members : int
        Members in the whole ensemble.
    world_size : int
        Ranks sharing them; at most ``num_members`` (no rank may be empty).
    rank : int
        This rank, ``0 <= rank < world_size``.

    Returns
    -------
    range
        The global indices of this rank's members.

    Examples
    --------
    >>> [shard_members(10, 3, r) for r in range(3)]  # 10 members over 3 ranks: 4 + 3 + 3
    [range(0, 4), range(4, 7), range(7, 10)]
    >>> shard_members(2, 3, 0)
    Traceback (most recent call last):
    ...
    ensembling._errors.EnsembleError: shard_members: 3 ranks for 2 members would leave 1 rank(s) without members; use at most 2 processes (or more members).
    """
    if world_size > num_members:
        raise EnsembleError(
            f"shard_members: {world_size} ranks for {num_members} members would leave "
            f"{world_size - num_members} rank(s) without members; use at most {num_members} "
            "processes (or more members)."
        )
    if not 0 <= rank < world_size:
        raise EnsembleError(f"shard_members: rank {rank} is not in [0, {world_size}).")
    base, extra = divmod(num_members, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def _group_info(group: Any) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise EnsembleError(
            "ShardedEnsemble: torch.distributed is not initialized; call "
            "torch.distributed.init_process_group(...) first (torchrun sets up the environment), "
            "or use ensembling.Ensemble in a single process."
        )
    return dist.get_world_size(group), dist.get_rank(group)


class ShardedEnsemble(nn.Module):
    """This rank's share of an ensemble whose members are split across a process group.

    Parameters
    ----------
    factory : callable
        Builds one member, as for :class:`~ensembling.Ensemble`.
    num_members : int
        Members in the *whole* ensemble.
    seed : int
        Member ``i`` is initialized from ``(seed, i)`` only, so the shards
        together equal ``Ensemble(factory, num_members, seed=seed)``, member for
        member, whatever the number of ranks.
    group : ProcessGroup, optional
        The process group (default: the world).
    device : torch.device or str, optional
        Where this rank's members live (for NCCL, this rank's GPU).
    **ensemble_options
        ``dtype``, ``randomness``, ``chunk_size``, ``fast_path``: passed to the
        local :class:`~ensembling.Ensemble`.

    Examples
    --------
    In each process of a group (``torchrun``, or :func:`launch` with a
    function defined in a module)::

        sharded = ShardedEnsemble(lambda: nn.Linear(3, 2), 5, seed=0)
        sharded.members                        # rank 0 of 2: range(0, 3); rank 1: range(3, 5)
        sharded(torch.ones(4, 3)).shape        # this rank's members: [3, 4, 2] or [2, 4, 2]
        sharded.predict(torch.ones(4, 3)).shape  # all members, on every rank: [5, 4, 2]

    ``tests/test_distributed.py`` runs exactly this on 2 and 3 processes.
    """

    def __init__(
        self,
        factory: Callable[[], nn.Module],
        num_members: int,
        *,
        seed: int,
        group: Any = None,
        device: torch.device | str | None = None,
        **ensemble_options: Any,
    ) -> None:
        super().__init__()
        world_size, rank = _group_info(group)
        self.group = group
        self.rank, self.world_size = rank, world_size
        self.num_members = num_members
        self.members = shard_members(num_members, world_size, rank)
        self.seed = seed
        self.local = Ensemble._shard(factory, num_members, self.members, seed, device=device, **ensemble_options)

    def __len__(self) -> int:
        return self.num_members

    def extra_repr(self) -> str:
        return f"rank {self.rank} of {self.world_size}: members {self.members.start}..{self.members.stop - 1} of {self.num_members}"

    def local_inputs(self, x: Tensor) -> Tensor:
        """This rank's rows of a per-member input ``x`` of shape ``[num_members, ...]``."""
        if x.dim() == 0 or x.shape[0] != self.num_members:
            raise EnsembleError(
                f"ShardedEnsemble: a per-member input needs one entry per member of the whole "
                f"ensemble along dimension 0 ({self.num_members}), got shape {list(x.shape)}."
            )
        return x[self.members.start : self.members.stop]

    def forward(self, x: Tensor, *, in_dims: int | None = None, **kwargs: Any) -> Tensor:
        """Run this rank's members: ``[local members, ...]``.

        ``in_dims=None`` gives every member ``x``; ``in_dims=0`` takes this
        rank's rows of ``x``, which must cover the whole ensemble.
        """
        if in_dims == 0:
            return self.local(self.local_inputs(x), in_dims=0, **kwargs)
        if in_dims is not None:
            raise EnsembleError("ShardedEnsemble: in_dims must be None (shared input) or 0 (per member).")
        return self.local(x, **kwargs)

    def gather(self, local: Tensor) -> Tensor:
        """Assemble every rank's ``[local members, ...]`` tensor into ``[num_members, ...]``, on every rank."""
        if local.shape[0] != len(self.members):
            raise EnsembleError(
                f"ShardedEnsemble.gather: expected {len(self.members)} rows (this rank's members), "
                f"got shape {list(local.shape)}."
            )
        width = math.ceil(self.num_members / self.world_size)
        padded = local.new_zeros((width, *local.shape[1:]))
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        _collective("gather", self.rank, lambda: dist.all_gather(parts, padded.contiguous(), group=self.group))
        return torch.cat(
            [parts[r][: len(shard_members(self.num_members, self.world_size, r))] for r in range(self.world_size)]
        )

    @torch.no_grad()
    def predict(self, x: Tensor, *, in_dims: int | None = None, reduce: str | None = None) -> Tensor:
        """Predictions of the whole ensemble, on every rank, in member order.

        ``reduce="mean"`` returns the members' mean ``[...]`` instead of ``[num_members, ...]``.
        """
        full = self.gather(self(x, in_dims=in_dims))
        if reduce is None:
            return full
        if reduce == "mean":
            return full.mean(dim=0)
        raise EnsembleError(f"ShardedEnsemble.predict: reduce must be None or 'mean', got {reduce!r}.")

    # ---------------------------------------------------------------- checkpoints

    def _member_state(self) -> dict[str, Tensor]:
        local = self.local.state_dict()
        state = {
            f"members.{member}.{name}": tensor[k]
            for k, member in enumerate(self.members)
            for name, tensor in local.items()
        }
        state[_COUNT_KEY] = torch.tensor(self.num_members)
        return state

    def save(self, path: str | os.PathLike) -> None:
        """Write a :mod:`torch.distributed.checkpoint` directory; every rank writes its members."""
        _collective("save", self.rank, lambda: dcp.save(self._member_state(), checkpoint_id=path, process_group=self.group))

    def load(self, path: str | os.PathLike) -> None:
        """Load this rank's members from a checkpoint saved with any number of ranks."""
        count = _checkpoint_member_count(path)
        if count != self.num_members:
            raise EnsembleError(
                f"ShardedEnsemble.load: the checkpoint at {path} holds {count} members, but this "
                f"ensemble has {self.num_members}; build ShardedEnsemble(..., {count}, ...) to load it."
            )
        state = self._member_state()
        del state[_COUNT_KEY]
        _collective("load", self.rank, lambda: dcp.load(state, checkpoint_id=path, process_group=self.group))

    def gather_ensemble(self) -> Ensemble:
        """The whole ensemble as a single-process :class:`~ensembling.Ensemble`, on every rank."""
        local = self.local
        with torch.no_grad():
            params = {name: self.gather(t) for name, t in local.named_stacked_parameters().items()}
            buffers = {name: self.gather(t) for name, t in local.named_stacked_buffers().items()}
        requires_grad = {name: t.requires_grad for name, t in local.named_stacked_parameters().items()}
        whole = Ensemble._from_stacked(
            local._template, params, buffers, requires_grad, local.randomness, local.chunk_size, local.fast_path
        )
        return whole.train(local.training)


def _load_in_this_process(state: dict[str, Tensor], path: str | os.PathLike) -> None:
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*load in a single process", category=UserWarning)
        dcp.load(state, checkpoint_id=path, no_dist=True)


def _checkpoint_member_count(path: str | os.PathLike) -> int:
    count = torch.tensor(0)
    try:
        _load_in_this_process({_COUNT_KEY: count}, path)
    except (Exception, CheckpointException) as err:  # CheckpointException is a BaseException
        raise EnsembleError(
            f"ensembling.distributed: {path} is not a sharded-ensemble checkpoint ({type(err).__name__}: {err})."
        ) from err
    return int(count)


def load_ensemble(ensemble: Ensemble, path: str | os.PathLike) -> Ensemble:
    """Load a :class:`ShardedEnsemble` checkpoint into a single-process ``Ensemble`` (in place).

    Parameters
    ----------
    ensemble : Ensemble
        With as many members as the checkpoint, e.g. ``Ensemble(factory, n, seed=0)``.
    path : str or os.PathLike
        The checkpoint directory written by :meth:`ShardedEnsemble.save`.

    Returns
    -------
    Ensemble
        ``ensemble``, with the checkpoint's values.

    Examples
    --------
    After ``torchrun --nproc-per-node 2 -m ensembling.distributed --checkpoint ckpt/``::

        ens = load_ensemble(Ensemble(digits_member, 16), "ckpt/")  # all 16 members, one process
    """
    count = _checkpoint_member_count(path)
    if count != len(ensemble):
        raise EnsembleError(
            f"load_ensemble: the checkpoint at {path} holds {count} members, but the ensemble has "
            f"{len(ensemble)}; build Ensemble(factory, {count}, ...) to load it."
        )
    state = {
        f"members.{member}.{name}": tensor[member]
        for name, tensor in ensemble.state_dict().items()
        for member in range(count)
    }
    _load_in_this_process(state, path)
    return ensemble


def _collective(what: str, rank: int, call: Callable[[], Any]) -> Any:
    try:
        return call()
    except EnsembleError:
        raise
    except (Exception, CheckpointException) as err:  # DistBackendError, RuntimeError, ...
        raise EnsembleError(
            f"ShardedEnsemble.{what} failed on rank {rank} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). Another rank probably failed or did not "
            f"call {what}: see its traceback. Collectives wait at most the process group's timeout."
        ) from err


# -------------------------------------------------------------------- local launcher


def _worker(rank: int, world_size: int, store: str, timeout_s: float, fn: Callable, args: tuple, out: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    outcome: tuple[str, Any]
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )  # fmt: skip
        try:
            outcome = ("ok", fn(rank, world_size, *args))
        finally:
            dist.destroy_process_group()
    except BaseException as err:  # reported to the parent, which raises
        outcome = ("error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}")
    with open(f"{out}.tmp", "wb") as handle:
        pickle.dump(outcome, handle)
    os.replace(f"{out}.tmp", out)


@contextlib.contextmanager
def _main_module_hidden() -> Any:
    """Start processes without making them re-run the parent's ``__main__`` script.

    ``spawn`` normally re-imports the parent's main script in each child, which
    re-runs an unguarded script (a tutorial run as ``python plot_09_....py``) and
    fails. ``launch`` only sends importable functions, so the children do not
    need it: while they start, ``__main__`` does not say where it came from.
    """
    main = sys.modules["__main__"]
    saved = {k: main.__dict__.pop(k) for k in ("__file__",) if k in main.__dict__}
    spec = getattr(main, "__spec__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__dict__.update(saved)
        main.__spec__ = spec


def launch(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 60.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` new local processes (gloo).

    Each process joins a fresh gloo process group (through a file store: no
    network port is opened) whose collectives time out after ``timeout_s``
    seconds, and gets ``cpu_count // world_size`` threads. ``fn`` must be
    importable (defined in a module, not in ``__main__`` or a notebook); the
    children do not re-run the caller's script, so ``launch`` works from a
    script without an ``if __name__ == "__main__"`` guard, a notebook, or a
    docs build.

    Parameters
    ----------
    fn : callable
        ``fn(rank, world_size, *args)``; its return value must be picklable.
    world_size : int
        Number of processes.
    *args
        Passed to ``fn``.
    timeout_s : float, default 60
        Collective timeout in each process; the launcher itself waits at most
        ``2 * timeout_s + 30`` seconds before killing the processes.

    Returns
    -------
    list
        ``fn``'s return values, by rank.

    Raises
    ------
    EnsembleError
        If any rank raised (with every failed rank's error) or did not finish in time.

    Examples
    --------
    With a worker defined in an importable module::

        results = launch(demo_worker, 2, 8, 100, 0)   # 8 members, 100 steps, seed 0, on 2 processes
        results[0]["probs"].shape                     # gathered on every rank: [8, 360, 10]
    """
    if getattr(fn, "__module__", None) == "__main__" or "<locals>" in getattr(fn, "__qualname__", ""):
        raise EnsembleError(
            f"launch: {getattr(fn, '__qualname__', fn)!r} is defined in a script, notebook or function, "
            "so new processes cannot import it; move it to a module (a .py file on the import path) "
            "and pass it from there."
        )
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="ensembling-launch-") as tmp:
        outs = [str(Path(tmp) / f"rank{r}.pkl") for r in range(world_size)]
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, str(Path(tmp) / "store"), timeout_s, fn, args, outs[r]))
            for r in range(world_size)
        ]
        with _main_module_hidden():
            for p in procs:
                p.start()
        deadline = time.monotonic() + 2 * timeout_s + 30
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in hung:
            procs[r].kill()
            procs[r].join()
        results, errors = [], []
        for r, out in enumerate(outs):
            if not Path(out).exists():
                errors.append(f"rank {r}: no result ({'killed after the deadline' if r in hung else f'exit code {procs[r].exitcode}'})")
                results.append(None)
                continue
            with open(out, "rb") as handle:
                status, value = pickle.load(handle)
            if status == "error":
                errors.append(f"rank {r}: {value}")
            results.append(value)
        if errors:
            raise EnsembleError("launch: " + f"{len(errors)} of {world_size} ranks failed:\n" + "\n".join(errors))
        return results


# -------------------------------------------------------------------- the digits demo


def digits_data(device: torch.device | str = "cpu", seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's bundled digits, scaled to [0, 1], with a seeded 80/20 split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(X))
    train, test = order[:cut], order[cut:]
    return X[train].to(device), y[train].to(device), X[test].to(device), y[test].to(device)


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
        prog="torchrun --nproc-per-node N -m ensembling.distributed",
        description="Train a sharded ensemble on scikit-learn's digits and report its accuracy.",
    )
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=120.0, help="collective timeout, seconds")
    parser.add_argument("--checkpoint", default=None, help="directory to save the trained ensemble to")
    args = parser.parse_args(argv)

    if "RANK" not in os.environ:
        parser.error("run me under torchrun, e.g. torchrun --nproc-per-node 2 -m ensembling.distributed")
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
