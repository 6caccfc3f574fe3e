"""results.md: the figures as markdown tables, with what they were measured on."""
from __future__ import annotations

import time
from pathlib import Path

from perf import measure

RESULTS = Path(__file__).resolve().parent / "results"

COLUMNS = ("scenario", "conns", "req/s", "min-max", "rows/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms",
           "errors", "CPU ms/req", "server cores", "per worker", "wrk cores", "other cores", "PSS MB",
           "cache hits")


def table(header: tuple, rows: list[tuple]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def ratio(ours: float | None, reference: float | None) -> str:
    return f"{ours / reference:.2f}" if ours and reference else "-"


def render(meta: dict, baseline: dict | None, configs: list[dict]) -> str:
    lines = [f"# Benchmark {meta['stamp']}", "", *method(meta), ""]
    if baseline:
        lines += [f"In-process ONNX Runtime, iris, 1 thread: {baseline['rows']} rows per run in "
                  f"{baseline['batch_ms']:.3f} ms = {num(baseline['batch_rows_per_s'])} rows/s; 1 row per run in "
                  f"{baseline['single_us']:.1f} us = {num(baseline['single_per_s'])} runs/s.", ""]
    for config in configs:
        lines += section(config, baseline)
    return "\n".join(lines) + "\n"


def method(meta: dict) -> list[str]:
    host, p = meta["host"], meta["host"]["packages"]
    return [
        f"- machine: {host['cpus']} CPUs ({host['cpu']}), kernel {host['kernel']}, "
        f"load average at start {host['loadavg_at_start']:.2f}",
        f"- code: commit {host['commit']}{' with uncommitted changes' if host['dirty'] else ''}; python "
        f"{host['python']}, " + ", ".join(f"{k} {v}" for k, v in p.items()) + f"; {host['wrk']}",
        f"- load: wrk -t1 --timeout {measure.TIMEOUT_SECONDS}s, {meta['duration']:g} s per run, {meta['runs']} "
        f"run(s) per cell after a {meta['warmup']} s warm-up per scenario; a cell shows the run with the median "
        "req/s (the lower middle one for an even count), min-max over all runs beside it",
        "- req/s and rows/s count 2xx responses only; errors are non-2xx plus socket errors over all runs",
        "- latency is wrk's: closed loop, from sending a request to its response, so at saturation it "
        "includes queueing (no coordinated-omission correction)",
        "- cores = CPU seconds / run seconds: the server (master + workers), each worker (busiest first; "
        "an uneven split means connections were not spread over the workers), wrk itself, and everything "
        "else on the machine (a high 'other' means the run was disturbed)",
    ]


def section(config: dict, baseline: dict | None) -> list[str]:
    cold = config["cold_start_s"]
    lines = [f"## {config['config']} (worker {config['worker']})", "",
             f"Cold start, process start to first 200 from /ready: median {config['cold_start_median_s']:.3f} s "
             f"({', '.join(f'{t:.3f}' for t in cold)}); PSS when idle {config['pss_idle_mb']:.0f} MB.", ""]
    if config["env"]:
        lines += ["Settings: " + ", ".join(f"{k}={v}" for k, v in config["env"].items()), ""]
    rows = [cells(cell) for cells_by_conns in config["results"].values() for cell in cells_by_conns.values()]
    lines += table(COLUMNS, rows) + [""]
    lines += references(config, baseline) + light_load(config)
    return lines


def cells(r: dict) -> tuple:
    latency, low_high = r["latency_ms"], r["req_per_s_range"]
    rows = num(r["rows_per_s"]) if r["rows_per_s"] != r["req_per_s"] else "-"
    errors = str(r["errors_all_runs"]) + (" (workers restarted)" if r["workers_changed"] else "")
    seconds = r["duration_s"]
    return (r["scenario"], r["connections"], num(r["req_per_s"]), f"{num(low_high[0])}-{num(low_high[1])}", rows,
            num(latency["p50"], 2), num(latency["p90"], 2), num(latency["p99"], 2), num(latency["p999"], 2),
            errors, num(r["cpu_ms_per_req"], 3), num(r["server_cpu_s"] / seconds, 2),
            " ".join(num(w / seconds, 2) for w in r["worker_cpu_s"]),
            num(r["client_cpu_s"] / seconds, 2), num(r["other_cpu_s"] / seconds, 2), num(r["pss_mb"]),
            hits(r.get("cache")))


def hits(cache: dict | None) -> str:
    """Share of requests a cache answered, and by level."""
    if not cache or cache["hit_ratio"] is None:
        return "-"
    return f"{cache['hit_ratio']:.1%} (l1 {num(cache['l1_hit'])}, l2 {num(cache['l2_hit'])})"


def req_per_s(results: dict, scenario: str, connections: int) -> float | None:
    cell = results.get(scenario, {}).get(connections)
    return cell["req_per_s"] if cell else None


def references(config: dict, baseline: dict | None) -> list[str]:
    lines = reference_table(config["results"], config["references"]) if config["references"] else []
    if baseline and "batch_1000" in config["results"]:
        lines += batch_table(config, baseline)
    return lines


def reference_table(ours: dict, refs: dict) -> list[str]:
    ref = {app: r["results"]["predict_uncached"] for app, r in refs.items()}
    conns = sorted({c for by_conns in ref.values() for c in by_conns})
    rows = [(c, num(req_per_s(ours, "predict_uncached", c)), num(req_per_s(ref, "ort", c)),
             ratio(req_per_s(ours, "predict_uncached", c), req_per_s(ref, "ort", c)),
             num(req_per_s(ours, "predict_cached", c)), num(req_per_s(ref, "echo", c)),
             ratio(req_per_s(ours, "predict_cached", c), req_per_s(ref, "echo", c))) for c in conns]
    return ["### Against the reference apps (same Gunicorn settings, worker class and workers)", ""] + table(
        ("conns", "predict_uncached req/s", "ort app req/s", "ratio",
         "predict_cached req/s", "echo app req/s", "ratio"), rows) + [""]


def batch_table(config: dict, baseline: dict) -> list[str]:
    rows = [(c, num(r["rows_per_s"]), ratio(r["rows_per_s"], baseline["batch_rows_per_s"]))
            for c, r in config["results"]["batch_1000"].items()]
    return ["### batch_1000 against in-process ONNX Runtime on the same rows", "",
            f"In-process is one thread; {config['config']} can reach at most min(workers, CPUs) times it.",
            ""] + table(("conns", "batch_1000 rows/s", "ratio to in-process"), rows) + [""]


def light_load(config: dict) -> list[str]:
    # wrk 4 cannot hold a fixed request rate (wrk2 can). Light load is read at
    # 1 and 8 connections, and from predict_paced: 32 connections that pause
    # before each request, offering about half the saturation rate.
    results = config["results"]
    peak = req_per_s(results, "predict_uncached", 32)
    cells = [(str(c), results["predict_uncached"][c]) for c in (1, 8) if c in results.get("predict_uncached", {})]
    cells += [(f"{c}, paced", cell) for c, cell in results.get("predict_paced", {}).items() if c == 32]
    if not cells:
        return []
    rows = [(label, num(r["req_per_s"]), f"{100 * r['req_per_s'] / peak:.0f}%" if peak else "-",
             num(r["latency_ms"]["p50"], 2), num(r["latency_ms"]["p99"], 2),
             ratio(r["latency_ms"]["p99"], r["latency_ms"]["p50"])) for label, r in cells]
    return ["### Latency under light load (predict_uncached)", "",
            "wrk 4 cannot fix the request rate: light load is 1 and 8 connections, and 32 connections that "
            "pause 0-8 ms before each request (predict_paced), beside the 32-connection maximum.", ""] + table(
        ("conns", "req/s", "of c32 req/s", "p50 ms", "p99 ms", "p99/p50"), rows) + [""]


def destination(given: Path | None, name: str) -> tuple[str, Path]:
    """(the run's UTC stamp, where its results go): given, else perf/results/<name>-<stamp>/."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return stamp, (given or RESULTS / (f"{name}-{stamp}" if name else stamp)).resolve()
