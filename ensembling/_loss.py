"""The training objective of an ensemble: each member's mean loss, summed over members."""

from __future__ import annotations

from torch import Tensor

from ._errors import EnsembleError

__all__ = ["ensemble_loss"]


def ensemble_loss(losses: Tensor) -> Tensor:
    """Sum over members of each member's mean loss: backpropagating it trains every member as if alone.

    Member ``i``'s loss depends only on member ``i``'s slice of each stacked
    parameter, so the gradient of the *sum* with respect to that slice is
    member ``i``'s own gradient. A mean over members instead would divide every
    gradient by ``num_members`` (for SGD, a smaller learning rate).

    Parameters
    ----------
    losses : Tensor
        Unreduced losses with the members first, ``[num_members, ...]``: e.g.
        ``F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")``
        viewed as ``[num_members, batch]``.

    Returns
    -------
    Tensor
        A scalar: ``losses.flatten(1).mean(dim=1).sum()``.

    Examples
    --------
    >>> import torch
    >>> losses = torch.tensor([[1.0, 3.0], [10.0, 30.0]])  # [2 members, 2 examples]
    >>> ensemble_loss(losses)  # (1 + 3) / 2 + (10 + 30) / 2
    tensor(22.)
    """
    if losses.dim() < 2:
        raise EnsembleError(
            f"ensemble_loss: expected unreduced losses of shape [num_members, ...], got shape "
            f"{list(losses.shape)}; pass reduction='none' to the loss and view it as [num_members, -1]."
        )
    return losses.flatten(1).mean(dim=1).sum()
