"""What the figures were measured on: machine, load, versions, code."""
from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata

from perf import loadgen, usage
from tests.server import ROOT

PACKAGES = ("gunicorn", "meinheld", "falcon", "orjson", "numpy", "onnxruntime")


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "missing"


def describe() -> dict:
    return {
        "cpus": os.cpu_count(), "cpu": cpu_model(), "kernel": platform.release(),
        "loadavg_at_start": usage.loadavg(), "python": platform.python_version(),
        "packages": {p: version(p) for p in PACKAGES}, "wrk": loadgen.version(),
        "commit": git("rev-parse", "--short", "HEAD"),
        # Uncommitted changes mean the commit alone does not say what was measured.
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    }
