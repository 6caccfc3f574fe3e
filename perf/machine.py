"""The machine the figures were measured on, and what the processes on it
used: CPU time and memory from /proc, versions, the code's commit."""
from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from tests.server import ROOT

TICKS = os.sysconf("SC_CLK_TCK")
ROLLUP_FIELDS = ("Rss", "Pss", "Shared_Clean", "Shared_Dirty", "Private_Clean", "Private_Dirty", "Anonymous")
PACKAGES = ("gunicorn", "meinheld", "falcon", "orjson", "numpy", "onnxruntime")


def tree(master: int) -> list[int]:
    """The master and its workers (its direct children)."""
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return [master, *map(int, children)]


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of the whole process (all threads); None once it has gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The name in parentheses may hold spaces; fields after it start at field 3
    # (state), so utime (field 14) and stime (15) are at 11 and 12.
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def pss_mb(pids: list[int]) -> float:
    """Proportional set size: shared pages counted once across the processes."""
    total_kb = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                total_kb += int(line.split()[1])
    return total_kb / 1024


def rollup(pid: int) -> dict[str, float]:
    """smaps_rollup in MB, plus uss = Private_Clean + Private_Dirty."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        if key in ROLLUP_FIELDS:
            values[key.lower()] = int(rest.split()[0]) / 1024
    values["uss"] = values["private_clean"] + values["private_dirty"]
    return values


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    # user nice system idle iowait irq softirq steal; guest time is inside user.
    return (sum(values) - values[3] - values[4]) / TICKS


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


@dataclass
class Sample:
    cpu: dict[int, float]
    busy: float

    @classmethod
    def take(cls, pids: list[int]) -> "Sample":
        return cls({pid: cpu_seconds(pid) for pid in pids}, machine_busy_seconds())

    def cpu_since(self, before: "Sample") -> tuple[dict[int, float], bool]:
        """CPU seconds each process used between the samples, and whether the
        set of processes changed (a worker that died took its CPU time with it)."""
        used = {p: self.cpu[p] - before.cpu[p] for p in self.cpu
                if before.cpu.get(p) is not None and self.cpu[p] is not None}
        changed = self.cpu.keys() != before.cpu.keys() or None in self.cpu.values()
        return used, changed


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
    from perf.measure import wrk_version

    return {
        "cpus": os.cpu_count(), "cpu": cpu_model(), "kernel": platform.release(),
        "loadavg_at_start": loadavg(), "python": platform.python_version(),
        "packages": {p: version(p) for p in PACKAGES}, "wrk": wrk_version(),
        "commit": git("rev-parse", "--short", "HEAD"),
        # Uncommitted changes mean the commit alone does not say what was measured.
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    }
