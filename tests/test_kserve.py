"""k8s/kserve/: the ServingRuntime and the example InferenceService, checked
offline. KServe's kinds are custom resources, so their Kubernetes parts (the
container, its probes and resources) are validated with kubernetes-validate
inside a Pod, and the rest against what KServe and this server expect; the
container's settings and probes are then tried on a real server."""
from __future__ import annotations

import kubernetes_validate
import pytest
import requests
import yaml

from app import settings as settings_module
from app.http import openapi
from tests.server import ROOT, Server

KSERVE = ROOT / "k8s" / "kserve"


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((KSERVE / name).read_text()) if d]


def one(name: str, kind: str) -> dict:
    found = [d for d in documents(name) if d.get("kind") == kind]
    assert len(found) == 1, f"{name}: expected one {kind}"
    return found[0]


@pytest.fixture(scope="module")
def runtime() -> dict:
    return one("servingruntime.yaml", "ServingRuntime")


@pytest.fixture(scope="module")
def service() -> dict:
    return one("inferenceservice.yaml", "InferenceService")


def container(runtime: dict) -> dict:
    containers = runtime["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(c: dict) -> dict:
    return {e["name"]: e.get("value") for e in c.get("env", [])}


def validate_in_pod(c: dict) -> None:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": {"containers": [c]}}
    kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)


def test_the_runtime_is_a_v2_runtime_for_sklearn_and_onnx(runtime):
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    spec = runtime["spec"]
    assert spec["protocolVersions"] == ["v2"]
    formats = {f["name"]: f for f in spec["supportedModelFormats"]}
    assert set(formats) == {"sklearn", "onnx"}
    assert all(f.get("autoSelect") is True and isinstance(f.get("version"), str) for f in formats.values())
    assert container(runtime)["name"] == "kserve-container"


def test_the_container_is_a_valid_kubernetes_container(runtime):
    validate_in_pod(container(runtime))


def test_models_come_from_mnt_models_and_every_setting_is_known(runtime):
    env = env_of(container(runtime))
    assert env["MLSERVE_MODELS_DIR"] == "/mnt/models"
    # The server refuses unknown MLSERVE_ variables: every one set here must load.
    values = {name: value if value is not None else "1" for name, value in env.items()}
    loaded = settings_module.load(environ=values, path=str(KSERVE / "absent.yaml"))
    assert loaded.models.directory == "/mnt/models"
    assert loaded.server.port == container(runtime)["ports"][0]["containerPort"]
    assert loaded.server.host == "0.0.0.0"
    assert loaded.server.admin_token == ""


def test_prometheus_scrapes_the_metrics_port_and_path(runtime):
    annotations = runtime["spec"]["annotations"]
    assert annotations["prometheus.kserve.io/port"] == str(container(runtime)["ports"][0]["containerPort"])
    assert annotations["prometheus.kserve.io/path"] == "/metrics"


def test_the_probes_are_documented_v2_endpoints(runtime):
    c = container(runtime)
    paths = openapi.load()["paths"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] in paths
        assert c[probe]["httpGet"]["port"] == c["ports"][0]["containerPort"]


def test_the_inference_service_uses_the_runtime(runtime, service):
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["protocolVersion"] == "v2"
    assert "://" in model["storageUri"]
    validate_in_pod({"name": "predictor", "image": "mlserve", "resources": model["resources"]})


def test_the_kustomization_lists_both(runtime, service):
    kustomization = documents("kustomization.yaml")[0]
    assert sorted(kustomization["resources"]) == ["inferenceservice.yaml", "servingruntime.yaml"]


@pytest.mark.server
def test_a_server_with_the_runtimes_settings_answers_its_probes(runtime, demo_models):
    """The container's settings (less the bind address: a free port here) on a
    real server whose model directory stands in for /mnt/models."""
    c = container(runtime)
    env = {name: value for name, value in env_of(c).items() if value is not None and name != "MLSERVE_BIND"}
    env["MLSERVE_MODELS_DIR"] = str(demo_models)
    with Server(demo_models, workers=1, env=env) as running:
        for probe in ("readinessProbe", "livenessProbe"):
            assert requests.get(running.url + c[probe]["httpGet"]["path"], timeout=10).status_code == 200
        assert requests.get(running.url + runtime["spec"]["annotations"]["prometheus.kserve.io/path"],
                            timeout=10).status_code == 200
        body = {"inputs": [{"name": "predict", "shape": [1, 4], "datatype": "FP64", "data": [5.1, 3.5, 1.4, 0.2]}]}
        r = requests.post(running.url + "/v2/models/iris_classifier/infer", json=body, timeout=10)
        assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [0]
        assert requests.post(running.url + "/v2/repository/index", timeout=10).status_code == 403
