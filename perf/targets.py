"""The servers under test: ours, started by tests.server exactly as `make
serve` starts it, and the reference apps under the same Gunicorn settings."""
from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from perf import machine
from tests.server import GUNICORN, ROOT
from tests.server import Server as TestServer

MODELS = ROOT / "models"
REFERENCE_CONFIG = Path(__file__).resolve().parent / "reference_gunicorn.py"
# tests.server polls every 50 ms; cold start is timed by this poll.
POLL_SECONDS = 0.01


@dataclass(frozen=True)
class Config:
    """One server configuration: worker class, worker count, extra MLSERVE_* settings."""
    worker_class: str
    workers: int
    env: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.worker_class}-w{self.workers}" + "".join(f"+{label(k, v)}" for k, v in sorted(self.env.items()))

    def server_env(self) -> dict:
        return {"MLSERVE_SERVER_WORKER_CLASS": self.worker_class, **self.env}


def label(name: str, value: str) -> str:
    """A setting as part of a configuration's name (also a directory name)."""
    if name == "MLSERVE_REDIS_URL":
        return "redis" if value else "no-redis"
    if name == "MLSERVE_CACHE_L1_MAX_ENTRIES" and value == "0":
        return "l1-off"
    return f"{name.removeprefix('MLSERVE_').lower()}={re.sub(r'[^A-Za-z0-9._-]', '_', value)}"


class Server(TestServer):
    """Our server. name says what it is in the results."""
    name = "mlserve"

    def __init__(self, config: Config, root: Path = ROOT):
        super().__init__(MODELS, workers=config.workers, env=config.server_env(), root=root)
        self.config = config

    def wait_until(self, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log()}")
            try:
                if requests.get(self.url + path, timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(POLL_SECONDS)
        raise TimeoutError(f"{self.name} not answering {path} after {timeout} s:\n{self.log()}")

    def pids(self) -> list[int]:
        return machine.tree(self.master_pid)

    def worker_in_use(self) -> str:
        """The worker class Gunicorn reports, which may differ from the one asked
        for (gunicorn.conf.py falls back to gthread when meinheld is missing)."""
        found = re.search(r"Using worker: (\S+)", self.log())
        return found.group(1) if found else "unknown"

    def close(self, keep_log: Path | None = None) -> None:
        """Stop, keep the log, remove the working directory."""
        self.stop()
        if keep_log:
            keep_log.parent.mkdir(parents=True, exist_ok=True)
            keep_log.write_text(self.log())
        shutil.rmtree(self.workdir, ignore_errors=True)


class Reference(Server):
    """A reference app (perf/reference_apps.py) under the Gunicorn settings our
    server would get from the same MLSERVE_* settings (perf/reference_gunicorn.py)."""

    def __init__(self, app: str, config: Config):
        super().__init__(config)
        self.name = f"ref_{app}"
        self.command = [str(GUNICORN), "-c", str(REFERENCE_CONFIG), f"perf.reference_apps:{app}"]

    def start(self, timeout: float = 60.0, ready: bool = True) -> "Reference":
        self.log_file = open(self.log_path, "wb")
        self.process = subprocess.Popen(self.command, cwd=ROOT, env=self.env,
                                        stdout=self.log_file, stderr=subprocess.STDOUT)
        self.wait_until("/ready", timeout)
        return self
