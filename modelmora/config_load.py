"""Loading the configuration: the TOML file, MODELMORA_* environment overrides, and validation
errors in words.

These helpers know nothing of the settings themselves: `modelmora.config.load_settings` passes
them its settings class and the tables that describe its keys (sections, list keys, secrets).
"""

from __future__ import annotations

import ast
import os
import re
import tomllib
import types
import typing
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

__all__ = ("ConfigError", "config_file", "default_home", "env_overrides", "explain", "merge", "read_file")


class ConfigError(Exception):
    """The configuration file or environment holds an unknown key or a bad value."""


def default_home() -> Path:
    """`$MODELMORA_HOME`, else `$XDG_DATA_HOME/modelmora`, else `~/.local/share/modelmora`."""
    env = os.environ.get("MODELMORA_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "modelmora"


def config_file(config_path: str | Path | None, env: Mapping[str, str]) -> Path | None:
    """The configuration file to read: `config_path`, else `MODELMORA_CONFIG`, else
    `$MODELMORA_HOME/config.toml` (home: `MODELMORA_HOME` in `env`, else `default_home()`) when that
    exists; else None."""
    if config_path is not None:
        return Path(config_path)
    if env.get("MODELMORA_CONFIG"):
        return Path(env["MODELMORA_CONFIG"])
    home = Path(env["MODELMORA_HOME"]).expanduser() if env.get("MODELMORA_HOME") else default_home()
    candidate = home / "config.toml"
    return candidate if candidate.is_file() else None


def read_file(path: Path) -> dict[str, Any]:
    """The TOML configuration file at `path` as a table.

    Raises:
        ConfigError: the file cannot be read or is not valid TOML.
    """
    try:
        return tomllib.loads(path.expanduser().read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc


def env_overrides(
    environ: Mapping[str, str],
    *,
    fields: Collection[str],
    sections: Collection[str],
    list_keys: Collection[str],
    section_list_keys: Mapping[tuple[str, str], str],
    skip: Collection[str],
) -> dict[str, Any]:
    """The settings that MODELMORA_* variables of `environ` set, as a (nested) table.

    `MODELMORA_<KEY>` sets a top-level key of `fields`, `MODELMORA_<SECTION>__<KEY>` a key of a
    section in `sections`. A top-level key in `list_keys` takes a comma-separated list; a section
    key in `section_list_keys` a list split by its separator (or newlines). Variables in `skip`
    and every `MODELMORA_TEST_*` are not settings.

    Raises:
        ConfigError: a variable names an unknown key or section.
    """
    out: dict[str, Any] = {}
    for key, value in environ.items():
        if not key.startswith("MODELMORA_") or key in skip or key.startswith("MODELMORA_TEST_"):
            continue
        name = key.removeprefix("MODELMORA_").lower()
        if "__" in name:
            section, sub = name.split("__", 1)
            if section not in sections:
                raise ConfigError(f"unknown configuration section in environment variable {key}")
            separator = section_list_keys.get((section, sub))
            if separator is not None:
                items = value.replace("\n", separator).split(separator)
                out.setdefault(section, {})[sub] = [item.strip() for item in items if item.strip()]
            else:
                out.setdefault(section, {})[sub] = value
        elif name in list_keys:
            out[name] = [item.strip() for item in value.split(",") if item.strip()]
        elif name in fields:
            out[name] = value
        else:
            raise ConfigError(f"unknown configuration key in environment variable {key}")
    return out


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`base` with the keys of `over` on top (tables are merged key by key)."""
    merged = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = merge(merged[k], v)
        else:
            merged[k] = v
    return merged


_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_BOUND = re.compile(r"^Expected `(?P<type>int|float)` (?P<bound>[<>]=? ?-?[\d.e+]+)$")
_PATTERN = re.compile(r"^Expected `str` matching regex (?P<pattern>'.*')$", re.DOTALL)
_TYPE_WORDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}


def explain(
    message: str,
    data: dict[str, Any],
    from_env: dict[str, Any],
    overrides: dict[str, Any],
    path: Path | None,
    *,
    root: type,
    secret_keys: Collection[str],
    pattern_words: Mapping[str, str],
) -> str:
    """msgspec's validation message as one line in words, naming the key, its value and where it came
    from (`$.request_ring_mb` + `Expected `int` >= 1` -> "request_ring_mb must be an integer >= 1 (got -5)").

    Args:
        message: msgspec's message, converting `data` to `root`.
        data: what was converted (file, environment and overrides merged).
        from_env: the part of `data` the environment set.
        overrides: the keyword overrides (the command line).
        path: the configuration file, if one was read.
        root: the settings class `data` was converted to (for a Literal setting's choices).
        secret_keys: dotted keys whose values never appear in the message.
        pattern_words: what a string setting's pattern means, in words.
    """
    match = _AT.match(message.strip())
    assert match is not None  # the pattern matches any text
    what, at = match["what"], (match["path"] or "").lstrip(".")
    if what.startswith("Object contains unknown field"):
        field = what.split("`")[1] if "`" in what else "?"
        return f"invalid configuration: unknown key {'.'.join(p for p in (at, field) if p)!r}"
    parts = [p for p in re.split(r"\.|\[|\]", at) if p]
    value: Any = data
    for part in parts:
        value = value.get(part) if isinstance(value, dict) else None
    if bound := _BOUND.match(what):
        expected = f"must be {_TYPE_WORDS[bound['type']]} {bound['bound']}"
    elif pattern := _PATTERN.match(what):
        regex = ast.literal_eval(pattern["pattern"])
        expected = f"must be {pattern_words.get(regex, f'a string matching {regex}')}"
    elif what.startswith("Invalid enum value"):
        expected = f"must be one of {', '.join(repr(c) for c in _choices(root, parts))}"
    elif typed := re.match(r"^Expected `(\w+)`", what):
        expected = f"must be {_TYPE_WORDS.get(typed[1], typed[1])}"
    else:
        expected = what[:1].lower() + what[1:]
    key = ".".join(parts) or "configuration"
    if any(key == secret or key.startswith(secret + ".") for secret in secret_keys):
        value = None  # never echo a secret
        key = key.split(".")[0] + "." + key.split(".")[1]
    origin = f", in {path}" if path is not None else ""
    section, _, sub = key.partition(".")
    if parts and parts[0] in overrides and overrides[parts[0]] is not None:
        origin = ", from the command line"
    elif section in from_env and (not sub or sub in from_env[section]):
        origin = f", from {'MODELMORA_' + (section.upper() + '__' + sub.upper() if sub else section.upper())}"
    got = f" (got {value!r}{origin})" if value is not None else (f" ({origin[2:]})" if origin else "")
    return f"invalid configuration: {key} {expected}{got}"


def _choices(root: type, parts: list[str]) -> tuple[str, ...]:
    """The allowed values of the Literal setting of `root` at `parts` (empty when it is not one)."""
    owner: Any = root
    hint: Any = None
    for part in parts:
        hints = typing.get_type_hints(owner, include_extras=True) if isinstance(owner, type) else {}
        hint = hints.get(part)
        owner = hint
    while typing.get_origin(hint) in (Annotated, typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return tuple(str(a) for a in typing.get_args(hint)) if typing.get_origin(hint) is Literal else ()
