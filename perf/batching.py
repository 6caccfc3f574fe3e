"""Adaptive batching, in one run (`python -m perf batching`):

    python -m perf batching --duration 10 --runs 3

The ~200 MB MLP (perf/bigmodels.py big_mlp, one row per request, uncached)
and the iris forest (at its batching default: off) on 2 workers, one server
per configuration, all started first and taking turns run by run:

- unbatched: big_mlp with batching off (models.yaml);
- batched-W ms: big_mlp batching with max_wait_ms W, for each --waits;
- gthread-batched: the same as batched-2 ms on the gthread worker
  (--threads per worker), the other way a worker can gather requests.

Goals, each judged on the figures of this run:
- big_mlp, wrk -c32: batched (2 ms) >= 6x the req/s of unbatched, and p99 <=
  max wait + 2 x the mean batch run time (mlserve_batch_run_seconds over the
  run) at every wait;
- big_mlp, wrk -c1: batched p50 <= unbatched p50 + max wait + 1 ms;
- iris, wrk -c32 and -c1, on the batched server against the unbatched one:
  req/s >= 0.95x and p50 <= 1.05x (no regression, within the noise of a
  shared machine).

Every run is saved as JSON, with summary.json and results.md, under
perf/results/batching-<UTC timestamp>/.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import orjson
import requests
from prometheus_client.parser import text_string_to_metric_families

from perf import bigmodels, machine, measure, report
from perf.scenarios import IRIS, SCENARIOS, Scenario
from perf.targets import Config
from perf.targets import Server as TargetServer
from tests.server import ROOT
from tests.server import Server as TestServer

MLP = bigmodels.MLP
MLP_PREDICT = Scenario("mlp_predict", "/api/v1/predict", body_file=True)
IRIS_PREDICT = SCENARIOS["predict_uncached"]
WAITS = (0.5, 1.0, 2.0, 5.0)
REFERENCE_WAIT = 2.0


class BatchServer(TargetServer):
    """Our server on a repository of big_mlp and iris, with the given models.yaml."""

    def __init__(self, config: Config, models: Path, models_config: Path):
        TestServer.__init__(self, models, workers=config.workers, env=config.server_env(),
                            models_config=models_config)
        self.config = config


def repository(out: Path) -> Path:
    """big_mlp (built when missing) and the demo iris forest side by side."""
    bigmodels.ensure(bigmodels.DEFAULT_DIR, (MLP,))
    iris = ROOT / "models" / IRIS
    if not (iris / "1").is_dir():
        raise SystemExit(f"{iris} is missing: run `make models` first")
    folder = out / "models"
    folder.mkdir(parents=True, exist_ok=True)
    for name, source in ((MLP, bigmodels.DEFAULT_DIR / MLP), (IRIS, iris)):
        if not (folder / name).exists():
            (folder / name).symlink_to(source.resolve())
    return folder


def configurations(args: argparse.Namespace) -> list[tuple[str, Config, dict]]:
    """(label, server config, big_mlp's batching entry in models.yaml)."""
    chosen = [("unbatched", Config("meinheld", args.workers), {"enabled": False})]
    chosen += [(f"batched-{w:g}ms", Config("meinheld", args.workers), {"enabled": True, "max_wait_ms": w})
               for w in args.waits]
    if args.threads:
        chosen.append(("gthread-batched", Config("gthread", args.workers, {"MLSERVE_SERVER_THREADS": str(args.threads)}),
                       {"enabled": True, "max_wait_ms": REFERENCE_WAIT}))
    return chosen


def plan_of(label: str) -> list[tuple[Scenario, int]]:
    """What each configuration measures: big_mlp at 32 connections everywhere; the rest where compared."""
    runs = [(MLP_PREDICT, 32)]
    if label in ("unbatched", f"batched-{REFERENCE_WAIT:g}ms"):
        runs += [(MLP_PREDICT, 1), (IRIS_PREDICT, 32), (IRIS_PREDICT, 1)]
    elif label == "gthread-batched":
        runs += [(IRIS_PREDICT, 32)]
    return runs


def batch_counters(target: TestServer) -> dict[str, float]:
    """big_mlp's batch histograms' sums and counts, over every worker."""
    wanted = {f"mlserve_{name}_{part}" for name in ("batch_size", "batch_run_seconds", "batch_queue_wait_seconds")
              for part in ("sum", "count")}
    totals = dict.fromkeys(wanted, 0.0)
    for family in text_string_to_metric_families(requests.get(target.url + "/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name in wanted and sample.labels.get("model") == MLP:
                totals[sample.name] += sample.value
    return totals


def batch_use(before: dict, after: dict) -> dict:
    delta = {k: after[k] - before[k] for k in after}
    batches = delta["mlserve_batch_size_count"]
    waits = delta["mlserve_batch_queue_wait_seconds_count"]
    return {"batches": batches,
            "mean_batch_rows": delta["mlserve_batch_size_sum"] / batches if batches else None,
            "mean_batch_run_ms": delta["mlserve_batch_run_seconds_sum"] * 1000 / batches if batches else None,
            "mean_queue_wait_ms": delta["mlserve_batch_queue_wait_seconds_sum"] * 1000 / waits if waits else None}


def check(target: TestServer, body: Path) -> None:
    for payload in (body.read_bytes(), orjson.dumps({"model_name": IRIS, "features": [5.1, 3.5, 1.4, 0.2],
                                                      "use_cache": False})):
        resp = requests.post(target.url + "/api/v1/predict", data=payload, timeout=30,
                             headers={"Content-Type": "application/json"})
        if resp.status_code != 200 or "prediction" not in resp.json():
            raise RuntimeError(f"predict: HTTP {resp.status_code}: {resp.text[:300]}")


def start(label: str, config: Config, batching: dict, models: Path, out: Path) -> BatchServer:
    models_config = out / f"models-{label}.yaml"
    models_config.write_text(json.dumps({"models": {MLP: {"batching": batching}, IRIS: {}}}) + "\n")
    server = BatchServer(config, models, models_config)
    server.start(timeout=120)
    return server


def bench(chosen: list[tuple[str, Config, dict]], args: argparse.Namespace, models: Path, out: Path,
          body: Path) -> dict[str, dict]:
    """Every configuration's server runs at once (an idle one costs nothing); the
    configurations take turns, run by run, so a disturbance on the shared machine
    spreads over all of them instead of falling on one."""
    servers: dict[str, BatchServer] = {}
    try:
        for label, config, batching in chosen:
            servers[label] = start(label, config, batching, models, out)
            check(servers[label], body)
        results = {label: {"label": label, "config": config.name, "worker": servers[label].worker_in_use(),
                           "batching": batching, "cells": {},
                           "described": requests.get(f"{servers[label].url}/api/v1/models/{MLP}", timeout=10).json()["batching"]}
                   for label, config, batching in chosen}
        runs: dict[tuple[str, str], list[dict]] = {}
        for label, _, _ in chosen:
            for scenario, connections in plan_of(label):
                warning = measure.warm_up(servers[label], scenario, connections, args.warmup,
                                          body if scenario.body_file else None)
                if warning:
                    measure.log("WARNING " + warning)
        for i in range(1, args.runs + 1):
            for label, _, _ in chosen:
                for scenario, connections in plan_of(label):
                    before = batch_counters(servers[label])
                    record = measure.measured(servers[label], scenario, connections, args.duration,
                                              body if scenario.body_file else None, label, i, args.runs,
                                              out / "runs" / label)
                    record["batching"] = batch_use(before, batch_counters(servers[label]))
                    runs.setdefault((label, f"{scenario.name}-c{connections}"), []).append(record)
        for (label, name), records in runs.items():
            results[label]["cells"][name] = measure.median(records)
        return results
    finally:
        for label, server in servers.items():
            server.close(out / f"mlserve-{label}.log")


def goals(results: dict[str, dict], waits: tuple[float, ...]) -> list[tuple[str, str, bool | None]]:
    """(goal, figures, met) for each goal the figures of this run allow judging."""
    def cell(label, name):
        return results.get(label, {}).get("cells", {}).get(name)

    found = []
    base, ref = cell("unbatched", "mlp_predict-c32"), cell(f"batched-{REFERENCE_WAIT:g}ms", "mlp_predict-c32")
    if base and ref:
        ratio = ref["req_per_s"] / base["req_per_s"] if base["req_per_s"] else 0.0
        found.append(("big_mlp c32: batched (2 ms) / unbatched req/s >= 6x",
                      f"{report.num(ref['req_per_s'])} / {report.num(base['req_per_s'])} = {ratio:.1f}x", ratio >= 6))
    for w in waits:
        r = cell(f"batched-{w:g}ms", "mlp_predict-c32")
        run_ms = r and r["batching"]["mean_batch_run_ms"]
        if run_ms:
            bound = w + 2 * run_ms
            found.append((f"big_mlp c32, max wait {w:g} ms: p99 <= max wait + 2 x batch run",
                          f"p99 {r['latency_ms']['p99']:.1f} ms, bound {w:g} + 2 x {run_ms:.1f} = {bound:.1f} ms",
                          r["latency_ms"]["p99"] <= bound))
    base, ref = cell("unbatched", "mlp_predict-c1"), cell(f"batched-{REFERENCE_WAIT:g}ms", "mlp_predict-c1")
    if base and ref:
        added = ref["latency_ms"]["p50"] - base["latency_ms"]["p50"]
        found.append((f"big_mlp c1: batched p50 <= unbatched p50 + {REFERENCE_WAIT:g} ms + 1 ms",
                      f"{ref['latency_ms']['p50']:.2f} - {base['latency_ms']['p50']:.2f} = {added:+.2f} ms",
                      added <= REFERENCE_WAIT + 1))
    for conns in (32, 1):
        base = cell("unbatched", f"predict_uncached-c{conns}")
        ref = cell(f"batched-{REFERENCE_WAIT:g}ms", f"predict_uncached-c{conns}")
        if base and ref:
            ratio = ref["req_per_s"] / base["req_per_s"] if base["req_per_s"] else 0.0
            p50 = ref["latency_ms"]["p50"] / base["latency_ms"]["p50"] if base["latency_ms"]["p50"] else 0.0
            found.append((f"iris c{conns} (default: off) beside batched big_mlp: req/s >= 0.95x, p50 <= 1.05x",
                          f"req/s {ratio:.3f}x, p50 {p50:.3f}x", ratio >= 0.95 and p50 <= 1.05))
    return found


def render(meta: dict, results: dict[str, dict], waits: tuple[float, ...]) -> str:
    lines = [f"# Adaptive batching, {meta['stamp']}", "", *report.method(meta), ""]
    rows = []
    for label, result in results.items():
        for name, r in result["cells"].items():
            use = r["batching"] if name.startswith("mlp") else {}
            rows.append((label, result["worker"], r["scenario"], r["connections"], report.num(r["req_per_s"]),
                         f"{report.num(r['req_per_s_range'][0])}-{report.num(r['req_per_s_range'][1])}",
                         f"{r['latency_ms']['p50']:.2f}", f"{r['latency_ms']['p99']:.2f}", r["errors_all_runs"],
                         fmt(use.get("mean_batch_rows"), 1), fmt(use.get("mean_batch_run_ms"), 1),
                         fmt(use.get("mean_queue_wait_ms"), 2)))
    lines += report.table(("config", "worker", "scenario", "conns", "req/s", "min-max", "p50 ms", "p99 ms", "errors",
                           "rows/batch", "batch run ms", "queue wait ms"), rows) + [""]
    curve = [(f"{w:g}", report.num(c["req_per_s"]), f"{c['latency_ms']['p99']:.1f}", fmt(c["batching"]["mean_batch_rows"], 1))
             for w in waits if (c := results.get(f"batched-{w:g}ms", {}).get("cells", {}).get("mlp_predict-c32"))]
    if curve:
        lines += ["big_mlp at 32 connections against the max wait:", ""]
        lines += report.table(("max wait ms", "req/s", "p99 ms", "rows/batch"), curve) + [""]
    lines += report.table(("goal", "figures", "met"), [(g, f, {True: "met", False: "MISSED", None: "-"}[m])
                                                      for g, f, m in goals(results, waits)])
    described = next((r["described"] for r in results.values() if r["label"] == "unbatched"), None)
    if described:
        lines += ["", f"big_mlp's measured cost (GET /api/v1/models/{MLP}): one row {described['row_cost_ms']} ms, "
                      f"8 rows in one call {described['batch_of_8_ms']} ms."]
    return "\n".join(lines) + "\n"


def fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=int, default=10, help="seconds per run (default 10)")
    p.add_argument("--runs", type=int, default=3, help="runs per cell; the median by req/s is reported (default 3)")
    p.add_argument("--warmup", type=int, default=2, help="unrecorded seconds per cell first (default 2; 0: none)")
    p.add_argument("--workers", type=int, default=2, help="server workers (default 2)")
    p.add_argument("--waits", type=lambda t: tuple(float(v) for v in t.split(",")), default=WAITS,
                   help="comma list of max waits in ms for the curve (default 0.5,1,2,5; 2 is the reference)")
    p.add_argument("--threads", type=int, default=16, help="threads per gthread worker (default 16; 0: no gthread)")
    p.add_argument("--out", type=Path, help="output directory (default perf/results/batching-<UTC timestamp>/)")
    args = p.parse_args(argv)
    if args.runs < 1 or args.duration < 1 or args.warmup < 0:
        p.error("--runs and --duration must be positive, --warmup >= 0")
    if REFERENCE_WAIT not in args.waits:
        args.waits = (*args.waits, REFERENCE_WAIT)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    stamp, out = report.destination(args.out, "batching")
    os.chdir(ROOT)
    out.mkdir(parents=True, exist_ok=True)
    models = repository(out)
    body = out / "mlp_predict.json"
    body.write_bytes(orjson.dumps({"model_name": MLP, "features": [round(0.1 * i - 3, 2) for i in range(64)],
                                   "use_cache": False}))
    chosen = configurations(args)
    cells = sum(len(plan_of(label)) for label, _, _ in chosen)
    measure.log(f"writing to {out}; this takes about {cells * (args.warmup + args.runs * (args.duration + 1)) + 20 * len(chosen)} s")
    meta = {"stamp": stamp, "host": machine.describe(), "duration": args.duration, "runs": args.runs,
            "warmup": args.warmup, "waits": list(args.waits), "workers": args.workers}
    results = bench(chosen, args, models, out, body)
    (out / "summary.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    markdown = render(meta, results, tuple(args.waits))
    (out / "results.md").write_text(markdown)
    print(markdown)
    return 0
