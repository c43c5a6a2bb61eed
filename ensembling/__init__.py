"""Vectorized model ensembling in PyTorch.

The library: :class:`Ensemble` (many same-architecture modules stored stacked
and run as one), :class:`EnsembleError`, the device helpers
(:func:`default_device`, :func:`synchronize`, :func:`tolerances` for honest
loop-vs-vectorized comparisons, :func:`peak_memory`), ``ensembling.legacy``
(the deprecated ``functorch.combine_state_for_ensemble``, for migrating old
code) and ``ensembling.distributed`` (members sharded across processes).

Tutorial helpers, used by the pages to time and report on the reader's
machine: :func:`measure`, :func:`compare`, :class:`Timing`,
:func:`print_measured`, ``MEASURED_PREFIX`` and :func:`plot_timings`.
"""

from ._bench import MEASURED_PREFIX, Timing, compare, measure, print_measured
from ._ensemble import Ensemble
from ._device import default_device, synchronize, tolerances
from ._errors import EnsembleError
from ._memory import peak_memory
from ._plot import plot_timings

__all__ = [
    "MEASURED_PREFIX",
    "Ensemble",
    "EnsembleError",
    "Timing",
    "compare",
    "default_device",
    "measure",
    "peak_memory",
    "plot_timings",
    "print_measured",
    "synchronize",
    "tolerances",
]

__version__ = "0.1.0"
