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

To try it on one machine without ``torchrun``, :func:`ensembling.launcher.launch`
runs a function on several local processes; ``torchrun --nproc-per-node 2 -m
ensembling.tutorial.digits`` trains a sharded ensemble on the bundled digits data.

Every collective is bounded by the process group's timeout; a failure
(another rank crashed, or never called the collective) becomes an
:class:`~ensembling.EnsembleError` that names the rank and the operation.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.api import CheckpointException

from ._ensemble import Ensemble
from ._errors import EnsembleError

__all__ = ["ShardedEnsemble", "load_ensemble", "shard_members"]

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
    ensembling.EnsembleError: shard_members: 3 ranks for 2 members would leave 1 rank(s) without members; ...
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
        self.local = Ensemble(factory, num_members, seed=seed, members=self.members, device=device, **ensemble_options)

    def __len__(self) -> int:
        return self.num_members

    def extra_repr(self) -> str:
        first, last = self.members.start, self.members.stop - 1
        return f"rank {self.rank} of {self.world_size}: members {first}..{last} of {self.num_members}"

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
        _collective(
            "save", self.rank, lambda: dcp.save(self._member_state(), checkpoint_id=path, process_group=self.group)
        )

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
            for name, t in local.named_stacked_parameters().items():
                params[name].requires_grad_(t.requires_grad)
        options = {"randomness": local.randomness, "chunk_size": local.chunk_size, "fast_path": local.fast_path}
        return Ensemble.from_stacked(local[0], params, buffers, **options)


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
