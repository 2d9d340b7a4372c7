"""The package layering of shoal, checked on the source: cli → node → {raft, gossip, runtime, lb}.

Every ``import`` in a module counts — module level, function-local and ``if TYPE_CHECKING:``
ones alike (a function-local import that dodges a cycle is still a cycle). Only ``shoal.*``
imports are looked at; relative imports are resolved.

Why an AST test and not import-linter: it needs no extra tool or config file, it counts
function-local and TYPE_CHECKING imports without options, and its rules are plain Python data
below that the tests name in their ids.

The rules:

* a package imports only packages below it (``LAYERS``), plus the edges between packages of one
  layer listed in ``ALLOWED_SAME_LAYER`` (raft → runtime for volume options; otherwise
  raft, gossip, runtime and lb are independent of each other), so raft, gossip, runtime
  and lb never import shoal.node or shoal.cli, and shoal.node never imports shoal.cli;
* no import cycle between the modules of each package in ``CYCLE_FREE``;
* the modules in ``NOT_IMPORTED`` are imported by no shoal module but the listed ones.

``CYCLE_FREE`` and ``NOT_IMPORTED`` are lists to extend. node/agent.py is only wiring: no
module of the node imports it (only the CLI, which starts the agent), and node/ has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Package → layer; a package may import packages of a lower layer (pyproject's package-dir maps
#: shoal.<name> to the folder <name>/).
LAYERS: dict[str, int] = {"cli": 2, "node": 1, "raft": 0, "gossip": 0, "runtime": 0, "lb": 0}

#: (importer, imported) package pairs allowed within one layer. raft → runtime: the state
#: machine validates volume driver options with shoal.runtime.volumes (its pure part; debt:
#: move that part to a leaf both can import, and let the runtime take translated calls).
ALLOWED_SAME_LAYER: frozenset[tuple[str, str]] = frozenset({("raft", "runtime")})

#: Packages whose modules must not import each other in a circle (function-local imports count).
CYCLE_FREE: list[str] = ["raft", "gossip", "runtime", "lb", "node", "cli"]

#: Module → the only shoal modules allowed to import it. Test doubles stay out of production.
NOT_IMPORTED: dict[str, frozenset[str]] = {
    "shoal.runtime.testing": frozenset(),
    "shoal.gossip.testing": frozenset(),
    "shoal.node.agent": frozenset({"shoal.cli.main"}),
    # the Agent's mixins (membership lifecycle, role switch): parts of the wiring
    "shoal.node.lifecycle": frozenset({"shoal.node.agent"}),
    "shoal.node.roleswitch": frozenset({"shoal.node.agent"}),
}


def module_files() -> dict[str, Path]:
    """Every shoal module, by dotted name."""
    mods: dict[str, Path] = {}
    for pkg in LAYERS:
        for path in sorted((ROOT / pkg).glob("*.py")):
            name = f"shoal.{pkg}" if path.stem == "__init__" else f"shoal.{pkg}.{path.stem}"
            mods[name] = path
    return mods


def imports_of(name: str, source: str, known: set[str], is_package: bool = False) -> set[str]:
    """The shoal modules ``source`` (module ``name``) imports, anywhere in its body.
    ``from shoal.p import m`` counts as importing module ``shoal.p.m`` when that is a module,
    else the package ``shoal.p``."""
    package = name if is_package else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("shoal."))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod != "shoal" and not mod.startswith("shoal."):
                continue
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                found.add(sub if sub in known else mod)
    return {m for m in found if m != name}


def import_graph() -> dict[str, set[str]]:
    mods = module_files()
    known = set(mods)
    return {
        name: imports_of(name, path.read_text(), known, path.stem == "__init__") & known
        for name, path in mods.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def package_of(module: str) -> str:
    return module.split(".")[1]


GRAPH = import_graph()


@pytest.mark.parametrize("pkg", sorted(LAYERS))
def test_a_package_imports_only_packages_below_it(pkg: str) -> None:
    wrong = sorted(
        f"{mod} imports {dep}"
        for mod, deps in GRAPH.items()
        if package_of(mod) == pkg
        for dep in deps
        if package_of(dep) != pkg
        and LAYERS[package_of(dep)] >= LAYERS[pkg]
        and (pkg, package_of(dep)) not in ALLOWED_SAME_LAYER
    )
    assert wrong == []


@pytest.mark.parametrize("pkg", CYCLE_FREE)
def test_no_import_cycle_inside_the_package(pkg: str) -> None:
    inside = {
        m: {d for d in deps if package_of(d) == pkg}
        for m, deps in GRAPH.items()
        if package_of(m) == pkg
    }
    assert cycles(inside) == []


@pytest.mark.parametrize("module", sorted(NOT_IMPORTED))
def test_module_is_imported_only_where_allowed(module: str) -> None:
    assert module in GRAPH, f"{module} no longer exists: update NOT_IMPORTED"
    importers = sorted(m for m, deps in GRAPH.items() if module in deps)
    assert [m for m in importers if m not in NOT_IMPORTED[module]] == []


def test_the_checker_sees_function_local_relative_and_type_checking_imports() -> None:
    # The rules above are only as good as the import scan: it must see the imports that dodge
    # a cycle at run time.
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from .worker import Worker\n"
        "def f() -> None:\n"
        "    from shoal.node import agent\n"
        "    import shoal.cli.main\n"
        "from . import table\n"
    )
    known = {"shoal.lb.worker", "shoal.lb.table", "shoal.node.agent", "shoal.cli.main"}
    assert imports_of("shoal.lb.proxy", source, known) == known


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
