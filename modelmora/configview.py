"""The effective configuration as TOML, secrets masked (`mm serve --print-config`).

What is printed is what the server would run with: defaults, then the file, then `MODELMORA_*`
variables, then command-line flags, each winning over the one before. The output reads back as a
configuration file. Masked: every text whose key names a secret (secret, password, token, key,
credential, access key; not `*_file` / `*_path` / `*_dir` keys, which are paths), and the
password of any URL that carries one (`postgresql://user:***@host/db`).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import msgspec

from .config import Settings

__all__ = ("MASK", "masked", "render")

MASK = "***"
_SECRET_KEY = re.compile(r"secret|password|passwd|token|credential|access_key|(^|_)key$")
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _is_secret(key: str) -> bool:
    key = key.lower()
    return not key.endswith(("_file", "_path", "_dir")) and _SECRET_KEY.search(key) is not None


def _mask_url(value: str) -> str:
    if "://" not in value or "@" not in value:
        return value
    try:
        parts = urlsplit(value)
        if parts.password is None:
            return value
        user = parts.username or ""
        host = parts.netloc.rsplit("@", 1)[1]
    except ValueError:
        return MASK  # not a URL we can take apart: show none of it
    return urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{host}"))


def _mask(key: str, value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _mask(k, v) for k, v in value.items()}
    if _is_secret(key) and not isinstance(value, bool | int | float):
        if isinstance(value, list | tuple):
            return [MASK for _ in value]
        return MASK if value not in ("", None) else value
    if isinstance(value, str):
        return _mask_url(value)
    if isinstance(value, list | tuple):
        return [_mask_url(v) if isinstance(v, str) else v for v in value]
    return value


def masked(settings: Settings) -> dict[str, Any]:
    """The settings as plain values (home resolved), secrets masked."""
    data: dict[str, Any] = msgspec.to_builtins(settings)
    data["home"] = str(settings.home_path)
    return {k: _mask(k, v) for k, v in data.items()}


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return "nan" if math.isnan(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: JSON's escapes are TOML's
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def _table(prefix: str, data: dict[str, Any], out: list[str]) -> None:
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict) and v is not None}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    if prefix and (scalars or not tables):
        out.extend(["", f"[{prefix}]"])
    out.extend(f"{_key(k)} = {_value(v)}" for k, v in scalars.items())
    for k, v in tables.items():
        _table(f"{prefix}.{_key(k)}" if prefix else _key(k), v, out)


def render(settings: Settings) -> str:
    """The effective configuration as a TOML document (settings left unset, None, are left out)."""
    out = [
        "# The effective configuration: defaults < config file < MODELMORA_* environment < command line.",
        f"# Secrets are shown as {MASK!r}.",
    ]
    _table("", masked(settings), out)
    return "\n".join(out) + "\n"
