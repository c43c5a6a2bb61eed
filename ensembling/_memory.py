"""Peak tensor memory of a computation, counted at the ATen dispatcher (any device)."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["peak_memory"]


class _Tracker(TorchDispatchMode):
    """Counts the bytes of every new storage an operator returns, until its tensor dies."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[tuple[str, int], int] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: tuple[str, int]) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {
            (str(t.device), t.untyped_storage().data_ptr())
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor) and t.device.type != "meta"
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = (str(t.device), storage.data_ptr())
            if storage.data_ptr() == 0 or key in inputs or key in self.live:
                continue  # empty, a view or in-place result of an input, or already counted
            self.live[key] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(t, self._release, key)
        return out


def peak_memory(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn()`` and return its result and the peak bytes of tensors it had alive at once.

    Every operator ``fn`` runs is observed at the ATen dispatcher: each new
    storage an operator returns counts from then until its tensor is freed.
    Views and in-place results add nothing; tensors that existed before the call
    (inputs, parameters) are not counted. The result is the same on every
    device and does not include allocator caching or fragmentation, so it
    compares *algorithms* (how much an ensemble's forward pass keeps alive),
    not processes.

    Parameters
    ----------
    fn : callable
        A function of no arguments.

    Returns
    -------
    result, peak_bytes : tuple
        What ``fn`` returned (its tensors are still counted as alive at the
        end), and the peak in bytes.

    Examples
    --------
    >>> def work():
    ...     a = torch.empty(1000, 250)  # 1,000,000 bytes of float32
    ...     b = torch.empty(500, 250)   #   500,000 bytes, while a is alive
    ...     del a                       # frees 1,000,000
    ...     return torch.empty(250, 250)  # 250,000 bytes, with b still alive
    >>> _, peak = peak_memory(work)
    >>> peak
    1500000
    >>> x = torch.randn(100, 100)
    >>> peak_memory(lambda: x.t().mul_(2))[1]  # a view and an in-place op allocate nothing
    0
    """
    tracker = _Tracker()
    with tracker:
        result = fn()
    return result, tracker.peak
