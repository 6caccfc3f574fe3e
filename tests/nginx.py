"""Real nginx (Debian's /usr/sbin/nginx) in front of real servers, run with
the production config: docker/nginx/templates/default.conf.template rendered
as the official nginx image renders it (NGINX_PORT), and an upstream list
written in the form of docker/nginx/mlserve-upstream.conf with the test's
instances. The main nginx.conf around it stands in for the image's: its own
prefix, pid, logs and temp directories under a temporary directory, in the
foreground, on a free port."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import requests

from tests.server import ROOT, free_port

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
CONFIG = ROOT / "docker" / "nginx"
TEMPLATE = CONFIG / "templates" / "default.conf.template"
UPSTREAM = CONFIG / "mlserve-upstream.conf"

# The http block of the official image's nginx.conf, less its fixed paths: the
# template must work inside it (it may not repeat what this already sets).
MAIN = """\
{user}worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log notice;

events {{
    worker_connections 1024;
}}

http {{
{mime_types}    default_type application/octet-stream;
    sendfile on;
    keepalive_timeout 65;
    client_body_temp_path {prefix}/temp/client_body;
    proxy_temp_path {prefix}/temp/proxy;
    fastcgi_temp_path {prefix}/temp/fastcgi;
    uwsgi_temp_path {prefix}/temp/uwsgi;
    scgi_temp_path {prefix}/temp/scgi;
    include default.conf;
}}
"""


def render(template: str, values: dict[str, str]) -> str:
    """As the nginx image's envsubst step: ${NAME} for each NAME given; nginx's
    own $variables are left alone. A placeholder left over is an error."""
    for name, value in values.items():
        template = template.replace("${" + name + "}", value)
    left = re.findall(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}", template)
    if left:
        raise ValueError(f"{TEMPLATE}: no value for {', '.join(sorted(set(left)))}")
    return template


def upstream_servers(addresses: list[str]) -> str:
    """docker/nginx/mlserve-upstream.conf's server line, with its parameters,
    once for each of these addresses."""
    lines = [line.strip() for line in UPSTREAM.read_text().splitlines()
             if line.strip().startswith("server ")]
    if len(lines) != 1:
        raise ValueError(f"{UPSTREAM}: expected one server line, found {len(lines)}")
    parameters = lines[0].rstrip(";").split()[2:]
    return "".join(f"server {' '.join([address, *parameters])};\n" for address in addresses)


class Nginx:
    def __init__(self, upstreams: list[str]):
        """upstreams: HOST:PORT of each instance."""
        self.upstreams = upstreams
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.prefix = Path(tempfile.mkdtemp(prefix="mlserve-nginx-"))
        self.conf = self.prefix / "conf"
        self.process: subprocess.Popen | None = None

    def write_config(self) -> None:
        for sub in ("conf", "logs", "temp"):
            (self.prefix / sub).mkdir(exist_ok=True)
        mime = Path("/etc/nginx/mime.types")
        (self.conf / "nginx.conf").write_text(MAIN.format(
            prefix=self.prefix,
            # Workers would otherwise run as nobody, who cannot use these directories.
            user="user root;\n" if os.geteuid() == 0 else "",
            mime_types=f"    include {mime};\n" if mime.exists() else ""))
        (self.conf / "default.conf").write_text(render(TEMPLATE.read_text(), {"NGINX_PORT": f"127.0.0.1:{self.port}"}))
        (self.conf / "mlserve-upstream.conf").write_text(upstream_servers(self.upstreams))

    def command(self, *extra: str) -> list[str]:
        return [NGINX, "-p", str(self.prefix), "-c", str(self.conf / "nginx.conf"),
                "-e", str(self.prefix / "logs" / "error.log"), *extra]

    def test_config(self) -> subprocess.CompletedProcess:
        self.write_config()
        return subprocess.run(self.command("-t"), capture_output=True, text=True, timeout=30)

    def start(self, timeout: float = 15.0) -> "Nginx":
        checked = self.test_config()
        if checked.returncode != 0:
            raise RuntimeError(f"nginx -t failed:\n{checked.stderr}")
        self.access_log = open(self.prefix / "logs" / "access.log", "wb")
        self.process = subprocess.Popen(self.command(), stdout=self.access_log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.process.returncode}:\n{self.error_log()}")
            try:
                if requests.get(self.url + "/nginx-health", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"nginx not answering after {timeout} s:\n{self.error_log()}")

    def error_log(self) -> str:
        path = self.prefix / "logs" / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def access_lines(self) -> list[str]:
        path = self.prefix / "logs" / "access.log"
        return path.read_text(errors="replace").splitlines() if path.exists() else []

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # graceful: finish what is in flight
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process:
            self.access_log.close()
        shutil.rmtree(self.prefix, ignore_errors=True)

    def __enter__(self) -> "Nginx":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
