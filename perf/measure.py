"""Measured wrk runs against a running server: throughput, latency, errors,
and the CPU and memory they cost; the check and warm-up before them; the
median of repeated runs."""
from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

from perf import machine, scenarios
from perf.scenarios import Scenario
from perf.targets import Server
from app.metrics import FLUSH_SECONDS
from tests.server import ROOT

WRK = shutil.which("wrk") or "/usr/bin/wrk"
# wrk leaves a request slower than --timeout out of the latency histogram and
# counts it as a timeout instead; the default of 2 s would cut off the very
# tail being measured at high connection counts.
TIMEOUT_SECONDS = 10


def wrk_command(script: Path, url: str, connections: int, duration: int, body: Path | None = None) -> list[str]:
    cmd = [WRK, "-t1", f"-c{connections}", f"-d{duration}s", "--latency",
           "--timeout", f"{TIMEOUT_SECONDS}s", "-s", str(script), url]
    return cmd + ["--", str(body)] if body else cmd


def run_wrk(cmd: list[str], cwd: Path, duration: int) -> tuple[dict, float]:
    """wrk's summary and the CPU seconds wrk itself used (the load generator
    shares the machine with the server; this says how much of it it took)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=duration + TIMEOUT_SECONDS + 30)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    client_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return parse_wrk(done), client_cpu


def parse_wrk(done: subprocess.CompletedProcess) -> dict:
    for line in done.stdout.splitlines():
        if line.startswith("JSON "):
            return json.loads(line[5:])
    raise RuntimeError(f"wrk printed no JSON line (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")


def wrk_version() -> str:
    done = subprocess.run([WRK, "-v"], capture_output=True, text=True)
    return (done.stdout + done.stderr).splitlines()[0].split(" Copyright")[0].strip()


def settle(target: Server, timeout: float = 10.0) -> None:
    """Wait until the server is idle. A run that starts while a worker still
    finishes the last run's slow requests finds that worker busy, and the idle
    one accepts every connection: a run on one core of two."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = machine.Sample.take(target.pids())
        time.sleep(0.1)
        used, _ = machine.Sample.take(target.pids()).cpu_since(before)
        if sum(used.values()) < 0.01:
            return


def run(target: Server, scenario: Scenario, connections: int, duration: int, body: Path | None) -> dict:
    cmd = wrk_command(scenario.script, target.url + scenario.path, connections, duration, body)
    settle(target)
    counting = target.name == "mlserve" and scenario.cached
    lookups_before = cache_lookups(target) if counting else None
    load_before = machine.loadavg()
    before = machine.Sample.take(target.pids())
    started = time.time()
    wrk, client_cpu = run_wrk(cmd, ROOT, duration)
    after = machine.Sample.take(target.pids())
    used, changed = after.cpu_since(before)
    server_cpu = sum(used.values())
    cache = cache_use(lookups_before, cache_lookups(target)) if counting else None
    return record(wrk, scenario, connections, {
        "cache": cache,
        "target": target.name, "started": started, "command": cmd, "loadavg_before": load_before,
        "server_cpu_s": server_cpu, "client_cpu_s": client_cpu, "workers_changed": changed,
        # Per worker, busiest first: an uneven split means connections were
        # not spread over the workers, which caps throughput below the cores.
        "worker_cpu_s": sorted((s for pid, s in used.items() if pid != target.master_pid), reverse=True),
        "other_cpu_s": max(0.0, after.busy - before.busy - server_cpu - client_cpu),
        "pss_mb": machine.pss_mb(target.pids()),
    })


