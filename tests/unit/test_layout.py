"""The package's layout, checked by path: every ``pl_parablock/**/*.py`` is read with ``ast`` (nothing is imported).

A module's *wing* is the folder it lies in (``pl_parablock/client/rounds.py``
is in ``client``); the modules directly in ``pl_parablock/`` are the top
level. The rules name folders, never module lists, so a module added to,
split in or moved between wings is checked by where it lands.

* **Sides.** Nothing under ``client/`` imports anything under ``server/``,
  and nothing under ``server/`` imports anything under ``client/``.
* **A pure core.** ``core/`` imports nothing of the package but ``core/``
  and ``pl_parablock.errors``, and no thread, socket, gRPC or Lightning.
* **The wire is below both sides.** ``wire/`` may import ``core/`` and
  ``pl_parablock.errors``, never ``server/``, ``client/``, ``recipe/``,
  ``model/``, ``simulation/`` or ``data/``.
* **No upward import.** ``recipe/`` imports nothing of ``model/`` or
  ``simulation/``, and no module below the top level imports an entry point
  (``fit``, ``simulate``, ``compare``, ``cli``, ``report``, ``reference``) or
  the public API package ``pl_parablock`` itself at module level.
* **No 0.1 path.** The package imports its modules by their new homes only
  (an old path of :data:`pl_parablock._compat.MOVED` would warn at import).
* **No import cycle** among the package's modules.

The side, core, wire and recipe rules count *every* import in a file, also
those inside functions and under ``if TYPE_CHECKING:``. The cycle and
entry-point rules count module-level imports only: imports inside functions
(run later, when every module is loaded) and under ``if TYPE_CHECKING:``
(never run) are ignored. Importing ``pl_parablock.a.b`` also runs the
package ``pl_parablock.a``'s ``__init__`` when the importer lies outside that
package, so that is an edge too (``recipe.schema`` -> ``pl_parablock.data``
-> ``recipe.schema`` is a cycle even though ``data/formats.py`` imports
nothing of the recipe).

A rule the code breaks today while its fix is under way is listed in
:data:`KNOWN` with the offending imports: its check is a strict ``xfail``.
Once the fix lands the check passes, XPASS(strict) fails the run, and the
entry must go. An import broken beyond the listed ones fails at once.
"""

from __future__ import annotations

import ast
import importlib
import os
import sys
import warnings
from collections.abc import Iterator

import pytest

import pl_parablock
from pl_parablock._compat import MOVED

PACKAGE = "pl_parablock"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), PACKAGE)

ENTRY_POINTS = ("fit", "simulate", "compare", "cli", "report", "reference")
"""The top-level modules that run the package (commands and their drivers); nothing below imports them at module level."""
NAMED_WINGS = ("core", "server", "client", "wire", "recipe", "model", "data", "simulation")
CORE_MAY_IMPORT = (f"{PACKAGE}.core", f"{PACKAGE}.errors")
IMPURE = {"threading", "socket", "grpc", "lightning", "pytorch_lightning", "lightning_fabric", "multiprocessing", "asyncio"}
"""What the core never imports: it is the algorithm, run the same by a thread, a process, a server or a simulation."""
WIRE_MAY_NOT_IMPORT = ("server", "client", "recipe", "model", "simulation", "data")


# --- reading the source ---------------------------------------------------------------------------------------------


def _modules(root: str) -> dict[str, tuple[str, bool]]:
    """Every module of the package: name -> (path, is a package ``__init__``)."""
    out = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(folder, f)
            parts = [PACKAGE, *os.path.relpath(path, root)[: -len(".py")].split(os.sep)]
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            out[".".join(parts)] = (path, is_package)
    return out


MODULES = _modules(ROOT)
WINGS = sorted(name for name in os.listdir(ROOT) if os.path.isfile(os.path.join(ROOT, name, "__init__.py")))


def under(module: str, folder: str) -> bool:
    """Whether ``module`` lies in ``pl_parablock/<folder>/`` (the package ``pl_parablock.<folder>`` included)."""
    return module == f"{PACKAGE}.{folder}" or module.startswith(f"{PACKAGE}.{folder}.")


