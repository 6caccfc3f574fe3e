"""mlserve models publish | promote | rollback | versions | split | shadow.

Each changes the repository through app.lifecycle (checked first), then tells
running servers: a Redis message when Redis is configured, else SIGHUP to the
master named in the pid file.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_commands(models) -> None:
    publish = models.add_parser("publish", help="add an artifact (.onnx, .joblib, .pkl) as the next version")
    publish.add_argument("path", type=Path)
    publish.add_argument("--name", required=True)
    publish.add_argument("--features", help="comma-separated feature names (default: the current version's)")
    publish.add_argument("--task", choices=("classification", "regression", "clustering"),
                         help="for a bare .onnx (default: read from its outputs)")
    publish.add_argument("--classes", help="comma-separated class labels for a bare .onnx classifier")
    publish.add_argument("--promote", action="store_true", help="serve it at once")
    publish.add_argument("--reason", default="")
    publish.set_defaults(run=cmd_publish)

    promote = models.add_parser("promote", help="serve a version (the old one is kept for rollback)")
    promote.add_argument("name")
    promote.add_argument("version", type=int)
    promote.add_argument("--reason", default="")
    promote.set_defaults(run=cmd_promote)

    rollback = models.add_parser("rollback", help="serve the previously serving version again")
    rollback.add_argument("name")
    rollback.add_argument("--reason", default="")
    rollback.set_defaults(run=cmd_rollback)

    versions = models.add_parser("versions", help="versions on disk and the serving history")
    versions.add_argument("name")
    versions.set_defaults(run=cmd_versions)

    split = models.add_parser("split", help="route traffic over versions: 1=90,2=10 (canary), or off")
    split.add_argument("name")
    split.add_argument("weights")
    split.add_argument("--reason", default="")
    split.set_defaults(run=cmd_split)

    shadow = models.add_parser("shadow", help="mirror requests to a version off the response path, or off")
    shadow.add_argument("name")
    shadow.add_argument("version")
    shadow.add_argument("--reason", default="")
    shadow.set_defaults(run=cmd_shadow)


def context():
    from app import settings as settings_module
    from app.lifecycle import Lifecycle
    from app.repository import ModelRepository

    settings = settings_module.load()
    return settings, Lifecycle(ModelRepository(settings.models.directory), settings.models.verify_tolerance)


def allow(settings, lifecycle, name: str, action: str) -> None:
    """Refuse, as the admin API does, to change what config/models.yaml pins."""
    from app.registry import ModelPlan, read_model_config

    plans = read_model_config(Path(settings.models.config), lifecycle.repository)
    plans.get(name, ModelPlan()).allow(name, action)


def changed(settings, what: str) -> int:
    from app.swap import notify_servers

    print(what)
    print(notify_servers(settings.redis.url, Path(settings.pid_path), what))
    return 0


def guarded(cmd):
    """Refusals print one line and exit 1."""
    def run(args) -> int:
        from app.errors import ServingError

        try:
            return cmd(args, *context())
        except ServingError as exc:
            print(f"mlserve: {exc.code}: {exc.message}", file=sys.stderr)
            return 1
        except (ValueError, argparse.ArgumentTypeError) as exc:
            print(f"mlserve: {exc}", file=sys.stderr)
            return 2
    return run


@guarded
def cmd_publish(args, settings, lifecycle) -> int:
    features = [f.strip() for f in args.features.split(",")] if args.features else None
    classes = [as_label(c) for c in args.classes.split(",")] if args.classes else None
    mv = lifecycle.publish(args.path, args.name, features, args.task, classes, reason=args.reason)
    runtime = mv.metadata.get("serving_runtime")
    state = lifecycle.repository.serving_state(args.name) or {}
    if args.promote and state.get("version") != mv.version:
        allow(settings, lifecycle, args.name, "promote")
        lifecycle.promote(args.name, mv.version, reason=args.reason or "published with --promote")
        state = {"version": mv.version}
    serving = "serving" if state.get("version") == mv.version else f"not serving (promote with: mlserve models promote {args.name} {mv.version})"
    return changed(settings, f"published {mv.name} v{mv.version} ({runtime}), {serving}")


@guarded
def cmd_promote(args, settings, lifecycle) -> int:
    allow(settings, lifecycle, args.name, "promote")
    state = lifecycle.promote(args.name, args.version, reason=args.reason)
    return changed(settings, f"{args.name}: serving v{state['version']} (previous v{state['previous']})")


@guarded
def cmd_rollback(args, settings, lifecycle) -> int:
    allow(settings, lifecycle, args.name, "rollback")
    state = lifecycle.rollback(args.name, reason=args.reason)
    return changed(settings, f"{args.name}: rolled back to v{state['version']}")


@guarded
def cmd_split(args, settings, lifecycle) -> int:
    allow(settings, lifecycle, args.name, "split")
    weights = None if args.weights == "off" else parse_split(args.weights)
    state = lifecycle.split(args.name, weights, reason=args.reason)
    return changed(settings, f"{args.name}: split {state['split'] or 'off'}")


@guarded
def cmd_shadow(args, settings, lifecycle) -> int:
    allow(settings, lifecycle, args.name, "shadow")
    if args.version != "off" and not args.version.isdigit():
        raise ValueError(f"expected a version number or off, got {args.version!r}")
    version = None if args.version == "off" else int(args.version)
    lifecycle.shadow(args.name, version, reason=args.reason)
    return changed(settings, f"{args.name}: shadow {'off' if version is None else f'v{version}'}")


@guarded
def cmd_versions(args, settings, lifecycle) -> int:
    repository = lifecycle.repository
    state = repository.serving_state(args.name) or {}
    for version in repository.versions(args.name):
        meta = repository.get(args.name, version).metadata
        mark = "*" if version == state.get("version") else " "
        print(f"{mark} v{version:<4} {meta.get('created', '-'):<26} {meta.get('serving_runtime', '-'):<8} "
              f"{meta.get('algorithm') or meta.get('source_format', '-')}")
    print("history:")
    for entry in state.get("history", []):
        print(f"  {entry['at']}  {entry['action']:<9} v{entry['version'] if entry['version'] else '-':<4} "
              f"by {entry['by']}" + (f"  ({entry['reason']})" if entry.get("reason") else ""))
    return 0


def parse_split(text: str) -> dict:
    try:
        return {int(v): float(w) for v, w in (part.split("=", 1) for part in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected VERSION=WEIGHT,...; got {text!r}") from None


def as_label(text: str):
    text = text.strip()
    return int(text) if text.lstrip("-").isdigit() else text
