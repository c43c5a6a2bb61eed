"""Benchmark: ``python -m ensembling.bench``.

Measures, side by side in one run on the current device, and prints tables
with ratios:

* **inference** for MLP ensembles of (members, batch, in, hidden) =
  (10, 64, 784, 128), (100, 64, 784, 128), (100, 8, 32, 32), (1000, 8, 16, 16),
  each with one input shared by every member and with one input per member:
  a Python loop, raw ``vmap(functional_call)``, :class:`~ensembling.Ensemble` on
  its ``vmap`` path and on its default (fastest) path, ``torch.compile`` of the
  ensemble, hand-batched :func:`torch.baddbmm` (the speed limit for these
  MLPs) and ``tensordict.nn.EnsembleModule``;
* a **training step** (forward, backward, Adam) for the same configurations:
  a loop of separate models and optimizers versus one ``Ensemble`` and one
  optimizer;
* **real architectures** (section ``zoo``, :mod:`ensembling._bench_zoo`): a
  custom MLP class, a BatchNorm CNN, a transformer classifier, multi-head
  attention, an LSTM forecaster, a bidirectional GRU and an embedding model,
  at 4, 16 and 64 members (4 and 16 with ``--quick``): a loop of modules
  versus one ``Ensemble``, inference and a training step, with the ratios and
  the plan ``Ensemble`` chose (``ens.plan()``);
* **initialization** of 1,000 members of the 784-128-128-10 MLP: building the
  modules and stacking them versus ``Ensemble(factory, 1000)``, time and peak
  memory (each measured in a fresh subprocess);
* a **sharded** ensemble (:mod:`ensembling.distributed`) on 1 and on 2 local
  gloo processes: inference with the gather, and a training step.
* a **sweep** (section ``sweep``): 16 and 64 hyperparameter configurations
  trained in one run versus one at a time, and the per-member-values
  ``ensembling.optim.AdamW`` step versus torch's foreach ``AdamW`` step.

Every implementation's output is checked against the loop before it is timed.
The implementations compared in a row are timed together by
:func:`ensembling.tutorial.compare` (alternating rounds, one thread on the CPU);
times are medians over the rounds and a ratio is the median of the per-round
ratios, so background load falls on both sides alike. Nothing here is
asserted: the numbers are for reading, and differ between machines.

Options: ``--quick`` (shorter timing, no ``torch.compile``), ``--no-compile``,
``--sections inference,training,zoo,init,distributed,sweep``, ``--min-run-time SECONDS``.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state

from ._bench_common import CLASSES, CustomMLP, mlp
from ._bench_common import table as _table
from ._bench_zoo import MEMBER_COUNTS, zoo
from ._device import default_device, synchronize, tolerances
from ._ensemble import Ensemble
from ._loss import ensemble_loss
from .tutorial.timing import Timing, compare, format_seconds, speedup

CONFIGS = [(10, 64, 784, 128), (100, 64, 784, 128), (100, 8, 32, 32), (1000, 8, 16, 16)]


def _ratio(a: Timing | None, b: Timing | None) -> str:
    """``a``'s time / ``b``'s: the median of the per-round ratios when both were timed by one ``compare``."""
    return "-" if a is None or b is None else f"{speedup(b, a).value:.2f}"


class _Setup:
    """One configuration: members, their stacked state and every implementation."""

    def __init__(self, config: tuple[int, int, int, int], shared: bool, device: torch.device):
        members, batch, in_features, hidden = config
        torch.manual_seed(0)
        self.models = [mlp(in_features, hidden).to(device) for _ in range(members)]
        self.shared = shared
        self.x = torch.randn(batch, in_features, device=device)
        self.xs = torch.randn(members, batch, in_features, device=device)
        self.target = torch.randint(0, CLASSES, (members, batch), device=device)
        self.params, self.buffers = stack_module_state(self.models)
        self.base = copy.deepcopy(self.models[0]).to("meta")
        self.ensemble = Ensemble.from_modules(self.models)
        self.ensemble_vmap = Ensemble.from_modules(self.models, fast_path=False)
        self.ensemble_custom = Ensemble.from_modules([CustomMLP(m) for m in self.models])

    def inputs(self) -> tuple[torch.Tensor, Any]:
        return (self.x, None) if self.shared else (self.xs, 0)

    def loop(self) -> torch.Tensor:
        if self.shared:
            return torch.stack([m(self.x) for m in self.models])
        return torch.stack([m(x) for m, x in zip(self.models, self.xs)])

    def raw_vmap(self) -> Callable[[], torch.Tensor]:
        base = self.base
        fn = torch.vmap(
            lambda p, b, x: functional_call(base, (p, b), (x,)),
            in_dims=(0, 0, None if self.shared else 0),
        )
        x = self.x if self.shared else self.xs
        return lambda: fn(self.params, self.buffers, x)

    def baddbmm(self) -> Callable[[], torch.Tensor]:
        layers = [
            (self.params[f"{i}.weight"].detach().mT, self.params[f"{i}.bias"].detach().unsqueeze(1)) for i in (0, 2, 4)
        ]
        members = len(self.models)

        def forward() -> torch.Tensor:
            h = self.x.expand(members, *self.x.shape) if self.shared else self.xs
            for k, (weight_t, bias) in enumerate(layers):
                h = torch.baddbmm(bias, h, weight_t)
                if k < len(layers) - 1:
                    h = h.relu_()
            return h

        return forward

    def tensordict(self) -> Callable[[], torch.Tensor] | None:
        try:
            from tensordict import TensorDict
            from tensordict.nn import EnsembleModule, TensorDictModule
        except ImportError:
            return None
        module = TensorDictModule(copy.deepcopy(self.models[0]), in_keys=["x"], out_keys=["y"])
        ens = EnsembleModule(module, num_copies=len(self.models), expand_input=self.shared)
        with torch.no_grad():
            for name, value in self.params.items():
                ens.params_td.get(("module", *name.split("."))).copy_(value)
        if self.shared:
            td = TensorDict({"x": self.x}, batch_size=[self.x.shape[0]])
        else:
            td = TensorDict({"x": self.xs}, batch_size=list(self.xs.shape[:2]))
        return lambda: ens(td)["y"]


def inference(device: torch.device, min_run_time: float, use_compile: bool) -> str:
    header = ["members", "batch", "in", "hidden", "input", "loop", "vmap", "Ens(vmap)", "Ens(best)",
              "Ens(custom)", "compiled", "baddbmm", "tensordict", "Ens(vmap)/vmap", "best/baddbmm",
              "custom/baddbmm", "best/tensordict", "loop/best"]  # fmt: skip
    rows = []
    for config in CONFIGS:
        for shared in (True, False):
            s = _Setup(config, shared, device)
            x, in_dims = s.inputs()
            candidates: dict[str, Callable[[], Any] | None] = {
                "loop": s.loop,
                "vmap": s.raw_vmap(),
                "Ens(vmap)": lambda s=s, x=x, d=in_dims: s.ensemble_vmap(x, in_dims=d),
                "Ens(best)": lambda s=s, x=x, d=in_dims: s.ensemble(x, in_dims=d),
                "Ens(custom)": lambda s=s, x=x, d=in_dims: s.ensemble_custom(x, in_dims=d),
                "compiled": None,
                "baddbmm": s.baddbmm(),
                "tensordict": s.tensordict(),
            }
            if use_compile:
                compiled = torch.compile(s.ensemble)
                candidates["compiled"] = lambda c=compiled, x=x, d=in_dims: c(x, in_dims=d)
            present = {label: fn for label, fn in candidates.items() if fn is not None}
            with torch.no_grad():
                expected = s.loop()
                tol = tolerances(torch.float32, device)
                for label, fn in present.items():
                    torch.testing.assert_close(fn(), expected, **tol, msg=lambda m, label=label: f"{label}: {m}")
                    fn()  # an Ensemble's first calls may still be measuring its plan: settle it first
                measured = compare(present, device=device, min_run_time=min_run_time)  # alternating rounds
            times: dict[str, Timing | None] = {label: measured.get(label) for label in candidates}
            best = times["Ens(best)"]
            rows.append([
                *map(str, config), "shared" if shared else "per-member",
                *(format_seconds(t.median) if t else "-" for t in times.values()),
                _ratio(times["Ens(vmap)"], times["vmap"]), _ratio(best, times["baddbmm"]),
                _ratio(times["Ens(custom)"], times["baddbmm"]), _ratio(best, times["tensordict"]),
                _ratio(times["loop"], best),
            ])  # fmt: skip
            print(f"  inference {config} {'shared' if shared else 'per-member'} done", file=sys.stderr, flush=True)
    return _table(
        "Inference: median time per call; ratios are time/time (below 1 = left side faster)",
        header,
        rows,
    )


def training(device: torch.device, min_run_time: float) -> str:
    header = ["members", "batch", "in", "hidden", "input", "loop", "Ensemble", "loop/Ensemble"]
    rows = []
    fused = {"fused": True} if device.type in ("cpu", "cuda", "mps") else {}
    for config in CONFIGS:
        for shared in (True, False):
            s = _Setup(config, shared, device)
            x, in_dims = s.inputs()
            optimizers = [torch.optim.Adam(m.parameters(), lr=1e-3, **fused) for m in s.models]
            ens_opt = torch.optim.Adam(s.ensemble.parameters(), lr=1e-3, **fused)

            def loop_step() -> None:
                for k, (model, opt) in enumerate(zip(s.models, optimizers)):
                    opt.zero_grad(set_to_none=True)
                    logits = model(s.x if shared else s.xs[k])
                    F.cross_entropy(logits, s.target[k]).backward()
                    opt.step()

            def ensemble_step() -> None:
                ens_opt.zero_grad(set_to_none=True)
                logits = s.ensemble(x, in_dims=in_dims)  # [members, batch, classes]
                per_member = F.cross_entropy(logits.flatten(0, 1), s.target.flatten(), reduction="none")
                ensemble_loss(per_member.view(len(s.models), -1)).backward()
                ens_opt.step()

            for _ in range(14):  # past the calls the ensemble measures its activation layout over
                ensemble_step()
            timed = compare({"loop": loop_step, "Ensemble": ensemble_step}, device=device, min_run_time=min_run_time)
            t_loop, t_ens = timed["loop"], timed["Ensemble"]
            rows.append(
                [
                    *map(str, config),
                    "shared" if shared else "per-member",
                    format_seconds(t_loop.median),
                    format_seconds(t_ens.median),
                    _ratio(t_loop, t_ens),
                ]
            )
            print(f"  training {config} {'shared' if shared else 'per-member'} done", file=sys.stderr, flush=True)
    return _table(
        f"Training step (forward + backward + Adam{'(fused=True)' if fused else ''}): median time per step",
        header,
        rows,
    )


def _rss_bytes(field: str) -> int:
    """VmRSS or VmHWM (peak) of this process, from /proc (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _init_child(method: str, members: int, device: str) -> dict[str, float]:
    """Runs in a fresh process: time one initialization and report its peak memory."""
    dev = torch.device(device)
    factory = lambda: mlp(784, 128)  # noqa: E731
    numel = members * sum(p.numel() for p in factory().parameters())
    torch.manual_seed(0)
    Ensemble(factory, 2, device=dev)  # warm up: imports, allocator, kernels
    synchronize(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
        base = _rss_bytes("VmRSS")
    start = time.perf_counter()
    if method == "build+stack":
        models = [factory().to(dev) for _ in range(members)]
        result: object = stack_module_state(models)
        del models
    elif method == "Ensemble":
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the MLP must not need the copy-one-member fallback
            result = Ensemble(factory, members, device=dev)
    else:  # the floor: fresh memory for every parameter, filled with one uniform_ call
        result = torch.empty(numel, device=dev).uniform_(-0.1, 0.1)
    synchronize(dev)
    seconds = time.perf_counter() - start
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) - base
    else:
        peak = _rss_bytes("VmHWM") - base
    del result  # kept alive until the peak was read
    return {"seconds": seconds, "peak_bytes": float(peak), "stacked_bytes": float(numel * 4)}


def initialization(device: torch.device, members: int = 1000, repeats: int = 3) -> str:
    results = {}
    for method in ("build+stack", "Ensemble", "floor"):
        runs = []
        for _ in range(repeats):
            out = subprocess.run(
                [sys.executable, "-m", "ensembling.bench", "--init-child", method, str(members), str(device)],
                capture_output=True,
                text=True,
                check=True,
            )
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        results[method] = {
            "seconds": min(r["seconds"] for r in runs),
            "peak_bytes": min(r["peak_bytes"] for r in runs),
        }
    stacked = runs[0]["stacked_bytes"]
    build, vec = results["build+stack"], results["Ensemble"]
    labels = {"build+stack": "build 1000 modules + stack_module_state", "Ensemble": "Ensemble(factory, 1000)",
              "floor": "floor: empty(...).uniform_() of the same size"}  # fmt: skip
    rows = [
        [labels[method], format_seconds(r["seconds"]), f"{r['peak_bytes'] / 2**20:.0f} MiB"]
        for method, r in results.items()
    ]
    rows.append(["build+stack / Ensemble", f"{build['seconds'] / vec['seconds']:.2f}x",
                 f"{build['peak_bytes'] / vec['peak_bytes']:.2f}x"])  # fmt: skip
    where = "peak allocated (CUDA)" if device.type == "cuda" else "peak RSS growth"
    return _table(
        f"Initialization of {members} members of 784-128-128-10, {stacked / 2**20:.0f} MiB of "
        f"parameters (best of {repeats} fresh processes)",
        ["method", "time", where],
        rows,
    )


DIST_CONFIGS = [(64, 64, 784, 128), (256, 8, 16, 16)]


def _distributed_worker(rank: int, world_size: int, config: tuple[int, int, int, int], min_run_time: float) -> dict:
    """Time inference (forward + all_gather) and a training step of this rank's shard."""
    import torch.distributed as dist

    from .distributed import ShardedEnsemble

    members, batch, in_features, hidden = config
    sharded = ShardedEnsemble(lambda: mlp(in_features, hidden), members, seed=0)
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(members, batch, in_features, generator=g)
    target = sharded.local_inputs(torch.randint(0, CLASSES, (members, batch), generator=g))
    optimizer = torch.optim.Adam(sharded.parameters(), lr=1e-3, fused=True)

    def infer() -> None:
        sharded.predict(xs, in_dims=0)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        logits = sharded(xs, in_dims=0)
        loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
        ensemble_loss(loss.view(target.shape)).backward()
        optimizer.step()

    def timed(fn: Callable[[], None]) -> float:
        """Median per-call time over 5 blocks that every rank runs with the same count.

        (Each rank must make the same number of collective calls, so the
        adaptive repeat count of torch.utils.benchmark cannot be used here.)
        """
        fn(), fn()
        start = time.perf_counter()
        fn()
        once = torch.tensor(time.perf_counter() - start)
        dist.all_reduce(once, op=dist.ReduceOp.MAX)
        calls = max(3, int(min_run_time / 5 / float(once)))
        blocks = []
        for _ in range(5):
            dist.barrier()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            dist.barrier()
            blocks.append((time.perf_counter() - start) / calls)
        return sorted(blocks)[2]

    return {"infer": timed(infer), "step": timed(step), "threads": torch.get_num_threads()}


def distributed(min_run_time: float) -> str:
    from . import bench  # the worker by its importable name, even when this file runs as __main__
    from .launcher import launch

    header = ["members", "batch", "in", "hidden", "processes", "threads each", "inference+gather",
              "training step", "inference speedup", "training speedup"]  # fmt: skip
    rows = []
    for config in DIST_CONFIGS:
        base: dict[str, float] = {}
        for world in (1, 2):
            results = launch(bench._distributed_worker, world, config, min_run_time, timeout_s=120)
            slowest = {k: max(r[k] for r in results) for k in ("infer", "step")}  # a step ends with the slowest rank
            base = base or slowest
            speedups = [f"{base['infer'] / slowest['infer']:.2f}x", f"{base['step'] / slowest['step']:.2f}x"]
            times = [format_seconds(slowest["infer"]), format_seconds(slowest["step"])]
            rows.append([*map(str, config), str(world), str(results[0]["threads"]), *times, *speedups])
            print(f"  distributed {config} x{world} done", file=sys.stderr, flush=True)
    return _table(
        "Sharded ensemble (gloo, local processes, the machine's cores split between them): "
        "median time per call of the slowest rank; speedup over 1 process",
        header,
        rows,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ensembling.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short timings, no torch.compile")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    parser.add_argument("--sections", default="inference,training,zoo,init,distributed,sweep")
    parser.add_argument("--min-run-time", type=float, default=None, help="seconds per measurement")
    parser.add_argument("--init-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.init_child:
        method, members, device = args.init_child
        print(json.dumps(_init_child(method, int(members), device)))
        return 0

    device = default_device()
    min_run_time = args.min_run_time or (0.05 if args.quick else 0.3)
    use_compile = not (args.quick or args.no_compile)
    sections = {s.strip() for s in args.sections.split(",")}
    unknown = sections - {"inference", "training", "zoo", "init", "distributed", "sweep"}
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}")
    print(f"device: {device}; torch {torch.__version__}; {torch.get_num_threads()} threads\n")
    if "inference" in sections:
        print(inference(device, min_run_time, use_compile), flush=True)
    if "training" in sections:
        print(training(device, min_run_time), flush=True)
    if "zoo" in sections:
        print(zoo(device, min_run_time, (4, 16) if args.quick else MEMBER_COUNTS), flush=True)
    if "init" in sections:
        print(initialization(device), flush=True)
    if "distributed" in sections:
        print(distributed(min_run_time), flush=True)
    if "sweep" in sections:  # a hyperparameter sweep in one run (ensembling.optim), see _bench_sweep
        from ._bench_sweep import run as sweep

        print("\n".join(sweep(device, args.quick)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
