"""mlserve predict and mlserve batch: predictions from a running server,
for one row given on the command line or every row of a CSV file."""
from __future__ import annotations

import csv
import json
import math
import os
import sys
from pathlib import Path
from typing import IO

from app import columns
from app.cli.context import Context
from app.cli.output import Progress
from app.cli.errors import CommandError, UsageError
from app.client import MLServeError


def add_commands(sub, add_url, positive_int) -> None:
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


def cmd_predict(args, ctx: Context) -> int:
    if args.features_json is not None:
        try:
            features = json.loads(args.features_json)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--json: not valid JSON ({exc})") from None
    else:
        try:
            features = [float(v) for v in args.features.split(",")]
        except ValueError:
            raise UsageError(f"--features: expected comma-separated numbers, got {args.features!r}") from None
    with ctx.client(args.url, args.api_key) as client:
        result = client.predict(args.model, features, use_cache=args.use_cache, version=args.version)
    print(json.dumps(result, indent=2))
    return 0


class BadInput(CommandError):
    """The input CSV cannot be sent as it is; the message names the line and column."""


def cmd_batch(args, ctx: Context) -> int:
    with ctx.client(args.url, args.api_key) as client:
        return batch(args, client)


def batch(args, client) -> int:
    info = client.get_model_info(args.model)
    if "features" not in info:
        raise BadInput(f"model_not_ready: {args.model} is loaded but not serving")
    version = args.version or info["version"]
    partial = args.output.with_name(args.output.name + ".part")
    try:
        total = count_rows(args.input, args.header)
        with open(args.input, newline="", encoding="utf-8-sig") as source, \
                open(partial, "w", newline="", encoding="utf-8") as target:
            done = predict_csv(client, args, info, version, source, target, total)
        os.replace(partial, args.output)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise BadInput(describe_input_error(exc, args.input)) from None
    finally:
        partial.unlink(missing_ok=True)
    print(f"wrote {done} predictions to {args.output} ({args.model} v{version})")
    return 0


def predict_csv(client, args, info: dict, version: int, source: IO[str], target: IO[str], total: int) -> int:
    """Stream source to target chunk by chunk. Every chunk names the same version, so
    a model swapped on the server mid-run cannot mix two models in one file."""
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
    for name in features:
        if [h.strip() for h in header].count(name) > 1:
            raise BadInput(f"{path}: column {name!r} appears twice in the header")
    found, missing = columns.find(header, features)
    if missing:
        hint = "; the first row looks like data: use --no-header" if all(map(is_number, header)) else ""
        named = "any feature" if len(missing) == len(features) else ", ".join(missing)
        raise BadInput(f"{path}: no column for {named}; the model expects {', '.join(features)}; "
                       f"the file has {', '.join(h.strip() for h in header) or 'no columns'}{hint}")
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
