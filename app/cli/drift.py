"""mlserve models drift NAME (what a running server measures) and mlserve drift
report LOG.jsonl (the same statistic, offline, from a prediction log file):
a table in the terminal, and with --plot a PNG of the reference against the
current histogram of every feature."""
from __future__ import annotations

import json
from pathlib import Path

from app.cli.context import Context
from app.cli.errors import CommandError
from app.cli.output import table


def add_model_commands(models, add_url, positive_int) -> None:
    drift = models.add_parser("drift", help="data drift of a model on a running server: PSI per feature")
    drift.add_argument("name")
    drift.add_argument("--version", type=positive_int, help="a loaded version (default: the serving one)")
    add_options(drift)
    add_url(drift)
    drift.set_defaults(run=cmd_model_drift)


def add_commands(sub, positive_int) -> None:
    group = sub.add_parser("drift", help="data drift computed offline")
    verbs = group.add_subparsers()
    report = verbs.add_parser("report", help="PSI per feature from prediction log files (JSON Lines)")
    report.add_argument("logs", nargs="+", type=Path, metavar="LOG.jsonl")
    report.add_argument("--model", required=True)
    report.add_argument("--version", type=positive_int, help="default: the newest version in the log")
    add_options(report)
    report.set_defaults(run=cmd_report)


def add_options(parser) -> None:
    parser.add_argument("--plot", type=Path, metavar="FILE.png", help="draw reference and current histograms")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def cmd_model_drift(args, ctx: Context) -> int:
    with ctx.client(args.url, args.api_key) as client:
        found = client.drift(args.name, args.version)
    return show(found, args)


def cmd_report(args, ctx: Context) -> int:
    from app.drift import Thresholds, offline_report

    options = ctx.settings.drift
    records = list(read_records(args.logs))
    version = args.version or max((r["version"] for r in records if r.get("model") == args.model
                                   and r.get("status") == 200 and isinstance(r.get("version"), int)), default=None)
    if version is None:
        raise CommandError(f"no prediction of {args.model} in {', '.join(map(str, args.logs))}")
    metadata = ctx.repository.get(args.model, version).metadata
    rows = [r for r in records if r.get("model") == args.model and r.get("version") == version and r.get("status") == 200]
    limits = Thresholds(options.warn_threshold, options.drift_threshold, options.epsilon, options.min_rows)
    try:
        found = offline_report(metadata, [r["features"] for r in rows], [r["prediction"] for r in rows],
                               limits, options.baseline_rows)
    except ValueError as exc:
        raise CommandError(f"{args.model} v{version}: {exc}") from None
    return show({"model": args.model, "version": version, **found}, args)


def read_records(paths: list[Path]):
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                try:
                    record = json.loads(line)
                except ValueError:
                    raise CommandError(f"{path}:{number}: not a JSON record") from None
                if isinstance(record, dict):
                    yield record


def show(found: dict, args) -> int:
    if args.json:
        print(json.dumps(found, indent=2))
    else:
        print(render(found))
    if args.plot:
        plot(found, args.plot)
        print(f"wrote {args.plot}")
    return 0


def render(found: dict) -> str:
    """The terminal table of a drift report (the endpoint's JSON, or the offline one)."""
    head = f"{found['model']} v{found['version']}: {found['status']}"
    if found.get("enabled") is False:
        return head + " (drift.enabled is off on this server)"
    reference = found.get("reference") or {}
    if found["status"] == "collecting_baseline":
        return head + f" ({reference.get('collected', 0)} of {reference.get('rows')} baseline rows served so far)"
    window = found.get("window") or {}
    head += (f"\nreference: {reference.get('kind')}" + (f" ({reference['source']})" if reference.get("source") else "")
             + f", {reference.get('rows')} rows; window: {window.get('rows', 0)} rows")
    rows = [("FEATURE", "PSI", "STATUS", "ROWS")]
    for f in found["features"]:
        rows.append((f["feature"], number(f["psi"]), f["status"], str(f["rows"])))
    if found.get("prediction"):
        p = found["prediction"]
        rows.append(("(prediction)", number(p["psi"]), p["status"], str(p["rows"])))
    return head + "\n" + table(rows)


def number(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def bin_labels(entry: dict) -> list[str]:
    if "labels" in entry:
        return [str(label) for label in entry["labels"]]
    edges = [f"{e:g}" for e in entry["edges"]]
    if not edges:
        return ["all"]
    return [f"<={edges[0]}", *(f"{a}-{b}" for a, b in zip(edges, edges[1:])), f">{edges[-1]}"]


def plot(found: dict, path: Path) -> None:
    """Reference against current fractions per bin, one panel per feature (and the predictions)."""
    try:
        import matplotlib
    except ImportError:
        raise CommandError("--plot needs matplotlib: pip install 'mlserve[plot]'") from None
    matplotlib.use("Agg")
    from matplotlib import pyplot

    panels = [(f["feature"], f) for f in found["features"]]
    if found.get("prediction"):
        panels.append(("prediction", found["prediction"]))
    if not panels:
        raise CommandError("nothing to plot: no reference yet")
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    figure, axes = pyplot.subplots(rows, columns, figsize=(5.2 * columns, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (title, entry) in zip(axes.flat, panels):
        labels = bin_labels(entry)
        x = range(len(labels))
        ax.bar([i - 0.2 for i in x], entry["reference_fractions"], width=0.4, label="reference", color="#8da0cb")
        ax.bar([i + 0.2 for i in x], entry["current_fractions"], width=0.4, label="current", color="#fc8d62")
        ax.set_xticks(list(x), labels, rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{title}: PSI {number(entry['psi'])} ({entry['status']})", fontsize=10)
        ax.set_ylabel("fraction of rows", fontsize=8)
    axes.flat[0].legend(fontsize=8)
    figure.suptitle(f"{found['model']} v{found['version']}: {found['status']}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
