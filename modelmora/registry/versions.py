"""Semantic versions of installed models: parsing, ordering, and `id@version` references."""

from __future__ import annotations

import re
from typing import Any

from ..errors import InvalidInput

__all__ = ("SEMVER_RE", "check_version", "latest", "semver_key", "split_ref")

SEMVER_RE = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$")


def check_version(version: str, field: str = "version") -> str:
    """`version` when it is a semantic version (1.2.0, 2.0.0-rc.1).

    Raises:
        InvalidInput: it is not; `field` names where it came from.
    """
    if not SEMVER_RE.match(version):
        raise InvalidInput(
            f"{field.removeprefix('$.')}: {version!r} is not a semantic version (MAJOR.MINOR.PATCH, e.g. 1.2.0)",
            field=field,
        )
    return version


def semver_key(version: str) -> tuple[Any, ...]:
    """A sort key in semantic-version precedence (1.10.0 after 1.9.0; 1.0.0-rc.1 before 1.0.0);
    a string that is not a semantic version sorts first, by its text."""
    m = SEMVER_RE.match(version)
    if m is None:
        return (0, version)
    pre = m.group(4)
    ids: tuple[Any, ...] = ()
    if pre is not None:  # numeric identifiers sort numerically and before alphanumeric ones
        ids = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split("."))
    return (1, int(m.group(1)), int(m.group(2)), int(m.group(3)), pre is None, ids)


def latest(versions: list[str]) -> str | None:
    """The highest of `versions` in semantic-version precedence."""
    return max(versions, key=semver_key) if versions else None


def split_ref(ref: str) -> tuple[str, str | None]:
    """`id@1.2.0` as (id, "1.2.0"); `id` as (id, None).

    Raises:
        InvalidInput: the version after `@` is not a semantic version.
    """
    model_id, sep, version = ref.partition("@")
    if not sep:
        return ref, None
    return model_id, check_version(version)
