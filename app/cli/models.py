"""mlserve models ...: the repository (demo, publish, versions), its lifecycle
(promote, rollback, split, shadow), and what a running server has loaded
(list, info).

Lifecycle verbs change the repository through app.lifecycle (checked first),
then tell running servers (app/cli/servers.py).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from app.cli.context import Context
from app.cli.output import Steps, table
from app.cli.errors import UsageError

TASKS = ("classification", "regression", "clustering")


def add_commands(models, add_url) -> None:
    demo = models.add_parser("demo", help="train the demo models from bundled datasets (those missing)")
    demo.add_argument("--force", action="store_true", help="add a new version even where one exists")
    demo.set_defaults(run=cmd_demo)

    listing = models.add_parser("list", help="the models a running server has loaded")
    add_url(listing)
    listing.set_defaults(run=cmd_list)
    info = models.add_parser("info", help="one model as a running server describes it (JSON)")
    info.add_argument("name")
    add_url(info)
    info.set_defaults(run=cmd_info)

    publish = models.add_parser("publish", help="add an artifact (.onnx, .joblib, .pkl) as the next version")
    publish.add_argument("path", type=Path)
    publish.add_argument("--name", required=True)
    publish.add_argument("--features", help="comma-separated feature names (default: the current version's)")
    publish.add_argument("--task", choices=TASKS, help="for a bare .onnx (default: read from its outputs)")
    publish.add_argument("--classes", help="comma-separated class labels for a bare .onnx classifier")
    publish.add_argument("--reference", type=Path, metavar="DATA.csv",
                         help="rows like the training data (a header naming the features), the drift reference; "
                              "without it the version takes the first rows it serves")
    publish.add_argument("--promote", action="store_true", help="serve it at once")
    publish.add_argument("--reason", default="")
    publish.set_defaults(run=cmd_publish)

    promote = models.add_parser("promote", help="serve a version (the old one is kept for rollback)")
    promote.add_argument("name")
    promote.add_argument("version", type=int)
    promote.add_argument("--reason", default="")
    add_remote(promote, add_url)
    promote.set_defaults(run=cmd_promote)

    rollback = models.add_parser("rollback", help="serve the previously serving version again")
    rollback.add_argument("name")
    rollback.add_argument("--reason", default="")
    add_remote(rollback, add_url)
    rollback.set_defaults(run=cmd_rollback)

    versions = models.add_parser("versions", help="versions on disk and the serving history")
    versions.add_argument("name")
    versions.set_defaults(run=cmd_versions)

    split = models.add_parser("split", help="route traffic over versions: 1=90,2=10 (canary), or off")
    split.add_argument("name")
    split.add_argument("weights")
    split.add_argument("--reason", default="")
    add_remote(split, add_url)
    split.set_defaults(run=cmd_split)

    shadow = models.add_parser("shadow", help="mirror requests to a version off the response path, or off")
    shadow.add_argument("name")
    shadow.add_argument("version")
    shadow.add_argument("--reason", default="")
    add_remote(shadow, add_url)
    shadow.set_defaults(run=cmd_shadow)


def cmd_demo(args, ctx: Context) -> int:
    from app.training import build_demo_models

    for mv in build_demo_models(ctx.repository, only_missing=not args.force):
        print(f"built {mv.name} v{mv.version} ({mv.metadata['serving_runtime']}): {mv.path}")
    return 0


def cmd_list(args, ctx: Context) -> int:
    rows = [("NAME", "SERVING", "VERSIONS", "TASK", "RUNTIME")]
    with ctx.client(args.url) as client:
        for m in client.list_models():
            serving = m.get("serving_version")
            rows.append((m["name"], "-" if serving is None else str(serving),
                         ",".join(map(str, m.get("versions") or [])) or "-",
                         m.get("task") or "-", m.get("runtime") or "-"))
    print(table(rows))
    return 0


def cmd_info(args, ctx: Context) -> int:
    with ctx.client(args.url) as client:
        print(json.dumps(client.get_model_info(args.name), indent=2))
    return 0


def cmd_publish(args, ctx: Context) -> int:
    features = [f.strip() for f in args.features.split(",")] if args.features else None
    classes = [as_label(c) for c in args.classes.split(",")] if args.classes else None
    lifecycle = ctx.lifecycle
    with Steps(sys.stderr) as progress:
        mv = ctx.publisher.publish(args.path, args.name, features, args.task, classes, reason=args.reason,
                                   reference=args.reference, progress=progress)
    runtime = mv.metadata.get("serving_runtime")
    state = lifecycle.serving_state(args.name)
    if args.promote and state.get("version") != mv.version:
        lifecycle.promote(args.name, mv.version, reason=args.reason or "published with --promote")
        state = {"version": mv.version}
    serving = "serving" if state.get("version") == mv.version else \
        f"not serving (promote with: mlserve models promote {args.name} {mv.version})"
    return ctx.changed(f"published {mv.name} v{mv.version} ({runtime}), {serving}")


def add_remote(parser, add_url) -> None:
    add_url(parser, "the server to change, through its admin API (default: MLSERVE_URL; with neither, "
                    "the repository in models.directory, and running servers are told)")
    parser.add_argument("--api-key", help="an admin key or the server's admin token "
                                          "(default: MLSERVE_API_KEY, else server.admin_token)")


def cmd_promote(args, ctx: Context) -> int:
    with ctx.admin_client(args) as client:
        if client:
            answer = client.promote(args.name, args.version, args.reason)
            return remote_change(client, answer, f"{args.name}: serving v{answer['serving_version']} "
                                                 f"(previous v{answer['previous_version']})")
    state = ctx.lifecycle.promote(args.name, args.version, reason=args.reason)
    return ctx.changed(f"{args.name}: serving v{state['version']} (previous v{state['previous']})")


def cmd_rollback(args, ctx: Context) -> int:
    with ctx.admin_client(args) as client:
        if client:
            answer = client.rollback(args.name, args.reason)
            return remote_change(client, answer, f"{args.name}: rolled back to v{answer['serving_version']}")
    state = ctx.lifecycle.rollback(args.name, reason=args.reason)
    return ctx.changed(f"{args.name}: rolled back to v{state['version']}")


def cmd_split(args, ctx: Context) -> int:
    weights = None if args.weights == "off" else parse_split(args.weights)
    with ctx.admin_client(args) as client:
        if client:
            answer = client.split(args.name, weights, args.reason)
            return remote_change(client, answer, f"{args.name}: split {answer['split'] or 'off'}")
    state = ctx.lifecycle.split(args.name, weights, reason=args.reason)
    return ctx.changed(f"{args.name}: split {state['split'] or 'off'}")


def cmd_shadow(args, ctx: Context) -> int:
    if args.version != "off" and not args.version.isdigit():
        raise UsageError(f"expected a version number or off, got {args.version!r}")
    version = None if args.version == "off" else int(args.version)
    shown = "off" if version is None else f"v{version}"
    with ctx.admin_client(args) as client:
        if client:
            return remote_change(client, client.shadow(args.name, version, args.reason), f"{args.name}: shadow {shown}")
    ctx.lifecycle.shadow(args.name, version, reason=args.reason)
    return ctx.changed(f"{args.name}: shadow {shown}")


def remote_change(client, answer: dict, what: str) -> int:
    others = answer["swap"]["other_hosts_notified"]
    told = "no other host told (no Redis)" if others is None else f"{others} worker(s) of other hosts told"
    print(what)
    print(f"{client.base_url} is reloading; {told}")
    return 0


def cmd_versions(args, ctx: Context) -> int:
    lifecycle, repository = ctx.lifecycle, ctx.repository
    lifecycle.require_model(args.name)
    state = lifecycle.serving_state(args.name)
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
        raise UsageError(f"expected VERSION=WEIGHT,...; got {text!r}") from None


def as_label(text: str):
    text = text.strip()
    return int(text) if text.lstrip("-").isdigit() else text
