"""`mm init`: a commented configuration file holding every setting at its default.

The template is built from `config.Settings` itself (each field, its default, and the docstring
under it in config.py), so it lists every key there is; every line is commented out, so the
file changes nothing until a line is uncommented.
"""

from __future__ import annotations

import ast
import inspect
import json
import textwrap
from pathlib import Path
from typing import Any

import msgspec

from .cli_base import CommandFailed, console, settings_for
from .config import Settings

__all__ = ("config_template", "init")

_HEADER = """\
# ModelMora configuration, written by `mm init`: every setting at its default, commented out.
# Uncomment a line to change it. The environment overrides this file: MODELMORA_<KEY> for a
# top-level key, MODELMORA_<SECTION>__<KEY> for one in a [section]. Unknown keys are errors.
"""


def _docs(cls: type) -> dict[str, str]:
    """Field -> the docstring written under it in the class body (config.py)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body if isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for node, after in zip(body, [*body[1:], None], strict=True):
        named = isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
        if named and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            assert isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
            docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


def _toml(value: Any) -> str | None:
    """A TOML value (None: the setting has no value by default)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(str(_toml(v)) for v in value) + "]"
    return None


def _section(cls: type, defaults: Any, name: str | None) -> list[str]:
    docs = _docs(cls)
    out = [] if name is None else ["", f"[{name}]"]
    if cls.__doc__:
        out += [f"# {line}" for line in textwrap.wrap(" ".join(cls.__doc__.split()), 96)] if name else []
    for field in cls.__struct_fields__:  # type: ignore[attr-defined]
        value = getattr(defaults, field)
        if isinstance(value, msgspec.Struct | dict):
            continue  # its own section
        out.append("")
        if field in docs:
            out += [f"# {line}" for line in textwrap.wrap(docs[field], 96)]
        rendered = _toml(value)
        out.append(f"# {field} = {rendered}" if rendered is not None else f"# {field} = (unset)")
    return out


def config_template() -> str:
    """The commented configuration file."""
    defaults = Settings()
    lines = [_HEADER.rstrip("\n"), ""]
    lines += _section(Settings, defaults, None)
    for field in Settings.__struct_fields__:  # every [section]: timeout_s, s3, auth, tls, ...
        value = getattr(defaults, field)
        if isinstance(value, msgspec.Struct):
            lines += _section(type(value), value, field)
    lines += ["", "[pipelines]", "# Task type -> \"module:Class\" of a custom worker pipeline, for example:",
              '#   txt2embed = "mypackage.pipelines:MyEmbedding"']  # fmt: skip
    return "\n".join(lines) + "\n"


def init(*, config: Path | None = None, force: bool = False, home: Path | None = None) -> None:
    """Write a commented configuration file with every setting and its default.

    Parameters
    ----------
    config
        Where to write it (default: $MODELMORA_HOME/config.toml, which mm serve reads).
    force
        Overwrite an existing file.
    """
    path = config if config is not None else settings_for(None, home).home_path / "config.toml"
    if path.exists() and not force:
        raise CommandFailed(f"{path} exists: pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_template())
    console.print(f"wrote {path}: every setting at its default, commented out", highlight=False)
