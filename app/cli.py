"""mlserve: the command line."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlserve", description="Real-time model serving.")
    sub = parser.add_subparsers()

    serve = sub.add_parser("serve", help="serve the models (Gunicorn, settings from config/server.yaml)")
    serve.set_defaults(run=cmd_serve)

    models = sub.add_parser("models", help="the model repository").add_subparsers()
    demo = models.add_parser("demo", help="train the demo models from bundled datasets (those missing)")
    demo.add_argument("--force", action="store_true", help="add a new version even where one exists")
    demo.set_defaults(run=cmd_demo)

    train = sub.add_parser("train", help="train a model from a CSV and add it to the repository")
    train.add_argument("csv", type=Path)
    train.add_argument("--target", help="the target column (not needed for clustering)")
    train.add_argument("--name", required=True, help="model name, [a-z0-9][a-z0-9_-]{0,63}")
    train.add_argument("--algorithm", default="random_forest")
    train.set_defaults(run=cmd_train)
    return parser


def repository():
    from app import settings
    from app.repository import ModelRepository

    return ModelRepository(settings.load().models.directory)


def cmd_serve(args) -> int:
    gunicorn = Path(sys.executable).with_name("gunicorn")
    os.execv(str(gunicorn), [str(gunicorn), "-c", "gunicorn.conf.py"])


def cmd_demo(args) -> int:
    from app.training import build_demo_models

    for mv in build_demo_models(repository(), only_missing=not args.force):
        print(f"built {mv.name} v{mv.version} ({mv.metadata['serving_runtime']}): {mv.path}")
    return 0


def cmd_train(args) -> int:
    from app.repository import is_valid_name
    from app.training import algorithms, train_csv

    if not is_valid_name(args.name):
        print(f"mlserve: bad model name {args.name!r}: use [a-z0-9][a-z0-9_-]{{0,63}}", file=sys.stderr)
        return 2
    if args.algorithm not in algorithms():
        print(f"mlserve: unknown algorithm {args.algorithm!r}; one of {', '.join(algorithms())}", file=sys.stderr)
        return 2
    mv, report = train_csv(repository(), args.csv, args.target, args.name, args.algorithm)
    print(report)
    print(f"saved {mv.name} v{mv.version} ({mv.metadata['serving_runtime']}) to {mv.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
