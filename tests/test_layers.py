"""The package's layers point one way: every import (lazy ones inside functions included) goes to a lower layer.

docs/DESIGN.md draws the same map. A new top-level module or subpackage must be placed in LAYERS.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pickscore

PACKAGE = Path(pickscore.__file__).resolve().parent

# Lowest first. A unit (a top-level module or a subpackage) may import units of lower layers only; units of one
# layer are independent of each other. Inside a unit, imports are free, but no cycle anywhere.
LAYERS = [
    [
        "pickscore.version",
        "pickscore.errors",
        "pickscore.v1",
        "pickscore.scenes",
        "pickscore.flags",
        "pickscore.limits",
        "pickscore.extras",
        "pickscore.resources",
        "pickscore.tls",
    ],
    ["pickscore.status"],
    ["pickscore.model"],
    ["pickscore.backends", "pickscore.datasets"],
    ["pickscore.scorer", "pickscore.client", "pickscore.server", "pickscore.exporter", "pickscore.training"],
    ["pickscore.places"],  # "a place that scores": in this process (scorer) or on servers (client)
    ["pickscore.commands", "pickscore.jobs"],
    ["pickscore.collect"],
    ["pickscore.cli", "pickscore"],
]
LAYER = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def module_names(root: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The package modules ``name`` imports anywhere in its body; ``from a import b`` is a.b when that is a module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in out if m in modules and m != name}


def unit_of(module: str) -> str:
    """pickscore.x for a top-level module or for every module of the subpackage pickscore.x; the facade is itself."""
    return ".".join(module.split(".")[:2])


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """'a -> b' for every import from a unit to one of the same or a higher layer; unplaced units are named."""
    found = []
    for source, targets in sorted(graph.items()):
        unit = unit_of(source)
        if unit not in LAYER:
            found.append(f"{source}: unit {unit} is not placed in LAYERS")
            continue
        for target in sorted(targets):
            other = unit_of(target)
            if other != unit and LAYER.get(other, len(LAYERS)) >= LAYER[unit]:
                found.append(f"{source} -> {target}")
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_import_points_down():
    assert upward_imports(import_graph()) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_checks_catch_an_upward_import_and_a_cycle():
    """The checker itself: a graph with a model -> server arrow and a backends <-> scorer loop fails both checks."""
    graph = import_graph()
    graph["pickscore.model.scoring"] = graph["pickscore.model.scoring"] | {"pickscore.server.engine"}
    graph["pickscore.backends"] = graph["pickscore.backends"] | {"pickscore.scorer"}
    assert "pickscore.model.scoring -> pickscore.server.engine" in upward_imports(graph)
    assert any({"pickscore.backends", "pickscore.scorer"} <= set(c) for c in cycles(graph))


def test_relative_and_from_imports_resolve_to_modules(tmp_path):
    pkg = tmp_path / "pickscore"
    (pkg / "server").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("")
    (pkg / "server" / "__init__.py").write_text("")
    (pkg / "server" / "a.py").write_text("def f():\n    from ..errors import X\n    from . import b\n")
    (pkg / "server" / "b.py").write_text("from pickscore import errors\n")
    modules = module_names(pkg)
    assert imports_of("pickscore.server.a", modules["pickscore.server.a"], set(modules)) == {
        "pickscore.errors",
        "pickscore.server.b",
    }
    assert imports_of("pickscore.server.b", modules["pickscore.server.b"], set(modules)) == {"pickscore.errors"}


def test_the_client_loads_neither_the_server_nor_prometheus_nor_torch():
    code = (
        "import sys, pickscore.client; print(sorted(m for m in sys.modules if m.startswith("
        "('pickscore.server', 'pickscore.backends', 'prometheus_client', 'torch'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# The transports are siblings over the neutral API (pickscore.server.api): none imports another's modules.
TRANSPORTS = {
    "scoring.v1 over gRPC": {"pickscore.server.scoring_v1"},
    "KServe v2 over gRPC": {"pickscore.server.kserve_v2"},
    "HTTP": {"pickscore.server.http", "pickscore.server.http_kserve"},
}


def transport_crossings(graph: dict[str, set[str]]) -> list[str]:
    """'a -> b' for every import from one transport's module to another transport's."""
    owner = {module: name for name, modules in TRANSPORTS.items() for module in modules}
    return [
        f"{source} -> {target}"
        for source, targets in sorted(graph.items())
        if source in owner
        for target in sorted(targets)
        if owner.get(target, owner[source]) != owner[source]
    ]


def test_transports_do_not_import_each_other():
    graph = import_graph()
    assert set().union(*TRANSPORTS.values()) <= set(graph), "a transport module listed here no longer exists"
    assert transport_crossings(graph) == []


def test_the_transport_check_catches_http_importing_a_grpc_service():
    graph = import_graph()
    graph["pickscore.server.http"] = graph["pickscore.server.http"] | {"pickscore.server.scoring_v1"}
    assert transport_crossings(graph) == ["pickscore.server.http -> pickscore.server.scoring_v1"]


MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60
GENERATED = ("pickscore/v1/", "pickscore/collect/migrations/")


def oversized(root: Path = PACKAGE) -> list[str]:
    """Modules over 500 lines and functions over 60, except generated code and argparse builders (declarative:
    one add_argument per flag, named *parser*)."""
    found = []
    for path in module_names(root).values():
        relative = path.relative_to(root.parent).as_posix()
        if relative.startswith(GENERATED):
            continue
        source = path.read_text()
        if source.count("\n") > MAX_MODULE_LINES:
            found.append(f"{relative}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and "parser" not in node.name:
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{relative}: {node.name} is {length} lines")
    return found


def test_modules_and_functions_stay_short():
    assert oversized() == []


def test_the_size_check_catches_a_long_function(tmp_path):
    pkg = tmp_path / "pickscore"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    (pkg / "long.py").write_text(f"def long():\n{body}\n\ndef add_parser():\n{body}")
    assert oversized(pkg) == [f"pickscore/long.py: long is {MAX_FUNCTION_LINES + 1} lines"]
