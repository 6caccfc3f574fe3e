"""mlserve: the command line."""
from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import os
import sys
from pathlib import Path
from typing import IO, Callable

from app import lifecycle_commands


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

    models = sub.add_parser("models", help="the model repository, and what a running server has loaded") \
        .add_subparsers()
    demo = models.add_parser("demo", help="train the demo models from bundled datasets (those missing)")
    demo.add_argument("--force", action="store_true", help="add a new version even where one exists")
    demo.set_defaults(run=cmd_demo)
    listing = models.add_parser("list", help="the models a running server has loaded")
    add_url(listing)
    listing.set_defaults(run=cmd_models_list)
    info = models.add_parser("info", help="one model as a running server describes it (JSON)")
    info.add_argument("name")
    add_url(info)
    info.set_defaults(run=cmd_models_info)

    lifecycle_commands.add_commands(models)

    predict = sub.add_parser("predict", help="one prediction from a running server; prints the response JSON")
    predict.add_argument("model")
    given = predict.add_mutually_exclusive_group(required=True)
    given.add_argument("--features", help="comma-separated numbers in the model's feature order, "
                                          "e.g. 5.1,3.5,1.4,0.2 (write --features=-1,2 when the first is negative)")
    given.add_argument("--json", dest="features_json", metavar="JSON",
                       help="the features as JSON: a list, or an object keyed by feature name")
    predict.add_argument("--version", type=positive_int, help="a loaded version (default: the serving one)")
    predict.add_argument("--no-cache", dest="use_cache", action="store_false", help="do not answer from the cache")
    add_url(predict)
    predict.set_defaults(run=cmd_predict)

    batch = sub.add_parser("batch", help="predict every row of a CSV through a running server; "
                                         "writes the rows with prediction (and p_<class>) columns")
    batch.add_argument("model")
    batch.add_argument("input", type=Path, help="CSV of feature rows")
    batch.add_argument("output", type=Path, help="CSV to write (replaced only once every row is predicted)")
    batch.add_argument("--chunk-size", type=positive_int, default=500, help="rows per request (default 500)")
    batch.add_argument("--no-header", dest="header", action="store_false",
                       help="the input has no header row: columns are the model's features, in its order")
    batch.add_argument("--version", type=positive_int, help="a loaded version (default: the serving one)")
    add_url(batch)
    batch.set_defaults(run=cmd_batch)

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


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def add_url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="the server (default: http://HOST:PORT of server.host and server.port "
                                      "in the settings, http://127.0.0.1:8080 unless changed)")


def default_url() -> str:
    """Where `mlserve serve` listens with the current settings."""
    from app import settings

    s = settings.load()
    host, port = s.server.host, s.server.port
    # A wildcard bind is reached through loopback; IPv6 literals need brackets in a URL.
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{s.bind}"


def fail(message: str, status: int = 1) -> int:
    print(f"mlserve: {message}", file=sys.stderr)
    return status


def remote(cmd: Callable) -> Callable:
    """A command that talks to a running server: it gets a client, and every client
    error becomes one line on stderr and exit status 1."""

    @functools.wraps(cmd)
    def run(args) -> int:
        from app.client import MLClient, MLServeError
        from app.settings import SettingError

        try:
            url = args.url or default_url()
        except SettingError as exc:
            return fail(f"bad setting: {exc}")
        try:
            client = MLClient(url)
        except ValueError as exc:
            return fail(f"--url: {exc}", 2)
        try:
            with client:
                return cmd(args, client)
        except MLServeError as exc:
            return fail(f"{exc.code}: {exc.message}")

    return run


