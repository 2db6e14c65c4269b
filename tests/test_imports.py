"""The package's import graph has no cycle (DESIGN.md, "Layout").

The graph is built statically from the source, without importing anything: an edge
``a -> b`` for every ``import shmcache.b``, ``from shmcache.b import ...``,
``from .b import ...`` and ``from . import b`` in module ``a``, wherever the statement is:
at module level, inside a function (a lazy import), under ``if``/``try``. A lazy import
is still a dependency, only a deferred one, so it counts: "no import cycle" means none,
deferred or not. ``from . import name`` where ``name`` is not a module is an edge to the
package itself (``shmcache/__init__.py``). An extension module (``_native``, built from
C source) is a node that imports nothing of the package.

Not edges: the implicit import of a parent package that every ``import shmcache.x`` does
(else every module would be in a cycle with ``__init__``), and names computed at run time
(``importlib.import_module(...)``), which no static reading can follow.
"""

import ast
from pathlib import Path

import pytest

import shmcache

pytestmark = pytest.mark.unit

PACKAGE = "shmcache"
ROOT = Path(shmcache.__file__).resolve().parent


def module_names(root=ROOT, package=PACKAGE):
    """{dotted module name: path} of every module under ``root``; the path is None for an
    extension module (its C source, or the library built from it)."""
    modules = {}
    for path in sorted(root.rglob("*")):
        if path.suffix not in (".py", ".c", ".so"):
            continue
        parts = list(path.relative_to(root).parts)
        parts[-1] = parts[-1].partition(".")[0]      # _native.cpython-311-x86_64-linux-gnu.so
        if parts[-1] == "__init__":
            parts.pop()
        name = ".".join([package, *parts])
        if path.suffix == ".py":
            modules[name] = path
        else:
            modules.setdefault(name, None)
    return modules


def _base(module, path, level):
    """The package a relative import of ``level`` dots in ``module`` starts from."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(level - 1):
        package = package.rpartition(".")[0]
    return package


def imports_of(module, path, modules):
    """The package's modules that ``module`` (at ``path``) imports, anywhere in its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _base(module, path, node.level)
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            # ``from x import y`` imports the module x.y if there is one, else x itself
            targets = [f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules
                       else target for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:   # ``import shmcache.x.y`` -> closest module
                target = target.rpartition(".")[0]
            if target and target != module:
                found.add(target)
    return found


def import_graph(root=ROOT, package=PACKAGE):
    modules = module_names(root, package)
    return {module: imports_of(module, path, modules) if path else set()
            for module, path in modules.items()}


def find_cycles(graph):
    """Every cycle of ``graph`` ({node: set of nodes}): one per strongly connected component
    with more than one node (or a node importing itself), as a list of nodes that starts and
    ends with the same node. Tarjan's algorithm, iterative."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    counter = [0]

    def visit(start):
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in graph[node]:
                        components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph, component):
    """One concrete cycle through the smallest-named node of ``component``."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:                       # breadth first: the shortest way back to start
        following = []
        for node in frontier:
            for child in sorted(graph[node] & component):
                if child == start:
                    return paths[node] + [start]
                if child not in paths:
                    paths[child] = paths[node] + [child]
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle in component {sorted(component)}")


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 20 and "shmcache.worker" in graph    # the whole package was read
    cycles = find_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_wire_codec_is_imported_by_server_and_peer_client_alike():
    graph = import_graph()
    assert "shmcache.wire" in graph["shmcache.http_front"]
    assert "shmcache.wire" in graph["shmcache.peers"]
    assert "shmcache.http_front" not in graph["shmcache.peers"]
    assert "shmcache.http_front" not in graph["shmcache.peer_fetch"]


@pytest.mark.parametrize("lazy", [False, True])
def test_a_cycle_is_found_and_named(tmp_path, lazy):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("from .a import A\n")
    (package / "a.py").write_text("from .b import B\nA = 1\n")
    if lazy:
        (package / "b.py").write_text("B = 2\n\ndef f():\n    from . import a\n    return a\n")
    else:
        (package / "b.py").write_text("from .c import C\nB = 2\n")
    (package / "c.py").write_text("import pkg.a\nC = 3\n")
    graph = import_graph(package, "pkg")
    expected = ["pkg.a", "pkg.b", "pkg.a"] if lazy else ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    assert find_cycles(graph) == [expected]


def test_acyclic_package_passes(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("from .a import A\nfrom . import b\n")
    (package / "a.py").write_text("from .b import B\nfrom . import c\nA = 1\n")
    (package / "b.py").write_text("import pkg.c\nB = 2\n")
    (package / "c.py").write_text("from os import path\nfrom . import _ext\nC = 3\n")
    (package / "_ext.c").write_text("/* an extension module */\n")
    graph = import_graph(package, "pkg")
    assert graph == {"pkg": {"pkg.a", "pkg.b"}, "pkg.a": {"pkg.b", "pkg.c"},
                     "pkg.b": {"pkg.c"}, "pkg.c": {"pkg._ext"}, "pkg._ext": set()}
    assert find_cycles(graph) == []
