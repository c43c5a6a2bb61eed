"""What the benchmark's sections share: the benchmarked MLP (as ``nn.Sequential`` and as a custom class) and tables."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CLASSES", "CustomMLP", "mlp", "table"]

CLASSES = 10


def mlp(in_features: int, hidden: int) -> nn.Sequential:
    """The benchmarked member: Linear-ReLU-Linear-ReLU-Linear, 10 outputs."""
    return nn.Sequential(
        nn.Linear(in_features, hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, CLASSES),
    )  # fmt: skip


class CustomMLP(nn.Module):
    """The benchmarked MLP as a custom class, as in the first tutorial: ``x.flatten(1)``, then ``F.relu``."""

    def __init__(self, seq: nn.Sequential):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = seq[0], seq[2], seq[4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    """A right-aligned text table under ``title``, ending with an empty line."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([title, line(header), line(["-" * w for w in widths]), *map(line, rows), ""])
