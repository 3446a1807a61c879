"""The OpenAPI document says what the gate does: a bearer token scheme (and mutual TLS when the
server asks for client certificates), each operation's scope from the access table the gate applies,
and the gate's 401, 403 and 429 in our error shape with their headers."""

from __future__ import annotations

from typing import Any

import httpx
import msgspec
import pytest

from modelmora.api import create_app, openapi
from modelmora.api.access import REST_ACCESS
from modelmora.config import TlsSettings
from modelmora.security import OPEN

from conftest import AppUnderTest

HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
ERROR_BODY = {"$ref": "#/components/schemas/ErrorBody"}


def operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, op)
        for path, item in doc["paths"].items()
        for method, op in item.items()
        if method in HTTP_METHODS
    ]


def resolve(doc: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    ref = response.get("$ref")
    if ref is None:
        return response
    prefix = "#/components/responses/"
    assert ref.startswith(prefix), ref
    found: dict[str, Any] = doc["components"]["responses"][ref.removeprefix(prefix)]
    return found


def test_the_bearer_scheme_is_declared_and_mutual_tls_only_when_asked_for() -> None:
    doc = openapi.document()
    schemes = doc["components"]["securitySchemes"]
    assert schemes["bearerAuth"]["type"] == "http" and schemes["bearerAuth"]["scheme"] == "bearer"
    assert "mutualTLS" not in schemes
    mutual = openapi.document(mutual_tls=True)
    assert mutual["components"]["securitySchemes"]["mutualTLS"]["type"] == "mutualTLS"
    for _, _, op in operations(mutual):  # a client certificate on every connection, health probes included
        assert op["security"] and all("mutualTLS" in requirement for requirement in op["security"])


def test_every_operation_names_the_scope_the_gate_asks_for_and_its_refusals() -> None:
    doc = openapi.document()
    ops = operations(doc)
    assert len(ops) > 20
    for method, path, op in ops:
        access = REST_ACCESS[(method, path)]
        responses = op["responses"]
        if access == OPEN:
            assert op["security"] == [], (method, path)
            assert "401" not in responses, (method, path)
            continue
        assert op["security"] == [{"bearerAuth": [str(access)]}], (method, path)
        for status, header in (("401", "WWW-Authenticate"), ("403", "WWW-Authenticate"), ("429", "Retry-After")):
            response = resolve(doc, responses[status])
            assert response["content"]["application/json"]["schema"] == ERROR_BODY, (method, path, status)
            assert header in response["headers"], (method, path, status)
    infer = doc["paths"]["/api/v1/infer/{model_id}"]["post"]
    assert infer["security"] == [{"bearerAuth": ["infer"]}]
    assert "queue full" in infer["responses"]["429"]["description"]  # the model's queue, and the token's limits
    assert "rate" in infer["responses"]["429"]["description"]
    load = doc["paths"]["/api/v1/models/{model_id}/load"]["post"]
    assert load["security"] == [{"bearerAuth": ["admin"]}]
    assert doc["paths"]["/health/live"]["get"]["security"] == []


@pytest.mark.anyio
async def test_the_served_document_adds_mutual_tls_when_the_server_asks_for_client_certificates(
    echo_app: AppUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    served = (await echo_app.client.get("/openapi.json")).json()
    assert served == msgspec.json.decode(openapi.document_bytes())
    tls = TlsSettings(cert_file="server.pem", key_file="server.key", client_ca_file="clients.pem")
    monkeypatch.setattr(echo_app.service, "settings", msgspec.structs.replace(echo_app.settings, tls=tls))
    transport = httpx.ASGITransport(app=create_app(echo_app.service))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        served = (await client.get("/openapi.json")).json()
    assert "mutualTLS" in served["components"]["securitySchemes"]
    assert served == msgspec.json.decode(openapi.document_bytes(mutual_tls=True))
