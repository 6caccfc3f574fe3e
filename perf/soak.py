"""The soak: does every long-lived structure in a worker stay within its bounds
under sustained, mixed traffic?

    python -m perf soak                      # 10 minutes, the default config, Redis on
    python -m perf soak --minutes 2 --commit 2631bf6

The real server (2 workers unless --workers) serves a copy of the demo models
with a second iris_classifier version, with a private redis-server. wrk sends
perf/wrk/soak_mix.lua for the whole run: new random rows (cache misses), Zipf
rows (hits), 100-row batches and bad requests. Every --swap-every seconds the
serving iris version flips through the admin API (new workers fork from the
reloaded master). Every --sample-every seconds the RSS and USS of the master
and of each worker are read from /proc and printed.

It fails (exit 1) when, after the warm-up, a worker's memory ends above its
idle baseline + cache.l1_max_bytes x 1.2, or the workers' level (the highest
worker USS in each swap interval) grows by more than 5 % from the first
interval after the warm-up to the last; likewise the master's RSS (its USS
swings with what the workers it forked have written to).
Results: perf/results/soak-<UTC timestamp>/ (samples.json, results.md).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import requests

from app import settings as settings_module
from perf import machine, measure, report, scenarios
from perf.commits import checkout
from perf.report import table
from perf.targets import MODELS, Config, Server
from tests.redis_server import RedisServer
from tests.server import ROOT

TOKEN = "soak-admin-token"
SCRIPT = Path(__file__).resolve().parent / "wrk" / "soak_mix.lua"
CEILING_FACTOR = 1.2
GROWTH_LIMIT = 0.05


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="length of the run (default 10)")
    p.add_argument("--warmup", type=float, help="minutes before the checks apply (default: a fifth of the run, at most 2)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--swap-every", type=float, default=60.0, help="seconds between swaps (0: none)")
    p.add_argument("--sample-every", type=float, default=10.0, help="seconds between memory samples")
    p.add_argument("--env", action="append", default=[], metavar="MLSERVE_X=VALUE", help="extra server setting")
    p.add_argument("--commit", help="serve this commit (a temporary worktree) instead of the checkout")
    p.add_argument("--out", type=Path, help="output directory (default perf/results/soak-<UTC timestamp>/)")
    args = p.parse_args(argv)
    if args.warmup is None:
        args.warmup = min(2.0, args.minutes / 5)
    return args


def repository(into: Path) -> Path:
    """The demo models and a second iris_classifier version to swap to."""
    models = into / "models"
    shutil.copytree(MODELS, models, ignore=shutil.ignore_patterns("serving.json"))
    shutil.copytree(models / "iris_classifier" / "1", models / "iris_classifier" / "2")
    return models


def l1_max_bytes(env: dict) -> int:
    """The setting the server runs with (the checkout's default unless --env sets it)."""
    return settings_module.load(environ=env, path=str(ROOT / "config" / "server.yaml")).cache.l1_max_bytes


class Swapper(threading.Thread):
    """Flips iris_classifier between versions 2 and 1 through the admin API."""

    def __init__(self, server: Server, every: float):
        super().__init__(daemon=True)
        self.server, self.every, self.stop, self.swaps = server, every, threading.Event(), []

    def run(self) -> None:
        version = 2
        while self.every and not self.stop.wait(self.every):
            answer = requests.post(f"{self.server.url}/api/v1/admin/models/iris_classifier/promote",
                                   json={"version": version}, headers={"Authorization": f"Bearer {TOKEN}"},
                                   timeout=60)
            self.swaps.append((time.monotonic(), version, answer.status_code))
            version = 3 - version


def sample(server: Server, started: float) -> dict:
    pids = machine.tree(server.master_pid)
    memory = {}
    for pid in pids:
        with contextlib.suppress(OSError, KeyError):
            r = machine.rollup(pid)
            memory[pid] = {"rss_mb": round(r["rss"], 1), "uss_mb": round(r["uss"], 1)}
    return {"t": round(time.monotonic() - started, 1), "master": memory.pop(server.master_pid, None),
            "workers": memory}


def describe(s: dict) -> str:
    workers = "  ".join(f"{pid}: rss {m['rss_mb']:.0f} uss {m['uss_mb']:.0f}" for pid, m in sorted(s["workers"].items()))
    master = s["master"] or {}
    return f"t={s['t']:6.0f}s  master rss {master.get('rss_mb', 0):.0f} uss {master.get('uss_mb', 0):.0f} MB  {workers}"


def levels(samples: list[dict], after: float, every: float, of=lambda s: [m["uss_mb"] for m in s["workers"].values()]
           ) -> list[float]:
    """The highest figure (by default a worker's USS) in each interval of `every` seconds from `after` on."""
    buckets: dict[int, float] = {}
    for s in samples:
        figures = of(s)
        if s["t"] >= after and figures:
            key = int((s["t"] - after) // every)
            buckets[key] = max(buckets.get(key, 0.0), max(figures))
    return [buckets[k] for k in sorted(buckets)]


def master_rss(sample: dict) -> list[float]:
    # RSS, not USS: the master's USS falls at every fork (its pages are
    # shared with the new workers) and climbs back as they write to their
    # copies, which says nothing about the master's own growth.
    return [sample["master"]["rss_mb"]] if sample["master"] else []


def verdict(samples: list[dict], baseline_uss: float, limit_mb: float, args) -> list[tuple[str, bool, str]]:
    """(check, passed, figures) for each of the soak's checks."""
    after = args.warmup * 60
    ceiling = baseline_uss + limit_mb * CEILING_FACTOR
    late = [m["uss_mb"] for s in samples if s["t"] >= after for m in s["workers"].values()]
    interval = args.swap_every or max(args.sample_every * 6, 60.0)
    worker_levels = levels(samples, after, interval)
    masters = levels(samples, after, interval, master_rss)
    checks = [("worker USS after warm-up <= idle baseline + l1_max_bytes x 1.2", bool(late) and max(late) <= ceiling,
               f"max {max(late, default=0):.1f} MB, ceiling {ceiling:.1f} MB ({baseline_uss:.1f} + {limit_mb:.1f} x 1.2)")]
    if len(worker_levels) >= 2:
        growth = worker_levels[-1] / worker_levels[0] - 1
        checks.append(("workers' level grows <= 5 %", growth <= GROWTH_LIMIT,
                       f"{worker_levels[0]:.1f} -> {worker_levels[-1]:.1f} MB ({growth:+.1%}); every interval: "
                       + ", ".join(f"{v:.0f}" for v in worker_levels)))
    if len(masters) >= 2:
        growth = masters[-1] / masters[0] - 1
        checks.append(("master's RSS grows <= 5 %", growth <= GROWTH_LIMIT,
                       f"{masters[0]:.1f} -> {masters[-1]:.1f} MB ({growth:+.1%})"))
    return checks


def run_load(server: Server, args, body: Path) -> tuple[dict, float]:
    command = measure.wrk_command(SCRIPT, server.url, args.connections, int(args.minutes * 60), body)
    return measure.run_wrk(command, ROOT, int(args.minutes * 60))


def soak(server: Server, args, body: Path, limit_mb: float) -> dict:
    started = time.monotonic()
    server.wait_for_workers(args.workers)
    idle = sample(server, started)
    baseline = statistics.median(m["uss_mb"] for m in idle["workers"].values())
    measure.log(f"idle: {describe(idle)}")
    result: dict = {}
    load = threading.Thread(target=lambda: result.update(zip(("wrk", "wrk_cpu_s"), run_load(server, args, body))))
    swapper = Swapper(server, args.swap_every)
    load.start()
    swapper.start()
    samples = [idle]
    while load.is_alive():
        load.join(args.sample_every)
        samples.append(sample(server, started))
        measure.log(describe(samples[-1]))
    swapper.stop.set()
    return {"samples": samples, "baseline_uss_mb": baseline, "swaps": swapper.swaps, **result}


def render(meta: dict, run: dict, checks: list) -> str:
    wrk = run.get("wrk") or {}
    lines = [f"# Soak {meta['stamp']}", "",
             f"- code: {meta['code']}; {meta['minutes']:g} min, warm-up {meta['warmup']:g} min, {meta['workers']} "
             f"workers, wrk -c{meta['connections']} perf/wrk/soak_mix.lua, Redis on, a swap every "
             f"{meta['swap_every']:g} s ({len(run['swaps'])} done, statuses {sorted({s[2] for s in run['swaps']})})",
             f"- requests: {wrk.get('requests', 0):,} ({wrk.get('non2xx', 0):,} non-2xx: the bad tenth), socket "
             f"errors {sum(wrk.get(k, 0) for k in ('connect', 'read', 'write', 'timeout'))}",
             f"- cache.l1_max_bytes {meta['l1_max_mb']:.1f} MB; idle worker USS {run['baseline_uss_mb']:.1f} MB", ""]
    lines += table(("check", "passed", "figures"), [(c, "yes" if ok else "**NO**", f) for c, ok, f in checks])
    rows = [(s["t"], f"{(s['master'] or {}).get('rss_mb', 0):.0f} / {(s['master'] or {}).get('uss_mb', 0):.0f}",
             "  ".join(f"{m['rss_mb']:.0f} / {m['uss_mb']:.0f}" for _, m in sorted(s["workers"].items())))
            for s in run["samples"]]
    return "\n".join(lines + ["", *table(("t s", "master RSS / USS MB", "workers RSS / USS MB"), rows)]) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    stamp, out = report.destination(args.out, "soak")
    env = dict(item.split("=", 1) for item in args.env)
    limit_mb = l1_max_bytes(env) / 2**20
    with tempfile.TemporaryDirectory(prefix="mlserve-soak-") as scratch, RedisServer() as redis:
        root, code = ROOT, machine.git("rev-parse", "--short", "HEAD")
        if args.commit:
            code, root = checkout(args.commit, Path(scratch))
        env.update(MLSERVE_REDIS_URL=redis.url, MLSERVE_SERVER_ADMIN_TOKEN=TOKEN)
        server = Server(Config("meinheld", args.workers, env), root=root)
        server.env["MLSERVE_MODELS_DIR"] = str(repository(Path(scratch)))
        body = scenarios.write_bodies(out / "bodies")["batch_100"]
        server.start()
        try:
            run = soak(server, args, body, limit_mb)
        finally:
            server.close(out / "server.log")
    if args.commit:
        subprocess.run(["git", "worktree", "prune"], cwd=ROOT, check=False)  # its tree is gone
    checks = verdict(run["samples"], run["baseline_uss_mb"], limit_mb, args)
    meta = {"stamp": stamp, "code": code, "minutes": args.minutes, "warmup": args.warmup, "workers": args.workers,
            "connections": args.connections, "swap_every": args.swap_every, "l1_max_mb": limit_mb,
            "host": machine.describe()}
    (out / "samples.json").write_text(json.dumps({"meta": meta, "run": run, "checks": checks}, indent=2) + "\n")
    markdown = render(meta, run, checks)
    (out / "results.md").write_text(markdown)
    print(markdown)
    return 0 if all(ok for _, ok, _ in checks) else 1