@remote
def cmd_models_list(args, client) -> int:
    rows = [("NAME", "SERVING", "VERSIONS", "TASK", "RUNTIME")]
    for m in client.list_models():
        serving = m.get("serving_version")
        rows.append((m["name"], "-" if serving is None else str(serving),
                     ",".join(map(str, m.get("versions") or [])) or "-",
                     m.get("task") or "-", m.get("runtime") or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


@remote
def cmd_models_info(args, client) -> int:
    print(json.dumps(client.get_model_info(args.name), indent=2))
    return 0


@remote
def cmd_predict(args, client) -> int:
    if args.features_json is not None:
        try:
            features = json.loads(args.features_json)
        except json.JSONDecodeError as exc:
            return fail(f"--json: not valid JSON ({exc})", 2)
    else:
        try:
            features = [float(v) for v in args.features.split(",")]
        except ValueError:
            return fail(f"--features: expected comma-separated numbers, got {args.features!r}", 2)
    result = client.predict(args.model, features, use_cache=args.use_cache, version=args.version)
    print(json.dumps(result, indent=2))
    return 0


class BadInput(Exception):
    """The input CSV cannot be sent as it is; the message names the line and column."""


@remote
def cmd_batch(args, client) -> int:
    info = client.get_model_info(args.model)
    if "features" not in info:
        return fail(f"model_not_ready: {args.model} is loaded but not serving")
    version = args.version or info["version"]
    partial = args.output.with_name(args.output.name + ".part")
    try:
        total = count_rows(args.input, args.header)
        with open(args.input, newline="", encoding="utf-8-sig") as source, \
                open(partial, "w", newline="", encoding="utf-8") as target:
            done = predict_csv(client, args, info, version, source, target, total)
        os.replace(partial, args.output)
    except (OSError, UnicodeDecodeError, csv.Error, BadInput) as exc:
        return fail(describe_input_error(exc, args.input))
    finally:
        partial.unlink(missing_ok=True)
    print(f"wrote {done} predictions to {args.output} ({args.model} v{version})")
    return 0


def predict_csv(client, args, info: dict, version: int, source: IO[str], target: IO[str], total: int) -> int:
    """Stream source to target chunk by chunk. Every chunk names the same version, so
    a model swapped on the server mid-run cannot mix two models in one file."""
    from app.client import MLServeError

    features = info["features"]
    reader = csv.reader(source)
    writer = csv.writer(target)
    header, columns = read_header(reader, features, args.input) if args.header else (list(features), None)
    # The class columns come from the first answer: a classifier may have no probabilities.
    classes: list | None = None
    wrote_header = False
    progress = Progress(total, sys.stderr)
    done = 0
    try:
        for chunk in chunks(rows_of(reader, columns, features, len(header), args.input), args.chunk_size):
            try:
                result = client.batch_predict(args.model, [values for _, values in chunk], version=version)
            except MLServeError as exc:
                # The server numbers rows within one request; say which rows of the file they were.
                exc.message = f"{exc.message} (data rows {done + 1}-{done + len(chunk)} of {args.input})"
                raise
            if not wrote_header:
                classes = result["classes"] if result.get("probabilities") is not None else None
                writer.writerow(header + ["prediction"] + [f"p_{c}" for c in classes or []])
                wrote_header = True
            probabilities = result["probabilities"] if classes is not None else None
            for i, (raw, _) in enumerate(chunk):
                writer.writerow(raw + [result["predictions"][i]] + (probabilities[i] if probabilities else []))
            done += len(chunk)
            progress.update(done)
    finally:
        progress.close()
    if not wrote_header:
        classes = info.get("classes") if info.get("task") == "classification" else None
        writer.writerow(header + ["prediction"] + [f"p_{c}" for c in classes or []])
    return done


def read_header(reader, features: list[str], path: Path) -> tuple[list[str], list[int]]:
    """The header row, and the index of each of the model's features in it."""
    header = next(reader, None)
    if header is None:
        raise BadInput(f"{path}: empty file; expected a header row naming the features")
    found: dict[str, int] = {}
    for i, name in enumerate(h.strip() for h in header):
        if name in features and name in found:
            raise BadInput(f"{path}: column {name!r} appears twice in the header")
        found.setdefault(name, i)
    missing = [f for f in features if f not in found]
    if missing:
        hint = "; the first row looks like data: use --no-header" if all(map(is_number, header)) else ""
        named = "any feature" if len(missing) == len(features) else ", ".join(missing)
        raise BadInput(f"{path}: no column for {named}; the model expects {', '.join(features)}{hint}")
    return header, [found[f] for f in features]


def rows_of(reader, columns: list[int] | None, features: list[str], width: int, path: Path):
    """(raw cells padded to the header's width, feature values in the model's order)
    for each non-blank row; short rows are padded so prediction stays in its column."""
    n = len(features)
    for raw in reader:
        if not any(cell.strip() for cell in raw):
            continue
        if columns is None and len(raw) != n:
            raise BadInput(f"{path} line {reader.line_num}: {len(raw)} values; the model expects {n} "
                           f"({', '.join(features)})")
        if columns is not None and (len(raw) > width or len(raw) <= max(columns)):
            raise BadInput(f"{path} line {reader.line_num}: {len(raw)} values; the header names {width}")
        raw += [""] * (width - len(raw))
        cells = raw if columns is None else [raw[i] for i in columns]
        values = [float(cell) if is_number(cell) else math.nan for cell in cells]
        for name, cell, value in zip(features, cells, values):
            if not math.isfinite(value):
                raise BadInput(f"{path} line {reader.line_num}, {name}: {cell!r} is not a finite number")
        yield raw, values


def chunks(items, size: int):
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def count_rows(path: Path, header: bool) -> int:
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = sum(1 for row in csv.reader(f) if row and any(cell.strip() for cell in row))
    return max(0, rows - 1) if header else rows


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def describe_input_error(exc: Exception, path: Path) -> str:
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or exc}"
    if isinstance(exc, UnicodeDecodeError):
        return f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})"
    if isinstance(exc, csv.Error):
        return f"{path}: not readable as CSV ({exc})"
    return str(exc)


class Progress:
    """A one-line progress bar, drawn only when the stream is a terminal."""

    def __init__(self, total: int, stream: IO[str], width: int = 30):
        self.total = total
        self.stream = stream
        self.width = width
        self.shown = stream.isatty()
        self.closed = False

    def update(self, done: int) -> None:
        if not self.shown:
            return
        fraction = done / self.total if self.total else 1.0
        filled = int(self.width * min(fraction, 1.0))
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r[{bar}] {done}/{self.total} rows ({fraction:.0%})")
        self.stream.flush()

    def close(self) -> None:
        if self.shown and not self.closed:
            self.stream.write("\n")
            self.stream.flush()
        self.closed = True


if __name__ == "__main__":
    sys.exit(main())
