"""Plots of measured timings."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from .timing import Timing, format_ratio, speedup

if TYPE_CHECKING:  # matplotlib is only needed when a figure is drawn
    from matplotlib.axes import Axes

__all__ = ["plot_timings"]


def plot_timings(
    results: Mapping[str, Mapping[str, Timing]],
    *,
    baseline: str,
    ax: Axes | None = None,
    title: str | None = None,
) -> Axes:
    """Grouped bar chart of median times with their spread, annotated with the speedup over ``baseline``.

    Parameters
    ----------
    results : mapping
        ``{configuration label: {method label: Timing}}``; every configuration
        must time the same methods, ``baseline`` among them.
    baseline : str
        The method the speedups are relative to (e.g. ``"loop"``).
    ax : matplotlib.axes.Axes, optional
        Where to draw; a new figure is made when omitted.
    title : str, optional
        The axes title.

    Returns
    -------
    matplotlib.axes.Axes
        Log-scale time axis, one group of bars per configuration, each bar the
        median with a line from the 10th to the 90th percentile of its rounds;
        each non-baseline bar is labelled with its median speedup over the
        baseline (see :func:`ensembling.tutorial.speedup`), e.g. ``2.0x``.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> r = {"small": {"loop": Timing("loop", 2e-3, 0.0, 5), "vmap": Timing("vmap", 1e-3, 0.0, 5)}}
    >>> ax = plot_timings(r, baseline="loop")
    >>> [t.get_text() for t in ax.texts]
    ['2.0x']
    """
    import matplotlib.pyplot as plt

    configs = list(results)
    if not configs:
        raise ValueError("plot_timings: results is empty; time at least one configuration")
    methods = list(results[configs[0]])
    for config in configs:
        if list(results[config]) != methods:
            raise ValueError(
                f"plot_timings: configuration {config!r} times {list(results[config])}, "
                f"but {configs[0]!r} times {methods}; time the same methods everywhere"
            )
    if baseline not in methods:
        raise ValueError(f"plot_timings: baseline {baseline!r} is not one of the methods {methods}")

    if ax is None:
        _, ax = plt.subplots(figsize=(1.6 + 1.9 * len(configs), 3.8), layout="constrained")
    width = 0.8 / len(methods)
    for m, method in enumerate(methods):
        xs = [c + (m - (len(methods) - 1) / 2) * width for c in range(len(configs))]
        timings = [results[config][method] for config in configs]
        medians = [t.median * 1e3 for t in timings]
        spread = [
            [1e3 * (t.median - t.low) for t in timings],
            [1e3 * (t.high - t.median) for t in timings],
        ]
        ax.bar(
            xs,
            medians,
            width=width,
            label=method,
            yerr=spread,
            error_kw={"linewidth": 0.8},
        )
        if method == baseline:
            continue
        for x, config, t in zip(xs, configs, timings):
            ratio = speedup(t, results[config][baseline]).value
            ax.annotate(
                format_ratio(ratio),
                (x, 1e3 * t.high),
                ha="center",
                va="bottom",
                fontsize=8,
            )
    ax.set_xticks(range(len(configs)), configs)
    ax.set_yscale("log")
    ax.set_ylabel("median time per call (ms, log scale)")
    ax.legend(frameon=False)
    if title:
        ax.set_title(title)
    return ax
