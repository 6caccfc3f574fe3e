"""mlserve: the operator's command line. One module per group of verbs;
main() is the one error boundary: a user mistake is one line on stderr and
exit status 1 (2 for a command line that cannot be run as written), never
a traceback."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from app.cli import drift, keys, models, predict, train
from app.cli.context import Context
from app.cli.errors import CommandError
from app.client import MLServeError
from app.logs import quiet_library_warnings
from app.errors import ServingError
from app.settings import SettingError


def main(argv: list[str] | None = None, ctx: Context | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    quiet_library_warnings()
    try:
        return args.run(args, ctx or Context()) or 0
    except KeyboardInterrupt:
        return 130
    except (ServingError, MLServeError) as exc:
        return fail(f"{exc.code}: {exc.message}")
    except SettingError as exc:
        return fail(f"bad setting: {exc}")
    except CommandError as exc:
        return fail(str(exc), exc.status)
    except OSError as exc:
        if exc.filename is None:
            raise
        return fail(f"{exc.filename}: {exc.strerror or exc}")
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] == "app":
            raise
        return fail(f"this command needs the server install (pip install 'mlserve[server]'): {exc}")


def fail(message: str, status: int = 1) -> int:
    print(f"mlserve: {message}", file=sys.stderr)
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlserve", description="Real-time model serving.")
    sub = parser.add_subparsers()

    serve = sub.add_parser("serve", help="serve the models (Gunicorn, settings from config/server.yaml)")
    serve.set_defaults(run=cmd_serve)

    group = sub.add_parser("models", help="the model repository, and what a running server has loaded")
    verbs = group.add_subparsers()
    models.add_commands(verbs, add_url)
    drift.add_model_commands(verbs, add_url, positive_int)
    drift.add_commands(sub, positive_int)
    predict.add_commands(sub, add_url, positive_int)
    keys.add_commands(sub, add_url)
    train.add_commands(sub)
    return parser


def cmd_serve(args, ctx: Context) -> int:
    gunicorn = Path(sys.executable).with_name("gunicorn")
    os.execv(str(gunicorn), [str(gunicorn), "-c", "gunicorn.conf.py"])


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def add_url(parser: argparse.ArgumentParser, help: str | None = None, key_help: str | None = None) -> None:
    parser.add_argument("--url", help=help or "the server (default: MLSERVE_URL, else http://HOST:PORT of "
                                              "server.host and server.port, http://127.0.0.1:8080 unless changed)")
    parser.add_argument("--api-key", help=key_help or "the API key to send, when the server requires keys "
                                                      "(default: MLSERVE_API_KEY)")


if __name__ == "__main__":
    sys.exit(main())
