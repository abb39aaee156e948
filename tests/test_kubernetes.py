"""The Kubernetes examples (service/kubernetes/) cannot drift from the service: probe paths, port, the grace period
against the drain, and every TRANSFERKIT_* variable they set are checked against the code."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from transferkit.service.settings import SERVER_STOP_GRACE_S, ServiceSettings, env_name

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "service" / "kubernetes").glob("*.yaml"))
SETTING_NAMES = {env_name(name): name for name in ServiceSettings.model_fields}
PORT = 3000  # `bentoml serve`'s and `transferkit serve`'s default, which the container runs


def _documents(path: Path) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(path.read_text()) if doc}


def _settings(container: dict) -> tuple[ServiceSettings, dict[str, str]]:
    """The service settings the container's environment makes (validated like the service validates them)."""
    values = {item["name"]: item["value"] for item in container["env"]
              if "value" in item and item["name"].startswith("TRANSFERKIT_")}
    unknown = {item["name"] for item in container["env"]} - set(SETTING_NAMES) - {"BENTOML_DO_NOT_TRACK"}
    assert not unknown, f"not a transferkit setting: {unknown}"
    return ServiceSettings(**{SETTING_NAMES[name]: value for name, value in values.items()}), values


def test_there_is_a_cpu_and_a_gpu_example():
    assert [path.name for path in EXAMPLES] == ["cpu.yaml", "gpu.yaml"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.stem)
def test_the_example_matches_the_service(path):
    docs = _documents(path)
    deployment, service, autoscaler = docs["Deployment"], docs["Service"], docs["HorizontalPodAutoscaler"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    settings, _ = _settings(container)
    assert container["ports"] == [{"name": "http", "containerPort": PORT}]
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]
    assert autoscaler["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    # The probes the service answers without a token and before the model is ready (liveness) or once it is.
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == container["startupProbe"]["httpGet"]["path"] == "/readyz"
    # Kubernetes SIGKILLs the pod after the grace period: it must cover preStop, the drain and the server's exit.
    sleep, seconds = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep == "sleep"
    pre_stop = int(seconds)
    needed = pre_stop + settings.drain_timeout_s + SERVER_STOP_GRACE_S
    assert pod["terminationGracePeriodSeconds"] >= needed, (pod["terminationGracePeriodSeconds"], needed)
    # Workers follow the CPU limit: a request below it would schedule pods that then run slower than planned.
    resources = container["resources"]
    assert resources["requests"]["cpu"] == resources["limits"]["cpu"]
    token = next(item for item in container["env"] if item["name"] == env_name("api_token"))
    assert token["valueFrom"]["secretKeyRef"]["optional"] is True


def test_the_gpu_example_asks_for_a_gpu_and_the_batched_layout():
    (container,) = _documents(EXAMPLES[1])["Deployment"]["spec"]["template"]["spec"]["containers"]
    settings, _ = _settings(container)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert settings.device == "gpu" and settings.layout == "batched"
