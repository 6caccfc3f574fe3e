"""A real MLflow tracking server (sqlite backend store, a local artifact
directory, a free port on 127.0.0.1), started from .venv-mlflow (make test
makes it) and stopped by the tests; and the team's side of it: models logged,
registered and aliased through the MLflow client."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import requests

from tests.server import ROOT, free_port

MLFLOW = ROOT / ".venv-mlflow" / "bin" / "mlflow"


class MLflowServer:
    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="mlserve-mlflow-"))
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> "MLflowServer":
        if not MLFLOW.exists():
            raise RuntimeError(f"{MLFLOW} is missing: `make extras` installs the MLflow server the tests run")
        self.log = open(self.dir / "server.log", "wb")
        self.process = subprocess.Popen(
            [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.dir / 'mlflow.db'}",
             "--artifacts-destination", str(self.dir / "artifacts")],
            cwd=self.dir, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited:\n{(self.dir / 'server.log').read_text()[-3000:]}")
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"mlflow server not ready after {timeout} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # the server and the workers it started
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.process is not None:
            self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "MLflowServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Team:
    """What a team does with MLflow: log, register and alias models."""

    def __init__(self, url: str):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(url)
        mlflow.set_registry_uri(url)
        self.client = mlflow.MlflowClient(url, url)
        mlflow.set_experiment("mlserve-tests")

    def log_sklearn(self, name: str, estimator, X, metrics: dict | None = None, **options) -> int:
        """Log and register a fitted estimator (skops, MLflow 3's default, unless options say); its version."""
        with self.mlflow.start_run():
            for key, value in (metrics or {}).items():
                self.mlflow.log_metric(key, value)
            # Requirements given, so MLflow does not infer them (slow) from a subprocess.
            info = self.mlflow.sklearn.log_model(estimator, name="model", input_example=X[:5],
                                                 registered_model_name=name, pip_requirements=["scikit-learn"],
                                                 **options)
        return int(info.registered_model_version)

    def log_onnx(self, name: str, graph, X, metrics: dict | None = None) -> int:
        with self.mlflow.start_run():
            for key, value in (metrics or {}).items():
                self.mlflow.log_metric(key, value)
            info = self.mlflow.onnx.log_model(graph, name="model", input_example=X[:5], registered_model_name=name,
                                              pip_requirements=["onnx"])
        return int(info.registered_model_version)

    def set_alias(self, name: str, alias: str, version: int) -> None:
        self.client.set_registered_model_alias(name, alias, str(version))
