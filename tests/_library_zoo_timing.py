"""Time the library zoo: loop over 4 members vs ``Ensemble``, forward (eval, no grad) and training step.

Run ``python tests/_library_zoo_timing.py [repeats]`` (needs the zoo extra; not a test). Both
variants run side by side in alternating rounds (``ensembling.tutorial.compare``, one thread);
the table gives medians and the median per-round ratio loop/ensemble (>1: the ensemble is faster).
"""

from __future__ import annotations

import sys

import torch

from ensembling.tutorial import compare, speedup


def timed(loop, ensemble, repeats: int) -> tuple[float, float, float]:
    """Loop and ensemble in alternating rounds (after warm-up: the strategy is measured on the first calls).

    The warm-up runs on one thread, as the timing does, so the strategy is chosen for that setting.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(12):
            ensemble()
    finally:
        torch.set_num_threads(threads)
    t = compare({"loop": loop, "Ensemble": ensemble}, min_run_time=0.05 * repeats, rounds=repeats)
    return t["loop"].median, t["Ensemble"].median, speedup(t["Ensemble"], t["loop"]).value


def main(repeats: int) -> None:
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    import library_zoo as zoo

    from ensembling import Ensemble

    print(f"torch {torch.__version__}, 1 thread, 4 members, {repeats} alternating rounds")
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
                torch.stack([zm.select(m(*args, **zm.kwargs)) for m in members])  # as the ensemble returns it

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
        fl, fe, fr = timed(fwd_loop, fwd_ens, repeats)
        for m in members:
            m.train()
        ens.train()
        sl, se, sr = timed(step_loop, step_ens, repeats)
        print(
            f"{name:20s} {fl * 1e3:7.1f}ms {fe * 1e3:7.1f}ms {fr:5.2f}x {sl * 1e3:7.1f}ms {se * 1e3:7.1f}ms {sr:5.2f}x "
            + "; ".join(line.strip().split(" -> ")[1] for line in ens.plan().splitlines() if " -> " in line),
            flush=True,
        )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
