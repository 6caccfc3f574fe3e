"""Shared memory: models are loaded once in the Gunicorn master and shared
copy-on-write with the forked workers. This checks that they stay shared
while the workers serve.

For each model (perf/bigmodels.py) and worker count, the real server is
started with only that model; every worker serves at least 1,000 predictions
(use_cache false, so the model runs each time); then /proc/PID/smaps_rollup
of the master and of every worker is read. The same run serving only the
tiny iris_classifier is the imports-only baseline: what a worker costs
without a big model.

    .venv/bin/python -m perf memory [--workers 1,2,4,8] [--models mlp,forest,torch_mlp]

Results go to perf/results/memory-<UTC timestamp>/ (results.json,
results.md); the markdown is also printed.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path


import requests
from prometheus_client.mmap_dict import MmapedDict

from perf import bigmodels, machine, report
from tests.server import ROOT, Server

PER_WORKER = 1000
PSS_GOAL_RATIO = 1.3
USS_GOAL_MB = 30
MAX_WORKERS = 8
CONNECTIONS_PER_WORKER = 4
# Later rounds only make up for failed requests.
MAX_ROUNDS = 3
# app.metrics flushes each worker's request counts every second.
FLUSH_WAIT = 1.5
BASELINE = "iris_classifier"
MODELS = {"mlp": bigmodels.MLP, "forest": bigmodels.FOREST, "forest_sklearn": bigmodels.FOREST_SKLEARN,
          "torch_mlp": bigmodels.TORCH_MLP}
PACKAGES = ("gunicorn", "meinheld", "numpy", "onnxruntime", "scikit-learn", "prometheus-client")


# --- reading memory ---------------------------------------------------------

def private_mappings(pid: int, top: int = 5) -> list[tuple[str, float]]:
    """The mappings holding most of a process's private memory (MB): where
    the copies are, when a worker holds more than the baseline."""
    totals: dict[str, int] = {}
    name = "?"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if not fields[0].endswith(":"):  # a mapping's header: address perms offset dev inode [path]
            name = fields[5] if len(fields) > 5 else "[anonymous]"
        elif fields[0] in ("Private_Clean:", "Private_Dirty:"):
            totals[name] = totals.get(name, 0) + int(fields[1])
    largest = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    return [(n, round(kb / 1024, 1)) for n, kb in largest]


def snapshot(master: int, workers: list[int]) -> dict:
    return {"master": machine.rollup(master), "workers": {str(pid): machine.rollup(pid) for pid in workers}}


# --- load -------------------------------------------------------------------

def served(metrics_dir: Path, pids: list[int], model: str) -> dict[int, int]:
    """Predictions each worker answered with 200, from its own multiprocess
    metrics file (the /metrics endpoint sums the workers)."""
    counts = {}
    for pid in pids:
        path = metrics_dir / f"counter_{pid}.db"
        values = MmapedDict.read_all_values_from_file(str(path)) if path.exists() else []
        counts[pid] = int(sum(value for key, value, _, _ in values if is_prediction(key, model)))
    return counts


def is_prediction(key: str, model: str) -> bool:
    _, name, labels, _ = json.loads(key)
    return (name == "mlserve_requests_total" and labels.get("model") == model
            and labels.get("endpoint") == "predict" and labels.get("status") == "200")


def owner(port: int, client_port: int, pids: list[int]) -> int | None:
    """The worker holding the server end of the connection from client_port."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and int(fields[2].split(":")[1], 16) == client_port:
            inode = fields[9]
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except OSError:  # closed while listed
                continue
    return None


