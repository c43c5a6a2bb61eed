"""Implementation of :mod:`ensembling.optim` (per-member hyperparameters); import from there."""