def cache_lookups(target: Server) -> dict[tuple[str, str], float]:
    """mlserve_cache_lookups_total by (level, result), summed over models and
    workers. Workers publish their counts once a second: wait for that."""
    time.sleep(FLUSH_SECONDS + 0.2)
    counts: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(requests.get(target.url + "/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == "mlserve_cache_lookups_total":
                key = (sample.labels["level"], sample.labels["result"])
                counts[key] = counts.get(key, 0.0) + sample.value
    return counts


def cache_use(before: dict, after: dict) -> dict:
    """Lookups during the run per level, and the share of requests a cache
    answered: the first level consulted sees every cached request."""
    delta = {f"{level}_{result}": after.get((level, result), 0) - before.get((level, result), 0)
             for level in ("l1", "l2") for result in ("hit", "miss")}
    first = "l1" if delta["l1_hit"] + delta["l1_miss"] else "l2"
    requests_ = delta[f"{first}_hit"] + delta[f"{first}_miss"]
    delta["hit_ratio"] = (delta["l1_hit"] + delta["l2_hit"]) / requests_ if requests_ else None
    return delta


def record(wrk: dict, scenario: Scenario, connections: int, extra: dict) -> dict:
    seconds = wrk["duration_us"] / 1e6
    ok = wrk["requests"] - wrk["non2xx"]
    socket_errors = {k: wrk[k] for k in ("connect", "read", "write", "timeout")}
    return {
        "scenario": scenario.name, "connections": connections, "duration_s": seconds,
        "requests": wrk["requests"], "non2xx": wrk["non2xx"], "socket_errors": socket_errors,
        "errors": wrk["non2xx"] + sum(socket_errors.values()),
        # Only 2xx responses count: a server that fails fast must not look fast.
        "req_per_s": ok / seconds,
        "rows_per_s": ok * scenario.rows / seconds,
        "latency_ms": {k[:-3]: wrk[k] / 1000 for k in ("p50_us", "p90_us", "p99_us", "p999_us", "mean_us", "max_us")},
        "response_bytes": wrk["bytes"] / wrk["requests"] if wrk["requests"] else 0,
        **extra,
        "cpu_ms_per_req": extra["server_cpu_s"] * 1000 / ok if ok else None,
    }


def median(runs: list[dict]) -> dict:
    """The run with the median req/s, whole (its latencies belong to its
    throughput), with the spread of all runs beside it."""
    ranked = sorted(runs, key=lambda r: r["req_per_s"])
    chosen = dict(ranked[(len(ranked) - 1) // 2])
    chosen["runs"] = len(runs)
    chosen["req_per_s_range"] = [ranked[0]["req_per_s"], ranked[-1]["req_per_s"]]
    chosen["errors_all_runs"] = sum(r["errors"] for r in runs)
    return chosen


def check(target: Server, scenario: Scenario) -> None:
    """One request like the scenario's, answered 200 with the expected shape;
    wrk counts status codes only, so a wrong 200 would pass unseen."""
    body = scenarios.sample_body(scenario)
    resp = requests.request(scenario.method, target.url + scenario.path, data=body,
                            headers={"Content-Type": "application/json"}, timeout=30)
    if resp.status_code != 200:
        raise RuntimeError(f"{target.name} {scenario.name}: HTTP {resp.status_code}: {resp.text[:500]}")
    answer = resp.json()
    expected = {"predict": "prediction", "batch_predict": "predictions", "health": "status"}
    key = expected[scenario.path.rsplit("/", 1)[-1]]
    if target.name == "mlserve" and key not in answer:
        raise RuntimeError(f"{target.name} {scenario.name}: no {key!r} in {resp.text[:500]}")
    if target.name == "mlserve" and scenario.rows > 1 and answer.get("count") != scenario.rows:
        raise RuntimeError(f"{target.name} {scenario.name}: count {answer.get('count')} != {scenario.rows}")


def warm_up(target: Server, scenario: Scenario, connections: int, seconds: int, body: Path | None) -> str:
    """An unrecorded run, so first-request costs (page faults in fresh workers,
    ORT allocations, a cold cache) stay out of the figures. Stops the benchmark
    if nothing succeeds; returns a warning if anything failed."""
    if seconds <= 0:
        return ""
    wrk, _ = run_wrk(wrk_command(scenario.script, target.url + scenario.path, connections, seconds, body),
                         ROOT, seconds)
    errors = wrk["non2xx"] + sum(wrk[k] for k in ("connect", "read", "write", "timeout"))
    summary = f"{target.name} {scenario.name} warm-up: {errors} errors in {wrk['requests']} requests"
    if wrk["requests"] == wrk["non2xx"]:
        raise RuntimeError(summary)
    return summary if errors else ""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def measured(target: Server, scenario: Scenario, connections: int, duration: int, body: Path | None,
             label: str, number: int, runs: int, directory: Path) -> dict:
    """Run `number` of `runs`, saved as JSON in directory and logged."""
    record = run(target, scenario, connections, duration, body)
    record.update(config=label, run=number)
    save(record, directory / f"{scenario.name}-c{connections}-run{number}.json")
    log(progress(record, runs))
    return record


def save(record: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


def progress(r: dict, runs: int) -> str:
    latency = r["latency_ms"]
    return (f"{r['config']} {r['target']} {r['scenario']} c{r['connections']} run {r['run']}/{runs}: "
            f"{r['req_per_s']:.0f} req/s  p50 {latency['p50']:.2f} ms  p99 {latency['p99']:.2f} ms  "
            f"errors {r['errors']}  server CPU {r['server_cpu_s']:.2f} s  other CPU {r['other_cpu_s']:.2f} s")
