"""Vectorized model ensembling in PyTorch.

Helpers for the tutorials in this repository: pick the device, choose honest
tolerances for loop-vs-vectorized comparisons, and time implementations side
by side on the reader's machine. ``ensembling.legacy`` re-implements the
deprecated ``functorch.combine_state_for_ensemble`` for migrating old code.
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