def top_level(module: str) -> bool:
    """Whether ``module`` is ``pl_parablock`` itself or a file directly in ``pl_parablock/``."""
    return module == PACKAGE or not any(under(module, wing) for wing in WINGS)


def in_wing(folder: str) -> list[str]:
    return sorted(m for m in MODULES if under(m, folder))


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


def imports(tree: ast.AST, importer: str, *, is_package: bool = False, module_level: bool = False, modules: object = None) -> set[str]:
    """The package's modules that the code of module ``importer`` imports by name.

    ``from pl_parablock.server import grpc_server`` names the module
    ``pl_parablock.server.grpc_server``; ``from pl_parablock.server import
    Aggregator`` names the package ``pl_parablock.server``. Relative imports
    are resolved. ``modules`` (default: the package's) tells a module from a name.
    """
    known = MODULES if modules is None else modules
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
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        out.update(t for t in targets if t == PACKAGE or t.startswith(PACKAGE + "."))
    return out


def external_imports(tree: ast.AST) -> set[str]:
    """The top-level names of everything outside the package that the code imports, at any level."""
    out = set()
    for node in _import_nodes(tree, module_level=False):
        if isinstance(node, ast.ImportFrom) and node.level:
            continue
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        out.update(n.split(".")[0] for n in names if n.split(".")[0] != PACKAGE)
    return out


def _tree(module: str) -> ast.Module:
    path = MODULES[module][0]
    with open(path, encoding="utf-8") as f:
        return ast.parse(f.read(), path)


TREES = {m: _tree(m) for m in MODULES}
ALL_IMPORTS = {m: imports(TREES[m], m, is_package=MODULES[m][1]) for m in MODULES}
MODULE_LEVEL_IMPORTS = {m: imports(TREES[m], m, is_package=MODULES[m][1], module_level=True) for m in MODULES}


def graph(module_level_imports: dict[str, set[str]], packages: set[str]) -> dict[str, set[str]]:
    """Module-level import edges, with the ``__init__`` of every package an import enters from outside."""
    out: dict[str, set[str]] = {}
    for module, targets in module_level_imports.items():
        parts = module.split(".")
        inside = {".".join(parts[:i]) for i in range(1, len(parts) + (1 if module in packages else 0))}
        edges = set()
        for target in targets:
            tparts = target.split(".")
            edges.add(target)
            edges.update(p for p in (".".join(tparts[:i]) for i in range(1, len(tparts))) if p not in inside)
        out[module] = {e for e in edges if e in module_level_imports}
    return out


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
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
        for w in sorted(g[v]):
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
            if len(component) > 1 or v in g[v]:
                found.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return sorted(found)


