"""The deployment files agree with each other and with the code: the
Dockerfile (hadolint), docker-compose.yml (the Compose specification, through
docker-compose), the Kubernetes manifests (kubernetes-validate, against a
named Kubernetes version) and the nginx config, checked against the settings
the server declares and against a real server for the probe paths."""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml

from app import settings
from tests.k8s import K8S, container_environment, find, kustomization, manifests, pod_spec, server_container
from tests.nginx import TEMPLATE, UPSTREAM, Nginx
from tests.server import ROOT

DOCKER = ROOT / "docker"
KUBERNETES_VERSION = "1.33.0"
SHORT_FORMS = {"MLSERVE_BIND", "MLSERVE_WORKERS", "MLSERVE_MODELS_DIR", "MLSERVE_REDIS_URL", "MLSERVE_CONFIG"}
DEFAULTS = settings.Settings()


def setting_names() -> set[str]:
    return {env for env, _, _, _ in settings.describe()} | SHORT_FORMS


# --- Dockerfile ----------------------------------------------------------------

def dockerfile() -> str:
    return (DOCKER / "Dockerfile").read_text()


def instruction(name: str) -> list[str]:
    """Every argument string of one instruction in the runtime stage (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", dockerfile().split("\nFROM ")[-1])
    return [line.split(None, 1)[1] for line in text.splitlines() if line.startswith(name + " ")]


def test_hadolint_passes_the_dockerfile():
    hadolint = Path(sys.executable).with_name("hadolint")
    done = subprocess.run([str(hadolint), str(DOCKER / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_dockerfile_runs_gunicorn_as_pid_1_on_its_exposed_port():
    assert instruction("CMD") == ['["gunicorn", "-c", "gunicorn.conf.py"]']  # exec form
    assert instruction("STOPSIGNAL") == ["SIGTERM"]
    assert instruction("EXPOSE") == ["8080"]
    assert "MLSERVE_BIND=0.0.0.0:8080" in " ".join(instruction("ENV"))
    assert re.fullmatch(r"\d+:\d+", instruction("USER")[0]) and not instruction("USER")[0].startswith("0:")
    assert "/ready" in (DOCKER / "healthcheck.py").read_text()


def healthcheck_command() -> list[str]:
    return ["CMD", *json.loads(instruction("HEALTHCHECK")[0].split(" CMD ", 1)[1])]


# --- docker-compose ------------------------------------------------------------

def compose_env(tmp_path: Path) -> Path:
    """docker/.env.example with its empty values filled, as a user would."""
    lines = []
    for line in (DOCKER / ".env.example").read_text().splitlines():
        name, sep, value = line.partition("=")
        lines.append(f"{name}=test-{name.lower()}" if sep and not line.startswith("#") and not value else line)
    path = tmp_path / ".env"
    path.write_text("\n".join(lines) + "\n")
    return path


def compose(*args: str, env_file: Path) -> subprocess.CompletedProcess:
    binary = shutil.which("docker-compose") or "/usr/bin/docker-compose"
    return subprocess.run([binary, "--env-file", str(env_file), "--project-directory", str(DOCKER),
                           "-f", str(DOCKER / "docker-compose.yml"), *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def composed(tmp_path_factory) -> dict:
    """The compose file as docker-compose resolves it: validated against the Compose specification."""
    done = compose("config", env_file=compose_env(tmp_path_factory.mktemp("compose")))
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


def test_the_compose_file_is_valid_and_has_every_service(composed):
    assert set(composed["services"]) == {"server", "redis", "nginx", "prometheus", "alertmanager", "grafana"}


def test_compose_needs_the_secrets_from_an_env_file_and_holds_none(tmp_path):
    raw = (DOCKER / "docker-compose.yml").read_text()
    example = (DOCKER / ".env.example").read_text()
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", raw))
    assert used <= set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", example, re.M))
    for service in yaml.safe_load(raw)["services"].values():
        for name, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|TOKEN|SECRET", name):
                assert str(value).startswith("${"), f"{name} has a value in the compose file"
    # The example as it is (no password chosen) must not start Grafana with a default one.
    unchanged = compose("config", "-q", env_file=DOCKER / ".env.example")
    assert unchanged.returncode != 0 and "GRAFANA_ADMIN_PASSWORD" in unchanged.stderr


def test_every_compose_service_restarts_and_waits_for_healthy_dependencies(composed):
    services = composed["services"]
    for name, service in services.items():
        assert service.get("restart") in ("always", "unless-stopped"), name
        assert service.get("healthcheck", {}).get("test"), name
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert condition == {"condition": "service_healthy"}, (name, dependency)
    assert services["server"]["healthcheck"]["test"] == healthcheck_command()
    assert services["nginx"]["depends_on"] == {"server": {"condition": "service_healthy"}}


def mounts(service: dict) -> dict[str, Path]:
    """container path -> host path of the service's bind mounts."""
    found = {}
    for volume in service.get("volumes", []):
        source, target = (volume["source"], volume["target"]) if isinstance(volume, dict) else volume.split(":")[:2]
        if source.startswith(("/", ".")):
            found[target] = Path(source).resolve()
    return found


