"""Tutorial plumbing: what the pages use to time, print and plot on the reader's machine.

Not part of the library's API (:mod:`ensembling` does not import it): the pages
import from here, and the benchmark (``python -m ensembling.bench``) reuses the
timing helpers.

* :mod:`ensembling.tutorial.timing` -- :func:`compare` (candidates timed in
  alternating rounds), :func:`measure`, :class:`Timing`, :func:`speedup` and
  :func:`verdict` (a sentence computed from two timings and their spread),
  :func:`print_measured` and ``MEASURED_PREFIX``;
* :mod:`ensembling.tutorial.plotting` -- :func:`plot_timings`;
* :mod:`ensembling.tutorial.digits` -- the sharding page's digits demo
  (``torchrun --nproc-per-node 2 -m ensembling.tutorial.digits``).
"""

from .plotting import plot_timings
from .timing import (
    MEASURED_PREFIX,
    Ratio,
    Timing,
    compare,
    measure,
    print_measured,
    speedup,
    verdict,
)

__all__ = [
    "MEASURED_PREFIX",
    "Ratio",
    "Timing",
    "compare",
    "measure",
    "plot_timings",
    "print_measured",
    "speedup",
    "verdict",
]
