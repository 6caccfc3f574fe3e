"""Fixtures that build the real dependency chain: demo models on disk, a
real Gunicorn server on a free port, a real Redis where a test needs one."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from app.repository import ModelRepository
from app.training import build_demo_models
from tests.server import ROOT, Server

DEMO = ("iris_classifier", "binary_classifier", "diabetes_regressor", "wine_clusters")


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory) -> Path:
    """A private copy of the demo repository (built by `make models`, or here if missing)."""
    target = tmp_path_factory.mktemp("models")
    source = ROOT / "models"
    if all((source / name / "1" / "metadata.json").is_file() for name in DEMO):
        for name in DEMO:
            shutil.copytree(source / name, target / name)
    else:
        build_demo_models(ModelRepository(target))
    return target


@pytest.fixture(scope="session")
def server(demo_models) -> Server:
    """One real 2-worker server with the demo models, shared by the read-only tests."""
    with Server(demo_models, workers=2) as running:
        yield running


@pytest.fixture
def client(server):
    from app.client import MLClient

    with MLClient(server.url) as c:
        yield c


@pytest.fixture(scope="module")
def degraded_server(demo_models, tmp_path_factory):
    """iris_classifier serving, ghost_model listed but absent from disk, batches capped at 5 rows."""
    config = tmp_path_factory.mktemp("degraded") / "models.yaml"
    config.write_text("models:\n  iris_classifier: {}\n  ghost_model: {}\n")
    running = Server(demo_models, workers=1, models_config=config,
                     env={"MLSERVE_SERVER_MAX_BATCH_ROWS": "5"}).start(ready=False)
    yield running
    running.stop()


@pytest.fixture
def fresh_models(demo_models, tmp_path) -> Path:
    """A writable copy of the demo repository for tests that change it."""
    target = tmp_path / "models"
    shutil.copytree(demo_models, target)
    return target


@pytest.fixture
def redis_server():
    """A private, empty redis-server for one test."""
    from tests.redis_server import RedisServer

    with RedisServer() as running:
        yield running


@pytest.fixture(scope="session")
def mlflow_server():
    """One real MLflow tracking server for the session (sqlite, local artifacts)."""
    from tests.mlflow_server import MLflowServer

    with MLflowServer() as running:
        yield running