def test_compose_runs_nginx_and_the_monitoring_with_the_files_the_tests_use(composed):
    services = composed["services"]
    nginx = mounts(services["nginx"])
    assert nginx["/etc/nginx/templates"] == TEMPLATE.parent.resolve()
    assert nginx["/etc/nginx/mlserve-upstream.conf"] == UPSTREAM.resolve()
    assert services["nginx"]["environment"]["NGINX_PORT"] == "8080"
    monitoring = ROOT / "config" / "monitoring"
    assert mounts(services["prometheus"])["/etc/prometheus"] == monitoring.resolve()
    prometheus = monitoring / "prometheus.yml"
    assert yaml.safe_load(prometheus.read_text())["rule_files"] == ["alerts.yml"]
    alertmanager = mounts(services["alertmanager"])
    assert alertmanager["/etc/alertmanager/alertmanager.yml"] == (monitoring / "alertmanager.yml").resolve()
    grafana = mounts(services["grafana"])
    assert grafana["/etc/grafana/provisioning"] == (monitoring / "grafana" / "provisioning").resolve()
    assert grafana["/var/lib/grafana/dashboards"] == (monitoring / "grafana" / "dashboards").resolve()
    volumes = [v if isinstance(v, str) else f"{v['source']}:{v['target']}" for v in services["server"]["volumes"]]
    assert any(v.startswith("models:/srv/mlserve/models") for v in volumes)
    # nginx's upstream and Prometheus's targets are the server service on its port.
    assert re.search(r"^server server:8080 ", UPSTREAM.read_text(), re.M)
    jobs = yaml.safe_load(prometheus.read_text())["scrape_configs"]
    scraped = [(job.get("metrics_path", "/metrics"), sd["names"], sd["port"]) for job in jobs
               for sd in job.get("dns_sd_configs", [])]
    assert ("/metrics", ["server"], 8080) in scraped


# --- nginx ---------------------------------------------------------------------

def directive(text: str, name: str) -> list[str]:
    return re.findall(rf"^\s*{name}\s+([^;]+);", text, re.M)


