"""Run a function on several local processes joined in a gloo process group, with bounded waits.

:func:`launch` is what the sharding page, the tests and the benchmark use to
try :mod:`ensembling.distributed` on one machine without ``torchrun``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ._errors import EnsembleError

__all__ = ["launch"]


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
                errors.append(
                    f"rank {r}: no result "
                    f"({'killed after the deadline' if r in hung else f'exit code {procs[r].exitcode}'})"
                )
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
