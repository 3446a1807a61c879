"""The exported surface of every package and module (modelmora and modelmora_workers): each public
module has an `__all__` that names only what exists and every public class and function it
defines; each package re-exports the `__all__` of the modules it re-exports from, except the names
listed below as reached through their module."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType
from typing import TypeVar

import pytest

import modelmora
import modelmora_workers


def _modules(root: ModuleType) -> list[str]:
    names = [root.__name__]
    names += [info.name for info in pkgutil.walk_packages(root.__path__, f"{root.__name__}.")]
    # entry points run on import; generated code (`modelmora._proto`, `just proto`) has its own layout
    return sorted(n for n in names if n.rsplit(".", 1)[-1] != "__main__" and "._proto" not in n)


MODULES = _modules(modelmora) + _modules(modelmora_workers)
PACKAGES = [name for name in MODULES if hasattr(importlib.import_module(name), "__path__")]

REACHED_THROUGH_THEIR_MODULE: dict[str, frozenset[str]] = {
    # Names a package leaves in a module it otherwise re-exports from: constants and helpers of
    # that module's own concern, used as `package.module.NAME`.
    "modelmora.images": frozenset({"data_uri_payload", "decode_base64"}),
    "modelmora.ipc": frozenset({"MAX_FRAME_BYTES", "Arrays", "Blobs", "split", "itemsize", "ALIGN", "HEADER_BYTES"}),
    "modelmora.jobs": frozenset({"COLUMNS", "PENDING", "encoder", "record", "idempotent"}),
    "modelmora.lifecycle": frozenset({"SpawnedProcess", "DEFAULT_PRELOAD", "ForkedProcess", "ZygoteClient"}),
    "modelmora.registry": frozenset(
        {"MODEL_ID_RE", "MAX_PARAMS_BYTES", "SCHEMA_VERSION", "SEMVER_RE", "LOCK_FORMAT", "CATALOG_FORMAT"}
        | {"HF_REPO_RE", "copy_tree", "download_hf", "fetch_http", "fetch_s3_source", "list_files"}
    ),
    "modelmora.results": frozenset({"SWEEP_GRACE_S", "expiry_of", "new_name", "sweep_interval", "sweeping"}),
    "modelmora.scheduler": frozenset({"abandon_if_unwanted", "dispatch", "keep_alive_s", "model_status"}),
    "modelmora.service": frozenset(
        {"literal_choices", "registered_status", "supervisor_status", "Prepared", "Job", "KEEP_S"}
    ),
}


def _defined_here(module: ModuleType) -> list[str]:
    """The public classes and functions `module` defines itself (not imported, not type variables)."""
    return [
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and not isinstance(value, TypeVar)
        and value.__module__ == module.__name__
    ]


def test_the_walk_finds_both_packages_and_their_modules() -> None:
    assert {"modelmora.ipc.ring", "modelmora.scheduler.queues", "modelmora_workers.worker"} <= set(MODULES)
    assert {"modelmora.ipc", "modelmora_workers.pipelines"} <= set(PACKAGES)


@pytest.mark.parametrize("name", MODULES)
def test_all_names_what_exists_and_every_public_definition(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert isinstance(exported, tuple), f"{name} has no __all__ tuple"
    assert len(exported) == len(set(exported)), f"{name}.__all__ has duplicates"
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names what it lacks: {missing}"
    unlisted = [n for n in _defined_here(module) if n not in exported]
    assert not unlisted, (
        f"{name} defines public names its __all__ leaves out (list them or make them private): {unlisted}"
    )


@pytest.mark.parametrize("name", PACKAGES)
def test_a_package_reexports_what_its_modules_promise(name: str) -> None:
    """A package re-exports only names its modules list in their `__all__` (the same objects), and
    re-exports the whole `__all__` of each module it re-exports from, except the names kept in
    their module."""
    package = importlib.import_module(name)
    exported = set(package.__all__)
    for n in exported:
        origin = getattr(getattr(package, n), "__module__", None)
        if isinstance(origin, str) and origin.startswith(f"{name}."):
            assert n in _all_of(origin), f"{name} re-exports {n}, which {origin}.__all__ does not list"
    kept = REACHED_THROUGH_THEIR_MODULE.get(name, frozenset())
    for sub in _submodules(package):
        module = importlib.import_module(sub)
        promised = set(module.__all__)
        taken = {n for n in exported if n in promised and getattr(package, n) is getattr(module, n)}
        if not taken:
            continue  # a module reached as `package.module`
        left_out = promised - exported - kept
        assert not left_out, f"{name} re-exports from {sub} but not {sorted(left_out)}"
    stale = kept - {n for sub in _submodules(package) for n in _all_of(sub)}
    assert not stale, f"REACHED_THROUGH_THEIR_MODULE[{name!r}] names what no module of it exports: {sorted(stale)}"


def _submodules(package: ModuleType) -> list[str]:
    return [f"{package.__name__}.{info.name}" for info in pkgutil.iter_modules(package.__path__) if info.name[0] != "_"]


def _all_of(name: str) -> tuple[str, ...]:
    return tuple(getattr(importlib.import_module(name), "__all__", ()))


def test_lifecycle_reexports_the_moved_names() -> None:
    import modelmora.lifecycle
    from modelmora.errors import WorkerError
    from modelmora.ipc.payloads import TensorData

    assert modelmora.lifecycle.WorkerError is WorkerError
    assert modelmora.lifecycle.TensorData is TensorData
