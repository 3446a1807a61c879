"""Checks shared by the Helm chart's and the plain manifests' tests: each document is valid against
the Kubernetes schemas (strict: no unknown field), and the workload agrees with the server itself:
the environment it gets is a configuration the server accepts, its ports are the ones that
configuration serves, its probes ask open endpoints that exist, its grace period outlasts the
server's own, and /dev/shm and MODELMORA_HOME are volumes."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

from modelmora.api.access import REST_ACCESS
from modelmora.config import Settings, load_settings
from modelmora.security import OPEN

KUBE_VERSION = "1.33.0"
ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
GET_ROUTES = {path for (method, path) in REST_ACCESS if method == "GET"}
OPEN_GET_ROUTES = {path for (method, path), access in REST_ACCESS.items() if method == "GET" and access is OPEN}
CRD_KINDS = {"ServiceMonitor"}
"""Custom resources: no schema in kubernetes-validate; checked field by field below."""
IMAGE_UID = 10001
"""The Dockerfile's USER (a test checks they agree)."""


def load_documents(texts: Iterable[str]) -> list[dict[str, Any]]:
    """Every non-empty YAML document in `texts`."""
    return [doc for text in texts for doc in yaml.safe_load_all(text) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = by_kind(docs, kind)
    return doc


def validate_all(docs: list[dict[str, Any]]) -> None:
    """Each document against the Kubernetes schemas, strictly; a ServiceMonitor by hand."""
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            check_service_monitor(doc)
        else:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def check_service_monitor(doc: dict[str, Any]) -> None:
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(doc["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    for endpoint in doc["spec"]["endpoints"]:
        assert endpoint["port"] == "http"
        assert endpoint["path"] in GET_ROUTES and endpoint["path"] == "/metrics"


def container_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The MODELMORA_* environment the server container gets: its ConfigMap and Secret (envFrom),
    then its own `env` (which wins, as in Kubernetes)."""
    container = server_container(docs)
    configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in by_kind(docs, "ConfigMap")}
    secrets = {d["metadata"]["name"]: d.get("stringData", {}) for d in by_kind(docs, "Secret")}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(configmaps[source["configMapRef"]["name"]])
        else:
            env.update(secrets[source["secretRef"]["name"]])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return {k: str(v) for k, v in env.items() if k.startswith("MODELMORA_")}


def server_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def check_workload(docs: list[dict[str, Any]]) -> Settings:
    """The Deployment and Service agree with the server; returns the settings the server would run with."""
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = server_container(docs)
    env = container_env(docs)
    settings = load_settings(None, environ=env)  # unknown keys, bad values: ConfigError
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": settings.port, "grpc": settings.effective_grpc_port("asyncio")}
    assert settings.host == "0.0.0.0"  # reachable from the Service
    home = settings.home or env["MODELMORA_HOME"]

    scheme = "HTTPS" if settings.tls.enabled else "HTTP"
    probes = {name: container[f"{name}Probe"]["httpGet"] for name in ("startup", "liveness", "readiness")}
    assert probes["liveness"]["path"] == "/health/live"
    assert probes["readiness"]["path"] == "/health/ready"
    for probe in probes.values():
        assert probe["path"] in OPEN_GET_ROUTES  # the kubelet sends no token
        assert ports.get(probe["port"], probe["port"]) == settings.port
        assert probe.get("scheme", "HTTP") == scheme

    service = one(docs, "Service")
    assert service["spec"]["selector"].items() <= pod_labels(deployment).items()
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert set(service_ports) == {"http", "grpc"}
    for name, port in service_ports.items():
        assert ports[port["targetPort"]] == ports[name]

    assert pod["terminationGracePeriodSeconds"] > settings.shutdown_grace_s
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == IMAGE_UID
    assert container["securityContext"]["allowPrivilegeEscalation"] is False

    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    shm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert shm["medium"] == "Memory" and shm["sizeLimit"]
    assert home in mounts and mounts[home] == "data"
    if container["securityContext"].get("readOnlyRootFilesystem"):
        assert "/tmp" in mounts
    for path in (settings.auth.tokens_file, settings.tls.cert_file, settings.tls.key_file, settings.tls.client_ca_file):
        if path:  # a file the server reads lives on a mounted volume
            assert any(path.startswith(mount + "/") for mount in mounts), path
    return settings


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    return labels
