"""The README, run as a reader would run it: every ```sh and ```python block,
in order, against a real server started as "A first session" says
(`MLSERVE_SERVER_ADMIN_TOKEN=secret make serve`, here on a free port and a
copy of the demo models), each output checked against the answer shown in the
block below it.

Indented blocks are not run: `make serve` and `make test` (this suite is
`make test`, and the server below is what `make serve` starts), syntax
synopses, and the deployment commands that need Docker or Kubernetes (the
files they use are checked by tests/test_image.py and tests/test_deploy_config.py).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

import pytest

from tests.server import ROOT, Server
from tests.wait import until

BLOCK = re.compile(r"^```(\w*)\n(.*?)^```$", re.M | re.S)
RUN = ("sh", "python")
SHOWN = ("json", "text", "")
# Fields whose values differ from run to run, or from worker to worker.
VARIABLE = {"timestamp", "latency_ms", "total_latency_ms", "uptime_seconds", "created", "sha256", "from_cache",
            "cache_hits", "row_cost_ms", "batch_of_8_ms"}
MASKS = [(re.compile(r"\d{4}-\d\d-\d\dT[\d:.]+Z"), "<time>"), (re.compile(r"pid \d+"), "pid <n>"),
         (re.compile(r"by [\w.-]+@[\w.-]+"), "by <user>")]
# What a command prints when it made the server swap its workers: the next command waits for the new ones.
SWAPPED = re.compile(r'sent SIGHUP to the master|"this_host":"reloading"')


@dataclass
class Example:
    language: str
    code: str
    shown_language: str | None
    shown: str | None
    line: int

    def __str__(self) -> str:
        return f"README.md line {self.line}:\n{self.code}"


def examples(text: str) -> list[Example]:
    """The runnable blocks, each with the answer shown in the fenced block right after it, if any."""
    found: list[Example] = []
    previous = None
    for match in BLOCK.finditer(text):
        language, body = match.group(1), match.group(2)
        line = text.count("\n", 0, match.start()) + 1
        if language in RUN:
            found.append(Example(language, body, None, None, line))
        elif language in SHOWN and previous in RUN:
            found[-1].shown_language, found[-1].shown = language or "text", body
        previous = language
    return found


def documents(text: str) -> list:
    """The JSON documents in text, one after another (curl prints no newline after a body)."""
    decoder, found, at = json.JSONDecoder(), [], 0
    while at < len(text):
        if text[at].isspace():
            at += 1
            continue
        document, at = decoder.raw_decode(text, at)
        found.append(document)
    return found


def is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def masked(line: str) -> str:
    for pattern, mask in MASKS:
        line = pattern.sub(mask, line)
    return line.rstrip()


def compare_json(shown, got, where: str = "") -> None:
    if isinstance(shown, dict):
        assert isinstance(got, dict) and set(got) == set(shown), f"{where}: keys {sorted(got)} != {sorted(shown)}"
        for key, value in shown.items():
            if key not in VARIABLE:
                compare_json(value, got[key], f"{where}.{key}")
    elif isinstance(shown, list):
        assert isinstance(got, list) and len(got) == len(shown), f"{where}: {got!r} != {shown!r}"
        for i, (a, b) in enumerate(zip(shown, got)):
            compare_json(a, b, f"{where}[{i}]")
    elif isinstance(shown, float) and not isinstance(got, bool):
        assert isinstance(got, (int, float)) and math.isclose(shown, got, rel_tol=1e-3, abs_tol=1e-6), \
            f"{where}: {got!r} != {shown!r}"
    else:
        assert got == shown and type(got) is type(shown), f"{where}: {got!r} != {shown!r}"


def compare_lines(shown: str, got: str) -> None:
    expected = shown.rstrip("\n").split("\n")
    actual = re.sub(r"\}(?=[{A-Za-z])", "}\n", got).rstrip("\n").split("\n")  # a body then more output
    for i, line in enumerate(expected):
        if line == "…":
            return
        assert i < len(actual), f"missing line {i + 1}: {line!r}\ngot:\n{got}"
        if line.startswith("{") and is_json(line):
            compare_json(json.loads(line), json.loads(actual[i]), f"line {i + 1}")
        else:
            assert masked(actual[i]) == masked(line), f"line {i + 1}:\n  got  {actual[i]!r}\n  want {line!r}"
    assert len(actual) == len(expected), f"extra lines: {actual[len(expected):]}"


@pytest.fixture(scope="module")
def reader(demo_models, tmp_path_factory):
    """(working directory, environment, server) of a reader in a checkout."""
    work = tmp_path_factory.mktemp("reader")
    shutil.copytree(demo_models, work / "models")
    (work / ".venv").symlink_to(ROOT / ".venv")
    with Server(work / "models", workers=2, env={"MLSERVE_SERVER_ADMIN_TOKEN": "secret"}) as server:
        # The reader's own shell: the server's settings, the repository as the README names it.
        env = {**os.environ, **server.env, "MLSERVE_MODELS_DIR": "models"}
        yield work, env, server


@pytest.mark.server
def test_every_example_in_the_readme_runs_and_answers_as_shown(reader):
    work, env, server = reader
    found = examples((ROOT / "README.md").read_text())
    assert len(found) >= 15  # the first session and the admin API at least
    for example in found:
        code = re.sub(r"(localhost|127\.0\.0\.1):8080", f"127.0.0.1:{server.port}", example.code)
        command = ["bash", "-e", "-o", "pipefail", "-c", code] if example.language == "sh" else \
            [str(work / ".venv" / "bin" / "python"), "-c", code]
        before = set(server.worker_pids())
        done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{example}\nexit {done.returncode}\n{done.stdout}\n{done.stderr}"
        if example.shown_language == "json":
            try:
                got = documents(done.stdout)
            except json.JSONDecodeError:
                raise AssertionError(f"{example}\nprinted what is not JSON:\n{done.stdout}") from None
            shown = [json.loads(line) for line in example.shown.splitlines() if line.strip()]
            assert len(got) == len(shown), f"{example}\ngot:\n{done.stdout}"
            for a, b in zip(shown, got):
                compare_json(a, b, str(example))
        elif example.shown_language == "text":
            try:
                compare_lines(example.shown, done.stdout)
            except AssertionError as exc:
                raise AssertionError(f"{example}\n{exc}\ngot:\n{done.stdout}") from None
        if SWAPPED.search(done.stdout):
            until(lambda old=before: len(server.worker_pids()) == 2 and not old & set(server.worker_pids()),
                  what=f"the swap after {example}")
