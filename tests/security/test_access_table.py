"""The access table names every REST route and every gRPC method the server serves, and the gRPC
listener refuses to serve a method it does not name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from grpclib.const import Cardinality, Handler
from starlette.routing import Mount, Route

from modelmora.api.access import GRPC_ACCESS, REST_ACCESS, RestAccess
from modelmora.api.grpc import GrpcListener, guarded
from modelmora.config import load_settings
from modelmora.security import OPEN, TOKEN, Gate, Scope

from conftest import AppUnderTest

pytestmark = pytest.mark.anyio


def _routes(app: Any) -> set[tuple[str, str]]:
    found = set()
    for route in app.app.routes:  # the ASGI entry point's Starlette app
        if isinstance(route, Route):
            found |= {(m, route.path) for m in route.methods or () if m != "HEAD"}
        elif isinstance(route, Mount):
            found.add(("GET", route.path + "/{path:path}"))
    return found


@pytest.mark.settings(result_store="filesystem")
async def test_every_rest_route_is_in_the_table(echo_app: AppUnderTest) -> None:
    from modelmora.api import create_app

    routes = _routes(create_app(echo_app.service))
    assert routes, "no routes found"
    missing = routes - set(REST_ACCESS)
    assert not missing, f"routes missing from api.access.REST_ACCESS: {sorted(missing)}"
    assert ("GET", "/api/v1/results/{name}") in routes  # the filesystem store's route was seen


def test_every_grpc_method_is_in_the_table(tmp_path: Path) -> None:
    sock = __import__("socket").socket()
    try:
        settings = load_settings(None, environ={}, home=str(tmp_path))
        service: Any = type("S", (), {"settings": settings})()
        jobs: Any = object()  # the job service is served when the server has a job runner
        listener = GrpcListener(service, sock, "http://x/", jobs=jobs)
        served = {path for h in listener.handlers for path in h.__mapping__()}
    finally:
        sock.close()
    assert served - set(GRPC_ACCESS) == set()
    assert set(GRPC_ACCESS) - served == set()  # and nothing else is listed


def test_a_grpc_method_missing_from_the_table_is_not_served() -> None:
    async def handler(stream: Any) -> None:
        raise AssertionError("never called")

    mapping = {"/modelmora.v1.Secret/Backdoor": Handler(handler, Cardinality.UNARY_UNARY, None, None)}
    with pytest.raises(KeyError):
        guarded(mapping, Gate(load_settings(None, environ={}).auth))


@pytest.mark.parametrize(
    ("method", "path", "access"),
    [
        ("POST", "/api/v1/infer/echo", Scope.INFER),
        ("GET", "/api/v1/models", Scope.READ),
        ("HEAD", "/api/v1/models/echo", Scope.READ),
        ("PUT", "/api/v1/models/echo", Scope.ADMIN),
        ("POST", "/api/v1/models/echo/load", Scope.ADMIN),
        ("POST", "/api/v1/models/echo/unload", Scope.ADMIN),
        ("GET", "/api/v1/status", Scope.READ),
        ("GET", "/health/models", Scope.READ),
        ("GET", "/metrics", Scope.READ),
        ("GET", "/health/live", OPEN),
        ("GET", "/health/ready", OPEN),
        ("GET", "/docs", OPEN),
        ("GET", "/docs/assets/swagger-ui.css", OPEN),
        ("GET", "/openapi.json", OPEN),
        ("GET", "/api/v1/results/abc.png", OPEN),
        ("OPTIONS", "/api/v1/infer/echo", OPEN),
        ("GET", "/api/v1/models/echo/load", TOKEN),  # no such route: any token, then 405
        ("GET", "/nowhere", TOKEN),
        ("POST", "/api/v1/models/a/b/load", TOKEN),
    ],
)
def test_paths_map_to_their_access(method: str, path: str, access: object) -> None:
    assert RestAccess()(method, path) == access


def test_metrics_can_be_opened() -> None:
    assert RestAccess(metrics_open=True)("GET", "/metrics") == OPEN
