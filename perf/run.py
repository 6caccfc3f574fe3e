"""The benchmark: `make bench` runs the full suite. Narrow it with flags, e.g.

    python perf/run.py --scenario predict_uncached --connections 32 --runs 3

For each worker class and worker count it starts the real server (as `make
serve` does), times its cold start, runs every scenario (perf/wrk/<name>.lua)
at every connection count with wrk, then the same load against the reference
apps (perf/reference_apps.py). Each run is saved as JSON in the output
directory; results.md there holds the tables, which are also printed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
# The server is started with the gunicorn next to this interpreter, so the
# harness must run in the project's virtualenv, whichever python started it.
if Path(sys.prefix).resolve() != VENV.resolve() and (VENV / "bin" / "python").exists():
    os.execv(VENV / "bin" / "python", [str(VENV / "bin" / "python"), *sys.argv])
sys.path.insert(0, str(ROOT))

from perf import host, inprocess, report, scenarios, suite  # noqa: E402
from perf.scenarios import SCENARIOS  # noqa: E402
from perf.targets import Config  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402


def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def name_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", action="append", choices=list(SCENARIOS), help="repeatable; default: all")
    p.add_argument("--connections", type=int_list, default=[1, 8, 32, 128], help="comma list (default 1,8,32,128)")
    # wrk takes whole seconds.
    p.add_argument("--duration", type=int, default=10, help="seconds per run (default 10)")
    p.add_argument("--runs", type=int, default=3, help="runs per cell; the median by req/s is reported (default 3)")
    p.add_argument("--warmup", type=int, default=2, help="unrecorded seconds per scenario first (default 2; 0: none)")
    p.add_argument("--workers", type=int_list, default=[2], help="comma list of worker counts (default 2)")
    p.add_argument("--worker-class", type=name_list, default=["meinheld", "gthread"],
                   help="comma list of meinheld, gthread (default both)")
    p.add_argument("--env", action="append", default=[], metavar="MLSERVE_X=VALUE",
                   help="extra server setting, repeatable (e.g. MLSERVE_REDIS_URL=redis://127.0.0.1:6379/0)")
    p.add_argument("--redis", action="store_true",
                   help="start a private redis-server and give the server its URL (L2 cache, control channel)")
    p.add_argument("--compare-env", action="append", default=[], metavar="MLSERVE_X=VALUE",
                   help="also bench each configuration with this setting added, in the same run (repeatable: "
                        "one more configuration each), e.g. MLSERVE_CACHE_L1_MAX_ENTRIES=0 for L2-only hits")
    p.add_argument("--out", type=Path, help="output directory (default perf/results/<UTC timestamp>/)")
    p.add_argument("--no-references", dest="references", action="store_false",
                   help="skip the reference apps and the in-process baseline")
    args = p.parse_args(argv)
    if set(args.worker_class) - {"meinheld", "gthread"}:
        p.error("--worker-class takes meinheld and/or gthread")
    if any("=" not in item for item in args.env + args.compare_env):
        p.error("--env takes NAME=VALUE")
    if not args.connections or min(args.connections) < 1 or args.runs < 1 or args.duration <= 0:
        p.error("--connections, --runs and --duration must be positive")
    return args


def configs(args: argparse.Namespace, redis_url: str = "") -> list[Config]:
    env = dict(item.split("=", 1) for item in args.env)
    if redis_url:
        env["MLSERVE_REDIS_URL"] = redis_url
    variants = [env] + [{**env, **dict([item.split("=", 1)])} for item in args.compare_env]
    return [Config(k, w, v) for k in args.worker_class for w in args.workers for v in variants]


def estimate_seconds(args: argparse.Namespace, plan: suite.Plan) -> float:
    per_target = len(plan.connections) * plan.runs * plan.duration
    refs = len(suite.REFERENCES) if args.references else 0
    per_config = (len(plan.scenarios) * (per_target + plan.warmup) + refs * (per_target + plan.warmup + 2)
                  + suite.COLD_STARTS * 3)
    return per_config * len(configs(args))


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = (args.out or ROOT / "perf" / "results" / stamp).resolve()
    os.chdir(ROOT)
    names = args.scenario or list(SCENARIOS)
    plan = suite.Plan([SCENARIOS[n] for n in dict.fromkeys(names)], sorted(set(args.connections)), args.duration,
                      args.runs, args.warmup, args.references, scenarios.write_bodies(out / "bodies"), out)
    meta = {"stamp": stamp, "host": host.describe(), "duration": args.duration, "runs": args.runs,
            "warmup": args.warmup, "scenarios": names, "connections": plan.connections}
    suite.log(f"writing to {out}; this takes about {estimate_seconds(args, plan) / 60:.1f} min")
    baseline = inprocess.measure(scenarios.iris_rows(1000)) if args.references else None
    with (RedisServer() if args.redis else contextlib.nullcontext()) as redis:
        results = [suite.bench(config, plan) for config in configs(args, redis.url if redis else "")]
    (out / "summary.json").write_text(json.dumps({"meta": meta, "in_process": baseline, "configs": results},
                                                 indent=2) + "\n")
    markdown = report.render(meta, baseline, results)
    (out / "results.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
