"""The shape of the code base: no import cycle inside fastnn, no source file grown past ~500 lines,
and no reference to documents that are not in the repository."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fastnn"
MAX_LINES = 520
# Documents outside the repository (spelled in parts so that this file does not cite them itself).
UNSHIPPED = ("DESIGN" + ".md", "TARGETS" + ".md", ".." + "/shared")  # "about 500": a file past this is doing more than one job


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """fastnn modules that ``name`` imports anywhere in its body (function-level imports too: a
    cycle dodged by importing inside a function is still a cycle)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import sub` imports the submodule pkg.sub when there is one.
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    # Importing a submodule runs its packages' __init__ first; that is not an edge of the cycle
    # analysis (a package importing its own submodules is normal), so parents are not added.
    return found


def test_no_import_cycle():
    modules = _modules()
    known = set(modules)
    graph = {name: _imports(name, path, known) for name, path in modules.items()}
    # A package's __init__ re-exporting its submodules is not a cycle: drop edges to ancestors.
    for name, deps in graph.items():
        graph[name] = {d for d in deps if not name.startswith(d + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def _sources():
    for folder, patterns in (("fastnn", ("*.py",)), ("csrc", ("*.cpp", "*.h")),
                             ("kernels", ("*.py", "*.cu", "*.cuh", "*.h"))):
        for pattern in patterns:
            yield from (ROOT / folder).rglob(pattern)


def test_no_source_file_over_about_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in _sources() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines (split them by job): {long}"


def test_repository_cites_no_document_outside_it():
    # The founders' planning notes (design and targets) are not shipped, so the code
    # and docs must say what they need themselves.
    offenders = []
    for path in ROOT.rglob("*"):
        if path.suffix not in (".py", ".cpp", ".h", ".cu", ".cuh", ".md", ".sh", ".toml") or ".venv" in path.parts \
                or "build" in path.parts:
            continue
        text = path.read_text(errors="replace")
        if any(name in text for name in UNSHIPPED):
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"files citing {UNSHIPPED}, which are not in the repository: {offenders}"
