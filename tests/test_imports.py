"""The import graph of our own modules, read from the AST of every file: no circles, and layers that import
downward only (launch -> train -> model).

Function-level imports count: an import moved into a function still runs, and a circle it closes fails
the first time that function is called before the other module has finished loading. Importing
``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py`` first, so the packages above a target are
edges too, save those the importer sits in (they are loaded before it). Imports under
``if TYPE_CHECKING:`` count as well: the checker reads them, and a type that can only be named through
a circle says the layers are wrong.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "scalegpt"
LAYERS = ("model", "train", "launch")
"""Lowest first: a module may import from its own layer and the ones before it."""


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    file: str
    line: int
    in_function: bool
    package_init: bool = False
    """The target is a package whose __init__ runs because a module below it is imported."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((PACKAGE, *parts))


def our_modules() -> dict[str, Path]:
    """Every module of model/, train/ and launch/ (and the package above them), by dotted name."""
    files = [ROOT / "__init__.py", *(p for layer in LAYERS for p in sorted((ROOT / layer).rglob("*.py")))]
    return {_module_name(p): p for p in files if p.is_file()}


def _function_nodes(tree: ast.AST) -> set[int]:
    """ids of the import nodes that sit inside a function body (at any depth)."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside.update(id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return inside


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: dict[str, Path]) -> set[str]:
    """The modules of ours that `node` loads: `from pkg import name` is pkg.name when that is a module."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in known}
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        origin = ".".join([*base, node.module] if node.module else base)
    else:
        origin = node.module or ""
    if origin not in known:
        return set()
    found = {f"{origin}.{alias.name}" for alias in node.names if f"{origin}.{alias.name}" in known}
    if len(found) < len(node.names):  # some names are attributes of the module itself
        found.add(origin)
    return found


def _packages_above(target: str, importer: str) -> Iterator[str]:
    """The packages whose __init__ importing `target` runs, less those `importer` lives in."""
    parts = target.split(".")
    mine = importer.split(".")
    for i in range(1, len(parts)):
        package = ".".join(parts[:i])
        if mine[:i] != parts[:i]:
            yield package


def import_edges() -> list[Edge]:
    """Every import of one of our modules by another, with where it is written."""
    known = our_modules()
    edges = []
    for module, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        in_function = _function_nodes(tree)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            direct = _targets(node, module, path.name == "__init__.py", known)
            above = {p for t in direct for p in _packages_above(t, module) if p in known} - direct
            rel, inner = str(path.relative_to(ROOT)), id(node) in in_function
            edges += [Edge(module, t, rel, node.lineno, inner) for t in direct if t != module]
            edges += [Edge(module, t, rel, node.lineno, inner, package_init=True) for t in above if t != module]
    return edges


def cycles(edges: list[Edge]) -> list[list[str]]:
    """The graph's strongly connected components of more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
        graph.setdefault(e.target, set())
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
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _describe(component: list[str], edges: list[Edge]) -> str:
    inside = set(component)
    lines = [
        f"  {e.source} -> {e.target}  ({e.file}:{e.line}{', in a function' if e.in_function else ''})"
        for e in sorted(edges, key=lambda e: (e.source, e.target, e.line))
        if e.source in inside and e.target in inside
    ]
    return "circle through " + ", ".join(component) + ":\n" + "\n".join(lines)


def test_our_modules_import_each_other_without_a_circle() -> None:
    edges = import_edges()
    found = cycles(edges)
    assert not found, "\n".join(_describe(c, edges) for c in found)


def test_the_graph_sees_function_level_imports_and_package_inits() -> None:
    """The graph is only as good as what it reads: a function-level import and an __init__ run by a deeper
    import both appear as edges."""
    edges = {(e.source, e.target): e for e in import_edges()}
    assert edges[("scalegpt.train.config.loading", "scalegpt.train.weights")].in_function  # only with init_from
    assert edges[("scalegpt.train.checkpoint", "scalegpt.train.config")].package_init  # config/__init__ runs first
    assert not edges[("scalegpt.train.checkpoint", "scalegpt.train.config.schema")].package_init


def test_a_circle_through_a_package_init_is_found() -> None:
    """The check itself fails on a circle, here the one a re-export from loading in train/config/__init__
    would close: checkpoint -> config (its __init__) -> loading -> weights -> checkpoint."""
    edges = import_edges()
    extra = Edge("scalegpt.train.config", "scalegpt.train.config.loading", "train/config/__init__.py", 1, False)
    found = cycles([*edges, extra])
    assert any(
        {"scalegpt.train.checkpoint", "scalegpt.train.weights", "scalegpt.train.config"} <= set(c) for c in found
    )


def test_layers_import_downward_only() -> None:
    wrong = []
    for e in import_edges():
        source_layer, target_layer = (name.split(".")[1] if "." in name else "" for name in (e.source, e.target))
        if (
            source_layer in LAYERS
            and target_layer in LAYERS
            and LAYERS.index(target_layer) > LAYERS.index(source_layer)
        ):
            wrong.append(f"{e.file}:{e.line} imports {e.target} ({source_layer}/ may not import from {target_layer}/)")
    assert not wrong, "\n".join(wrong)


def test_every_function_level_import_of_ours_says_why() -> None:
    """An import inside a function is there only to keep start-up fast, and a comment on its line (or the one
    above) says so; anything else belongs at the top of the module."""
    silent = []
    for e in import_edges():
        if not e.in_function or e.package_init:
            continue
        lines = (ROOT / e.file).read_text(encoding="utf-8").splitlines()
        if not any("#" in lines[i] for i in (e.line - 2, e.line - 1) if i >= 0):
            silent.append(f"{e.file}:{e.line} imports {e.target} inside a function without a comment")
    assert not silent, "\n".join(sorted(set(silent)))
