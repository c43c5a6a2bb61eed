"""How an ensemble runs its members: one frozen, validated options object.

Every constructor (``Ensemble(...)``, ``from_modules``, ``from_stacked``,
slicing) and every per-call override (``ens(x, randomness=...)``) goes through
:class:`Options`, so a bad value is refused in one place, with the option's
name, the value and what is accepted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from ._errors import EnsembleError

__all__ = ["RANDOMNESS", "STRATEGIES", "Options", "Randomness", "Strategy"]

Randomness = Literal["different", "same", "error"]
RANDOMNESS: tuple[str, ...] = ("different", "same", "error")
Strategy = Literal["auto", "vectorized", "loop"]
STRATEGIES: tuple[str, ...] = ("auto", "vectorized", "loop")


@dataclass(frozen=True)
class Options:
    """The run options of an :class:`~ensembling.Ensemble`.

    Attributes
    ----------
    randomness : {"different", "same", "error"}
        As for :func:`torch.vmap`: own dropout masks per member, shared ones,
        or an error if the forward pass draws random numbers.
    chunk_size : int or None
        Members evaluated at a time (``None``: all at once).
    fast_path : bool
        Whether a chain of Linear / Dropout / element-wise layers (with
        reshapes and reductions of member dimensions, an Embedding first)
        runs as batched matrix products instead of under ``vmap``.
    strategy : {"auto", "vectorized", "loop"}
        How other members run: one ``vmap`` call, back to back through
        torch's own kernels, or whichever measured faster per input signature.

    Examples
    --------
    >>> Options().randomness, Options(chunk_size=4).override(chunk_size=2).chunk_size
    ('different', 2)
    >>> Options(randomness="bogus")
    Traceback (most recent call last):
    ...
    ensembling.EnsembleError: Ensemble: randomness must be one of 'different', 'same', 'error'; got 'bogus'.
    """

    randomness: Randomness = "different"
    chunk_size: int | None = None
    fast_path: bool = True
    strategy: Strategy = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.randomness, str) or self.randomness not in RANDOMNESS:
            accepted = ", ".join(repr(r) for r in RANDOMNESS)
            raise EnsembleError(f"Ensemble: randomness must be one of {accepted}; got {self.randomness!r}.")
        size = self.chunk_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise EnsembleError(
                f"Ensemble: chunk_size must be a positive int (members per vmap chunk) or None "
                f"(all members at once); got {size!r}."
            )
        if not isinstance(self.fast_path, bool):
            raise EnsembleError(f"Ensemble: fast_path must be True or False; got {self.fast_path!r}.")
        if not isinstance(self.strategy, str) or self.strategy not in STRATEGIES:
            accepted = ", ".join(repr(s) for s in STRATEGIES)
            raise EnsembleError(f"Ensemble: strategy must be one of {accepted}; got {self.strategy!r}.")

    def override(self, randomness: Randomness | None = None, chunk_size: int | None = None) -> Options:
        """These options with a call's overrides (``None`` keeps the ensemble's value), validated."""
        if randomness is None and chunk_size is None:
            return self
        changes = {k: v for k, v in (("randomness", randomness), ("chunk_size", chunk_size)) if v is not None}
        return dataclasses.replace(self, **changes)
