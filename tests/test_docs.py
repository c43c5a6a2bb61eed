"""Public docstrings agree with the signatures they document, and every public name has an example."""

from __future__ import annotations

import inspect
import re

import pytest

import ensembling
import ensembling.legacy
import ensembling.tutorial

PUBLIC = [getattr(ensembling, name) for name in ensembling.__all__ if callable(getattr(ensembling, name))]
PUBLIC += [ensembling.legacy.combine_state_for_ensemble]
PUBLIC += [
    getattr(ensembling.tutorial, n) for n in ensembling.tutorial.__all__ if callable(getattr(ensembling.tutorial, n))
]
METHODS = [ensembling.Ensemble.from_modules, ensembling.Ensemble.forward]


def documented_parameters(obj) -> list[str]:
    doc = inspect.getdoc(obj) or ""
    section = "Attributes" if inspect.isclass(obj) and hasattr(obj, "__dataclass_fields__") else "Parameters"
    match = re.search(rf"^{section}\n-+\n(.*?)(?:\n\n[A-Z][a-z]+\n-+\n|\Z)", doc, re.S | re.M)
    if not match:
        return []
    names = []
    for line in match.group(1).splitlines():
        if line and not line[0].isspace():
            for name in line.split(":")[0].split(","):
                names.append(name.strip().lstrip("*"))
    return names


@pytest.mark.parametrize("obj", PUBLIC + METHODS, ids=lambda o: o.__qualname__)
def test_documented_parameters_exist_in_the_signature(obj) -> None:
    """No docstring documents an argument the signature does not have, and none is left out."""
    if inspect.isclass(obj) and issubclass(obj, BaseException):
        return  # exceptions take a message, documented by the class itself
    target = obj.__init__ if inspect.isclass(obj) else obj
    signature = inspect.signature(target)
    actual = [n for n in signature.parameters if n not in ("self", "cls") and not n.startswith("_")]
    documented = documented_parameters(obj)
    if not actual:
        return
    assert documented, f"{obj.__qualname__} has parameters {actual} but no Parameters section"
    assert set(documented) <= set(actual), f"documented but not in the signature: {set(documented) - set(actual)}"
    assert set(actual) <= set(documented), f"in the signature but not documented: {set(actual) - set(documented)}"


@pytest.mark.parametrize("obj", PUBLIC, ids=lambda o: o.__qualname__)
def test_every_public_name_has_an_example(obj) -> None:
    """Each public function and class carries a doctested Examples section."""
    assert ">>> " in (inspect.getdoc(obj) or ""), f"{obj.__qualname__} has no example"
