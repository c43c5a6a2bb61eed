"""ensembling.peak_memory counts the tensors a computation keeps alive at once."""

from __future__ import annotations

import torch
from torch import nn

from ensembling import Ensemble, peak_memory


def test_counts_simultaneously_alive_tensors_only() -> None:
    """Freed tensors stop counting; the peak is the largest simultaneous total."""

    def work() -> torch.Tensor:
        a = torch.empty(1000, dtype=torch.float64)  # 8,000 bytes
        b = torch.empty(500, dtype=torch.float64)  # 4,000 bytes, total 12,000
        del a
        c = torch.empty(100, dtype=torch.float64)  # 800 bytes, total 4,800
        return b + c[:1]  # 4,000 more, total 8,800

    result, peak = peak_memory(work)
    assert peak == 12_000 and result.shape == (500,)


def test_views_in_place_ops_and_existing_tensors_are_free() -> None:
    """Views, in-place results and tensors created before the call add nothing."""
    x = torch.randn(64, 64)
    assert peak_memory(lambda: x.t().unsqueeze(0).add_(1).squeeze(0))[1] == 0


def test_activation_memory_scales_with_members_and_chunking_caps_it() -> None:
    """An ensemble's forward keeps about members x batch x width alive; chunk_size divides it."""
    ens = Ensemble(lambda: nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 4)), 64, fast_path=False)
    x = torch.randn(16, 32)
    activation = 64 * 16 * 128 * 4
    with torch.no_grad():
        full = peak_memory(lambda: ens(x))[1]
        chunked = peak_memory(lambda: ens(x, chunk_size=8))[1]
    assert activation <= full <= 3 * activation
    assert chunked < full / 4
