"""mlserve models ...: the repository (demo, publish, versions), its lifecycle
(promote, rollback, split, shadow), and what a running server has loaded
(list, info).

Lifecycle verbs change the repository through app.lifecycle (checked first),
then tell running servers (app/cli/servers.py).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from app.cli.context import Context
from app.cli.output import Steps, table
from app.cli.errors import UsageError
from app.errors import ModelRefused

TASKS = ("classification", "regression", "clustering")
FRAMEWORKS = ("torch", "tensorflow")
OUTPUTS = ("logits", "probabilities", "values")


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

    publish = models.add_parser("publish", help="add a model as the next version: a file (.onnx, .skops, .joblib, "
                                                ".pkl, .pt, .keras), an MLflow model or SavedModel directory, "
                                                "or models:/NAME/VERSION or models:/NAME@ALIAS")
    publish.add_argument("source", help="the artifact, directory or MLflow registry URI")
    publish.add_argument("--name", help="the model here (required but for models:/ URIs, which default to their MLflow name)")
    publish.add_argument("--features", help="comma-separated feature names (default: the MLflow signature's, "
                                            "else the current version's)")
    publish.add_argument("--task", choices=TASKS, help="for a bare .onnx (default: read from its outputs)")
    publish.add_argument("--classes", help="comma-separated class labels for an ONNX, PyTorch or TensorFlow classifier")
    publish.add_argument("--trust", help="comma-separated types a .skops file may hold beyond skops' defaults "
                                         "(scikit-learn, numpy and scipy types only), e.g. sklearn.tree._tree.Tree")
    publish.add_argument("--framework", choices=FRAMEWORKS, help="export a PyTorch (.pt) or TensorFlow (.keras, "
                                                                 "SavedModel) model to ONNX (default: by its name)")
    publish.add_argument("--reference", type=Path, metavar="DATA.csv",
                         help="rows like the training data (a header naming the features), the drift reference; "
                              "without it the version takes the first rows it serves")
    publish.add_argument("--input-width", type=width, help="features the PyTorch model takes")
    publish.add_argument("--output", choices=OUTPUTS, help="what a PyTorch or TensorFlow model returns: logits "
                                                           "(softmax gives probabilities, argmax labels), "
                                                           "probabilities, or values (regression; the default)")
    publish.add_argument("--promote", action="store_true", help="serve it at once")
    publish.add_argument("--reason", default="")
    add_remote(publish, add_url)
    publish.set_defaults(run=cmd_publish)

    follow = models.add_parser("follow", help="track an MLflow alias: when it moves, publish and promote the "
                                              "version it names (checked first)")
    follow.add_argument("alias", help="NAME@ALIAS or models:/NAME@ALIAS")
    follow.add_argument("--name", help="the model here (default: the MLflow name)")
    follow.add_argument("--reason", default="")
    follow.set_defaults(run=cmd_follow)
    unfollow = models.add_parser("unfollow", help="stop tracking the MLflow alias a model follows")
    unfollow.add_argument("name")
    unfollow.add_argument("--reason", default="")
    unfollow.set_defaults(run=cmd_unfollow)

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
    with ctx.client(args.url, args.api_key) as client:
        for m in client.list_models():
            serving = m.get("serving_version")
            rows.append((m["name"], "-" if serving is None else str(serving),
                         ",".join(map(str, m.get("versions") or [])) or "-",
                         m.get("task") or "-", m.get("runtime") or "-"))
    print(table(rows))
    return 0


def cmd_info(args, ctx: Context) -> int:
    with ctx.client(args.url, args.api_key) as client:
        print(json.dumps(client.get_model_info(args.name), indent=2))
    return 0


def cmd_publish(args, ctx: Context) -> int:
    from app.cli import sources

    features = [f.strip() for f in args.features.split(",")] if args.features else None
    classes = [as_label(c) for c in args.classes.split(",")] if args.classes else None
    if args.url or ctx.settings.cli.url:  # through that server's admin API (an ONNX or skops upload)
        answer = sources.publish_there(args, ctx, features, classes)
        serving = "serving" if answer.get("serving_version") == answer["version"] else \
            f"not serving (serving v{answer.get('serving_version')})"
        told = (answer.get("swap") or {}).get("other_hosts_notified")
        others = "no Redis: other hosts not told" if told is None else f"{told} worker(s) told through Redis"
        print(f"published {answer['model']} v{answer['version']} ({answer.get('runtime')}) on "
              f"{args.url or ctx.settings.cli.url}, {serving}; "
              f"that host is reloading ({others})")
        return 0
    lifecycle = ctx.lifecycle
    with Steps(sys.stderr) as progress:
        mv = sources.publish_here(args, ctx, features, classes, progress)
    name = mv.name
    runtime = mv.metadata.get("serving_runtime")
    state = lifecycle.serving_state(name)
    if args.promote and state.get("version") != mv.version:
        lifecycle.promote(name, mv.version, reason=args.reason or "published with --promote")
        state = {"version": mv.version}
    serving = "serving" if state.get("version") == mv.version else \
        f"not serving (promote with: mlserve models promote {name} {mv.version})"
    return ctx.changed(f"published {mv.name} v{mv.version} ({runtime}), {serving}")


def add_remote(parser, add_url) -> None:
    add_url(parser, "the server to change, through its admin API (default: MLSERVE_URL; with neither, "
                    "the repository in models.directory, and running servers are told)",
            "an admin key or the server's admin token (default: MLSERVE_API_KEY, else server.admin_token)")


def cmd_follow(args, ctx: Context) -> int:
    from app.alias_follower import AliasFollower, Follow
    from app.cli.sources import DownloadBar, registry
    from app.mlflow_models import local_name, parse_model_uri

    ref = parse_model_uri(args.alias)
    if ref.alias is None:
        raise UsageError(f"{args.alias!r} names a version; follow takes an alias: NAME@ALIAS")
    name = local_name(ref, args.name)
    ctx.lifecycle.allow(name, "follow")
    mlflow = registry(ctx)
    follower = AliasFollower(ctx.publisher, ctx.lifecycle, lambda: mlflow, by="")
    # The first check happens here, so a mistake (no such alias, a model that
    # fails its checks) is told now; the server's follower takes over from this.
    outcome = follower.check(Follow(name, ref), DownloadBar())
    if outcome.result == "failed":
        raise ModelRefused(f"{ref}: {outcome.detail}")
    interval = ctx.settings.mlflow.follow_interval
    every = f"checked every {interval:g} s by the server" if interval else "not checked: mlflow.follow_interval is 0"
    ctx.changed(f"{name} follows {ref} ({every}): {outcome.detail}")
    return 1 if outcome.result == "refused" else 0


def cmd_unfollow(args, ctx: Context) -> int:
    from app.alias_follower import AliasFollower

    AliasFollower(ctx.publisher, ctx.lifecycle, lambda: None, by="").stop_following(args.name, reason=args.reason)
    return ctx.changed(f"{args.name} follows no MLflow alias")


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


def width(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a number of features >= 1, got {text!r}")
    return int(text)


def as_label(text: str):
    text = text.strip()
    return int(text) if text.lstrip("-").isdigit() else text
