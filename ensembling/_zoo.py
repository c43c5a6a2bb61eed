"""The architectures people ensemble, one small instance of each layer family.

Shared by the test suite (``tests/test_architectures.py``: every entry equals
the loop, forward and backward) and the benchmark (``python -m
ensembling.bench --sections zoo``). Each entry builds a member and makes its
positional inputs, with any leading dimensions (``()`` for one input shared
by every member, ``(members,)`` for one input per member).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "ARCHITECTURES", "Architecture", "Critic", "EmbeddingBagOfWords", "LSTMForecaster", "TransformerClassifier",
    "normal_inputs", "sequence_inputs", "token_inputs", "two_inputs",
]  # fmt: skip

Inputs = Callable[[tuple[int, ...], int, torch.Generator], tuple[Tensor, ...]]


@dataclass(frozen=True)
class Architecture:
    """A member factory, how to make its inputs, and whether training mode draws random numbers."""

    name: str
    factory: Callable[[], nn.Module]
    inputs: Inputs
    random_in_training: bool = False


def normal_inputs(*shape: int) -> Inputs:
    """Inputs of ``shape`` per example: ``[*lead, batch, *shape]``."""
    return lambda lead, batch, gen: (torch.randn(*lead, batch, *shape, generator=gen),)


class EmbeddingBagOfWords(nn.Module):
    """Token ids -> embeddings -> mean over the sequence -> logits."""

    def __init__(self, vocab: int = 20, dim: int = 8, classes: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: Tensor) -> Tensor:  # [batch, seq] -> [batch, classes]
        return self.head(self.embed(tokens).mean(dim=-2))


class TransformerClassifier(nn.Module):
    """Token ids -> embeddings + learned positions -> encoder layers -> mean -> logits."""

    def __init__(self, vocab: int = 20, dim: int = 16, heads: int = 2, layers: int = 2, seq: int = 6, classes: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.zeros(seq, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.position, std=0.02)

    def forward(self, tokens: Tensor) -> Tensor:  # [batch, seq] -> [batch, classes]
        h = self.encoder(self.embed(tokens) + self.position[: tokens.shape[-1]])
        return self.head(h.mean(dim=-2))


class LSTMForecaster(nn.Module):
    """A window of a series -> two LSTM layers -> the next value."""

    def __init__(self, features: int = 1, hidden: int = 16, layers: int = 2):
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, features)

    def forward(self, window: Tensor) -> Tensor:  # [batch, time, features] -> [batch, features]
        out, _ = self.lstm(window)
        return self.head(out[..., -1, :])


class Critic(nn.Module):
    """An RL critic: Q(state, action), two inputs."""

    def __init__(self, state: int = 5, action: int = 2, hidden: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(state + action, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, state: Tensor, action: Tensor) -> Tensor:
        return self.net(torch.cat([state, action], dim=-1))


def token_inputs(seq: int, vocab: int = 20) -> Inputs:
    return lambda lead, batch, gen: (torch.randint(0, vocab, (*lead, batch, seq), generator=gen),)


def two_inputs(a: int, b: int) -> Inputs:
    return lambda lead, batch, gen: (
        torch.randn(*lead, batch, a, generator=gen),
        torch.randn(*lead, batch, b, generator=gen),
    )


def sequence_inputs(seq: int, features: int, batch_first: bool = True) -> Inputs:
    if batch_first:
        return lambda lead, batch, gen: (torch.randn(*lead, batch, seq, features, generator=gen),)
    return lambda lead, batch, gen: (torch.randn(*lead, seq, batch, features, generator=gen),)


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in [
        Architecture("linear", lambda: nn.Linear(6, 4), normal_inputs(6)),
        Architecture(
            "mlp_layernorm_gelu",
            lambda: nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 4)),
            normal_inputs(6),
        ),
        Architecture(
            "conv1d_transpose",
            lambda: nn.Sequential(nn.Conv1d(2, 3, 3), nn.ReLU(), nn.ConvTranspose1d(3, 2, 3)),
            normal_inputs(2, 8),
        ),
        Architecture(
            "conv2d_transpose",
            lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(3, 2, 2, stride=2)),
            normal_inputs(2, 5, 5),
        ),
        Architecture(
            "conv3d_transpose",
            lambda: nn.Sequential(nn.Conv3d(2, 3, 2), nn.Tanh(), nn.ConvTranspose3d(3, 2, 2)),
            normal_inputs(2, 4, 4, 4),
        ),
        Architecture(
            "batchnorm1d",
            lambda: nn.Sequential(nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4)),
            normal_inputs(6),
        ),
        Architecture(
            "batchnorm2d_cnn",
            lambda: nn.Sequential(
                nn.Conv2d(2, 4, 3, bias=False),
                nn.BatchNorm2d(4),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Flatten(),
                nn.Linear(4 * 2 * 2, 3),
            ),
            normal_inputs(2, 6, 6),
        ),
        Architecture(
            "batchnorm3d", lambda: nn.Sequential(nn.Conv3d(2, 3, 2), nn.BatchNorm3d(3)), normal_inputs(2, 3, 3, 3)
        ),
        Architecture(
            "groupnorm", lambda: nn.Sequential(nn.Conv1d(4, 4, 3), nn.GroupNorm(2, 4), nn.SiLU()), normal_inputs(4, 7)
        ),
        Architecture("embedding", EmbeddingBagOfWords, token_inputs(5)),
        Architecture(
            "multihead_attention",
            lambda: nn.MultiheadAttention(8, 2, batch_first=True),
            lambda lead, batch, gen: tuple(torch.randn(*lead, batch, 5, 8, generator=gen) for _ in range(3)),
        ),
        Architecture(
            "transformer_encoder_layer",
            lambda: nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
            sequence_inputs(5, 8),
        ),
        Architecture(
            "transformer_decoder_layer",
            lambda: nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
            lambda lead, batch, gen: (
                torch.randn(*lead, batch, 4, 8, generator=gen),
                torch.randn(*lead, batch, 5, 8, generator=gen),
            ),
        ),
        Architecture("transformer_classifier", TransformerClassifier, token_inputs(6)),
        Architecture("rnn_tanh_2layers", lambda: nn.RNN(4, 6, num_layers=2), sequence_inputs(5, 4, batch_first=False)),
        Architecture(
            "rnn_relu_bidirectional",
            lambda: nn.RNN(4, 6, nonlinearity="relu", bidirectional=True, batch_first=True),
            sequence_inputs(5, 4),
        ),
        Architecture(
            "gru_bidirectional", lambda: nn.GRU(4, 6, batch_first=True, bidirectional=True), sequence_inputs(5, 4)
        ),
        Architecture("gru_no_bias", lambda: nn.GRU(4, 6, bias=False), sequence_inputs(5, 4, batch_first=False)),
        Architecture("lstm_2layers", lambda: nn.LSTM(4, 6, num_layers=2, batch_first=True), sequence_inputs(5, 4)),
        Architecture(
            "lstm_projection_bidirectional",
            lambda: nn.LSTM(4, 6, proj_size=3, bidirectional=True),
            sequence_inputs(5, 4, batch_first=False),
        ),
        Architecture("lstm_forecaster", LSTMForecaster, sequence_inputs(8, 1)),
        Architecture("lstm_cell", lambda: nn.LSTMCell(4, 6), normal_inputs(4)),
        Architecture("gru_cell", lambda: nn.GRUCell(4, 6), normal_inputs(4)),
        Architecture("critic_two_inputs", Critic, two_inputs(5, 2)),
        Architecture(
            "dropout",
            lambda: nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.Linear(8, 4)),
            normal_inputs(6),
            random_in_training=True,
        ),
        Architecture(
            "lstm_dropout",
            lambda: nn.LSTM(4, 6, num_layers=2, dropout=0.5),
            sequence_inputs(5, 4, batch_first=False),
            random_in_training=True,
        ),
    ]
}
