"""Start and stop a real server (Gunicorn, as `make serve` runs it) on a free
port. Used by the integration tests and the benchmarks."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
GUNICORN = Path(sys.executable).with_name("gunicorn")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_follower(pid: int) -> bool:
    try:
        return b"app.server.follower" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # gone
        return False


class Server:
    def __init__(self, models_dir: Path | str, workers: int = 2, env: dict | None = None,
                 models_config: Path | str | None = None, root: Path = ROOT):
        self.root = root  # the checkout whose code runs
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = Path(tempfile.mkdtemp(prefix="mlserve-test-"))
        self.log_path = self.workdir / "server.log"
        self.pid_file = self.workdir / "gunicorn.pid"
        self.env = {
            **os.environ,
            "MLSERVE_BIND": f"127.0.0.1:{self.port}",
            "MLSERVE_WORKERS": str(workers),
            "MLSERVE_MODELS_DIR": str(models_dir),
            "MLSERVE_MODELS_CONFIG": str(models_config or root / "config" / "models.yaml"),
            "MLSERVE_SERVER_PID_FILE": str(self.pid_file),
            "MLSERVE_MONITORING_METRICS_DIR": str(self.workdir / "metrics"),
            **(env or {}),
        }
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.process: subprocess.Popen | None = None
        self.log_file = None
        self.kept_log = ""

    def start(self, timeout: float = 60.0, ready: bool = True) -> "Server":
        self.log_file = open(self.log_path, "wb")
        self.process = subprocess.Popen([str(GUNICORN), "-c", "gunicorn.conf.py"], cwd=self.root, env=self.env,
                                        stdout=self.log_file, stderr=subprocess.STDOUT)
        try:
            self.wait_until("/ready" if ready else "/health", timeout)
        except BaseException:
            self.stop(signal.SIGKILL)
            raise
        return self

    def wait_until(self, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if requests.get(self.url + path, timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"server not answering {path} after {timeout} s:\n{self.log()}")

    @property
    def master_pid(self) -> int:
        return self.process.pid

    def worker_pids(self) -> list[int]:
        children = Path(f"/proc/{self.master_pid}/task/{self.master_pid}/children").read_text().split()
        return [int(pid) for pid in children if not is_follower(int(pid))]

    def follower_pid(self) -> int | None:
        """The master's alias follower process (app/server/follower.py), if it runs one."""
        children = Path(f"/proc/{self.master_pid}/task/{self.master_pid}/children").read_text().split()
        return next((int(pid) for pid in children if is_follower(int(pid))), None)

    def wait_for_workers(self, count: int, timeout: float = 30.0) -> None:
        """Until the master has exactly `count` workers: all booted, none retiring."""
        deadline = time.monotonic() + timeout
        while len(self.worker_pids()) != count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.worker_pids())} workers, not {count}:\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        if self.log_path.exists():
            self.kept_log = self.log_path.read_text(errors="replace")
        return self.kept_log

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Stop the server (if it runs) and remove its working directory; log() still answers."""
        try:
            if self.process is None or self.process.poll() is not None:
                return self.process.returncode if self.process else 0
            self.process.send_signal(sig)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                return self.process.wait()
        finally:
            self.remove_workdir()

    def remove_workdir(self) -> None:
        if self.log_file is not None:
            self.log_file.close()
        self.log()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
