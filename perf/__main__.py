"""python -m perf SUBCOMMAND: every benchmark, from the checkout's root.

    python -m perf run [...]        the full suite (make bench): every scenario, the reference apps
    python -m perf commits A B ...  the server at several commits side by side
    python -m perf memory [...]     weights shared across workers: PSS at 1, 2, 4 and 8 workers
    python -m perf mlserver [...]   ours beside Seldon MLServer on the same forest
    python -m perf soak [...]       memory under 10 minutes of mixed traffic and swaps stays bounded
    python -m perf bigmodels [...]  build the large models the memory benchmark serves
    python -m perf monitoring [...] the cost of the prediction log and drift on the request path
    python -m perf v2 [...]         the V2 protocol against v1 on the same work, in one run
    python -m perf nginx [...]      throughput through nginx against the instances directly
    python -m perf batching [...]   adaptive batching: the big MLP batched and not, the wait curve, iris beside it
    python -m perf ratelimit [...]  accepted req/s under a 100 req/s limit shared by 2 hosts x 2 workers

`python -m perf SUBCOMMAND --help` lists each one's flags.
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
COMMANDS = {"run": "perf.bench", "commits": "perf.commits", "memory": "perf.memory",
            "mlserver": "perf.mlserver", "soak": "perf.soak", "bigmodels": "perf.bigmodels",
            "monitoring": "perf.monitoring", "v2": "perf.v2", "nginx": "perf.nginx",
            "batching": "perf.batching", "ratelimit": "perf.ratelimit"}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:]) or 0


if __name__ == "__main__":
    # The servers under test are started with the gunicorn beside this
    # interpreter: run in the project's virtualenv, whichever python started us.
    if Path(sys.prefix).resolve() != VENV.resolve() and (VENV / "bin" / "python").exists():
        os.execv(VENV / "bin" / "python", [str(VENV / "bin" / "python"), "-m", "perf", *sys.argv[1:]])
    os.chdir(ROOT)
    sys.exit(main(sys.argv[1:]))
