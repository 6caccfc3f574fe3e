"""The container image, built from docker/Dockerfile as a user builds it, and
run: it serves the demo models at once, as a non-root user, with a working
HEALTHCHECK; a mounted models volume replaces the demo models; SIGTERM drains
it under load and it exits 0 within the graceful timeout.

Uses docker where a Docker engine answers, else podman (tests/containers.py).
The first run builds the base image and the dependency layers (minutes); later
runs reuse both and rebuild only what changed."""
from __future__ import annotations

import time

import pytest
import requests

from app.repository import ModelRepository
from tests import containers, k8s
from tests.load import Load
from tests.models import dataset, quick_classifier
from tests.server import free_port

pytestmark = [pytest.mark.server, pytest.mark.image]

TAG = "localhost/mlserve:test"
MODELS = "/srv/mlserve/models"
GRACEFUL_TIMEOUT = 30  # server.graceful_timeout's default: the image sets no other
SIZE_GOAL = 450 * 10**6  # bytes the image may add to its base
COUNT_GUNICORN = ("import os; print(sum(1 for p in os.listdir('/proc') if p.isdigit() and int(p) != os.getpid() "
                  "and b'/gunicorn' in open(f'/proc/{p}/cmdline', 'rb').read()))")
DEMO = {"iris_classifier": "iris", "binary_classifier": "breast_cancer",
        "diabetes_regressor": "diabetes", "wine_clusters": "wine"}


@pytest.fixture(scope="module")
def engine() -> containers.Engine:
    return containers.engine()


@pytest.fixture(scope="module")
def image(engine) -> str:
    started = time.monotonic()
    containers.build(engine, TAG)
    print(f"\nimage built with {engine.name} in {time.monotonic() - started:.0f} s")
    return TAG


def start(engine, image, env: dict | None = None, **options):
    port = free_port()
    container = containers.run(engine, image, env={**(env or {}), "MLSERVE_BIND": f"127.0.0.1:{port}"}, **options)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(container, url)
    except BaseException:
        container.remove()
        raise
    return container, url


