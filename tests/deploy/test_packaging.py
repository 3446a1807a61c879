"""The installed package holds every module: the image installs the project as a regular wheel (not
editable), where a package missing from pyproject's list fails only at run time (the image's
`mm serve` died with "No module named 'modelmora.jobs'")."""

from __future__ import annotations

import tomllib

from .k8s_checks import ROOT

PACKAGE_DIRS = {"modelmora": "modelmora", "modelmora_workers": "workers"}


def setuptools_table() -> dict[str, object]:
    table: dict[str, object] = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return table


def test_every_package_folder_is_in_the_wheel() -> None:
    table = setuptools_table()
    assert table["package-dir"] == PACKAGE_DIRS
    found = set()
    for name, folder in PACKAGE_DIRS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            found.add(".".join((name, *relative.parts)))
    assert sorted(found - set(table["packages"])) == []  # type: ignore[arg-type]


def test_every_data_file_is_in_the_wheel() -> None:
    data: dict[str, list[str]] = setuptools_table()["package-data"]  # type: ignore[assignment]
    for name, folder in PACKAGE_DIRS.items():
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in path.parts:
                package = ".".join((name, *path.parent.relative_to(ROOT / folder).parts))
                assert path.name in data.get(package, []), f"{path.relative_to(ROOT)} is not in package-data"
