"""Dependencies point one way: no import cycles between our modules, and no upward import between
the folders. Function-level imports count; imports under `if TYPE_CHECKING:` do not (they never run,
and annotations may name a type from anywhere).

The order, lowest first (a module may import its own folder and anything below it):
config < kernel types (proxy.errors, proxy.context) < providers < upstream client | telemetry
< shared state < kernel runtime (runtime, routing, relay, forward, headers) < middlewares < admin
< composition root (proxy.app) < mock provider < CLI. Folders on one level (upstream, telemetry)
do not import each other, and no middleware imports a sibling middleware.

(`test_no_cycles.py` is about reference cycles in memory; this one is about the code's layout.)
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("config", "providers", "proxy", "middlewares")
LAYERS: tuple[tuple[str, ...], ...] = (
    ("config",),
    ("proxy.errors", "proxy.context"),
    ("providers",),
    ("proxy.upstream", "proxy.telemetry"),  # independent of each other (SEPARATE)
    ("proxy.state",),
    ("proxy.cache",),  # the response cache's stores and rules: config, kernel types, providers, telemetry, state
    ("proxy.runtime", "proxy.routing", "proxy.relay", "proxy.forward", "proxy.headers"),
    ("middlewares",),
    ("proxy.admin",),
    ("proxy.app", "proxy"),
    ("proxy.mock",),
    ("proxy.server",),  # imports config only (and uvicorn): the HTTP server layer under the app
    ("proxy.cli",),
)
SEPARATE = {"proxy.upstream", "proxy.telemetry"}  # folders on one level that must not import each other


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node except the bodies of `if TYPE_CHECKING:` blocks."""
    out: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Our modules that `name` imports anywhere in its text."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of an attribute: its module
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def layer(name: str) -> tuple[int, str]:
    """(level, group): the longest matching prefix decides."""
    best = (-1, "", "")
    for level, groups in enumerate(LAYERS):
        for group in groups:
            if (name == group or name.startswith(group + ".")) and len(group) > len(best[2]):
                best = (level, group, group)
    assert best[0] >= 0, f"{name} is in no layer: add it to LAYERS"
    return best[0], best[1]


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_every_module_has_a_layer() -> None:
    for name in modules():
        layer(name)


def test_no_upward_or_sideways_import() -> None:
    wrong = []
    for name, targets in graph().items():
        level, group = layer(name)
        for target in targets:
            t_level, t_group = layer(target)
            if t_level > level or (t_level == level and t_group != group and {group, t_group} <= SEPARATE):
                wrong.append(f"{name} (level {level}) imports {target} (level {t_level})")
            elif name.startswith("middlewares.") and target.startswith("middlewares."):
                if name.split(".")[1] != target.split(".")[1]:
                    wrong.append(f"{name} imports the sibling middleware {target}")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles() -> None:
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                component.append(item)
                if item == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_function_level_imports(tmp_path: Path) -> None:
    """The rules above are only as good as the import reader: a late import is an edge, a
    type-checking one is not."""
    source = tmp_path / "late.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import proxy.cli.main\n"
                      "def f():\n    from proxy.app import build_app\n    import proxy.state.store as s\n")
    found = imports("proxy.state.late", source, {**modules(), "proxy.state.late": source})
    assert found == {"proxy.app", "proxy.state.store"}
