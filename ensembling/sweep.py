"""Hyperparameter sweeps in one run: per-member minibatches, and copying or re-drawing members.

* :class:`MemberBatches` gives every member its own minibatch each step, as
  one ``[num_members, batch, ...]`` tensor (one indexing op) for
  ``ens(xb, in_dims=0)``: bagging (``"bootstrap"``), disjoint ``"shards"`` or
  one ``"shared"`` batch, reproducible from a seed.
* :func:`copy_members` copies members' weights, buffers, optimizer state and
  per-member hyperparameters into other members; :func:`exploit` copies the
  best members (by a validation score) into the worst, and
  :func:`redraw_members` re-initializes members: population-based training in
  a few lines, with the optimizers of :mod:`ensembling.optim`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from ._ensemble import Ensemble
from ._errors import EnsembleError
from ._optim._values import MemberValues

__all__ = ["MemberBatches", "copy_members", "exploit", "redraw_members"]

Mode = Literal["bootstrap", "shards", "shared"]


class MemberBatches:
    """One minibatch per member per step, stacked: ``(xb, yb)`` of shapes ``[num_members, batch, ...]``.

    Each member draws from its own pool of example indices: a bootstrap
    resample of the data (``"bootstrap"``: ``len(X)`` draws with replacement,
    fixed for the run: bagging), a disjoint shard (``"shards"``: ``len(X) //
    num_members`` examples each) or the whole data set (``"shared"``: every
    member gets the same batch, an expanded view). Every epoch shuffles each
    pool on its own; iterating yields one epoch of ``len(self)`` steps (the
    last partial batch is dropped). Each step is one indexing op per tensor,
    ``X[idx]`` with ``idx`` of shape ``[num_members, batch]``.

    Parameters
    ----------
    X, y : Tensor
        The data, ``[N, ...]`` and ``[N, ...]`` (any number of tensors with the
        same leading size may be passed as ``*tensors``).
    num_members : int
        The ensemble's member count.
    batch_size : int
        Examples per member per step.
    mode : {"bootstrap", "shards", "shared"}
    seed : int
        Seeds the pools and the shuffles: the same seed gives the same batches.

    Examples
    --------
    >>> import torch
    >>> X, y = torch.randn(100, 3), torch.arange(100)  # 100 examples
    >>> batches = MemberBatches(X, y, num_members=4, batch_size=10, mode="shards", seed=0)
    >>> len(batches)  # steps per epoch: each shard holds 25 examples
    2
    >>> xb, yb = next(iter(batches))
    >>> xb.shape, yb.shape  # one batch per member, for ens(xb, in_dims=0)
    (torch.Size([4, 10, 3]), torch.Size([4, 10]))
    """

    def __init__(self, *tensors: Tensor, num_members: int, batch_size: int, mode: Mode = "bootstrap", seed: int = 0):
        if not tensors or any(t.shape[:1] != tensors[0].shape[:1] for t in tensors):
            sizes = [tuple(t.shape[:1]) for t in tensors]
            raise EnsembleError(f"MemberBatches: pass tensors with the same leading size (examples); got {sizes}.")
        if mode not in ("bootstrap", "shards", "shared"):
            raise EnsembleError(f"MemberBatches: mode must be 'bootstrap', 'shards' or 'shared', got {mode!r}.")
        n_examples = tensors[0].shape[0]
        self.tensors, self.num_members, self.batch_size, self.mode = tensors, num_members, batch_size, mode
        self.generator = torch.Generator().manual_seed(seed)
        if mode == "bootstrap":
            self.pools = torch.randint(n_examples, (num_members, n_examples), generator=self.generator)
        elif mode == "shards":
            size = n_examples // num_members
            perm = torch.randperm(n_examples, generator=self.generator)
            self.pools = perm[: size * num_members].view(num_members, size)
        else:
            self.pools = torch.arange(n_examples).unsqueeze(0)
        if batch_size < 1 or batch_size > self.pools.shape[1]:
            raise EnsembleError(
                f"MemberBatches: batch_size {batch_size} must be between 1 and the {self.pools.shape[1]} examples "
                f"each member draws from (mode {mode!r}, {n_examples} examples, {num_members} members)."
            )

    def __len__(self) -> int:
        return self.pools.shape[1] // self.batch_size

    def indices(self) -> Iterator[Tensor]:
        """One epoch of index tensors ``[num_members, batch]`` (``[1, batch]`` for ``"shared"``)."""
        order = torch.rand(self.pools.shape, generator=self.generator).argsort(dim=1)
        shuffled = self.pools.gather(1, order).to(self.tensors[0].device)
        for k in range(len(self)):
            yield shuffled[:, k * self.batch_size : (k + 1) * self.batch_size]

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        for idx in self.indices():
            batch = tuple(t[idx] for t in self.tensors)  # [members, batch, ...]
            if self.mode == "shared":
                batch = tuple(b.expand(self.num_members, *b.shape[1:]) for b in batch)
            yield batch


def _indices(name: str, members: int | Sequence[int] | Tensor, n: int) -> Tensor:
    idx = torch.as_tensor([members] if isinstance(members, int) else members, dtype=torch.long).reshape(-1)
    bad = idx[(idx < -n) | (idx >= n)]
    if bad.numel():
        raise EnsembleError(f"copy_members: {name} member {int(bad[0])} is out of range for {n} members.")
    return idx % n


def copy_members(
    ens: Ensemble,
    src: int | Sequence[int] | Tensor,
    dst: int | Sequence[int] | Tensor,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    hyperparameters: bool = True,
) -> None:
    """Copy members ``src`` into members ``dst``: weights, buffers, optimizer state and hyperparameters.

    Member ``dst[k]`` becomes an exact copy of member ``src[k]`` (all sources
    are read before any destination is written). With ``optimizer``, every
    per-member state tensor (``exp_avg``, ``momentum_buffer``, ...: those whose
    leading dimension is the member count) is copied the same way, and with
    ``hyperparameters=True`` so are per-member values in its param groups
    (:class:`~ensembling.optim.MemberValues`): perturb them afterwards for
    population-based training. Step counters are shared by all members and
    are left alone.

    Examples
    --------
    >>> import torch
    >>> from ensembling import Ensemble
    >>> from ensembling.optim import AdamW
    >>> ens = Ensemble(lambda: torch.nn.Linear(2, 1), 4)  # weight [4, 1, 2]
    >>> opt = AdamW(ens.parameters(), lr=[1e-3, 1e-2, 1e-1, 1.0])
    >>> copy_members(ens, src=[2], dst=[0], optimizer=opt)  # member 0 becomes member 2
    >>> w = ens.named_stacked_parameters()["weight"]
    >>> torch.equal(w[0], w[2]), opt.param_groups[0]["lr"].tolist()
    (True, [0.1, 0.01, 0.1, 1.0])
    """
    n = ens.num_members
    src_t, dst_t = _indices("source", src, n), _indices("destination", dst, n)
    if src_t.numel() != dst_t.numel() or dst_t.unique().numel() != dst_t.numel():
        raise EnsembleError(
            f"copy_members: got {src_t.numel()} sources and {dst_t.numel()} destinations; pass as many of each, "
            "and each destination once."
        )
    with torch.no_grad():
        tensors = [*ens.named_stacked_parameters().values(), *ens.named_stacked_buffers().values()]
        if optimizer is not None:
            for state in optimizer.state.values():
                tensors += [v for v in state.values() if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == n]
        for t in tensors:
            t[dst_t.to(t.device)] = t[src_t.to(t.device)]
        if optimizer is not None and hyperparameters:
            for group in optimizer.param_groups:
                for value in group.values():
                    for v in value if isinstance(value, tuple) else (value,):
                        if isinstance(v, MemberValues):
                            v[dst_t] = v[src_t]


def exploit(
    ens: Ensemble,
    scores: Tensor | Sequence[float],
    fraction: float = 0.25,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    higher_is_better: bool = True,
) -> tuple[Tensor, Tensor]:
    """Copy the best ``fraction`` of members (by ``scores``, ``[num_members]``) into the worst.

    Returns ``(src, dst)``: the best members, best first, and the worst
    members they were copied into, worst first (so ``src[k]`` went to
    ``dst[k]``). Perturb ``dst``'s hyperparameters next to explore.

    Examples
    --------
    >>> import torch
    >>> from ensembling import Ensemble
    >>> ens = Ensemble(lambda: torch.nn.Linear(2, 1), 4)
    >>> src, dst = exploit(ens, torch.tensor([0.5, 0.9, 0.1, 0.7]), fraction=0.5)
    >>> src.tolist(), dst.tolist()  # the best two into the worst two
    ([1, 3], [2, 0])
    """
    scores_t = torch.as_tensor(scores, dtype=torch.float64).detach().cpu().reshape(-1)
    if scores_t.numel() != ens.num_members:
        raise EnsembleError(f"exploit: got {scores_t.numel()} scores for {ens.num_members} members; pass one each.")
    k = int(fraction * ens.num_members)
    if not 0 < k <= ens.num_members // 2:
        raise EnsembleError(
            f"exploit: fraction {fraction} selects {k} of {ens.num_members} members; pick a fraction that selects at "
            "least one member and at most half."
        )
    order = scores_t.argsort(descending=higher_is_better)
    src, dst = order[:k], order.flip(0)[:k]
    copy_members(ens, src, dst, optimizer)
    return src, dst


def redraw_members(
    ens: Ensemble,
    members: int | Sequence[int] | Tensor,
    factory: Callable[[], nn.Module],
    optimizer: torch.optim.Optimizer | None = None,
    *,
    seed: int | None = None,
) -> None:
    """Re-initialize ``members`` with fresh modules from ``factory`` and zero their optimizer state.

    ``seed`` seeds the new draws (on the CPU); otherwise torch's global
    generator is used. Optimizer state tensors are zeroed for those members
    (for Adam this is the fresh state; an SGD momentum buffer restarts from
    zero rather than from the next gradient).

    Examples
    --------
    >>> import torch
    >>> from ensembling import Ensemble
    >>> ens = Ensemble(lambda: torch.nn.Linear(2, 1), 3)
    >>> before = ens.named_stacked_parameters()["weight"].detach().clone()  # [3, 1, 2]
    >>> redraw_members(ens, [1], lambda: torch.nn.Linear(2, 1), seed=0)
    >>> after = ens.named_stacked_parameters()["weight"]
    >>> torch.equal(after[0], before[0]), torch.equal(after[1], before[1])
    (True, False)
    """
    n = ens.num_members
    idx = _indices("redrawn", members, n)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        if seed is not None:
            torch.manual_seed(seed)
        fresh = [factory() for _ in range(idx.numel())]
        stacked = {**ens.named_stacked_parameters(), **ens.named_stacked_buffers()}
        for k, module in enumerate(fresh):
            state = module.state_dict()
            for name, t in stacked.items():
                t[int(idx[k])] = state[name].to(t.device, t.dtype)
        if optimizer is not None:
            for st in optimizer.state.values():
                for v in st.values():
                    if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == n:
                        v[idx.to(v.device)] = 0
