"""glibc's malloc on the CPU: keep what a training step frees, so the next step reuses it.

Why. glibc serves a request at or above its *mmap threshold* with a fresh
mapping that goes back to the kernel on ``free``, and hands free memory at the
top of its heap back beyond its *trim threshold*. Both adapt, but only to the
largest mapped block freed so far (the trim threshold to twice it), and only up
to 32 MiB and 64 MiB. A training step frees all its gradients at once: far more
than twice its largest tensor, and for an ensemble, whose stacked tensors are
``num_members`` times a member's, past the caps too. So each step hands its
memory back, maps it again, and the kernel zero-fills every 4 KiB page on first
touch. Measured on a 2-core VM, one thread: ResNet-10 x4 (16x16 images, SGD),
48,000 page faults a training step and the ensemble at 0.63x the loop's speed,
with the thresholds below about 100 faults and 1.08x; 16 x three
Linear(256, 256) (12 MiB, Adam), 1,900-2,500 faults a step and 20 % of the step,
then none.

What. When an ensemble first trains on the CPU, :func:`make_room` raises the
two thresholds: the mmap threshold above the ensemble's largest stacked
parameter, the trim threshold to four times the bytes of all its stacked
parameters (what a step may free at once: the gradients, an optimizer's
temporaries, a gradient's copy into its parameter's layout; twice left Adam
steps with a third of their faults, four with a few percent). The thresholds
only grow, never below glibc's own caps, and never past what ``mallopt`` takes
(an int). Nothing happens on other devices, without glibc, under another malloc
(``LD_PRELOAD``), when the user set glibc's malloc variables, or after
:func:`reuse_cpu_memory` ``(False)``. The cost: up to the trim threshold of
free memory stays mapped, as PyTorch's own CUDA caching allocator keeps its
blocks.

When. Two calls, both cheap after the first: ``Ensemble.forward`` when it
records gradients eagerly, and a hook (:func:`arm`) run after each gradient
accumulated into the ensemble's first trainable stacked parameter. The hook
runs outside any compiled graph, so a training loop of ``torch.compile(ens)``
gets the thresholds too (4 x Linear(1536, 1536), SGD, compiled with inductor:
18,450 page faults a step without them, 4-14 with; 86-95 ms a step, then
37-38). Copies (``copy.deepcopy``, pickles) carry no hooks; their first eager
training call still counts.
"""

from __future__ import annotations

import ctypes
import os
import sys
import weakref
from typing import Any

import torch

from ._errors import EnsembleError

__all__ = ["arm", "make_room", "reuse_cpu_memory", "settings"]

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
MMAP_CAP, TRIM_CAP = 32 << 20, 64 << 20  # glibc's dynamic limits on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX, twice it)
INT_MAX = 2**31 - 1
USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
OTHER_MALLOCS = ("jemalloc", "tcmalloc", "mimalloc")

_enabled = True
_set = {"mmap": 0, "trim": 0}  # what this process asked of mallopt so far (0: nothing)
_libc: Any = None


