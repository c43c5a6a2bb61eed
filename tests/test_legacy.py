"""ensembling.legacy.combine_state_for_ensemble behaves like functorch's."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from ensembling import EnsembleError
from ensembling.legacy import combine_state_for_ensemble

functorch = pytest.importorskip("functorch", reason="functorch is gone: nothing to compare with")
if not hasattr(functorch, "combine_state_for_ensemble"):
    pytest.skip("this functorch has no combine_state_for_ensemble", allow_module_level=True)


def _models(kind: str) -> list[nn.Module]:
    torch.manual_seed(0)
    if kind == "mlp":
        make = lambda: nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))  # noqa: E731
    else:  # BatchNorm: buffers, including an integer one
        make = lambda: nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))  # noqa: E731
    models = [make() for _ in range(4)]
    for m in models:  # give the BatchNorm buffers distinct values
        m.train()
        m(torch.randn(8, 6))
    return models


def _both(models: list[nn.Module]):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return functorch.combine_state_for_ensemble(models), combine_state_for_ensemble(models)


@pytest.mark.parametrize("kind", ["mlp", "batchnorm"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_same_tuples_as_functorch(kind: str, mode: str) -> None:
    """Same order, shapes, values and requires_grad=False for params and buffers."""
    models = [getattr(m, mode)() for m in _models(kind)]
    (_, fp, fb), (_, p, b) = _both(models)
    assert isinstance(p, tuple) and isinstance(b, tuple)
    assert len(p) == len(fp) and len(b) == len(fb)
    for ours, theirs in zip(p + b, fp + fb):
        assert torch.equal(ours, theirs) and ours.dtype == theirs.dtype
        assert not ours.requires_grad and not theirs.requires_grad


@pytest.mark.parametrize("kind", ["mlp", "batchnorm"])
def test_same_predictions_as_functorch_under_vmap(kind: str) -> None:
    """vmap over either fmodel gives bit-identical outputs, per-member and shared input."""
    models = [m.eval() for m in _models(kind)]
    (ffn, fp, fb), (fn, p, b) = _both(models)
    xs = torch.randn(4, 7, 6)
    assert torch.equal(torch.vmap(fn)(p, b, xs), torch.vmap(ffn)(fp, fb, xs))
    shared = torch.vmap(fn, in_dims=(0, 0, None))(p, b, xs[0])
    assert torch.equal(shared, torch.vmap(ffn, in_dims=(0, 0, None))(fp, fb, xs[0]))
    torch.testing.assert_close(shared[2], models[2](xs[0]).detach())


def test_not_linked_to_the_original_modules() -> None:
    """The stacked tensors are copies: changing them leaves the models alone."""
    models = _models("mlp")
    _, (_, p, _) = _both(models)
    before = models[0][0].weight.detach().clone()
    p[0].add_(1.0)
    assert torch.equal(models[0][0].weight, before)


def test_warns_like_functorch_and_names_the_replacement() -> None:
    """Both emit a FutureWarning that points to torch.func.stack_module_state."""
    models = _models("mlp")
    for fn in (functorch.combine_state_for_ensemble, combine_state_for_ensemble):
        with pytest.warns(FutureWarning, match="torch.func.stack_module_state"):
            fn(models)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize(
    ("models", "match"),
    [
        ([], "empty list"),
        ([nn.Linear(2, 2), "x"], "member 1 is a str"),
        ([nn.Linear(2, 2), nn.Linear(2, 2).eval()], "member 1 is in eval mode"),
        ([nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2))], "member 1 is a Sequential"),
        ([nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(3, 2)], r"'weight' of member 2 has shape \[2, 3\]"),
    ],
)
def test_errors_name_the_member_and_are_runtime_errors(models: list, match: str) -> None:
    """Bad input raises EnsembleError (a RuntimeError, as functorch raised) naming the member."""
    with pytest.raises(RuntimeError, match=match) as info:
        combine_state_for_ensemble(models)
    assert isinstance(info.value, EnsembleError)


def test_mixed_requires_grad_is_accepted_like_functorch() -> None:
    """Members that differ in requires_grad stack (detached), as functorch's combine_state_for_ensemble allowed."""
    models = [nn.Linear(3, 2) for _ in range(3)]
    models[1].weight.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        _, params, _ = combine_state_for_ensemble(models)
    assert not any(p.requires_grad for p in params)
    torch.testing.assert_close(params[0][1], models[1].weight.detach())
