"""Our server beside Seldon MLServer on the same model, in one run. Optional;
`make bench-mlserver` runs it with the defaults:

    python -m perf mlserver --duration 10 --runs 3 --connections 32

MLServer 1.7.1 with its scikit-learn runtime is installed into its own
virtualenv, .venv-mlserver/ at the repository root, created with python3 on
first use and left alone while it meets REQUIREMENTS: MLServer's dependencies
(FastAPI, uvicorn, pydantic 2, grpcio...) have no place in ours. Two pins are
MLServer's own needs: uvloop below 0.21, and uvicorn below 0.29 (with a
later one MLServer 1.7.1 runs its shutdown several times over on SIGTERM).
scikit-learn there is the version ours has (setup.cfg pins 1.9.1), and
MLServer's runtime works with it, so MLServer loads the very forest our
server serves, models/iris_classifier/<version>/model.joblib (`make models`
builds it); nothing is retrained.

Both servers get 2 worker processes, our default (config/server.yaml):
MLServer's `parallel_workers` (inference processes behind one HTTP process)
and our Gunicorn workers with meinheld (each one does HTTP and inference), as
`make serve` starts them. MLServer runs with debug off, so without an access
log, like ours. Each keeps its default monitoring: MLServer's metrics server
and its gRPC server listen on free ports of 127.0.0.1, ours counts Prometheus
metrics. MLServer is measured first and stopped, then ours; the same wrk load
goes to each (perf/wrk/mlserver_predict.lua, perf/wrk/predict_uncached.lua:
the same row, no cache), a warm-up run first, then --runs runs.

The same model is not the same computation: our server runs the forest's
verified ONNX conversion with ONNX Runtime (the report names the runtime its
metadata gives), MLServer calls scikit-learn's predict on the forest. The figures compare the two servers as each serves
that model out of the box.

Prints a markdown table (median req/s with min-max over the runs, p50 and p99
of the median run, non-2xx responses and socket errors summed over all runs,
and the ratio ours / MLServer) and saves every run as JSON, with
summary.json and results.md, under perf/results/mlserver-<UTC timestamp>/.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path


import requests
from packaging.specifiers import SpecifierSet

from app.repository import ModelRepository, ModelVersion
from perf import machine, measure, report, scenarios
from perf.scenarios import IRIS, IRIS_ROW, SCENARIOS, Scenario
from perf.targets import MODELS, Config, Server
from tests.server import ROOT, free_port

MLSERVER_VENV = ROOT / ".venv-mlserver"
MLSERVER_VERSION = "1.7.1"
REQUIREMENTS = {
    "mlserver": f"=={MLSERVER_VERSION}",
    "mlserver-sklearn": f"=={MLSERVER_VERSION}",
    # Ours, so that the joblib our server serves unpickles unchanged.
    "scikit-learn": f"=={metadata.version('scikit-learn')}",
    # MLServer 1.7.1 needs uvloop below 0.21.
    "uvloop": "<0.21",
    # uvicorn 0.29 replaced the install_signal_handlers hook that MLServer
    # 1.7.1 overrides with capture_signals: its HTTP and metrics servers then
    # catch SIGTERM and raise it again as they exit, so MLServer runs its
    # shutdown several times over (tracebacks in its log, at worst a hang).
    "uvicorn": "<0.29",
}
# MLServer 1.7.1 declares Python >=3.9,<3.13.
PYTHON_RANGE = ((3, 9), (3, 13))
# Our default worker count (config/server.yaml); MLServer gets as many.
WORKERS = 2
MLSERVER_SCENARIO = Scenario("mlserver_predict", f"/v2/models/{IRIS}/infer")
OUR_SCENARIO = SCENARIOS["predict_uncached"]
# What mlserver_predict.lua sends, for the check before the load.
V2_REQUEST = {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP32", "data": IRIS_ROW}]}
EXPECTED_CLASS = 0
# MLServer imports FastAPI, starts its workers and loads the model in each.
START_TIMEOUT = 180
STOP_TIMEOUT = 30
LEFTOVER_SECONDS = 5
# Idle: under 10% of a core over IDLE_INTERVAL seconds.
IDLE_INTERVAL = 0.5
IDLE_CPU_SECONDS = 0.05
IDLE_TIMEOUT = 30
COLUMNS = ("server", "req/s", "min-max", "p50 ms", "p99 ms", "non-2xx", "socket errors",
           "server cores", "wrk cores", "other cores")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # wrk takes whole seconds.
    p.add_argument("--duration", type=int, default=10, help="seconds per run (default 10)")
    p.add_argument("--runs", type=int, default=3, help="runs per server; the median by req/s is shown (default 3)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    p.add_argument("--warmup", type=int, default=2, help="unrecorded seconds per server first (default 2; 0: none)")
    p.add_argument("--out", type=Path, help="output directory (default perf/results/mlserver-<UTC timestamp>/)")
    args = p.parse_args(argv)
    if args.connections < 1 or args.runs < 1 or args.duration <= 0 or args.warmup < 0:
        p.error("--connections, --runs and --duration must be positive, --warmup not negative")
    return args


# --- MLServer's virtualenv ---------------------------------------------------

def venv_python() -> Path:
    return MLSERVER_VENV / "bin" / "python"


def installed_versions() -> dict[str, str | None]:
    """The required packages' versions in .venv-mlserver/, None where missing."""
    probe = ("import json, sys\nfrom importlib import metadata\nout = {}\n"
             "for name in sys.argv[1:]:\n"
             "    try:\n        out[name] = metadata.version(name)\n"
             "    except metadata.PackageNotFoundError:\n        out[name] = None\n"
             "print(json.dumps(out))")
    done = subprocess.run([str(venv_python()), "-c", probe, *REQUIREMENTS],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def unmet(versions: dict[str, str | None]) -> list[str]:
    return [f"{name}{spec}" for name, spec in REQUIREMENTS.items()
            if versions[name] is None or versions[name] not in SpecifierSet(spec)]


def check_python(python: str) -> None:
    done = subprocess.run([python, "-c", "import sys; print(*sys.version_info[:2])"],
                          capture_output=True, text=True, check=True)
    version = tuple(map(int, done.stdout.split()))
    low, high = PYTHON_RANGE
    if not low <= version < high:
        sys.exit(f"MLServer {MLSERVER_VERSION} needs Python >={'.'.join(map(str, low))},<"
                 f"{'.'.join(map(str, high))}; {python} is {'.'.join(map(str, version))}")


def ensure_venv() -> dict[str, str]:
    """Create .venv-mlserver/ and install the requirements unless it already meets them."""
    if not venv_python().exists():
        python = shutil.which("python3") or sys.exit("no python3 on PATH to create .venv-mlserver/")
        check_python(python)
        measure.log(f"creating {MLSERVER_VENV}")
        subprocess.run([python, "-m", "venv", str(MLSERVER_VENV)], check=True)
    missing = unmet(installed_versions())
    if missing:
        requirements = [f"{name}{spec}" for name, spec in REQUIREMENTS.items()]
        measure.log(f"installing into {MLSERVER_VENV}: {' '.join(requirements)} (unmet: {' '.join(missing)})")
        subprocess.run([str(venv_python()), "-m", "pip", "install", "-q", *requirements], check=True)
        missing = unmet(installed_versions())
        if missing:
            sys.exit(f"{MLSERVER_VENV} still does not meet {' '.join(missing)}")
    return installed_versions()


# --- MLServer ----------------------------------------------------------------

def served_model() -> ModelVersion:
    """The iris_classifier version our server serves: the one serving.json
    names, else the newest."""
    repository = ModelRepository(MODELS)
    if not repository.versions(IRIS):
        sys.exit(f"no {IRIS} in {MODELS}: run `make models`")
    version = (repository.serving_state(IRIS) or {}).get("version") or repository.latest(IRIS)
    return repository.get(IRIS, version)


def write_repository(workdir: Path, model: ModelVersion, port: int) -> dict:
    """MLServer's settings.json and a model repository with one model, in
    workdir; returns the settings."""
    settings = {
        "debug": False,
        "parallel_workers": WORKERS,
        "host": "127.0.0.1",
        "http_port": port,
        # Not measured, but on by default: free ports so nothing clashes.
        "grpc_port": free_port(),
        "metrics_port": free_port(),
        "metrics_dir": str(workdir / "metrics"),
        "model_repository_root": str(workdir / "models"),
    }
    (workdir / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    model_dir = workdir / "models" / IRIS
    model_dir.mkdir(parents=True)
    model_settings = {"name": IRIS, "implementation": "mlserver_sklearn.SKLearnModel",
                      "parameters": {"uri": str(model.artifact), "version": str(model.version)}}
    (model_dir / "model-settings.json").write_text(json.dumps(model_settings, indent=2) + "\n")
    return {"settings": settings, "model_settings": model_settings}


def descendants(pid: int) -> list[int]:
    """Every process below pid: MLServer's workers, and any process they start."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except FileNotFoundError:
            continue
        for child in map(int, children):
            found += [child, *descendants(child)]
    return found


def group_members(pgid: int) -> list[int]:
    """Live processes of the process group; zombies, which await their
    reaping by init, do not count."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        # After the name: state, ppid, pgrp.
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


class MLServer:
    """`mlserver start` on a model repository in a temporary directory, with
    the interface perf.measure expects of a target (name, url, master_pid, pids)."""
    name = "mlserver"

    def __init__(self, model: ModelVersion):
        self.workdir = Path(tempfile.mkdtemp(prefix="mlserver-bench-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = write_repository(self.workdir, model, self.port)
        self.log_path = self.workdir / "mlserver.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> "MLServer":
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLSERVER_")}
        # As gunicorn.conf.py does for our workers: the workers are the
        # parallelism, numeric libraries get one thread each.
        env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.log_file = open(self.log_path, "wb")
        # A session of its own, so stop() can reach workers the main process leaves behind.
        self.process = subprocess.Popen([str(MLSERVER_VENV / "bin" / "mlserver"), "start", str(self.workdir)],
                                        cwd=self.workdir, env=env, stdout=self.log_file,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.wait_ready()
            self.check()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlserver exited with {self.process.returncode}:\n{self.log()}")
            try:
                if requests.get(self.url + "/v2/health/ready", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"mlserver not ready after {START_TIMEOUT} s:\n{self.log()}")

    def check(self) -> None:
        """One request like the load's, answered 200 with the right class;
        wrk counts status codes only, so a wrong 200 would pass unseen."""
        resp = requests.post(self.url + MLSERVER_SCENARIO.path, json=V2_REQUEST, timeout=30)
        if resp.status_code != 200:
            raise RuntimeError(f"mlserver infer: HTTP {resp.status_code}: {resp.text[:500]}")
        outputs = resp.json().get("outputs") or [{}]
        if outputs[0].get("data") != [EXPECTED_CLASS]:
            raise RuntimeError(f"mlserver infer: expected class {EXPECTED_CLASS}, got {resp.text[:500]}")

    @property
    def master_pid(self) -> int:
        return self.process.pid

    def pids(self) -> list[int]:
        return [self.master_pid, *descendants(self.master_pid)]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def cpu_seconds(self) -> float:
        return sum(machine.cpu_seconds(pid) or 0.0 for pid in self.pids())

    def wait_idle(self) -> None:
        """Until MLServer's processes stop using CPU. wrk leaves requests
        queued when it stops, and MLServer shuts its inference workers down
        before its HTTP server, which then waits forever for those requests."""
        deadline = time.monotonic() + IDLE_TIMEOUT
        before = self.cpu_seconds()
        while time.monotonic() < deadline:
            time.sleep(IDLE_INTERVAL)
            now = self.cpu_seconds()
            if now - before < IDLE_CPU_SECONDS:
                return
            before = now
        measure.log(f"WARNING mlserver still busy {IDLE_TIMEOUT} s after the load")

    def stop(self) -> None:
        """SIGTERM, MLServer's graceful shutdown (it stops its workers); then
        SIGKILL to whatever is left of its process group, which holds only
        the processes it started."""
        if self.process is None or self.log_file.closed:
            return
        if self.process.poll() is None:
            self.wait_idle()
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                measure.log(f"WARNING mlserver still running {STOP_TIMEOUT} s after SIGTERM: killing it")
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        left = self.leftovers()
        if left:
            measure.log(f"WARNING mlserver left processes behind: killing {left}")
            os.killpg(self.process.pid, signal.SIGKILL)
        self.log_file.close()

    def leftovers(self) -> list[int]:
        """Processes of its group still alive a moment after the main process
        has gone (its workers exit after it)."""
        deadline = time.monotonic() + LEFTOVER_SECONDS
        while group_members(self.process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        return group_members(self.process.pid)

    def close(self, keep_log: Path | None = None) -> None:
        """Stop, keep the log, remove the temporary directory."""
        self.stop()
        if keep_log:
            keep_log.parent.mkdir(parents=True, exist_ok=True)
            keep_log.write_text(self.log())
        shutil.rmtree(self.workdir, ignore_errors=True)


# --- Our server --------------------------------------------------------------

def start_ours(model: ModelVersion) -> Server:
    """Our server as `make serve` starts it, with meinheld; refused if it
    serves another iris_classifier version than MLServer got."""
    server = Server(Config("meinheld", WORKERS)).start()
    try:
        measure.check(server, OUR_SCENARIO)
        answer = requests.post(server.url + OUR_SCENARIO.path, data=scenarios.sample_body(OUR_SCENARIO),
                               headers={"Content-Type": "application/json"}, timeout=30).json()
        if answer.get("model_version") != model.version or answer.get("prediction") != EXPECTED_CLASS:
            raise RuntimeError(f"ours: expected {model} to answer class {EXPECTED_CLASS}, got {answer}")
    except BaseException:
        server.close()
        raise
    return server


# --- Load --------------------------------------------------------------------

def bench(target, scenario: Scenario, label: str, args: argparse.Namespace, out: Path) -> dict:
    """A warm-up run, then args.runs runs; the median run with the error
    counts of all of them."""
    warning = measure.warm_up(target, scenario, args.connections, args.warmup, None)
    if warning:
        measure.log("WARNING " + warning)
    runs = [measure.measured(target, scenario, args.connections, args.duration, None, label, i, args.runs,
                           out / target.name) for i in range(1, args.runs + 1)]
    result = measure.median(runs)
    result["warmup_warning"] = warning
    result["non2xx_all_runs"] = sum(r["non2xx"] for r in runs)
    result["socket_errors_all_runs"] = {k: sum(r["socket_errors"][k] for r in runs)
                                        for k in runs[0]["socket_errors"]}
    return result


def bench_mlserver(model: ModelVersion, args: argparse.Namespace, out: Path) -> dict:
    server = MLServer(model)
    measure.log(f"starting MLServer {MLSERVER_VERSION} on {server.url} ({WORKERS} parallel workers)")
    try:
        server.start()
        result = {"label": f"MLServer {MLSERVER_VERSION} ({WORKERS} workers)", **server.config,
                  "pss_idle_mb": machine.pss_mb(server.pids())}
        result["result"] = bench(server, MLSERVER_SCENARIO, f"mlserver-w{WORKERS}", args, out)
    finally:
        server.close(out / "logs" / "mlserver.log")
    return result


def bench_ours(model: ModelVersion, args: argparse.Namespace, out: Path) -> dict:
    measure.log(f"starting our server ({WORKERS} meinheld workers)")
    server = start_ours(model)
    try:
        worker = server.worker_in_use()
        result = {"label": f"ours ({WORKERS} workers, {worker.rsplit('.', 1)[-1]})", "worker": worker,
                  "pss_idle_mb": machine.pss_mb(server.pids())}
        result["result"] = bench(server, OUR_SCENARIO, server.config.name, args, out)
    finally:
        server.close(out / "logs" / "mlserve.log")
    return result


# --- Report ------------------------------------------------------------------

def socket_errors(counts: dict) -> str:
    shown = [f"{k} {v}" for k, v in counts.items() if v]
    return ", ".join(shown) if shown else "0"


def row(server: dict) -> tuple:
    r = server["result"]
    low, high = r["req_per_s_range"]
    seconds = r["duration_s"]
    return (server["label"], report.num(r["req_per_s"]), f"{report.num(low)}-{report.num(high)}",
            report.num(r["latency_ms"]["p50"], 2), report.num(r["latency_ms"]["p99"], 2),
            r["non2xx_all_runs"], socket_errors(r["socket_errors_all_runs"]),
            report.num(r["server_cpu_s"] / seconds, 2), report.num(r["client_cpu_s"] / seconds, 2),
            report.num(r["other_cpu_s"] / seconds, 2))


def render(meta: dict, ours: dict, theirs: dict) -> str:
    o, t = ours["result"], theirs["result"]
    ratio = ("ours / MLServer", report.ratio(o["req_per_s"], t["req_per_s"]), "",
             report.ratio(o["latency_ms"]["p50"], t["latency_ms"]["p50"]),
             report.ratio(o["latency_ms"]["p99"], t["latency_ms"]["p99"]), "", "", "", "", "")
    host_info, venv = meta["host"], meta["mlserver_venv"]
    lines = [
        f"# Our server and MLServer {MLSERVER_VERSION}: {meta['model']} {meta['stamp']}", "",
        f"- model: the same joblib; ours serves it with its {meta['serving_runtime']} runtime, MLServer with "
        f"mlserver_sklearn (" + ", ".join(f"{k} {v}" for k, v in venv.items()) + ")",
        f"- machine: {host_info['cpus']} CPUs, load average at start {host_info['loadavg_at_start']:.2f}; "
        f"commit {host_info['commit']}{' with uncommitted changes' if host_info['dirty'] else ''}",
        f"- load: wrk -t1 -c{meta['connections']} --timeout {measure.TIMEOUT_SECONDS}s, {meta['duration']} s per "
        f"run, {meta['runs']} run(s) per server after a {meta['warmup']} s warm-up",
        "- req/s (2xx only) and p50/p99 are the median run's, min-max over all runs; non-2xx and socket "
        "errors are summed over all runs",
        "- cores = CPU seconds / run seconds: the server's processes, wrk, everything else on the machine "
        "(a high 'other' means the run was disturbed)", "",
        *report.table(COLUMNS, [row(ours), row(theirs), ratio]), ""]
    for server in (ours, theirs):
        if server["result"]["warmup_warning"]:
            lines += [f"Warm-up errors, not counted above: {server['result']['warmup_warning']}", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    stamp, out = report.destination(args.out, "mlserver")
    os.chdir(ROOT)
    versions = ensure_venv()
    model = served_model()
    meta = {"stamp": stamp, "host": machine.describe(), "mlserver_venv": versions, "model": str(model),
            "artifact": str(model.artifact), "serving_runtime": model.metadata.get("serving_runtime", "unknown"),
            "duration": args.duration, "runs": args.runs, "warmup": args.warmup, "connections": args.connections}
    measure.log(f"writing to {out}; this takes about {2 * (args.warmup + args.runs * args.duration) + 60} s")
    theirs = bench_mlserver(model, args, out)
    ours = bench_ours(model, args, out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({"meta": meta, "ours": ours, "mlserver": theirs}, indent=2) + "\n")
    markdown = render(meta, ours, theirs)
    (out / "results.md").write_text(markdown)
    print(markdown)
    return 0

