"""The V2 protocol against v1 on one server, in one run (`python -m perf v2`):

    python -m perf v2 --duration 10 --runs 3 --connections 32

Two comparisons, each a V2 scenario beside the v1 scenario doing the same work:

- json: one iris row per request, uncached. V2 JSON infer
  (perf/wrk/v2_infer_json.lua) against v1 predict (predict_uncached.lua).
  Goal: V2 req/s >= 0.9x v1's.
- binary: the same 1,000 iris rows per request, uncached. V2 infer with a
  binary FP32 tensor in and binary outputs (v2_infer_binary_1000.lua) against
  v1 batch_predict's JSON (batch_1000.lua). Goal: V2 rows/s >= 1.0x v1's.

One server (as `make serve` starts it) serves all four scenarios; each is
checked once, warmed up, then measured --runs times, the scenarios taking
turns so that a disturbance on the shared machine spreads over all of them.
A cell is the run with the median req/s. Every run is saved as JSON, with
summary.json and results.md, under perf/results/v2-<UTC timestamp>/.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import orjson
import requests

from perf import machine, measure, report, scenarios
from perf.scenarios import IRIS, IRIS_ROW, SCENARIOS, Scenario
from perf.targets import Config, Server
from tests.server import ROOT

INFER = f"/v2/models/{IRIS}/infer"
V2_JSON = Scenario("v2_infer_json", INFER)
V2_BINARY = Scenario("v2_infer_binary_1000", INFER, rows=1000, body_file=True)
# (name, V2 scenario, v1 scenario, what is compared, goal)
COMPARISONS = {
    "json": (V2_JSON, SCENARIOS["predict_uncached"], "req_per_s", 0.9),
    "binary": (V2_BINARY, SCENARIOS["batch_1000"], "rows_per_s", 1.0),
}


def binary_body(rows: list[list[float]]) -> tuple[bytes, int]:
    """The 1,000-row binary request and the length of its JSON part."""
    X = np.asarray(rows, dtype="<f4")
    head = orjson.dumps({"inputs": [{"name": "features", "shape": list(X.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": X.nbytes}}],
                         "parameters": {"binary_data_output": True, "use_cache": False}})
    return head + X.tobytes(), len(head)


def write_bodies(directory: Path) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    rows = scenarios.iris_rows(1000)
    batch = directory / "batch_1000.json"
    batch.write_bytes(scenarios.batch_body(rows))
    body, length = binary_body(rows)
    binary = directory / f"{V2_BINARY.name}.body"
    binary.write_bytes(body)
    Path(f"{binary}.header-length").write_text(str(length))
    return {"batch_1000": batch, V2_BINARY.name: binary}


def check(target: Server, scenario: Scenario, bodies: dict[str, Path]) -> None:
    """One request as the scenario sends it, answered 200 with the right number of labels."""
    if scenario.name == V2_BINARY.name:
        path = bodies[scenario.name]
        resp = requests.post(target.url + scenario.path, data=path.read_bytes(), timeout=30, headers={
            "Inference-Header-Content-Length": Path(f"{path}.header-length").read_text()})
        length = int(resp.headers.get("Inference-Header-Content-Length", 0))
        head = orjson.loads(resp.content[:length]) if resp.status_code == 200 and length else {}
        shape = next((o["shape"] for o in head.get("outputs", []) if o["name"] == "label"), None)
        if shape != [scenario.rows]:
            raise RuntimeError(f"{scenario.name}: HTTP {resp.status_code}, label shape {shape}: {resp.content[:300]!r}")
    elif scenario.name == V2_JSON.name:
        body = {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": IRIS_ROW}],
                "parameters": {"use_cache": False}}
        resp = requests.post(target.url + scenario.path, json=body, timeout=30)
        if resp.status_code != 200 or resp.json()["outputs"][0]["shape"] != [1]:
            raise RuntimeError(f"{scenario.name}: HTTP {resp.status_code}: {resp.text[:300]}")
    else:
        measure.check(target, scenario)


def bench(config: Config, names: list[str], args: argparse.Namespace, out: Path) -> dict:
    bodies = write_bodies(out / "bodies")
    chosen = [s for name in names for s in COMPARISONS[name][:2]]
    server = Server(config)
    server.start()
    try:
        for scenario in chosen:
            check(server, scenario, bodies)
        for scenario in chosen:
            warning = measure.warm_up(server, scenario, args.connections, args.warmup, bodies.get(scenario.name))
            if warning:
                measure.log("WARNING " + warning)
        runs: dict[str, list[dict]] = {s.name: [] for s in chosen}
        for i in range(1, args.runs + 1):
            for scenario in chosen:
                runs[scenario.name].append(measure.measured(
                    server, scenario, args.connections, args.duration, bodies.get(scenario.name),
                    config.name, i, args.runs, out / "runs"))
        return {"config": config.name, "worker": server.worker_in_use(),
                "results": {name: measure.median(r) for name, r in runs.items()}}
    finally:
        server.close(out / "mlserve.log")


def render(meta: dict, result: dict, names: list[str]) -> str:
    lines = [f"# V2 against v1, {meta['stamp']}", "", *report.method(meta), "",
             f"One server: {result['config']} (worker {result['worker']}), "
             f"{meta['connections']} connections.", ""]
    rows = []
    for name in names:
        v2, v1, key, goal = COMPARISONS[name]
        ours, theirs = result["results"][v2.name], result["results"][v1.name]
        value = ours[key] / theirs[key] if theirs[key] else 0.0
        for r in (ours, theirs):
            lat = r["latency_ms"]
            rows.append((r["scenario"], report.num(r["req_per_s"]),
                         f"{report.num(r['req_per_s_range'][0])}-{report.num(r['req_per_s_range'][1])}",
                         report.num(r["rows_per_s"]), f"{lat['p50']:.2f}", f"{lat['p99']:.2f}",
                         r["errors_all_runs"], report.num(r["cpu_ms_per_req"], 3), f"{r['response_bytes']:,.0f}"))
        rows.append((f"**{name}: V2 / v1 {key.replace('_per_s', '/s')}**", "", "", "", "", "", "", "",
                     f"**{value:.2f}x** (goal >= {goal}x: {'met' if value >= goal else 'MISSED'})"))
    lines += report.table(("scenario", "req/s", "min-max", "rows/s", "p50 ms", "p99 ms", "errors",
                           "server CPU ms/req", "response bytes"), rows)
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compare", action="append", choices=list(COMPARISONS), help="repeatable; default: both")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    p.add_argument("--duration", type=int, default=10, help="seconds per run (default 10)")
    p.add_argument("--runs", type=int, default=3, help="runs per scenario; the median by req/s is reported (default 3)")
    p.add_argument("--warmup", type=int, default=2, help="unrecorded seconds per scenario first (default 2; 0: none)")
    p.add_argument("--workers", type=int, default=2, help="server workers (default 2)")
    p.add_argument("--worker-class", choices=["meinheld", "gthread"], default="meinheld")
    p.add_argument("--out", type=Path, help="output directory (default perf/results/v2-<UTC timestamp>/)")
    args = p.parse_args(argv)
    if args.connections < 1 or args.runs < 1 or args.duration < 1 or args.warmup < 0:
        p.error("--connections, --runs and --duration must be positive, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    stamp, out = report.destination(args.out, "v2")
    os.chdir(ROOT)
    names = list(dict.fromkeys(args.compare or COMPARISONS))
    meta = {"stamp": stamp, "host": machine.describe(), "duration": args.duration, "runs": args.runs,
            "warmup": args.warmup, "connections": args.connections, "compare": names}
    measure.log(f"writing to {out}; this takes about "
                f"{2 * len(names) * (args.warmup + args.runs * args.duration) + 15} s")
    result = bench(Config(args.worker_class, args.workers), names, args, out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({"meta": meta, "result": result}, indent=2) + "\n")
    markdown = render(meta, result, names)
    (out / "results.md").write_text(markdown)
    print(markdown)
    return 0
