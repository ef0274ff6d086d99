"""The package's shape: no import circles, counting imports inside functions too.

Every ``import``/``from … import`` in ``src/kd2m`` (at module level or inside a function) is an
arrow from its module to the kd2m module it names (``from . import losses`` names the package
``kd2m.losses``; ``from .x import name`` names ``kd2m.x.name`` where that is a module, else
``kd2m.x``). A circle among them is refused: an import inside a function hides it from import
time, but the modules still depend on each other.
"""
import ast
from pathlib import Path

import kd2m

ROOT = Path(kd2m.__file__).parent


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """{module: the kd2m modules it imports, anywhere in its code}."""
    modules = {_module_name(p, root): p for p in root.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    child = f"{target}.{alias.name}"
                    targets.add(child if child in modules else target)
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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


def test_no_module_imports_itself_through_others():
    assert circles(import_graph()) == []


def test_the_walker_sees_imports_inside_functions(tmp_path):
    """A circle made only of a function-level import is found (the one kind that never fails at import time)."""
    pkg = tmp_path / "kd2m"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import g\n    return g\n")
    (pkg / "c.py").write_text("from .a import b\n")
    graph = import_graph(pkg)
    assert graph["kd2m.a"] == {"kd2m.b"} and graph["kd2m.b"] == {"kd2m.a"} and graph["kd2m.c"] == {"kd2m.a"}  # a name of a, not a module
    assert circles(graph) == [["kd2m.a", "kd2m.b"]]


def test_low_homes_import_nothing_of_kd2m():
    """errors and catalog are what every refusing module imports: they must stay at the bottom."""
    graph = import_graph()
    assert graph["kd2m.errors"] == set() and graph["kd2m.catalog"] == set()
