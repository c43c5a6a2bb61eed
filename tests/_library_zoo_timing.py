"""Time the library zoo: loop over 4 members vs ``Ensemble``, forward (eval, no grad) and training step.

Run ``python tests/_library_zoo_timing.py [repeats]`` (needs the zoo extra; not a test). Both
variants run side by side, interleaved, in one process; the table gives medians and the
ratio loop/ensemble (>1: the ensemble is faster). Timings on a shared CPU are noisy.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import torch


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(12):  # warm-up: vmap, lazy initialization, and the strategy measured on the first calls
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(repeats: int) -> None:
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    import library_zoo as zoo

    from ensembling import Ensemble

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, 4 members, median of {repeats}")
    print(
        f"{'model':20s} {'fwd loop':>9s} {'fwd ens':>9s} {'ratio':>6s} {'step loop':>9s} {'step ens':>9s} {'ratio':>6s}"
    )
    for name, zm in zoo.MODELS.items():
        torch.manual_seed(0)
        members = [zm.factory().eval() for _ in range(4)]
        ens = Ensemble.from_modules(members)
        args = zm.inputs(torch.Generator().manual_seed(0), ())

        def fwd_loop() -> None:
            with torch.no_grad():
                [zm.select(m(*args, **zm.kwargs)) for m in members]

        def fwd_ens() -> None:
            with torch.no_grad():
                zm.select(ens(*args, **zm.kwargs))

        train_members = [m.train() for m in members]
        opts = [torch.optim.SGD(m.parameters(), lr=1e-3) for m in train_members]
        ens.train()
        opt = torch.optim.SGD(ens.parameters(), lr=1e-3)

        def step_loop() -> None:
            for m, o in zip(train_members, opts):
                o.zero_grad()
                zm.select(m(*args, **zm.kwargs)).square().mean().backward()
                o.step()

        def step_ens() -> None:
            opt.zero_grad()
            zm.select(ens(*args, **zm.kwargs)).square().mean(dim=tuple(range(1, 3))).sum().backward()
            opt.step()

        for m in members:
            m.eval()
        ens.eval()
        fl, fe = median_seconds(fwd_loop, repeats), median_seconds(fwd_ens, repeats)
        for m in members:
            m.train()
        ens.train()
        sl, se = median_seconds(step_loop, repeats), median_seconds(step_ens, repeats)
        print(
            f"{name:20s} {fl * 1e3:7.1f}ms {fe * 1e3:7.1f}ms {fl / fe:5.2f}x "
            f"{sl * 1e3:7.1f}ms {se * 1e3:7.1f}ms {sl / se:5.2f}x",
            flush=True,
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
