"""The plain manifests (deploy/k8s): each valid against the Kubernetes schemas, the workload in
agreement with the server (k8s_checks), and the kustomization listing them."""

from __future__ import annotations

from typing import Any

import yaml

from modelmora.config import DEFAULT_GRPC_PORT, Settings

from .k8s_checks import DEPLOY, check_workload, load_documents, one, server_container, validate_all

K8S = DEPLOY / "k8s"
KUSTOMIZATION = K8S / "kustomization.yaml"


def manifests() -> dict[str, list[dict[str, Any]]]:
    return {p.name: load_documents([p.read_text()]) for p in sorted(K8S.glob("*.yaml")) if p != KUSTOMIZATION}


def test_every_manifest_is_valid_and_the_workload_agrees_with_the_server() -> None:
    files = manifests()
    docs = [doc for file_docs in files.values() for doc in file_docs]
    validate_all(docs)
    settings = check_workload(docs)
    defaults = Settings()
    assert (settings.port, settings.effective_grpc_port("asyncio")) == (defaults.port, DEFAULT_GRPC_PORT)
    assert settings.auth.enabled  # tokens from the Secret: nothing protected is open by default
    service = one(docs, "Service")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {
        "http": defaults.port,
        "grpc": DEFAULT_GRPC_PORT,
    }
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == one(docs, "Deployment")["metadata"]["name"]
    assert server_container(docs)["image"].startswith("modelmora:")


def test_the_kustomization_lists_every_manifest_but_the_service_monitor() -> None:
    listed = yaml.safe_load(KUSTOMIZATION.read_text())["resources"]
    assert sorted(listed) == sorted(set(manifests()) - {"servicemonitor.yaml"})
