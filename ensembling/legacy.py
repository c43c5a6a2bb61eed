"""A faithful re-implementation of ``functorch.combine_state_for_ensemble``.

For running and migrating old code on a PyTorch whose ``functorch`` package
(or its ``combine_state_for_ensemble``) is gone. New code should use
:func:`torch.func.stack_module_state` with :func:`torch.func.functional_call`,
or :class:`ensembling.Ensemble`.

Behaviour kept from functorch, because migrating code depends on it:

* parameters and buffers come back as **tuples**, ordered like
  ``named_parameters()`` / ``named_buffers()`` of the first model;
* every returned tensor is a new tensor **detached** from autograd
  (``requires_grad=False``) and unrelated to the original modules;
* the returned function is called as ``fmodel(params, buffers, *args)`` and is
  meant to be wrapped in :func:`torch.vmap`;
* calling it emits a :class:`FutureWarning` that names the replacement.

Differences: errors are :class:`ensembling.EnsembleError` (a ``RuntimeError``,
as functorch raised, and a ``ValueError``) and name the offending member; and
the functional model holds a ``meta``-device copy of the first model rather
than a full copy.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ._state import meta_copy
from ._validate import check_members

__all__ = ["FunctionalModuleWithBuffers", "combine_state_for_ensemble"]

DEPRECATION = (
    "combine_state_for_ensemble is the legacy functorch API (deprecated since "
    "PyTorch 2.0). Use torch.func.stack_module_state with torch.func.functional_call "
    "(or ensembling.Ensemble) instead; see "
    "https://docs.pytorch.org/docs/stable/func.migrating.html"
)


class FunctionalModuleWithBuffers(nn.Module):
    """The ``fmodel`` returned by :func:`combine_state_for_ensemble`.

    ``fmodel(params, buffers, *args, **kwargs)`` runs the first model's
    ``forward`` with the given tuples of tensors in place of its parameters
    and buffers (in ``param_names`` / ``buffer_names`` order).
    """

    def __init__(self, stateless_model: nn.Module, param_names: tuple[str, ...], buffer_names: tuple[str, ...]):
        super().__init__()
        self.stateless_model = stateless_model
        self.param_names = param_names
        self.buffer_names = buffer_names

    def forward(self, params: Sequence[Tensor], buffers: Sequence[Tensor], *args: Any, **kwargs: Any) -> Any:
        params, buffers = tuple(params), tuple(buffers)
        if len(params) != len(self.param_names) or len(buffers) != len(self.buffer_names):
            raise TypeError(
                f"fmodel: expected {len(self.param_names)} parameters and {len(self.buffer_names)} "
                f"buffers, got {len(params)} and {len(buffers)}; pass the tuples returned by "
                "combine_state_for_ensemble, in their order."
            )
        state = dict(zip(self.param_names, params))
        state.update(zip(self.buffer_names, buffers))
        return functional_call(self.stateless_model, state, args, kwargs)


def combine_state_for_ensemble(
    models: Iterable[nn.Module],
) -> tuple[FunctionalModuleWithBuffers, tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Stack the state of same-class models for :func:`torch.vmap` (legacy API).

    Parameters
    ----------
    models : iterable of nn.Module
        ``M`` models of one class (a list, tuple, ``nn.ModuleList`` or
        generator), in the same train/eval mode, with equally shaped
        parameters and buffers. Their ``requires_grad`` flags may differ, as
        functorch allowed: the stacks are detached either way.

    Returns
    -------
    fmodel : FunctionalModuleWithBuffers
        ``fmodel(params, buffers, x)`` is one member's forward pass.
    params : tuple of Tensor
        One tensor per parameter of ``models[0]``, in ``named_parameters()``
        order, each of shape ``[M, *parameter.shape]``, ``requires_grad=False``.
    buffers : tuple of Tensor
        The same for the buffers.

    Examples
    --------
    >>> import warnings
    >>> models = [nn.Linear(3, 2) for _ in range(4)]
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore", FutureWarning)
    ...     fmodel, params, buffers = combine_state_for_ensemble(models)
    >>> [list(p.shape) for p in params]  # weight [M, out, in], bias [M, out]
    [[4, 2, 3], [4, 2]]
    >>> params[0].requires_grad, buffers
    (False, ())
    >>> torch.vmap(fmodel, in_dims=(0, 0, None))(params, buffers, torch.ones(5, 3)).shape
    torch.Size([4, 5, 2])
    """
    warnings.warn(DEPRECATION, FutureWarning, stacklevel=2)
    # Like functorch, members may differ in requires_grad: the stacks are detached anyway.
    models = check_members(models, "combine_state_for_ensemble", requires_grad=False)
    param_names = tuple(name for name, _ in models[0].named_parameters())
    buffer_names = tuple(name for name, _ in models[0].named_buffers())
    params = tuple(torch.stack([m.get_parameter(name) for m in models]).detach() for name in param_names)
    buffers = tuple(torch.stack([m.get_buffer(name) for m in models]).detach() for name in buffer_names)
    stateless = meta_copy(models[0])
    return FunctionalModuleWithBuffers(stateless, param_names, buffer_names), params, buffers
