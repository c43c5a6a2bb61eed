"""The package's exception type."""

from __future__ import annotations

__all__ = ["EnsembleError"]


class EnsembleError(ValueError, RuntimeError):
    """Raised for input that cannot form (or feed) an ensemble.

    The message starts with the function or class that refused the input,
    names the offending member index and parameter or buffer, says what was
    expected and what was found, and how to fix it.

    It is a :class:`ValueError` (bad input) and also a :class:`RuntimeError`,
    which is what ``functorch.combine_state_for_ensemble`` raised, so code
    written against either keeps catching it.

    Examples
    --------
    >>> import warnings
    >>> from ensembling.legacy import combine_state_for_ensemble
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore", FutureWarning)  # the legacy API warns
    ...     try:
    ...         combine_state_for_ensemble([])
    ...     except EnsembleError as err:
    ...         print(err)
    combine_state_for_ensemble: got an empty list of models; pass at least one nn.Module.
    """


# Tracebacks and the docs show the public name, ``ensembling.EnsembleError``.
EnsembleError.__module__ = "ensembling"
