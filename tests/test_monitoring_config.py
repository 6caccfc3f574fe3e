"""The shipped monitoring configs: alert rules unit-tested with promtool,
Prometheus and Alertmanager configs validated by their own tools, routes by
severity, and every Grafana panel's PromQL parsed by promtool and naming only
metrics that a real running server exports."""
from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess

import pytest
import requests
import yaml

from app.repository import ModelRepository
from tests.monitoring_stack import CONFIG
from tests.redis_server import RedisServer
from tests.server import ROOT, Server
from tests.wait import until

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
AMTOOL = shutil.which("amtool") or "/usr/bin/amtool"
DASHBOARD = CONFIG / "grafana" / "dashboards" / "mlserve.json"
# Grafana's variables, as a query would see them.
VARIABLES = {"$__rate_interval": "1m", "$instance": ".*", "$model": ".*"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
                "unless", "inf", "nan"}


def run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_alert_rules_pass_their_promtool_unit_tests():
    done = run(PROMTOOL, "test", "rules", str(ROOT / "tests" / "data" / "monitoring" / "alerts_test.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_the_issue_asks_for_is_there_and_tested():
    rules = {r["alert"]: r for g in yaml.safe_load((CONFIG / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    assert {"MlserveHighErrorRatio", "MlserveLatencySLO", "MlserveModelNotReady", "MlserveSwapRefused",
            "MlserveRedisBreakerOpen", "MlserveFeatureDrift", "MlservePredictionLogDrops",
            "MlserveWorkerRestarts"} <= set(rules)
    assert rules["MlserveFeatureDrift"]["for"] == "15m" and "0.25" in rules["MlserveFeatureDrift"]["expr"]
    assert all(r["labels"]["severity"] in ("warning", "critical") for r in rules.values())
    tested = (ROOT / "tests" / "data" / "monitoring" / "alerts_test.yml").read_text()
    assert all(f"alertname: {name}" in tested for name in rules)


def test_prometheus_config_and_rules_are_valid_and_scrape_the_server():
    done = run(PROMTOOL, "check", "config", str(CONFIG / "prometheus.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    config = yaml.safe_load((CONFIG / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "mlserve")
    targets = job["dns_sd_configs"][0]  # every server replica, by the compose service's name
    assert (targets["names"], targets["port"], job["metrics_path"]) == (["server"], 8080, "/metrics")


def test_alertmanager_config_is_valid_routes_by_severity_and_holds_no_secret():
    path = CONFIG / "alertmanager.yml"
    done = run(AMTOOL, "check-config", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    routes = {severity: run(AMTOOL, "config", "routes", "test", f"--config.file={path}", f"severity={severity}")
              for severity in ("critical", "warning")}
    assert routes["critical"].stdout.split() == ["pagerduty,slack"]
    assert routes["warning"].stdout.split() == ["slack"]
    text = path.read_text()
    config = yaml.safe_load(text)
    for secret in ("api_url", "routing_key", "service_key", "slack_api_url", "pagerduty_url"):
        assert not re.search(rf"^\s*{secret}\s*:", text, re.M), f"{secret} belongs in a file, not in the repository"
    receivers = {r["name"]: r for r in config["receivers"]}
    assert set(receivers["slack"]["slack_configs"][0]) >= {"api_url_file"} and \
        "api_url" not in receivers["slack"]["slack_configs"][0]
    assert "routing_key_file" in receivers["pagerduty"]["pagerduty_configs"][0] and \
        "routing_key" not in receivers["pagerduty"]["pagerduty_configs"][0]


def panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    found = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]
    assert found and all(expr for _, expr in found)
    return found


def concrete(expr: str) -> str:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, expr
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not
    functions, keywords, label names (in {...} or by/on(...)), or strings."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        following = expr[match.end():].lstrip()[:1]
        if following != "(" and match.group() not in PROMQL_WORDS:
            names.add(match.group())
    return names


def test_the_dashboard_has_the_panels_the_issue_lists_and_its_provisioning():
    titles = " / ".join(title.lower() for title, _ in panel_queries())
    for wanted in ("request rate", "error rate", "p99", "cache hit ratio", "breaker", "swaps and refusals",
                   "serving version", "split", "shadow agreement", "feature psi", "prediction log"):
        assert wanted in titles, wanted
    psi = next(p for p in json.loads(DASHBOARD.read_text())["panels"] if p["title"].startswith("Feature PSI"))
    steps = [s["value"] for s in psi["fieldConfig"]["defaults"]["thresholds"]["steps"]]
    assert steps == [None, 0.1, 0.25]
    datasources = yaml.safe_load((CONFIG / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert datasources["datasources"][0]["type"] == "prometheus"
    providers = yaml.safe_load((CONFIG / "grafana" / "provisioning" / "dashboards" / "mlserve.yml").read_text())
    assert providers["providers"][0]["type"] == "file"


def test_every_panel_query_parses(tmp_path):
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:panel_{i}", "expr": concrete(expr)} for i, (_, expr) in enumerate(panel_queries())]}]}
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump(rules))
    done = run(PROMTOOL, "check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


def test_metric_names_are_read_from_promql():
    assert metric_names('sum by (model, le) (rate(x_bucket{model=~"$model", a="b(c)"}[5m])) / ignoring(level) '
                        'group_left sum(y_total) > bool 0.25') == {"x_bucket", "y_total"}


@pytest.mark.server
def test_every_metric_a_panel_names_is_exported_by_a_running_server(fresh_models, tmp_path):
    """A server with all of it in use: two iris versions split and shadowed, Redis
    for the cache and the stream, the file sink, drift, a reload."""
    from tests.models import quick_classifier

    quick_classifier(ModelRepository(fresh_models), "iris_classifier")  # v2
    config = tmp_path / "models.yaml"
    config.write_text("models:\n  iris_classifier: {split: {1: 50, 2: 50}, shadow: 2}\n  wine_clusters: {}\n")
    with RedisServer() as redis_server:
        env = {"MLSERVE_DRIFT_ENABLED": "true", "MLSERVE_DRIFT_MIN_ROWS": "10", "MLSERVE_REDIS_URL": redis_server.url,
               "MLSERVE_PREDICTION_LOG_FILE": str(tmp_path / "log.jsonl"),
               "MLSERVE_PREDICTION_LOG_REDIS_STREAM": "mlserve:predictions"}
        with Server(fresh_models, workers=2, env=env, models_config=config) as server:
            session = requests.Session()
            for i in range(60):
                session.post(server.url + "/api/v1/predict", json={
                    "model_name": "iris_classifier", "features": [5.0 + i / 20, 3.0, 1.5 + i / 20, 0.3]})
                session.post(server.url + "/api/v1/predict", json={"model_name": "iris_classifier",
                                                                   "features": [5.0, 3.0, 1.5, 0.3]})
            session.post(server.url + "/api/v1/predict", json={"model_name": "iris_classifier", "features": [1]})
            server.process.send_signal(signal.SIGHUP)  # a reload counts swaps

            def exported():
                text = requests.get(server.url + "/metrics", timeout=10).text
                return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and line[0] != "#"}
            wanted = set().union(*(metric_names(concrete(expr)) for _, expr in panel_queries()))
            until(lambda: wanted <= exported(), 30, what=f"the server exports {sorted(wanted - exported())}")
            until(lambda: redis_server.client().xlen("mlserve:predictions") >= 120, 30, what="records in the stream")
