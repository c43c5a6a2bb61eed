"""Prototype (issue 14, initialization fidelity): record what one ``factory()`` call does to each parameter.

Run ``python tests/_init_recording_probe.py [model ...]`` (the library-zoo packages needed; not a test).
A :class:`torch.overrides.TorchFunctionMode` sees every tensor creation and every in-place
tensor method (``normal_``, ``uniform_``, ``zero_``, ``fill_``, ``copy_``, ``erfinv_``, ``clamp_``,
...) that runs while the factory builds the model, including those inside ``torch.nn.init``
and ``reset_parameters``. Ops are attributed to the final parameters by storage address, so the
printout is, per model, each distinct op sequence with the parameters that share it, and whether
every op is *self-contained* (reads only that tensor and Python scalars), i.e. could be replayed
on a stacked ``[members, ...]`` tensor with per-member randomness. Storage addresses of freed
temporaries can be reused, so an op attributed to a parameter is a lead, not a proof.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

CREATE = {"empty", "zeros", "ones", "randn", "rand", "randint", "full", "tensor", "arange", "linspace", "eye"}


def describe(value: Any) -> str:
    """A short, storage-free description of an op argument."""
    if isinstance(value, Tensor):
        return f"<tensor {list(value.shape)}>"
    if isinstance(value, float):
        return f"{value:.4g}"
    return repr(value)


class Recorder(TorchFunctionMode):
    """Record in-place ops and creations, keyed by the storage address of the tensor they write."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[int, list[tuple[str, bool]]] = defaultdict(list)
        self.depth = 0  # only the outermost op is kept: nn.init.kaiming_uniform_, not its inner uniform_

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        self.depth += 1
        try:
            out = func(*args, **kwargs)
        finally:
            self.depth -= 1
        if self.depth == 0:
            self.note(getattr(func, "__name__", str(func)), args, kwargs, out)
        return out

    def note(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        """Record an in-place op (on its first tensor, positional or ``tensor=``) or a creation."""
        values = [*args, *kwargs.values()]
        target = None
        if name.endswith("_") and not name.endswith("__") and values and isinstance(values[0], Tensor):
            target = values[0]
        elif name in CREATE and isinstance(out, Tensor):
            target, values = out, [None]
        if target is None or target.numel() == 0:
            return
        own = not any(isinstance(v, Tensor) for v in values[1:])
        shown = [describe(a) for a in args[1:]]
        shown += [f"{k}={describe(v)}" for k, v in kwargs.items() if v is not target and v is not None]
        whole = (
            target.storage_offset() == 0 and target.numel() * target.element_size() == target.untyped_storage().nbytes()
        )
        view = "" if whole else f"@view{list(target.shape)}+{target.storage_offset()}"  # e.g. a padding row
        self.ops[target.untyped_storage().data_ptr()].append((f"{name}({', '.join(shown)}){view}", own))


def record(factory: Any) -> dict[str, list[tuple[str, bool]]]:
    """Op sequence per final parameter name for one ``factory()`` call."""
    with torch.no_grad(), Recorder() as rec:
        model = factory()
    return {k: rec.ops.get(p.untyped_storage().data_ptr(), []) for k, p in model.named_parameters()}


def report(name: str, factory: Any) -> None:
    """Print the distinct op sequences of ``factory()`` and the replay blockers."""
    per_param = record(factory)
    groups: dict[tuple[str, ...], list[str]] = defaultdict(list)
    blockers = []
    for k, ops in per_param.items():
        # Keep the ops after the parameter's creation; drop the allocation ('empty').
        seq = tuple(op for op, _ in ops if not op.startswith("empty("))
        groups[seq].append(k)
        blockers += [f"{k}: {op}" for op, own in ops if not own]
    print(f"== {name}: {len(per_param)} parameters, {len(groups)} distinct op sequences")
    for seq, names in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        shown = ", ".join(names[:3]) + (f", ... (+{len(names) - 3})" if len(names) > 3 else "")
        print(f"  [{len(names):3d}] {' -> '.join(seq) or '(nothing recorded)'}\n        e.g. {shown}")
    never = [k for k, ops in per_param.items() if not ops]
    print(f"  not self-contained ({len(blockers)}): " + ("; ".join(blockers[:6]) or "none"))
    if never:
        print(f"  no op recorded (created from another tensor?): {never[:6]}")


def main(names: list[str]) -> None:
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    import library_zoo as zoo

    for name in names or list(zoo.MODELS):
        report(name, zoo.MODELS[name].factory)


if __name__ == "__main__":
    main(sys.argv[1:])