@contextmanager
def paused(pids: list[int]):
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        # A signal takes effect when its process next runs; one still running
        # could be woken for the new connection and stop before accepting it.
        for pid in pids:
            wait_stopped(pid)
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def wait_stopped(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "T":
        if time.monotonic() > deadline:
            raise TimeoutError(f"worker {pid} did not stop")
        time.sleep(0.001)


def connect_to(server: Server, pid: int, pids: list[int]) -> http.client.HTTPConnection:
    """A keep-alive connection served by worker pid. Idle meinheld workers race
    to accept, and one of them usually wins nearly every connection; with the
    other workers paused for the few milliseconds of the connect, pid is the
    only one left to accept it."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    with paused([p for p in pids if p != pid]):
        conn.request("GET", "/health")
        conn.getresponse().read()
    got = owner(server.port, conn.sock.getsockname()[1], pids)
    if got != pid:
        raise RuntimeError(f"connection meant for worker {pid} was accepted by {got}")
    return conn


def post_many(conn: http.client.HTTPConnection, body: bytes, n: int, failures: list[int]) -> None:
    bad = 0
    for _ in range(n):
        try:
            conn.request("POST", "/api/v1/predict", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            bad += response.status != 200
        except (OSError, http.client.HTTPException):
            bad += 1
            conn.close()  # the next request opens a new one
    failures.append(bad)


def send(connections: dict[int, list], body: bytes, wanted: dict[int, int]) -> int:
    """wanted[pid] predictions over pid's connections, one thread each, all at once; the failures."""
    failures: list[int] = []
    threads = [threading.Thread(target=post_many, args=(conn, body, -(-wanted[pid] // len(conns)), failures))
               for pid, conns in connections.items() if wanted[pid] > 0 for conn in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(failures)


def drive(server: Server, pids: list[int], model: str, body: bytes) -> dict:
    """Send predictions until every worker has served PER_WORKER, over
    CONNECTIONS_PER_WORKER keep-alive connections to each worker."""
    metrics_dir = server.workdir / "metrics"
    connections = {pid: [connect_to(server, pid, pids) for _ in range(CONNECTIONS_PER_WORKER)] for pid in pids}
    cpu_before = {pid: machine.cpu_seconds(pid) for pid in pids}
    counts, sent, failures, rounds = served(metrics_dir, pids, model), 0, 0, 0
    try:
        while min(counts.values()) < PER_WORKER and rounds < MAX_ROUNDS:
            wanted = {pid: max(0, PER_WORKER - n) for pid, n in counts.items()}
            failures += send(connections, body, wanted)
            sent, rounds = sent + sum(wanted.values()), rounds + 1
            time.sleep(FLUSH_WAIT)
            counts = served(metrics_dir, pids, model)
    finally:
        for conn in (c for conns in connections.values() for c in conns):
            conn.close()
    cpu = {str(pid): round(machine.cpu_seconds(pid) - cpu_before[pid], 2) for pid in pids}
    return {"sent": sent, "failures": failures, "rounds": rounds,
            "served": {str(pid): n for pid, n in counts.items()}, "cpu_s": cpu}


def request_body(models_dir: Path, model: str) -> bytes:
    meta = json.loads((models_dir / model / "1" / "metadata.json").read_text())
    row = (meta.get("reference_sample") or [[0.5] * len(meta["feature_names"])])[0]
    return json.dumps({"model_name": model, "features": row, "use_cache": False}).encode()


# --- one server -------------------------------------------------------------

def wait_for_workers(server: Server, n: int, timeout: float = 120.0) -> list[int]:
    """The worker pids, once all n have run post_worker_init (which writes
    their metrics gauge file)."""
    deadline = time.monotonic() + timeout
    metrics_dir = server.workdir / "metrics"
    while time.monotonic() < deadline:
        pids = sorted(server.worker_pids())
        if len(pids) == n and all((metrics_dir / f"gauge_livemax_{pid}.db").exists() for pid in pids):
            return pids
        time.sleep(0.05)
    raise TimeoutError(f"{n} workers not up after {timeout} s:\n{server.log()}")


def measure(models_dir: Path, model: str, workers: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "models.yaml"
        config.write_text(f"models:\n  {model}: {{}}\n")
        server = Server(models_dir, workers, models_config=config)
        started = time.monotonic()
        server.start(timeout=300)
        try:
            return serve_and_read(server, model, workers, time.monotonic() - started,
                                  request_body(models_dir, model))
        finally:
            server.stop()


def serve_and_read(server: Server, model: str, workers: int, ready_s: float, body: bytes) -> dict:
    pids = wait_for_workers(server, workers)
    idle = snapshot(server.master_pid, pids)
    load = drive(server, pids, model, body)
    after = snapshot(server.master_pid, pids)
    worst = max(pids, key=lambda pid: after["workers"][str(pid)]["uss"])
    loaded = re.search(r"loaded \d+ of \d+ models in ([\d.]+) s", server.log())
    return {"model": model, "workers": workers, "ready_s": round(ready_s, 2),
            "load_s": float(loaded.group(1)) if loaded else None,
            "runtime": requests.get(f"{server.url}/api/v1/models/{model}", timeout=10).json().get("runtime"),
            "restarted": sorted(server.worker_pids()) != pids, "load": load, "idle": idle, "after": after,
            "master_private_mappings": private_mappings(server.master_pid),
            "worst_worker_private_mappings": private_mappings(worst)}


# --- figures ----------------------------------------------------------------

def summarize(run: dict, baseline_uss: float | None, one_worker_pss: float | None) -> dict:
    workers = list(run["after"]["workers"].values())
    uss = [w["uss"] for w in workers]
    total = run["after"]["master"]["pss"] + sum(w["pss"] for w in workers)
    ratio = total / one_worker_pss if one_worker_pss else None
    beyond = max(uss) - baseline_uss if baseline_uss is not None else None
    served_counts, cpu = run["load"]["served"].values(), run["load"]["cpu_s"].values()
    return {"workers": run["workers"], "ready_s": run["ready_s"], "load_s": run["load_s"],
            "total_pss": total, "pss_ratio": ratio, "master_pss": run["after"]["master"]["pss"],
            "uss_max": max(uss), "uss_mean": sum(uss) / len(uss),
            "rss_mean": sum(w["rss"] for w in workers) / len(workers), "uss_beyond_max": beyond,
            "idle_uss_mean": mean_uss(run["idle"]), "served_min": min(served_counts),
            "served_max": max(served_counts), "cpu_min": min(cpu), "cpu_max": max(cpu),
            "failures": run["load"]["failures"], "restarted": run["restarted"], "pss_ok": ratio is None or ratio <= PSS_GOAL_RATIO,
            "uss_ok": beyond is None or beyond <= USS_GOAL_MB}


def mean_uss(snap: dict) -> float:
    uss = [w["uss"] for w in snap["workers"].values()]
    return sum(uss) / len(uss)


def baseline_for(baseline: list[dict], workers: int) -> float:
    """Mean baseline worker USS at the nearest measured worker count."""
    nearest = min(baseline, key=lambda run: (abs(run["workers"] - workers), run["workers"]))
    return mean_uss(nearest["after"])


def summaries(runs: list[dict], baseline: list[dict] | None) -> list[dict]:
    one = next((r for r in runs if r["workers"] == 1), None)
    one_pss = summarize(one, None, None)["total_pss"] if one else None
    return [summarize(r, baseline_for(baseline, r["workers"]) if baseline else None, one_pss) for r in runs]


# --- report -----------------------------------------------------------------

def model_table(rows: list[dict], with_goals: bool) -> list[str]:
    header = ("workers", "ready s", "load s", "total PSS", "x 1 worker", "master PSS", "worker USS max",
              "worker USS mean", "USS idle mean", "USS max - baseline", "served/worker", "CPU s/worker", "errors")
    goals = ("PSS goal", "USS goal") if with_goals else ()
    cells = [(r["workers"], f"{r['ready_s']:.2f}", report.num(r["load_s"], 2), report.num(r["total_pss"]),
              report.num(r["pss_ratio"], 2), report.num(r["master_pss"]), report.num(r["uss_max"], 1),
              report.num(r["uss_mean"], 1), report.num(r["idle_uss_mean"], 1),
              report.num(r["uss_beyond_max"], 1), f"{r['served_min']}-{r['served_max']}",
              f"{r['cpu_min']:.1f}-{r['cpu_max']:.1f}",
              f"{r['failures']}{' (workers restarted)' if r['restarted'] else ''}",
              *((verdict(r["pss_ok"]), verdict(r["uss_ok"])) if with_goals else ())) for r in rows]
    return report.table(header + goals, cells)


def verdict(ok: bool) -> str:
    return "ok" if ok else "**missed**"


def section(title: str, runs: list[dict], rows: list[dict], with_goals: bool) -> list[str]:
    last = runs[-1]
    mappings = ", ".join(f"{Path(name).name or name} {mb:g}" for name, mb in last["worst_worker_private_mappings"])
    return [f"## {title}; served by {runs[0]['runtime']}", "", *model_table(rows, with_goals), "",
            f"Largest private mappings (MB) of the worker with the most USS at {last['workers']} workers: "
            f"{mappings}.", ""]


def describe_host() -> dict:
    return {"cpus": os.cpu_count(), "cpu": machine.cpu_model(), "kernel": platform.release(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(), "packages": {p: machine.version(p) for p in PACKAGES},
            "commit": machine.git("rev-parse", "--short", "HEAD"),
            "dirty": bool(machine.git("status", "--porcelain", "--untracked-files=no"))}


def method(meta: dict) -> list[str]:
    h = meta["host"]
    return [
        f"- machine: {h['cpus']} CPUs ({h['cpu']}), {h['memory_gib']} GiB, kernel {h['kernel']}; code: commit "
        f"{h['commit']}{' with uncommitted changes' if h['dirty'] else ''}; python {h['python']}, "
        + ", ".join(f"{k} {v}" for k, v in h["packages"].items()),
        f"- each row: a fresh server (meinheld workers) serving only that model; every worker answered at least "
        f"{PER_WORKER} predictions (use_cache false; counted from each worker's metrics file) over "
        f"{CONNECTIONS_PER_WORKER} keep-alive connections of its own (each opened while the other workers were "
        "paused with SIGSTOP, so that it landed on that worker), all workers at once; then "
        "/proc/PID/smaps_rollup of the master and the workers was read",
        "- MB = 2^20 bytes. total PSS = master + workers. USS = Private_Clean + Private_Dirty of one worker. "
        "'USS idle' is before the predictions. 'ready s': process start to the first 200 from /ready; "
        "'load s': model loading in the master, from its log; 'CPU s/worker': CPU seconds each worker used "
        "while the predictions were sent (min-max)",
        f"- baseline: the same, serving only {BASELINE}; its mean worker USS at the same worker count is "
        "subtracted in 'USS max - baseline'",
        f"- goals: total PSS <= {PSS_GOAL_RATIO} x the 1-worker total (checked on every row; the goal is "
        f"set at 8 workers); each worker's USS <= {USS_GOAL_MB} MB beyond the baseline",
    ]


def render(meta: dict, baseline: list[dict], models: dict[str, list[dict]]) -> str:
    lines = [f"# Shared memory {meta['stamp']}", "", *method(meta), ""]
    if baseline:
        lines += section(f"Baseline: {BASELINE}", baseline, summaries(baseline, None), False)
    for name, runs in models.items():
        lines += section(f"{name}: {meta['sizes'][name]}", runs, summaries(runs, baseline), True)
    return "\n".join(lines) + "\n"


# --- main -------------------------------------------------------------------

def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=lambda t: [int(v) for v in t.split(",")], default=[1, 2, 4, 8],
                   help="comma list of worker counts (default 1,2,4,8)")
    p.add_argument("--models", type=lambda t: [v.strip() for v in t.split(",")], default=["mlp", "forest"],
                   help=f"comma list of {', '.join(MODELS)} (default mlp,forest)")
    p.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the iris baseline")
    p.add_argument("--models-dir", type=Path, default=bigmodels.DEFAULT_DIR, help="where the big models are built")
    p.add_argument("--out", type=Path, help="output directory (default perf/results/memory-<UTC timestamp>/)")
    args = p.parse_args(argv)
    if set(args.models) - set(MODELS):
        p.error(f"--models takes {', '.join(MODELS)}")
    if not args.workers or min(args.workers) < 1 or max(args.workers) > MAX_WORKERS:
        p.error(f"--workers must be between 1 and {MAX_WORKERS}")
    if args.baseline and not (ROOT / "models" / BASELINE).is_dir():
        p.error(f"the baseline needs models/{BASELINE}: run `make models` (or pass --no-baseline)")
    args.workers = sorted(set(args.workers))
    return args


def run_all(models_dir: Path, model: str, counts: list[int]) -> list[dict]:
    runs = []
    for n in counts:
        print(f"{model}, {n} worker(s) ...", file=sys.stderr, flush=True)
        runs.append(measure(models_dir, model, n))
    return runs


def artifact_sizes(version_dir: Path) -> str:
    return ", ".join(f"{f.name} {f.stat().st_size / 2**20:.0f} MB" for f in sorted(version_dir.glob("model.*")))


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    stamp, out = report.destination(args.out, "memory")
    names = [MODELS[m] for m in args.models]
    models_dir = args.models_dir.resolve()
    built = bigmodels.ensure(models_dir, tuple(names))
    sizes = {n: artifact_sizes(models_dir / n / "1") for n in names}
    meta = {"stamp": stamp, "host": describe_host(), "built_s": built, "sizes": sizes,
            "per_worker": PER_WORKER, "workers": args.workers}
    baseline = run_all(ROOT / "models", BASELINE, args.workers) if args.baseline else []
    results = {n: run_all(models_dir, n, args.workers) for n in names}
    out.mkdir(parents=True, exist_ok=True)
    summary = {n: summaries(runs, baseline) for n, runs in results.items()}
    (out / "results.json").write_text(json.dumps({"meta": meta, "baseline": baseline, "models": results,
                                                  "summary": summary}, indent=2) + "\n")
    markdown = render(meta, baseline, results)
    (out / "results.md").write_text(markdown)
    print(markdown)
    return 0

