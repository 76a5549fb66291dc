"""The package's import structure, read from the source with ``ast`` (nothing is imported).

Two rules:

* **Sides.** The client side of a federation (the strategy, the transmitter,
  the runner, ``federation/transport.py``, ``link.py``, ``channel.py``,
  ``wire.py``) imports nothing of the server side (``federation/server.py``,
  ``service.py``, ``aggregator.py``), and the server side imports nothing of
  the client's transports (``federation/transport.py``). Neither side imports
  ``federation/inprocess.py`` (which joins both) or the ``pl_parablock.federation``
  package itself (which re-exports both). These rules count *every* import in
  the file, also those inside functions and under ``if TYPE_CHECKING:``.
* **No import cycle** among the package's modules. This rule counts
  module-level imports only: imports inside functions (run later, when every
  module is loaded) and under ``if TYPE_CHECKING:`` (never run) are ignored.
  Importing ``pl_parablock.a.b`` also runs the package ``pl_parablock.a``'s
  ``__init__`` when the importer lies outside that package, so that is an
  edge too (``config`` -> ``pl_parablock.data`` -> ``config`` is a cycle even
  though ``data/formats.py`` imports nothing of ``config``).
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "pl_parablock")
PACKAGE = "pl_parablock"

CLIENT_SIDE = {
    "pl_parablock.client.strategy",
    "pl_parablock.client.session",
    "pl_parablock.client.rounds",
    "pl_parablock.client.ledger",
    "pl_parablock.client.evaluation",
    "pl_parablock.client.checkpoint",
    "pl_parablock.client.transmitter",
    "pl_parablock.client.runner",
    "pl_parablock.client.transport",
    "pl_parablock.wire.link",
    "pl_parablock.wire.channel",
    "pl_parablock.wire.framing",
}
SERVER_SIDE = {
    "pl_parablock.server.grpc_server",
    "pl_parablock.server.service",
    "pl_parablock.server.aggregator",
}
BOTH_SIDES = {"pl_parablock.federation", "pl_parablock.server.inprocess"}
CLIENT_MAY_NOT_IMPORT = SERVER_SIDE | BOTH_SIDES
SERVER_MAY_NOT_IMPORT = {"pl_parablock.client.transport"} | BOTH_SIDES


def _modules() -> dict[str, tuple[str, bool]]:
    """Every module of the package: name -> (path, is a package ``__init__``)."""
    out = {}
    for folder, _, files in os.walk(ROOT):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(folder, f)
            parts = [PACKAGE, *os.path.relpath(path, ROOT)[: -len(".py")].split(os.sep)]
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            out[".".join(parts)] = (path, is_package)
    return out


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(node: ast.AST, module_level: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements under ``node``; with ``module_level``, not those in functions or under ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif module_level and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        elif module_level and isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                yield from _import_nodes(ast.Module(body=[other], type_ignores=[]), module_level)
        else:
            yield from _import_nodes(child, module_level)


def imports(tree: ast.AST, importer: str, *, is_package: bool = False, module_level: bool = False) -> set[str]:
    """The package's modules that the code of module ``importer`` imports by name.

    ``from pl_parablock.federation import server`` names the module
    ``pl_parablock.server.grpc_server``; ``from pl_parablock.federation import TLS``
    names the package ``pl_parablock.federation``. Relative imports are resolved.
    """
    here = importer.split(".") if is_package else importer.split(".")[:-1]
    out: set[str] = set()
    for node in _import_nodes(tree, module_level):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                up = here[: len(here) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        out.update(t for t in targets if t == PACKAGE or t.startswith(PACKAGE + "."))
    return out


def _tree(module: str) -> ast.Module:
    path = MODULES[module][0]
    with open(path, encoding="utf-8") as f:
        return ast.parse(f.read(), path)


def _all_imports(module: str) -> set[str]:
    return imports(_tree(module), module, is_package=MODULES[module][1])


def _graph() -> dict[str, set[str]]:
    """Module-level import edges, with the ``__init__`` of every package an import enters."""
    graph: dict[str, set[str]] = {}
    for module, (_, is_package) in MODULES.items():
        inside = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 2 if is_package else module.count(".") + 1)}
        edges = set()
        for target in imports(_tree(module), module, is_package=is_package, module_level=True):
            parts = target.split(".")
            edges.add(target)
            edges.update(p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p not in inside)
        graph[module] = {e for e in edges if e in MODULES}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_modules_named_here_exist():
    for module in CLIENT_SIDE | SERVER_SIDE | BOTH_SIDES | {"pl_parablock.wire.channel"}:
        assert module in MODULES, f"{module} is gone: update tests/unit/test_layout.py"


@pytest.mark.parametrize("module", sorted(CLIENT_SIDE))
def test_the_client_side_imports_nothing_of_the_server_side(module):
    wrong = _all_imports(module) & CLIENT_MAY_NOT_IMPORT
    assert not wrong, f"{module} imports {sorted(wrong)}; take shared names from pl_parablock.wire.channel or wire"


@pytest.mark.parametrize("module", sorted(SERVER_SIDE))
def test_the_server_side_imports_no_client_transport(module):
    wrong = _all_imports(module) & SERVER_MAY_NOT_IMPORT
    assert not wrong, f"{module} imports {sorted(wrong)}; take shared names from pl_parablock.wire.channel or wire"


def test_there_is_no_import_cycle():
    assert _cycles(_graph()) == []


def test_the_checks_see_a_server_import_on_the_client_side():
    """The rules above catch what they are for (the source is parsed, not run)."""
    strategy = ast.parse("from pl_parablock.server.grpc_server import TLS\n")
    assert "pl_parablock.server.grpc_server" in imports(strategy, "pl_parablock.client.strategy")
    hidden = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .server import TLS\n")
    assert imports(hidden, "pl_parablock.client.transport") == {"pl_parablock.server.grpc_server"}
    assert imports(hidden, "pl_parablock.client.transport", module_level=True) == set()
    as_module = ast.parse("from pl_parablock.federation import server\n")
    assert imports(as_module, "pl_parablock.client.strategy") == {"pl_parablock.server.grpc_server"}
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


PURE_CORE = {
    "pl_parablock.core": {"pl_parablock.core.aggregate", "pl_parablock.core.blocks", "pl_parablock.core.codecs", "pl_parablock.errors"},
    "pl_parablock.core.codecs": {"pl_parablock.errors"},
}
STDLIB_ALLOWED = {"__future__", "collections", "dataclasses", "hashlib", "math", "random", "typing", "torch"}


@pytest.mark.parametrize("module", sorted(PURE_CORE))
def test_the_algorithm_core_is_pure(module):
    """The core imports no thread, socket, gRPC or Lightning, and nothing of the federation's drivers."""
    tree = _tree(module)
    assert _all_imports(module) <= PURE_CORE[module]
    outside = set()
    for node in _import_nodes(tree, module_level=False):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        outside.update(n.split(".")[0] for n in names if not n.startswith("pl_parablock"))
    assert outside <= STDLIB_ALLOWED, sorted(outside - STDLIB_ALLOWED)
