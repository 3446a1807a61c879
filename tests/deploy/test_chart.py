"""The Helm chart (deploy/helm/modelmora), rendered offline with default and non-default values:
every manifest valid against the Kubernetes schemas, and the workload in agreement with the server
(k8s_checks)."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import pytest

from modelmora.config import DEFAULT_GRPC_PORT, Settings

from .k8s_checks import (
    DEPLOY,
    by_kind,
    check_workload,
    container_env,
    load_documents,
    one,
    server_container,
    validate_all,
)

CHART = DEPLOY / "helm" / "modelmora"
CERT = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
KEY = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n"

NON_DEFAULT: dict[str, Any] = {
    "image": {"repository": "registry.example.com/modelmora", "tag": "1.2.3-cuda"},
    "ports": {"http": 9000, "grpc": 9001},
    "config": {"max_batch_size": 64, "auth__metrics_open": True, "log_level": "debug"},
    "shutdownGraceSeconds": 45,
    "auth": {"enabled": True, "tokens": "app infer,read 0123456789abcdef0123\n"},
    "tls": {"enabled": True, "cert": CERT, "key": KEY, "clientAuth": True, "clientCa": CERT},
    "databaseUrl": "postgresql://modelmora:secret@postgres:5432/modelmora",
    "resultSecret": "a-shared-signing-key",
    "persistence": {"accessModes": ["ReadWriteMany"], "storageClassName": "nfs", "size": "200Gi"},
    "shm": {"sizeLimit": "4Gi"},
    "gpu": {"enabled": True, "count": 2},
    "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 8, "targetMemoryUtilizationPercentage": 80},
    "serviceMonitor": {
        "enabled": True,
        "labels": {"release": "prometheus"},
        "bearerTokenSecret": {"name": "modelmora-metrics", "key": "token"},
    },
    "nodeSelector": {"nvidia.com/gpu.present": "true"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
}
if "redis_url" in Settings.__struct_fields__:  # replicas' Redis, once the server has the setting
    NON_DEFAULT["redisUrl"] = "redis://redis:6379/0"


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    chart = helm.Chart.load(CHART)
    manifests = chart.render(values, name="mm", namespace="inference")
    return load_documents(text for path, text in manifests.items() if path.endswith((".yaml", ".yml")))


def test_the_chart_lints_clean() -> None:
    for values in (None, NON_DEFAULT):
        report = helm.lint(CHART, values, strict=True)
        assert report["errors"] == [], report
        assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


def test_default_values_render_a_valid_single_replica_on_the_server_defaults() -> None:
    docs = render()
    validate_all(docs)
    assert sorted(d["kind"] for d in docs) == [
        "ConfigMap",
        "Deployment",
        "PersistentVolumeClaim",
        "Service",
        "ServiceAccount",
    ]
    settings = check_workload(docs)
    defaults = Settings()
    assert settings.port == defaults.port and settings.effective_grpc_port("asyncio") == DEFAULT_GRPC_PORT
    assert settings.shutdown_grace_s == defaults.shutdown_grace_s
    service_ports = {p["name"]: p["port"] for p in one(docs, "Service")["spec"]["ports"]}
    assert service_ports == {"http": defaults.port, "grpc": DEFAULT_GRPC_PORT}
    assert not settings.auth.enabled and not settings.tls.enabled
    container = server_container(docs)
    assert container["image"] == "modelmora:0.1.0"
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    assert one(docs, "Deployment")["spec"]["replicas"] == 1
    claim = one(docs, "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_non_default_values_render_tls_tokens_gpu_autoscaling_and_monitoring() -> None:
    docs = render(NON_DEFAULT)
    validate_all(docs)
    settings = check_workload(docs)
    assert (settings.port, settings.effective_grpc_port("asyncio")) == (9000, 9001)
    assert settings.max_batch_size == 64 and settings.auth.metrics_open and settings.log_level == "debug"
    assert settings.auth.enabled and settings.tls.enabled and settings.tls.client_ca_file
    assert settings.database_url.startswith("postgresql://") and settings.result_secret
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 45 + 20
    assert "replicas" not in deployment["spec"]  # the autoscaler owns it
    assert "strategy" not in deployment["spec"]  # a ReadWriteMany claim: rolling updates
    container = server_container(docs)
    assert container["image"] == "registry.example.com/modelmora:1.2.3-cuda"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert container["resources"]["limits"]["memory"] == "8Gi"  # the values' limits are kept
    assert pod["nodeSelector"] == NON_DEFAULT["nodeSelector"] and pod["tolerations"] == NON_DEFAULT["tolerations"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["shm"]["emptyDir"]["sizeLimit"] == "4Gi"
    assert [i["key"] for i in volumes["tls"]["secret"]["items"]] == ["tls.crt", "tls.key", "ca.crt"]

    secret = one(docs, "Secret")
    assert secret["stringData"]["tokens"] == NON_DEFAULT["auth"]["tokens"]
    assert secret["stringData"]["tls.crt"] == CERT and secret["stringData"]["ca.crt"] == CERT
    env = container_env(docs)
    assert "MODELMORA_DATABASE_URL" not in one(docs, "ConfigMap")["data"]  # passwords stay in the Secret
    assert env["MODELMORA_DATABASE_URL"] == NON_DEFAULT["databaseUrl"]

    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "mm-modelmora"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    assert {m["resource"]["name"] for m in hpa["spec"]["metrics"]} == {"cpu", "memory"}

    monitor = one(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["scheme"] == "https" and endpoint["authorization"]["credentials"]["name"] == "modelmora-metrics"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= one(docs, "Service")["metadata"]["labels"].items()
    service = one(docs, "Service")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"http": 9000, "grpc": 9001}
    assert len(by_kind(docs, "PersistentVolumeClaim")) == 1


def test_existing_secrets_and_claim_are_used_instead_of_the_charts_own() -> None:
    docs = render(
        {
            "auth": {"enabled": True, "existingSecret": "my-tokens"},
            "tls": {"enabled": True, "existingSecret": "my-tls"},
            "persistence": {"existingClaim": "models"},
        }
    )
    validate_all(docs)
    check_workload(docs)
    assert by_kind(docs, "Secret") == [] and by_kind(docs, "PersistentVolumeClaim") == []
    volumes = {v["name"]: v for v in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["auth"]["secret"]["secretName"] == "my-tokens"
    assert volumes["tls"]["secret"]["secretName"] == "my-tls"
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "models"


def test_without_persistence_the_home_is_an_empty_dir() -> None:
    docs = render({"persistence": {"enabled": False}})
    validate_all(docs)
    check_workload(docs)
    volumes = {v["name"]: v for v in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["data"] == {"name": "data", "emptyDir": {}}
    assert by_kind(docs, "PersistentVolumeClaim") == []


def test_tls_without_its_files_is_refused_at_render() -> None:
    with pytest.raises(helm.HelmError, match=r"tls\.cert"):
        render({"tls": {"enabled": True}})


@pytest.mark.parametrize(("key", "hint"), [("port", "ports.http"), ("shutdown_grace_s", "shutdownGraceSeconds")])
def test_settings_the_chart_derives_are_refused_under_config(key: str, hint: str) -> None:
    with pytest.raises(helm.HelmError, match=f"config.{key}: set {hint}"):
        render({"config": {key: 1}})


def test_an_unknown_setting_under_config_is_caught_by_the_servers_own_check() -> None:
    from modelmora.config import ConfigError, load_settings

    docs = render({"config": {"max_batch_sise": 64}})
    validate_all(docs)  # valid Kubernetes, ...
    with pytest.raises(ConfigError, match="MODELMORA_MAX_BATCH_SISE"):  # ... but a server that would not start
        load_settings(None, environ=container_env(docs))
