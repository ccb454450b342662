"""Public surfaces are re-exported with a sorted ``__all__`` that resolves."""

from __future__ import annotations

import importlib

import pytest

MODULES = ["fiona", "fiona.errors", "fiona.config", "fiona.db", "fiona.scp"]


@pytest.mark.parametrize("name", MODULES)
def test_all_is_sorted_and_resolves(name: str) -> None:
    module = importlib.import_module(name)
    exported = module.__all__
    assert exported == sorted(exported)
    for symbol in exported:
        assert hasattr(module, symbol), f"{name}.{symbol}"


def test_retry_decisions_can_branch_on_class() -> None:
    from fiona import errors

    assert issubclass(errors.TransientForwardError, errors.ForwardError)
    assert issubclass(errors.PermanentForwardError, errors.ForwardError)
    assert issubclass(errors.OutOfSpaceError, errors.StorageError)
    assert issubclass(errors.ConfigError, errors.FionaError)
