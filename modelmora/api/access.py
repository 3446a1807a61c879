"""What each endpoint and method needs, in one table per protocol: a scope (`infer`, `read`,
`admin`), or nothing (`OPEN`: health probes, the docs, reflection). The gate applies it at the edge,
before any body is read; a test checks that every REST route and every gRPC method is listed.

A REST path the table does not name needs a known token (`TOKEN`), then answers 404 or 405, so that
the routes cannot be probed without one. OPTIONS is open (a CORS preflight carries no credentials, and
is answered without reaching an endpoint).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from ..security import OPEN, TOKEN, Access, Scope

__all__ = ("GRPC_ACCESS", "REST_ACCESS", "RestAccess", "grpc_access")

INFER, READ, ADMIN = Scope.INFER, Scope.READ, Scope.ADMIN

REST_ACCESS: Mapping[tuple[str, str], Access] = {
    ("POST", "/api/v1/infer/{model_id}"): INFER,
    ("POST", "/api/v1/infer/{model_id}/async"): INFER,
    ("GET", "/api/v1/jobs"): INFER,  # jobs are read with the scope that submits them
    ("GET", "/api/v1/jobs/{job_id}"): INFER,
    ("DELETE", "/api/v1/jobs/{job_id}"): INFER,
    ("GET", "/api/v1/jobs/{job_id}/result"): INFER,
    ("GET", "/api/v1/results/{name}"): OPEN,  # the URL's signature (HMAC, expiry) is the credential
    ("GET", "/api/v1/models"): READ,
    ("GET", "/api/v1/models/{model_id}"): READ,
    ("PUT", "/api/v1/models/{model_id}"): ADMIN,
    ("DELETE", "/api/v1/models/{model_id}"): ADMIN,
    ("POST", "/api/v1/models"): ADMIN,  # install
    ("POST", "/api/v1/models/{model_id}/load"): ADMIN,
    ("POST", "/api/v1/models/{model_id}/unload"): ADMIN,
    ("PUT", "/api/v1/models/{model_id}/metadata"): ADMIN,
    ("POST", "/api/v1/models/{model_id}/download"): ADMIN,
    ("POST", "/api/v1/models/{model_id}/versions/{version}"): ADMIN,  # activate (and pin)
    ("DELETE", "/api/v1/models/{model_id}/versions/{version}"): ADMIN,
    ("GET", "/api/v1/operations/{operation_id}"): READ,  # an install's progress
    ("GET", "/api/v1/status"): READ,
    ("GET", "/metrics"): READ,  # OPEN with `[auth] metrics_open`
    ("GET", "/api/v1/metrics"): READ,  # the same
    ("GET", "/health/live"): OPEN,
    ("GET", "/health/ready"): OPEN,
    ("GET", "/health/models"): READ,  # it lists every model and its last error
    ("GET", "/openapi.json"): OPEN,
    ("GET", "/docs"): OPEN,
    ("GET", "/docs/assets/{path:path}"): OPEN,
    # OpenAI-compatible (api/openai)
    ("POST", "/v1/embeddings"): INFER,
    ("POST", "/v1/completions"): INFER,
    ("POST", "/v1/chat/completions"): INFER,
    ("POST", "/v1/images/generations"): INFER,
    ("GET", "/v1/models"): READ,
    ("GET", "/v1/models/{model_id}"): READ,
    # Open Inference Protocol v2 (api/oip)
    ("GET", "/v2"): READ,
    ("GET", "/v2/health/live"): OPEN,
    ("GET", "/v2/health/ready"): OPEN,
    ("GET", "/v2/models/{name}"): READ,
    ("GET", "/v2/models/{name}/ready"): READ,
    ("POST", "/v2/models/{name}/infer"): INFER,
    ("GET", "/v2/models/{name}/versions/{version}"): READ,
    ("GET", "/v2/models/{name}/versions/{version}/ready"): READ,
    ("POST", "/v2/models/{name}/versions/{version}/infer"): INFER,
    ("POST", "/v2/repository/index"): READ,
    ("POST", "/v2/repository/models/{name}/load"): ADMIN,
    ("POST", "/v2/repository/models/{name}/unload"): ADMIN,
}
"""(method, path template) -> access. HEAD follows GET."""

_INFERENCE = "/modelmora.v1.InferenceService/"
_REGISTRY = "/modelmora.v1.RegistryService/"
_MANAGEMENT = "/modelmora.v1.ManagementService/"
_OIP = "/inference.GRPCInferenceService/"
_JOBS = "/modelmora.v1.JobService/"

GRPC_ACCESS: Mapping[str, Access] = {
    _INFERENCE + "Infer": INFER,
    _INFERENCE + "InferStream": INFER,
    _INFERENCE + "Generate": INFER,
    _REGISTRY + "ListModels": READ,
    _REGISTRY + "GetModel": READ,
    _REGISTRY + "UpdateModelSettings": ADMIN,
    _REGISTRY + "DeleteModel": ADMIN,
    _MANAGEMENT + "LoadModel": ADMIN,
    _MANAGEMENT + "UnloadModel": ADMIN,
    _MANAGEMENT + "GetStatus": READ,
    _JOBS + "InferAsync": INFER,
    _JOBS + "GetJob": INFER,
    _JOBS + "CancelJob": INFER,
    _JOBS + "WatchJob": INFER,
    _JOBS + "GetJobResult": INFER,
    _OIP + "ServerLive": OPEN,
    _OIP + "ServerReady": OPEN,
    _OIP + "ModelReady": READ,
    _OIP + "ServerMetadata": READ,
    _OIP + "ModelMetadata": READ,
    _OIP + "ModelInfer": INFER,
    _OIP + "ModelStreamInfer": INFER,
    _OIP + "RepositoryIndex": READ,
    _OIP + "RepositoryModelLoad": ADMIN,
    _OIP + "RepositoryModelUnload": ADMIN,
    "/grpc.health.v1.Health/Check": OPEN,
    "/grpc.health.v1.Health/Watch": OPEN,
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": OPEN,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": OPEN,
}
"""gRPC method path -> access. A method missing here is refused when the listener is built."""


def grpc_access(path: str) -> Access:
    """The access a gRPC method needs.

    Raises:
        KeyError: the method is not in `GRPC_ACCESS` (a server must not serve it unguarded).
    """
    return GRPC_ACCESS[path]


_PARAM = re.compile(r"\{(\w+)(:path)?\}")


def _pattern(template: str) -> re.Pattern[str]:
    parts, last = [], 0
    for m in _PARAM.finditer(template):
        parts.append(re.escape(template[last : m.start()]))
        parts.append(".*" if m[2] else "[^/]+")
        last = m.end()
    parts.append(re.escape(template[last:]))
    return re.compile("^" + "".join(parts) + "$")


class RestAccess:
    """`REST_ACCESS` compiled: the access a request needs from its method and path."""

    def __init__(self, table: Mapping[tuple[str, str], Access] = REST_ACCESS, *, metrics_open: bool = False) -> None:
        self.exact: dict[tuple[str, str], Access] = {}
        self.patterns: list[tuple[str, re.Pattern[str], Access]] = []
        for (method, template), access in table.items():
            if template in ("/metrics", "/api/v1/metrics") and metrics_open:
                access = OPEN
            if _PARAM.search(template):
                self.patterns.append((method, _pattern(template), access))
            else:
                self.exact[(method, template)] = access

    def __call__(self, method: str, path: str) -> Access:
        if method == "OPTIONS":  # a CORS preflight carries no credentials; it is answered 204 or 405
            return OPEN
        method = "GET" if method == "HEAD" else method
        found = self.exact.get((method, path))
        if found is not None:
            return found
        for m, pattern, access in self.patterns:
            if m == method and pattern.match(path):
                return access
        return TOKEN
