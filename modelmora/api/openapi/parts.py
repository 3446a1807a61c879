"""The pieces every part of the OpenAPI document is built from: references to the component
schemas, and responses in our error shape or with a JSON body."""

from __future__ import annotations

from typing import Any

__all__ = ("REF", "error", "ok")

REF = "#/components/schemas/{name}"
"""A reference to a component schema, by the name of its msgspec type."""


def error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    """A response with our error body (`ErrorBody`), and its `headers` when given."""
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": REF.format(name="ErrorBody")}}},
    }
    if headers:
        response["headers"] = headers
    return response


def ok(name: str, description: str = "OK") -> dict[str, Any]:
    """A response whose JSON body is the component schema `name`."""
    return {"description": description, "content": {"application/json": {"schema": {"$ref": REF.format(name=name)}}}}
