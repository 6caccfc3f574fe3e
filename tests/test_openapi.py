"""The OpenAPI document (app/http/openapi.yaml, served at /openapi.json):
valid OpenAPI 3.1, the same routes and methods as the app, and, through
schemathesis against the real server, every operation answers what the
document says (no 5xx, documented statuses and content types, bodies that
match their schemas) for generated requests, valid and invalid."""
from __future__ import annotations

import functools
import re
import signal
import subprocess
import sys
from pathlib import Path

import falcon.inspect
import pytest
import requests
import schemathesis
from falcon import testing

from app import settings as settings_module
from app.control import ControlChannel
from app.http import openapi
from app.http.app import create_app
from app.lifecycle import Lifecycle
from app.metrics import Metrics
from app.plan import read_plan
from app.registry import Registry
from app.reload import ReloadTrigger
from app.repository import ModelRepository
from tests.server import Server

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
CHECKS = ["not_a_server_error", "status_code_conformance", "content_type_conformance", "response_schema_conformance",
          "response_headers_conformance"]
METHODS = ("get", "post", "put", "patch", "delete")
# Bounded so the suite stays quick: generated cases per operation, on top of
# the deterministic coverage cases schemathesis adds; a fixed seed so a
# failure can be replayed with the command the test prints.
EXAMPLES = 25
SEED = 20261201


def full_app(models: Path, tmp_path: Path) -> falcon.App:
    """The app with every optional part, as the server builds it."""
    settings = settings_module.load(environ={}, path=str(tmp_path / "absent.yaml"))
    repository = ModelRepository(models)
    plan = functools.partial(read_plan, None)
    registry = Registry(repository, plan, 1e-5)
    registry.refresh()
    reloads = ReloadTrigger(ControlChannel(""), "test-host", tmp_path / "claims", lambda: None)
    return create_app(settings, registry, Metrics(), lifecycle=Lifecycle(repository, 1e-5, plan), reloads=reloads)


def app_operations(app: falcon.App) -> set[tuple[str, str]]:
    return {(route.path, m.method.lower()) for route in falcon.inspect.inspect_routes(app)
            for m in route.methods if not m.internal}


def documented_operations(document: dict) -> set[tuple[str, str]]:
    return {(path, method) for path, item in document["paths"].items() for method in item if method in METHODS}


def test_the_document_is_valid_openapi_3_1():
    document = openapi.load()
    assert document["openapi"] == "3.1.0"
    schemathesis.openapi.from_dict(document).validate()


def test_every_route_is_documented_and_every_documented_operation_exists(demo_models, tmp_path):
    app = app_operations(full_app(demo_models, tmp_path))
    documented = documented_operations(openapi.load())
    assert sorted(app - documented) == [], "routes missing from app/http/openapi.yaml"
    assert sorted(documented - app) == [], "documented operations the app does not have"
    assert {p for p, _ in app} >= {"/api/v1/predict", "/v2/models/{name}/infer", "/api/v1/admin/models/{name}/{action}",
                                   "/v2/repository/models/{name}/load", "/openapi.json"}


def test_every_operation_documents_its_errors_and_an_id():
    document = openapi.load()
    ids = []
    for path, item in document["paths"].items():
        for method, operation in item.items():
            ids.append(operation["operationId"])
            statuses = set(operation["responses"])
            assert any(s.startswith("2") for s in statuses), (path, method)
            if "{name}" in path and not path.startswith("/v2/repository"):
                assert "404" in statuses, (path, method)
    assert len(ids) == len(set(ids))


def test_served_document_is_the_file(demo_models, tmp_path):
    r = testing.TestClient(full_app(demo_models, tmp_path)).simulate_get("/openapi.json")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json == openapi.load()


def schemathesis_run(url: str, workdir: Path, *extra: str) -> str:
    """schemathesis's own runner (its pytest plugin does not run under this
    pytest): the explicit examples, its coverage cases and EXAMPLES generated
    cases per operation, valid and invalid. Its report, when all passed."""
    # Every standard method on every path, not QUERY: that method (an HTTP
    # draft) is refused by meinheld's own request parser before the app sees
    # the request, by closing the connection; the gthread worker passes it on
    # and the app answers it with a JSON 405 like any other method it lacks.
    (workdir / "schemathesis.toml").write_text(
        '[phases.coverage]\nunexpected-methods = ["get", "put", "post", "delete", "options", "patch", "trace"]\n')
    command = [str(SCHEMATHESIS), "run", f"{url}/openapi.json", "--checks", ",".join(CHECKS),
               "--phases", "examples,coverage,fuzzing", "--max-examples", str(EXAMPLES), "--seed", str(SEED),
               "--workers", "1", "--request-timeout", "30", "--generation-database", "none", "--no-color", *extra]
    # One worker thread: with two, Python 3.11's AST parser (which hypothesis
    # uses to describe its filters) can fail with "AST constructor recursion
    # depth mismatch" when both threads parse at once.
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=workdir)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout[-20000:]}\n{done.stderr[-3000:]}"
    selected = re.search(r"Selected: (\d+)/(\d+)\s+Tested: (\d+)", done.stdout)
    assert selected and selected.group(1) == selected.group(3), done.stdout[-3000:]
    assert re.search(r"(\d+) generated, \1 passed", done.stdout), done.stdout[-3000:]
    return done.stdout


@pytest.mark.server
def test_the_server_answers_as_documented(server, tmp_path):
    """Every operation of the shared server (without an admin token: the admin ones answer 403)."""
    report = schemathesis_run(server.url, tmp_path)
    assert re.search(r"Selected: (\d+)/\1", report)


@pytest.mark.server
def test_the_admin_operations_answer_as_documented_with_the_token(fresh_models, tmp_path):
    """The admin and repository operations past the token, on a server of their
    own: generated promotes, splits, unloads and loads really change what it serves."""
    admin = Server(fresh_models, workers=2, env={"MLSERVE_SERVER_ADMIN_TOKEN": "schema-secret"}).start()
    try:
        report = schemathesis_run(admin.url, tmp_path, "--include-tag", "admin",
                                  "-H", "Authorization: Bearer schema-secret")
        assert "Selected: 12/" in report  # 5 admin and repository operations, 4 of uploads, 3 of keys
        assert requests.get(admin.url + "/health", timeout=10).status_code == 200
        assert requests.get(admin.url + "/v2", timeout=10).status_code == 200
    finally:
        # NOTE: every accepted admin call asks for a reload (SIGHUP) and
        # Gunicorn applies them one after another, about 2 s each; a graceful
        # SIGTERM would wait behind the hundred or so this run queued.
        admin.stop(signal.SIGKILL)
