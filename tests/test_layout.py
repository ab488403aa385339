"""The folders are the architecture: each part imports only what it may (read from the code's own imports, lazy ones
included), no import cycles, no module over 400 lines, no private name used across modules."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "kerb_jupyter"

# part -> the parts of kerb_jupyter it may import ("package" is kerb_jupyter/__init__: version and the error tree)
ALLOWED = {
    "core": {"package", "core"},
    "sql": {"package", "core", "sql"},
    "doctor": {"package", "core", "sql", "doctor"},
    "server": {"package", "core", "sql", "server"},
    "kernel": {"package", "core", "sql", "doctor", "kernel"},
    "broker": {"package", "core", "broker"},
    "sandbox": {"package", "core", "sandbox"},
    "cli": {"package", "core", "sql", "doctor", "server", "broker", "sandbox", "cli"},
    "package": {"package", "core", "server", "kernel"},
}
# third-party packages a part must never import (the kernel stays light; the core runs anywhere)
FORBIDDEN = {
    "core": {"jupyter_server", "IPython", "ipykernel", "tornado", "sqlalchemy", "pyarrow", "pandas", "ldap3", "redis"},
    "sql": {"jupyter_server", "tornado"},
    "doctor": {"jupyter_server", "IPython", "tornado"},
    "kernel": {"jupyter_server", "tornado"},
    "broker": {"jupyter_server", "IPython", "psycopg"},
    "sandbox": {"jupyter_server", "IPython"},
}


def part_of(module: str) -> str:
    names = module.split(".")
    if len(names) == 1:
        return "package"
    if names[1] == "magic":
        return "kernel"
    if names[1] in ("cli", "wheelhouse"):
        return "cli"
    return names[1]


def modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(PKG.rglob("*.py")):
        names = list(path.relative_to(ROOT).with_suffix("").parts)
        if names[-1] == "__init__":
            names.pop()
        yield ".".join(names), path


MODULES = dict(modules())


def imports(module: str, path: Path) -> Iterator[tuple[str, list[str], int]]:
    """(imported module, names imported from it, line) for every import in the file, wherever it is."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            submodules = [n for n in names if f"{target}.{n}" in MODULES]
            for n in submodules:
                yield f"{target}.{n}", [], node.lineno
            rest = [n for n in names if n not in submodules]
            if rest or not submodules:
                yield target, rest, node.lineno


def internal_edges() -> Iterator[tuple[str, str, list[str], int]]:
    for module, path in MODULES.items():
        for target, names, line in imports(module, path):
            if target.split(".")[0] == "kerb_jupyter":
                yield module, target, names, line


def test_every_part_is_a_package_that_says_what_it_may_import():
    for part in ("core", "sql", "server", "doctor", "broker", "sandbox"):
        doc = ast.get_docstring(ast.parse((PKG / part / "__init__.py").read_text()))
        assert doc, f"kerb_jupyter/{part}/__init__.py needs a docstring saying what the part is"
    top = sorted(p.name for p in PKG.glob("*.py"))
    assert top == ["__init__.py", "cli.py", "magic.py", "wheelhouse.py"], top


def test_parts_import_only_what_they_may():
    wrong = []
    for module, target, _names, line in internal_edges():
        if part_of(target) not in ALLOWED[part_of(module)]:
            wrong.append(f"{module}:{line} ({part_of(module)}) imports {target} ({part_of(target)})")
    for module, path in MODULES.items():
        banned = FORBIDDEN.get(part_of(module), set())
        for target, _names, line in imports(module, path):
            if target.split(".")[0] in banned:
                wrong.append(f"{module}:{line} ({part_of(module)}) imports {target}")
    assert not wrong, "\n".join(wrong)


def test_the_rule_checker_sees_a_violation(tmp_path):
    """The checker itself: a core module importing the server is reported (so the test above can fail)."""
    path = tmp_path / "bad.py"
    path.write_text("def f():\n    from ..server import keeper\n")
    found = list(imports("kerb_jupyter.core.bad", path))
    assert ("kerb_jupyter.server.keeper", [], 2) in found
    assert part_of("kerb_jupyter.server.keeper") not in ALLOWED[part_of("kerb_jupyter.core.bad")]


def test_no_import_cycles():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, target, _names, _line in internal_edges():
        while target not in MODULES and "." in target:  # `from .x import name` of a name defined in x
            target = target.rpartition(".")[0]
        if target not in (module, "kerb_jupyter"):  # the root only re-exports the error tree and __version__
            graph[module].add(target)
    cycles = [c for c in strongly_connected(graph) if len(c) > 1]
    assert not cycles, cycles


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_private_name_is_used_across_modules():
    wrong = [f"{module}:{line} imports {', '.join(n for n in names if n.startswith('_'))} from {target}"
             for module, target, names, line in internal_edges()
             if target != module and any(n.startswith("_") and not n.startswith("__") for n in names)]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("folder", ["kerb_jupyter", "tests"])
def test_no_module_over_400_lines(folder):
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / folder).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long
