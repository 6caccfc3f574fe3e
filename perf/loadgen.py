"""One wrk run: the command line, and the JSON line the scripts print in done()."""
from __future__ import annotations

import json
import resource
import shutil
import subprocess
from pathlib import Path

WRK = shutil.which("wrk") or "/usr/bin/wrk"
# wrk leaves a request slower than --timeout out of the latency histogram and
# counts it as a timeout instead; the default of 2 s would cut off the very
# tail being measured at high connection counts.
TIMEOUT_SECONDS = 10


def command(script: Path, url: str, connections: int, duration: int, body: Path | None = None) -> list[str]:
    cmd = [WRK, "-t1", f"-c{connections}", f"-d{duration}s", "--latency",
           "--timeout", f"{TIMEOUT_SECONDS}s", "-s", str(script), url]
    return cmd + ["--", str(body)] if body else cmd


def run(cmd: list[str], cwd: Path, duration: int) -> tuple[dict, float]:
    """wrk's summary and the CPU seconds wrk itself used (the load generator
    shares the machine with the server; this says how much of it it took)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=duration + TIMEOUT_SECONDS + 30)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    client_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return parse(done), client_cpu


def parse(done: subprocess.CompletedProcess) -> dict:
    for line in done.stdout.splitlines():
        if line.startswith("JSON "):
            return json.loads(line[5:])
    raise RuntimeError(f"wrk printed no JSON line (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")


def version() -> str:
    done = subprocess.run([WRK, "-v"], capture_output=True, text=True)
    return (done.stdout + done.stderr).splitlines()[0].split(" Copyright")[0].strip()
