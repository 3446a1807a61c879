"""Every name a lifecycle or IPC module exports exists, and the public names keep their meaning."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import modelmora.ipc
import modelmora.lifecycle

PACKAGES = (modelmora.ipc, modelmora.lifecycle)
MODULES = [f"{pkg.__name__}.{info.name}" for pkg in PACKAGES for info in pkgutil.iter_modules(pkg.__path__)] + [
    pkg.__name__ for pkg in PACKAGES
]


@pytest.mark.parametrize("name", MODULES)
def test_all_lists_existing_names(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    assert sorted(exported) == sorted(set(exported)), f"{name}.__all__ has duplicates"
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names what it lacks: {missing}"


def test_lifecycle_reexports_the_moved_names() -> None:
    from modelmora.errors import WorkerError
    from modelmora.ipc.payloads import TensorData

    assert modelmora.lifecycle.WorkerError is WorkerError
    assert modelmora.lifecycle.TensorData is TensorData