def reuse_cpu_memory(enabled: bool = True) -> None:
    """Whether ensembles may raise glibc's malloc thresholds for their CPU training steps (default: yes).

    A training step frees all its gradients at once, more than glibc keeps
    between ``free`` and ``malloc`` by itself, and an ensemble's are
    ``num_members`` times a member's; so without this every training step on
    the CPU maps them anew and the kernel zero-fills each page (ResNet-10 x4 on
    a 2-core VM: 48,000 page faults a step, the ensemble at 0.63x the loop's
    speed; kept: 1.08x). An ensemble's first training step (eager or
    compiled) raises the thresholds enough for its stacked parameters; up to
    four times their bytes (at least 64 MiB) of freed memory then stays mapped
    for the next step, as PyTorch's CUDA caching allocator keeps its blocks.

    Parameters
    ----------
    enabled : bool, default True
        ``False``: ensembles leave glibc's allocator as it is from now on.
        Thresholds already raised stay (glibc has no way back to its adaptive
        rule). Environment variables ``MALLOC_MMAP_THRESHOLD_``,
        ``MALLOC_TRIM_THRESHOLD_`` or ``MALLOC_TOP_PAD_``, a ``glibc.malloc``
        entry in ``GLIBC_TUNABLES``, and another malloc in ``LD_PRELOAD`` count
        as the user's choice: ensembles never change it. Other platforms and
        devices are never touched.

    Examples
    --------
    >>> import ensembling
    >>> ensembling.reuse_cpu_memory(False)  # e.g. to measure what the page faults cost
    >>> ensembling.reuse_cpu_memory(True)
    """
    global _enabled
    if not isinstance(enabled, bool):
        raise EnsembleError(f"reuse_cpu_memory: enabled must be True or False; got {enabled!r}.")
    _enabled = enabled


def settings() -> dict[str, int]:
    """The thresholds this process set through ``mallopt``, in bytes (0: left to glibc)."""
    return dict(_set)


def _glibc() -> Any:
    """The process's C library if it is glibc with glibc's malloc and no user malloc settings, else ``None``."""
    global _libc
    if _libc is None:
        _libc = False
        preload = os.environ.get("LD_PRELOAD", "")
        tunables = os.environ.get("GLIBC_TUNABLES", "")
        user_set = any(v in os.environ for v in USER_VARIABLES) or "glibc.malloc." in tunables
        if sys.platform.startswith("linux") and not user_set and not any(m in preload for m in OTHER_MALLOCS):
            try:
                libc = ctypes.CDLL(None)
                if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt"):
                    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
                    _libc = libc
            except OSError:
                pass
    return _libc or None


def wanted(params: list[torch.Tensor]) -> tuple[int, int]:
    """The (mmap, trim) thresholds in bytes that let CPU tensors of these sizes, freed each step, be reused.

    Never below glibc's adaptive caps: setting either threshold ends glibc's
    adaptation of both. ``(0, 0)``: no CPU tensor that takes gradients.
    """
    sizes = [p.numel() * p.element_size() for p in params if p.device.type == "cpu" and p.requires_grad]
    if not sizes:
        return 0, 0
    mmap, trim = max(sizes) + (1 << 20), 4 * sum(sizes)  # + 1 MiB: glibc maps requests >= the threshold
    return min(max(MMAP_CAP, mmap), INT_MAX), min(max(TRIM_CAP, trim), INT_MAX)


def make_room(ens: Any) -> None:
    """Raise glibc's thresholds for ``ens``'s CPU training steps, once per set of stacked tensors."""
    slots = ens._state.param_slots
    if not slots:
        return
    key = id(slots[0].get())
    if not _enabled or ens.__dict__.get("_malloc_key") == key:
        return
    object.__setattr__(ens, "_malloc_key", key)
    mmap, trim = wanted([slot.get() for slot in slots])
    if (mmap <= _set["mmap"] and trim <= _set["trim"]) or _glibc() is None:
        return
    if mmap > _set["mmap"] and _libc.mallopt(M_MMAP_THRESHOLD, mmap) == 1:
        _set["mmap"] = mmap
    if trim > _set["trim"] and _libc.mallopt(M_TRIM_THRESHOLD, trim) == 1:
        _set["trim"] = trim


def arm(ens: Any) -> None:
    """Run :func:`make_room` for ``ens`` after each gradient accumulated into its first trainable stacked parameter.

    A post-accumulate-grad hook runs eagerly, after the backward of a compiled
    forward too. It holds the ensemble weakly, and costs one Python call a step.
    """
    ref = weakref.ref(ens)

    def hook(_: torch.Tensor) -> None:
        owner = ref()
        if owner is not None:
            make_room(owner)

    for slot in ens._state.param_slots:
        param = slot.get()
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(hook)
            return
