"""mlserve train: fit a model on a CSV and add it to the repository."""
from __future__ import annotations

import sys
from pathlib import Path

from app.cli.context import Context
from app.cli.output import Steps
from app.cli.errors import UsageError


def add_commands(sub) -> None:
    train = sub.add_parser("train", help="train a model from a CSV and add it to the repository")
    train.add_argument("csv", type=Path)
    train.add_argument("--target", help="the target column (not needed for clustering)")
    train.add_argument("--name", required=True, help="model name, [a-z0-9][a-z0-9_-]{0,63}")
    train.add_argument("--algorithm", default="random_forest")
    train.set_defaults(run=cmd_train)


def cmd_train(args, ctx: Context) -> int:
    from app.repository import is_valid_name
    from app.training import algorithms, train_csv

    if not is_valid_name(args.name):
        raise UsageError(f"bad model name {args.name!r}: use [a-z0-9][a-z0-9_-]{{0,63}}")
    if args.algorithm not in algorithms():
        raise UsageError(f"unknown algorithm {args.algorithm!r}; one of {', '.join(algorithms())}")
    ctx.lifecycle.allow(args.name, "publish")
    with Steps(sys.stderr) as progress:
        mv, report = train_csv(ctx.repository, args.csv, args.target, args.name, args.algorithm,
                               ctx.settings.models.verify_tolerance, progress)
    print(report)
    state = ctx.lifecycle.serving_state(mv.name)
    serving = "serving" if state.get("version") == mv.version else \
        f"not serving (promote with: mlserve models promote {mv.name} {mv.version})"
    return ctx.changed(f"saved {mv.name} v{mv.version} ({mv.metadata['serving_runtime']}) to {mv.path}, {serving}")