def a_cycle(g: dict[str, set[str]], component: list[str]) -> list[str]:
    """One import circle through ``component``'s first module, as the path ``[a, b, ..., a]`` (shortest, by BFS)."""
    start, members = component[0], set(component)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(g[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [*reversed(path), start]
                if w not in came_from:
                    came_from[w] = v
                    nxt.append(w)
        frontier = nxt
    raise ValueError(f"no cycle through {start}")


PACKAGES = {m for m, (_, is_package) in MODULES.items() if is_package}
GRAPH = graph(MODULE_LEVEL_IMPORTS, PACKAGES)


# --- the rules, as functions of a module's imports ------------------------------------------------------------------


def into(targets: set[str], folders: tuple[str, ...]) -> set[str]:
    """The ``targets`` that lie under one of ``folders``."""
    return {t for t in targets if any(under(t, f) for f in folders)}


def upward(module: str, targets: set[str]) -> set[str]:
    """For a module below the top level: the entry points (and the public API package) among ``targets``."""
    if top_level(module):
        return set()
    return {t for t in targets if t == PACKAGE or any(t == f"{PACKAGE}.{e}" or t.startswith(f"{PACKAGE}.{e}.") for e in ENTRY_POINTS)}


def core_outside(targets: set[str]) -> set[str]:
    """What a core module imports of the package outside ``core/`` and ``errors``."""
    return {t for t in targets if not any(t == ok or t.startswith(ok + ".") for ok in CORE_MAY_IMPORT)}


RULES = {
    "client-not-server": ("client", lambda m: into(ALL_IMPORTS[m], ("server",)), "the client side imports nothing of the server side"),
    "server-not-client": ("server", lambda m: into(ALL_IMPORTS[m], ("client",)), "the server side imports nothing of the client side"),
    "core-in-core": ("core", lambda m: core_outside(ALL_IMPORTS[m]), "the core imports only pl_parablock.core.* and pl_parablock.errors"),
    "core-pure": ("core", lambda m: external_imports(TREES[m]) & IMPURE, "the core imports no thread, socket, gRPC or Lightning"),
    "wire-low": (
        "wire",
        lambda m: into(ALL_IMPORTS[m], WIRE_MAY_NOT_IMPORT),
        "the wire imports nothing of server/, client/, recipe/, model/, simulation/ or data/",
    ),
    "recipe-not-model": (
        "recipe",
        lambda m: into(ALL_IMPORTS[m], ("model", "simulation")),
        "the recipe imports nothing of model/ or simulation/",
    ),
    "no-entry-point": (None, lambda m: upward(m, MODULE_LEVEL_IMPORTS[m]), "below the top level, no module-level import of an entry point"),
    "no-old-path": (None, lambda m: {t for t in ALL_IMPORTS[m] if t not in MODULES}, "the package imports its modules by their 0.2 paths"),
}
"""rule -> (the folder it checks, or None for every module; the offending imports of a module; what it says)."""

KNOWN: dict[tuple[str, str], set[str]] = {}
"""(rule, module) -> the imports that break the rule today, while the fix is under way. Remove an entry when its check XPASSes."""

KNOWN_CYCLES: list[list[str]] = []
"""The import circles (as strongly connected components, sorted) that exist today while their fix is under way."""


class KnownViolationError(AssertionError):
    """A rule broken exactly as :data:`KNOWN` says: the check is an expected failure."""


def _cases() -> list:
    out = []
    for rule, (folder, _, _) in RULES.items():
        for module in in_wing(folder) if folder else sorted(MODULES):
            known = KNOWN.get((rule, module))
            marks = ()
            if known:
                reason = f"{module} imports {', '.join(sorted(known))}; once it does not, drop KNOWN[{rule!r}, {module!r}]"
                marks = (pytest.mark.xfail(strict=True, raises=KnownViolationError, reason=reason),)
            out.append(pytest.param(rule, module, marks=marks, id=f"{rule}:{module}"))
    return out


def _check(wrong: set[str], known: set[str], what: str) -> None:
    """Pass on no violation; fail on one not in ``known``; an expected failure (:class:`KnownViolationError`) on exactly ``known``."""
    assert not wrong - known, f"{what}: {sorted(wrong - known)}"
    if wrong:
        assert wrong == known, f"{what}: only {sorted(wrong)} now, no longer {sorted(known - wrong)}: update KNOWN"
        raise KnownViolationError(f"{what}: {sorted(wrong)} (known)")


# --- the package's layout -------------------------------------------------------------------------------------------


def test_the_wings_the_rules_name_exist():
    assert set(NAMED_WINGS) <= set(WINGS), f"missing wings {sorted(set(NAMED_WINGS) - set(WINGS))}: update tests/unit/test_layout.py"
    for e in ENTRY_POINTS:
        assert f"{PACKAGE}.{e}" in MODULES and top_level(f"{PACKAGE}.{e}"), f"entry point {e} is gone: update tests/unit/test_layout.py"
    for wing in NAMED_WINGS:
        assert len(in_wing(wing)) > 1, f"{wing}/ holds no module"


def test_every_known_violation_names_a_module_and_a_rule_that_exist():
    for rule, module in KNOWN:
        assert rule in RULES, rule
        assert module in MODULES, f"{module} is gone: its KNOWN entry goes (the rule is checked where the code went)"


@pytest.mark.parametrize(("rule", "module"), _cases())
def test_the_rule_holds(rule, module):
    _, offending, says = RULES[rule]
    _check(offending(module), KNOWN.get((rule, module), set()), f"{says}; {module} imports")


@pytest.mark.parametrize(
    "expected",
    [pytest.param(KNOWN_CYCLES, marks=pytest.mark.xfail(strict=True, raises=KnownViolationError, reason=f"import cycles {KNOWN_CYCLES}"))]
    if KNOWN_CYCLES
    else [[]],
)
def test_there_is_no_import_cycle(expected):
    found = cycles(GRAPH)
    shown = "; ".join(" -> ".join(a_cycle(GRAPH, c)) for c in found)
    assert all(c in expected for c in found), f"import cycle(s) at module level: {shown}"
    if found:
        assert found == expected, f"only {found} now: update KNOWN_CYCLES"
        raise KnownViolationError(f"known import cycle(s): {shown}")


# --- the checks catch what they are for (the source is parsed, not run) --------------------------------------------

FAKE = {
    "pl_parablock",
    "pl_parablock.errors",
    "pl_parablock.fit",
    "pl_parablock.server",
    "pl_parablock.server.grpc_server",
    "pl_parablock.client",
    "pl_parablock.client.transport",
    "pl_parablock.client.strategy",
}


def test_the_parser_resolves_names_modules_and_relative_imports():
    def parse(src: str, importer: str, **kw: bool) -> set[str]:
        return imports(ast.parse(src), importer, modules=FAKE, **kw)

    assert parse("from pl_parablock.server.grpc_server import TLS\n", "pl_parablock.client.strategy") == {"pl_parablock.server.grpc_server"}
    assert parse("from pl_parablock.server import grpc_server\n", "pl_parablock.client.strategy") == {"pl_parablock.server.grpc_server"}
    assert parse("from pl_parablock.server import Aggregator\n", "pl_parablock.client.strategy") == {"pl_parablock.server"}
    assert parse("import pl_parablock.server.grpc_server as g\nimport torch\n", "pl_parablock.client.strategy") == {
        "pl_parablock.server.grpc_server"
    }
    assert parse("from . import strategy\nfrom .. import errors\n", "pl_parablock.client", is_package=True) == {
        "pl_parablock.client.strategy",
        "pl_parablock.errors",
    }
    hidden = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..server import grpc_server\n"
    assert parse(hidden, "pl_parablock.client.transport") == {"pl_parablock.server.grpc_server"}
    assert parse(hidden, "pl_parablock.client.transport", module_level=True) == set()
    late = "def f():\n    from pl_parablock.fit import main\n"
    assert parse(late, "pl_parablock.client.strategy") == {"pl_parablock.fit"}
    assert parse(late, "pl_parablock.client.strategy", module_level=True) == set()
    src = (
        "import threading\nfrom concurrent.futures import Future\nfrom . import x\n"
        "def f():\n    import grpc.aio\nimport pl_parablock.errors\n"
    )
    assert external_imports(ast.parse(src)) == {"threading", "concurrent", "grpc"}


def test_the_rules_see_a_wrong_import():
    assert into({"pl_parablock.server.grpc_server", "pl_parablock.core.plan", "pl_parablock.serverless"}, ("server",)) == {
        "pl_parablock.server.grpc_server"
    }
    assert into({"pl_parablock.server"}, ("server",)) == {"pl_parablock.server"}
    assert core_outside({"pl_parablock.core.plan", "pl_parablock.errors", "pl_parablock.wire.framing", "pl_parablock.errors_x"}) == {
        "pl_parablock.wire.framing",
        "pl_parablock.errors_x",
    }
    assert upward("pl_parablock.simulation.virtual", {"pl_parablock.reference", "pl_parablock", "pl_parablock.core.plan"}) == {
        "pl_parablock.reference",
        "pl_parablock",
    }
    assert upward("pl_parablock.simulate", {"pl_parablock.reference"}) == set()  # the top level may
    with pytest.raises(KnownViolationError):
        _check({"a"}, {"a"}, "known")
    with pytest.raises(AssertionError) as wrong:
        _check({"a", "b"}, {"a"}, "one more")
    assert not isinstance(wrong.value, KnownViolationError)
    with pytest.raises(AssertionError) as partly:
        _check({"a"}, {"a", "b"}, "partly fixed")
    assert not isinstance(partly.value, KnownViolationError)
    _check(set(), set(), "clean")


def test_the_cycle_check_sees_a_circle_through_a_package_init():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(g) == [["a", "b", "c"]]
    assert a_cycle(g, ["a", "b", "c"]) == ["a", "b", "c", "a"]
    assert a_cycle({"a": {"a"}}, ["a"]) == ["a", "a"]
    # recipe.schema imports data.formats, which runs the package data's __init__, which imports recipe.schema
    level = {
        "pl_parablock.recipe": set(),
        "pl_parablock.recipe.schema": {"pl_parablock.data.formats"},
        "pl_parablock.data": {"pl_parablock.recipe.schema"},
        "pl_parablock.data.formats": set(),
    }
    g = graph(level, {"pl_parablock.recipe", "pl_parablock.data"})
    assert g["pl_parablock.recipe.schema"] == {"pl_parablock.data", "pl_parablock.data.formats"}
    assert cycles(g) == [["pl_parablock.data", "pl_parablock.recipe.schema"]]
    # a module inside a package does not enter its own package's __init__
    inner = graph(
        {
            "pl_parablock.data": {"pl_parablock.data.formats"},
            "pl_parablock.data.formats": {"pl_parablock.data.chat"},
            "pl_parablock.data.chat": set(),
        },
        {"pl_parablock.data"},
    )
    assert cycles(inner) == []


# --- the public names and 0.1's paths --------------------------------------------------------------------------------


def test_every_public_name_imports_from_the_package():
    names = pl_parablock.__all__
    assert len(names) == len(set(names))
    scope: dict[str, object] = {}
    exec(f"from pl_parablock import {', '.join(names)}", scope)
    assert all(scope[n] is getattr(pl_parablock, n) for n in names)


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_module_path_still_imports_and_warns_naming_its_new_home(old, monkeypatch):
    name = f"{PACKAGE}.{old}"
    homes = [importlib.import_module(f"{PACKAGE}.{h}") for h in MOVED[old]]
    for m in [n for n in sys.modules if n == name or n.startswith(name + ".")]:
        monkeypatch.delitem(sys.modules, m)  # import it afresh: the warning comes once, at import
    parent = name.rsplit(".", 1)[0]
    if parent != PACKAGE and parent in sys.modules:
        monkeypatch.delitem(sys.modules, parent)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(name)
    messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning) and str(w.message).startswith(name + " ")]
    assert messages, f"importing {name} gave no DeprecationWarning naming it: {[str(w.message) for w in caught]}"
    for home in homes:
        assert home.__name__ in messages[0], f"the warning does not name {home.__name__}: {messages[0]}"
        public = [k for k in vars(home) if not k.startswith("_")]
        assert all(hasattr(module, k) for k in public), f"{name} lacks {[k for k in public if not hasattr(module, k)]}"
    first = homes[0]
    assert all(getattr(module, k) is v for k, v in vars(first).items() if not k.startswith("_"))


def test_the_old_client_module_names_still_import_with_a_warning():
    import pl_parablock.client as client_package
    from pl_parablock.client import rounds

    for n in ("ClientRounds", "ROUND_METRICS"):
        with pytest.warns(DeprecationWarning, match="pl_parablock.client.rounds"):
            assert getattr(client_package, n) is getattr(rounds, n)


def test_no_class_over_500_lines_and_no_file_over_700():
    """A class that big holds several jobs, a file that big several classes' worth: split it by job (DESIGN §3)."""
    too_big = []
    for folder, _, names in os.walk(ROOT):
        for name in [n for n in names if n.endswith(".py")]:
            path = os.path.join(folder, name)
            source = open(path, encoding="utf-8").read()
            if source.count("\n") > 700:
                too_big.append(f"{path}: {source.count(chr(10))} lines")
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.ClassDef) and node.end_lineno is not None and node.end_lineno - node.lineno + 1 > 500:
                    too_big.append(f"{path}: class {node.name}, {node.end_lineno - node.lineno + 1} lines")
    assert not too_big, too_big