def wait_ready(container: containers.Container, url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/ready", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        if not container.running:
            raise RuntimeError(f"the container exited ({container.exit_code}):\n{container.logs()}")
        time.sleep(0.1)
    raise TimeoutError(f"the container is not ready after {timeout} s:\n{container.logs()}")


@pytest.fixture(scope="module")
def demo(engine, image):
    """A container of the image as built: the demo models it carries."""
    container, url = start(engine, image)
    yield container, url
    container.remove()


def test_the_image_adds_less_than_its_size_goal_to_the_base(engine, image):
    added = containers.layers_above_base(engine, image, containers.BASE_IMAGE)
    print(f"\nlayers above {containers.BASE_IMAGE}: {added / 1e6:.0f} MB ({added / 2**20:.0f} MiB)")
    assert 0 < added <= SIZE_GOAL


def test_every_demo_model_answers_at_once(demo):
    _, url = demo
    served = {m["name"]: m for m in requests.get(url + "/api/v1/models", timeout=10).json()["models"]}
    assert set(served) == set(DEMO)
    for name, data in DEMO.items():
        X, y, _ = dataset(data)
        row = X[0].tolist()
        assert len(row) == len(served[name]["features"])
        r = requests.post(url + "/api/v1/predict", json={"model_name": name, "features": row}, timeout=10)
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["model_name"] == name and answer["model_version"] == 1
        if served[name]["task"] == "classification":
            assert answer["prediction"] == y[0]
        else:
            assert isinstance(answer["prediction"], (int, float))


def test_gunicorn_is_pid_1_and_runs_as_a_non_root_user(demo):
    container, _ = demo
    uid = container.exec("id", "-u")
    assert uid.returncode == 0 and uid.stdout.decode().strip() not in ("", "0")
    status = container.exec("cat", "/proc/1/status").stdout.decode()
    uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    assert "0" not in uids
    cmdline = container.exec("cat", "/proc/1/cmdline").stdout.decode().split("\0")
    assert any(arg.endswith("/gunicorn") for arg in cmdline), cmdline


def test_the_healthcheck_passes_on_the_ready_server_and_fails_without_one(engine, image, demo):
    container, _ = demo
    command = containers.healthcheck(engine, image)
    passed = container.exec(*command)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    # Pointed at a port nothing listens on, the same command must report unhealthy.
    failed = container.exec(*command, env={"MLSERVE_BIND": f"127.0.0.1:{free_port()}"})
    assert failed.returncode == 1
    assert b"unhealthy" in failed.stdout


def test_a_mounted_models_volume_replaces_the_demo_models(engine, image, tmp_path):
    repository = tmp_path / "models"
    quick_classifier(ModelRepository(repository), "volume_model")
    config = tmp_path / "config"
    config.mkdir()
    (config / "models.yaml").write_text("models: {}\n")  # no list: every model in the repository
    container, url = start(engine, image, env={"MLSERVE_MODELS_CONFIG": "/srv/mlserve/volume-config/models.yaml"},
                           volumes=[f"{repository}:{MODELS}:ro", f"{config}:/srv/mlserve/volume-config:ro"])
    try:
        names = [m["name"] for m in requests.get(url + "/api/v1/models", timeout=10).json()["models"]]
        assert names == ["volume_model"]
        r = requests.post(url + "/api/v1/predict", json={"model_name": "volume_model",
                                                         "features": [5.1, 3.5, 1.4, 0.2]}, timeout=10)
        assert r.status_code == 200, r.text
        assert r.json()["prediction"] == 0 and r.json()["model_version"] == 1
        gone = requests.post(url + "/api/v1/predict", json={"model_name": "iris_classifier",
                                                            "features": [5.1, 3.5, 1.4, 0.2]}, timeout=10)
        assert gone.status_code == 404
    finally:
        container.remove()


def test_sigterm_under_light_load_drains_and_exits_0_within_the_graceful_timeout(engine, image):
    """Clients on keep-alive connections: each request sent before or after
    SIGTERM is answered, the last with Connection: close, and the client
    leaves (to another instance, were there one)."""
    container, url = start(engine, image)
    try:
        load = Load(url, threads=3, pause=0.02, reconnect_when_ending=False).start()
        try:
            load.wait_for_answers(50)
            load.ending.set()
            seconds = container.stop(timeout=GRACEFUL_TIMEOUT)
        finally:
            load.stop()
        logs = container.logs()
        print(f"\nstopped in {seconds:.1f} s; {load.count()} requests answered")
        # The engine sends SIGKILL (exit 137) if the server outlives the timeout.
        assert container.exit_code == 0, logs
        assert load.failures == [], logs
        assert "Handling signal: term" in logs and "Shutting down: Master" in logs
    finally:
        container.remove()


def test_the_image_serves_as_the_kubernetes_pod_runs_it(engine, image, redis_server):
    """k8s/deployment.yaml's container: its settings, its user, a read-only
    root with writable space only where the pod mounts an emptyDir, no
    capabilities. Only the address and Redis are this machine's."""
    environment = {k: v for k, v in k8s.container_environment().items() if v is not None}
    container_spec = k8s.server_container()
    environment["MLSERVE_WORKERS"] = str(int(float(container_spec["resources"]["requests"]["cpu"])))
    environment["MLSERVE_REDIS_URL"] = redis_server.url
    context = k8s.pod_spec()["securityContext"]
    assert container_spec["securityContext"]["readOnlyRootFilesystem"] is True
    container, url = start(engine, image, env=environment, read_only_with_tmpfs=k8s.empty_dirs(),
                           user=f"{context['runAsUser']}:{context['runAsGroup']}",
                           extra=["--cap-drop=ALL", "--security-opt=no-new-privileges"])
    try:
        r = requests.post(url + "/api/v1/predict", json={"model_name": "iris_classifier",
                                                         "features": [5.1, 3.5, 1.4, 0.2]}, timeout=10)
        assert r.status_code == 200, r.text
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert requests.get(url + container_spec[probe]["httpGet"]["path"], timeout=10).status_code == 200
        assert "mlserve_requests_total" in requests.get(url + "/metrics", timeout=10).text
        processes = container.exec("python3", "-c", COUNT_GUNICORN)
        assert processes.stdout.decode().strip() == str(1 + int(environment["MLSERVE_WORKERS"]))  # master + workers
        assert container.exec("touch", "/srv/mlserve/written").returncode != 0  # the root is read-only
        container.stop(timeout=k8s.pod_spec()["terminationGracePeriodSeconds"])
        assert container.exit_code == 0, container.logs()
    finally:
        container.remove()
