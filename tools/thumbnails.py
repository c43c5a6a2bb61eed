"""Draw the gallery thumbnails of the pages whose own figure is a thin strip.

A gallery card shows a 400x280 thumbnail; sphinx-gallery shrinks a page's
figure into it, so a wide, short figure (a row of dropout masks, the shard
layout) becomes an unreadable strip. These pages point at a dedicated image
instead (``# sphinx_gallery_thumbnail_path = "_static/thumbs/<name>.png"``),
drawn here with the same computation as the page, at the card's shape and with
text large enough to read at card size::

    .venv/bin/python tools/thumbnails.py   # rewrites docs/_static/thumbs/*.png
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from torch import nn
from torch.func import functional_call, stack_module_state

from ensembling.distributed import shard_members

THUMBS = Path(__file__).resolve().parent.parent / "docs" / "_static" / "thumbs"
SIZE_IN, DPI = (4.0, 2.8), 100  # sphinx-gallery's default thumbnail_size, 400x280 pixels
plt.rcParams.update({"font.size": 12, "axes.titlesize": 13})


def dropout_masks() -> plt.Figure:
    """plot_06: which units dropout drops, per member, under randomness="different" and "same"."""
    torch.manual_seed(0)
    member = nn.Sequential(nn.Linear(8, 24), nn.Dropout(p=0.5))
    params, buffers = stack_module_state([copy.deepcopy(member) for _ in range(6)])
    base = copy.deepcopy(member).to("meta")

    def f(p: dict, b: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(base, (p, b), (x,))

    x = torch.ones(1, 8)
    fig, axes = plt.subplots(2, 1, figsize=SIZE_IN, dpi=DPI, layout="constrained", sharex=True)
    for ax, mode in zip(axes, ("different", "same")):
        out = torch.vmap(f, in_dims=(0, 0, None), randomness=mode)(params, buffers, x)
        ax.imshow((out[:, 0] == 0).float().numpy(), cmap="Greys", aspect="auto", interpolation="nearest")
        ax.set_title(f'randomness="{mode}"')
        ax.set_ylabel("member")
        ax.set_yticks([])
    axes[1].set_xlabel("unit (dark: dropped)")
    axes[1].set_xticks([])
    return fig


def shard_layout() -> plt.Figure:
    """plot_09: how 10 members are split over 2, 3 and 4 ranks."""
    fig, ax = plt.subplots(figsize=SIZE_IN, dpi=DPI, layout="constrained")
    for row, world_size in enumerate((2, 3, 4)):
        for rank in range(world_size):
            block = shard_members(10, world_size, rank)
            ax.barh(row, len(block), left=block.start, color=f"C{rank}", edgecolor="white", height=0.8)
            ax.text(block.start + len(block) / 2, row, f"rank {rank}", ha="center", va="center", color="white")
    ax.set_yticks(range(3), [f"{w} ranks" for w in (2, 3, 4)])
    ax.set_xticks(range(0, 11, 2))
    ax.set_xlabel("member index")
    ax.set_title("10 members, sharded")
    ax.invert_yaxis()
    return fig


THUMBNAILS: dict[str, Callable[[], plt.Figure]] = {
    "plot_06_dropout_masks": dropout_masks,
    "plot_09_shard_layout": shard_layout,
}


def main() -> None:
    THUMBS.mkdir(parents=True, exist_ok=True)
    for name, draw in THUMBNAILS.items():
        fig = draw()
        fig.savefig(THUMBS / f"{name}.png", dpi=DPI, metadata={"Software": None})
        plt.close(fig)
        print(f"wrote {(THUMBS / f'{name}.png').relative_to(THUMBS.parent.parent.parent)}")


if __name__ == "__main__":
    main()
