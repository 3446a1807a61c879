"""Security in the OpenAPI document: the schemes (a bearer token; mutual TLS where the server asks
for client certificates) and, on every operation, what the access table (`api.access.REST_ACCESS`,
the one the gate applies) says it needs, with the gate's refusals in our error shape: 401 and 403
(with `WWW-Authenticate`) and 429 (with `Retry-After`)."""

from __future__ import annotations

from typing import Any

from ...security import OPEN, TOKEN
from ..access import REST_ACCESS
from .parts import error

__all__ = ("BEARER", "MUTUAL_TLS", "secure", "security_components")

BEARER = "bearerAuth"
"""The bearer token scheme's name; a requirement lists the scope its token must hold."""
MUTUAL_TLS = "mutualTLS"
"""The client certificate scheme's name (only in a document served with `[tls] client_ca_file`)."""

_HTTP_METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")
_CHALLENGE = {
    "WWW-Authenticate": {
        "description": 'The challenge: `Bearer realm="modelmora"`, with `error="invalid_token"` for an unknown'
        ' token or `error="insufficient_scope", scope="<scope>"` for one without the scope',
        "schema": {"type": "string"},
    }
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before trying again", "schema": {"type": "integer"}}}
_LIMITS = (
    "the token is over its request rate (rate_limit_per_s) or runs max_concurrent_requests already;"
    " only with [auth] limits set (Retry-After)"
)


def security_components(*, mutual_tls: bool) -> dict[str, Any]:
    """The security schemes, and the responses of the gate's refusals (`components` entries)."""
    schemes: dict[str, Any] = {
        BEARER: {
            "type": "http",
            "scheme": "bearer",
            "description": "A token named in the server's [auth] tokens_file or [auth] tokens, sent as"
            " `Authorization: Bearer <token>`. Needed only while authentication is on (any token configured);"
            " each operation lists the scope its token must hold: infer (inference and jobs), read (models,"
            " status, health of models, metrics) or admin (install, settings, load, unload, delete).",
        }
    }
    if mutual_tls:
        schemes[MUTUAL_TLS] = {
            "type": "mutualTLS",
            "description": "A client certificate signed by a CA of the server's [tls] client_ca_file, presented in"
            " the TLS handshake of every connection.",
        }
    responses = {
        "Unauthenticated": error(
            "No bearer token, or one the server does not know (only while authentication is on)", _CHALLENGE
        ),
        "PermissionDenied": error("The token lacks the scope this operation needs", _CHALLENGE),
        "TokenLimited": error("Too many requests: " + _LIMITS, _RETRY_AFTER),
    }
    return {"securitySchemes": schemes, "responses": responses}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/responses/{name}"}


def secure(paths: dict[str, Any], *, mutual_tls: bool) -> None:
    """Give every operation of `paths` its security requirement and the gate's responses.

    Raises:
        KeyError: an operation the access table does not name (the gate would answer it 404).
    """
    transport: dict[str, list[str]] = {MUTUAL_TLS: []} if mutual_tls else {}
    for path, item in paths.items():
        for method, operation in item.items():
            if method not in _HTTP_METHODS:
                continue
            access = REST_ACCESS[(method.upper(), path)]
            if access == OPEN:
                operation["security"] = [transport] if transport else []
                continue
            roles = [] if access == TOKEN else [str(access)]
            operation["security"] = [{BEARER: roles, **transport}]
            responses = operation["responses"]
            responses["401"] = _ref("Unauthenticated")
            responses["403"] = _ref("PermissionDenied")
            if "429" in responses:  # the model's queue full, too
                described = responses["429"]["description"].removesuffix(" (Retry-After)")
                responses["429"] = error(f"{described}; or {_LIMITS}", _RETRY_AFTER)
            else:
                responses["429"] = _ref("TokenLimited")
            operation["responses"] = dict(sorted(responses.items()))