def size_bytes(value: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    return int(value[:-1]) * units[value[-1].lower()] if value[-1].lower() in units else int(value)


def seconds(value: str) -> float:
    return float(value[:-1]) if value.endswith("s") else float(value)


def test_the_nginx_config_matches_the_server_settings():
    text = TEMPLATE.read_text()
    upstream = re.search(r"upstream mlserve \{(.*?)\n\}", text, re.S).group(1)
    assert size_bytes(directive(text, "client_max_body_size")[0]) == DEFAULTS.server.max_body_bytes
    assert seconds(directive(upstream, "keepalive_timeout")[0]) < DEFAULTS.server.keepalive
    assert seconds(directive(text, "proxy_read_timeout")[0]) >= DEFAULTS.server.timeout
    assert directive(text, "proxy_http_version") == ["1.1"]
    assert directive(text, "proxy_set_header Connection") == ['""']
    assert int(directive(upstream, "keepalive")[0]) > 0


def test_nginx_answers_its_own_errors_in_the_servers_json_shape():
    text = TEMPLATE.read_text()
    for code in (413, 502, 503, 504):
        target = directive(text, f"error_page {code}")
        assert target and target[0].startswith("@"), code
        block = re.search(rf"location {re.escape(target[0])} \{{(.*?)\n    \}}", text, re.S).group(1)
        returned = re.search(r"return (\d+) '(.*)';", block)
        assert int(returned.group(1)) == code
        body = json.loads(returned.group(2).replace("\\n", ""))
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
        assert directive(block, "default_type") == ["application/json"]


def test_the_nginx_template_leaves_nginx_variables_to_nginx():
    # The nginx image substitutes every environment variable it defines, with
    # or without braces: nginx's own variables are all lower case, its
    # environment's upper case, and NGINX_PORT is the one placeholder.
    text = TEMPLATE.read_text()
    assert set(re.findall(r"\$\{(\w+)\}", text)) == {"NGINX_PORT"}
    names = re.findall(r"\$([A-Za-z_]\w*)", text.replace("${NGINX_PORT}", ""))
    assert names and all(name == name.lower() for name in names)


def test_nginx_accepts_the_config():
    nginx = Nginx(["127.0.0.1:8080", "127.0.0.1:8081"])
    try:
        checked = nginx.test_config()
    finally:
        nginx.stop()
    assert checked.returncode == 0, checked.stderr


# --- Kubernetes ----------------------------------------------------------------

def test_kustomization_lists_every_manifest():
    listed = set(kustomization()["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    images = {image["name"] for image in kustomization().get("images", [])}
    assert server_container()["image"].split(":")[0] in images


def test_every_manifest_is_valid_for_the_named_kubernetes_version():
    import kubernetes_validate

    docs = manifests()
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "Ingress", "HorizontalPodAutoscaler",
                                         "PodDisruptionBudget", "ConfigMap", "PersistentVolumeClaim"}
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    assert find("HorizontalPodAutoscaler", "mlserve")["apiVersion"] == "autoscaling/v2"


def test_the_manifests_set_only_real_settings_with_valid_values():
    environment = container_environment()
    assert set(environment) <= setting_names(), set(environment) - setting_names()
    # The values as the server reads them; the ones from the pod's spec are stood in for.
    loaded = settings.load(environ={**{k: v for k, v in environment.items() if v is not None},
                                    "MLSERVE_WORKERS": "2", "MLSERVE_SERVER_ADMIN_TOKEN": "x"},
                           path=str(ROOT / "no-such-settings-file.yaml"))
    container = server_container()
    assert [p["containerPort"] for p in container["ports"]] == [loaded.server.port]
    assert loaded.server.host == "0.0.0.0"
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    mounted = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert "persistentVolumeClaim" in mounted[loaded.models.directory]
    assert "emptyDir" in mounted[loaded.monitoring.metrics_dir]
    redis = find("Service", "mlserve-redis")
    assert loaded.redis.url == f"redis://{redis['metadata']['name']}:{redis['spec']['ports'][0]['port']}/0"


def test_workers_follow_the_cpu_request():
    container = server_container()
    workers = next(item for item in container["env"] if item["name"] == "MLSERVE_WORKERS")
    field = workers["valueFrom"]["resourceFieldRef"]
    assert field["resource"] == "requests.cpu" and str(field["divisor"]) == "1"
    assert field.get("containerName", container["name"]) == container["name"]
    assert math.ceil(float(container["resources"]["requests"]["cpu"])) >= 1
    assert container["resources"]["limits"]["memory"] and container["resources"]["requests"]["memory"]


def test_the_grace_period_covers_the_prestop_sleep_and_the_drain():
    spec = pod_spec()
    pre_stop = server_container()["lifecycle"]["preStop"]["sleep"]["seconds"]
    graceful = int(container_environment().get("MLSERVE_SERVER_GRACEFUL_TIMEOUT")
                   or DEFAULTS.server.graceful_timeout)
    assert spec["terminationGracePeriodSeconds"] > pre_stop + graceful


def test_the_pod_runs_as_the_image_user_on_a_read_only_root():
    spec = pod_spec()
    container = server_container()
    uid = int(instruction("USER")[0].split(":")[0])
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == uid
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert any(m["mountPath"] == "/tmp" and "emptyDir" in volumes[m["name"]] for m in container["volumeMounts"])


def test_service_ingress_autoscaler_and_budget_point_at_the_server_pods():
    pod_labels = find("Deployment", "mlserve")["spec"]["template"]["metadata"]["labels"]
    service = find("Service", "mlserve")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == server_container()["ports"][0]["name"]
    assert find("PodDisruptionBudget", "mlserve")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    target = find("HorizontalPodAutoscaler", "mlserve")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "mlserve")
    assert find("HorizontalPodAutoscaler", "mlserve")["spec"]["minReplicas"] >= 2
    ingress = find("Ingress", "mlserve")
    paths = [p for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    for p in paths:
        assert p["backend"]["service"] == {"name": "mlserve", "port": {"name": "http"}}
        assert not p["path"].startswith(("/api/v1/admin", "/metrics")) and p["path"] != "/"
    assert {"/api/v1/predict", "/api/v1/batch_predict", "/api/v1/models"} <= {p["path"] for p in paths}
    annotations = ingress["metadata"]["annotations"]
    for key in ("nginx.ingress.kubernetes.io/proxy-body-size", "nginx.org/client-max-body-size"):
        assert size_bytes(annotations[key]) == DEFAULTS.server.max_body_bytes
    assert annotations["nginx.ingress.kubernetes.io/proxy-http-version"] == "1.1"
    assert int(annotations["nginx.org/keepalive"]) > 0


@pytest.mark.server
def test_the_probe_and_scrape_paths_answer_on_a_real_server(server):
    container = server_container()
    paths = {container[probe]["httpGet"]["path"] for probe in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert paths == {"/ready", "/health"}
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    for path in paths:
        assert requests.get(server.url + path, timeout=10).status_code == 200, path
    annotations = find("Deployment", "mlserve")["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == container["ports"][0]["containerPort"]
    metrics = requests.get(server.url + annotations["prometheus.io/path"], timeout=10)
    assert metrics.status_code == 200 and "mlserve_requests_total" in metrics.text
