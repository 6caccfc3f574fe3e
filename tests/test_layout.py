"""What runs where, checked from the imports: the core (app/*.py) is free of
Falcon and Gunicorn, so it is testable alone and every protocol is a thin
layer over it; the client ships on its own."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parent.parent / "app"
CORE = sorted(p.stem for p in APP.glob("*.py") if p.stem not in ("__init__", "client"))
WEB = {"falcon", "gunicorn", "meinheld"}


def module_path(module: str) -> Path:
    parts = module.split(".")[1:]
    path = APP.joinpath(*parts)
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imports(module: str) -> set[str]:
    """Every module `module` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(module_path(module).read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            if node.module == "app" or node.module.startswith("app."):
                base = node.module
                found.update(f"{base}.{a.name}" for a in node.names if module_path(f"{base}.{a.name}").exists())
    return found


def closure(module: str) -> tuple[set[str], set[str]]:
    """(app modules reached from module, third-party top-level packages they import)."""
    seen, external, todo = set(), set(), [module]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for name in imports(current):
            if name == "app" or name.startswith("app."):
                if module_path(name).exists():
                    todo.append(name)
            else:
                external.add(name.split(".")[0])
    return seen, external


@pytest.mark.parametrize("name", CORE)
def test_core_modules_import_neither_falcon_nor_gunicorn(name):
    reached, external = closure(f"app.{name}")
    assert not external & WEB, f"app.{name} imports {sorted(external & WEB)}"
    outside = sorted(m for m in reached if m.startswith(("app.http", "app.server", "app.cli")))
    assert not outside, f"app.{name} reaches {outside}"


def test_the_client_needs_only_requests_and_orjson():
    reached, external = closure("app.client")
    assert reached == {"app.client"}
    assert external - set(sys.stdlib_module_names) == {"requests", "orjson"}


def test_http_modules_are_the_only_ones_besides_the_server_importing_falcon():
    for path in APP.rglob("*.py"):
        module = "app." + ".".join(path.relative_to(APP).with_suffix("").parts)
        if "falcon" in {n.split(".")[0] for n in imports(module.removesuffix(".__init__"))}:
            assert module.startswith(("app.http.", "app.server.")), module
