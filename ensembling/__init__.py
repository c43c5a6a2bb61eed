"""Vectorized model ensembling in PyTorch.

The library: :class:`Ensemble` (many same-architecture modules stored stacked
and run as one), :class:`EnsembleError`, :func:`ensemble_loss` (the objective
that trains every member as if alone), the device helpers
(:func:`default_device`, :func:`synchronize`, :func:`tolerances` for honest
loop-vs-vectorized comparisons, :func:`peak_memory`, :func:`reuse_cpu_memory`),
``ensembling.legacy`` (the deprecated ``functorch.combine_state_for_ensemble``,
for migrating old code), ``ensembling.distributed`` (members sharded across
processes) and ``ensembling.launcher`` (local process groups for trying it).

The tutorial pages' own plumbing (timing, printing and plotting what they
measure, the digits demo) lives apart, in ``ensembling.tutorial``; the library
never imports it.
"""

from ._device import default_device, synchronize, tolerances
from ._ensemble import Ensemble
from ._errors import EnsembleError
from ._loss import ensemble_loss
from ._malloc import reuse_cpu_memory
from ._memory import peak_memory

__all__ = [
    "Ensemble",
    "EnsembleError",
    "default_device",
    "ensemble_loss",
    "peak_memory",
    "reuse_cpu_memory",
    "synchronize",
    "tolerances",
]

__version__ = "0.1.0"
