"""The monitoring stack as the tests run it: a real Prometheus and a real
Alertmanager (Debian's packages) on free 127.0.0.1 ports, with configs made
from the shipped ones (config/monitoring/) but short intervals; and a local
HTTP receiver standing in for Slack and PagerDuty."""
from __future__ import annotations

import http.server
import json
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import requests
import yaml

from tests.server import ROOT, free_port

CONFIG = ROOT / "config" / "monitoring"


class Receiver(http.server.ThreadingHTTPServer):
    """Records every POST (path, lower-cased headers, body); answers 200."""

    def __init__(self):
        self.posts: list[tuple[str, dict, bytes]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.posts.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass
        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def bodies(self, path: str) -> list[dict]:
        return [json.loads(body) for p, _, body in self.posts if p == path]

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class Process:
    """A monitoring binary in its own directory, stopped with SIGTERM."""
    binary = ""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix=f"mlserve-{Path(self.binary).name}-"))
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float = 60.0) -> "Process":
        self.log = open(self.dir / "log.txt", "wb")
        self.process = subprocess.Popen(self.command(), cwd=self.dir, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.binary} exited with {self.process.returncode}:\n{self.output()}")
            try:
                if requests.get(self.url + "/-/ready", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.binary} not ready after {timeout} s:\n{self.output()}")

    def output(self) -> str:
        path = self.dir / "log.txt"
        return path.read_text(errors="replace")[-5000:] if path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if getattr(self, "log", None):
            self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Alertmanager(Process):
    """The shipped alertmanager.yml with its receivers' URLs and keys pointed at receiver, and short waits."""
    binary = shutil.which("prometheus-alertmanager") or "/usr/bin/prometheus-alertmanager"

    def __init__(self, receiver: Receiver):
        super().__init__()
        config = yaml.safe_load((CONFIG / "alertmanager.yml").read_text())
        config["route"].update(group_wait="1s", group_interval="1s", repeat_interval="1h")
        (self.dir / "slack_webhook_url").write_text(receiver.url + "/slack\n")
        (self.dir / "pagerduty_routing_key").write_text("0123456789abcdef0123456789abcdef\n")
        for entry in config["receivers"]:
            for slack in entry.get("slack_configs", []):
                slack["api_url_file"] = str(self.dir / "slack_webhook_url")
            for pager in entry.get("pagerduty_configs", []):
                pager["routing_key_file"] = str(self.dir / "pagerduty_routing_key")
                pager["url"] = receiver.url + "/pagerduty"
        self.config = self.dir / "alertmanager.yml"
        self.config.write_text(yaml.safe_dump(config))

    def command(self) -> list[str]:
        return [self.binary, f"--config.file={self.config}", f"--storage.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--cluster.listen-address="]


class Prometheus(Process):
    """Scrapes targets every second and evaluates the shipped alert rules every second, each `for:` cut to for_."""
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"

    def __init__(self, targets: list[str], alertmanager: Alertmanager | None = None, for_: str = "2s"):
        super().__init__()
        rules = yaml.safe_load((CONFIG / "alerts.yml").read_text())
        for group in rules["groups"]:
            for rule in group["rules"]:
                if "for" in rule:
                    rule["for"] = for_
        (self.dir / "alerts.yml").write_text(yaml.safe_dump(rules))
        config = yaml.safe_load((CONFIG / "prometheus.yml").read_text())
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        config["scrape_configs"][0]["static_configs"] = [{"targets": targets}]
        if alertmanager is not None:
            config["alerting"]["alertmanagers"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{alertmanager.port}"]}]
        else:
            del config["alerting"]
        self.config = self.dir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config))

    def command(self) -> list[str]:
        return [self.binary, f"--config.file={self.config}", f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}"]

    def query(self, expr: str) -> list[dict]:
        answer = requests.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10).json()
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def alerts(self) -> list[dict]:
        return requests.get(self.url + "/api/v1/alerts", timeout=10).json()["data"]["alerts"]
