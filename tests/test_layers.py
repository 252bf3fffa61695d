"""The package's shape: layers that only point down, no import circle, no function over 80 lines.

Read from the source with `ast` (nothing is imported), so a lazy import inside a function counts as much
as one at the top of a module: a circle that works only because an import is deferred still fails here.
An `if __name__ == "__main__":` block is the program's entry point, not part of the module others import,
so its imports are left out.

The layers, lowest first. A module may import its own layer and the ones below, never one above:

    foundation   settings, jupyter, store, stats, machine (what the machine is good at), the package itself
    models       vitrepro.models.*
    data         vitrepro.data
    evaluate     evaluate, analysis, baselines (evaluators, and the analyses of trained models)
    train        vitrepro.train (it runs the evaluators at the end of a run, so evaluate sits below it)
    experiments  vitrepro.experiments.* (the notebooks' code)
    report       verdicts, report (read the experiments' results)
    entry        experiments.run_all (runs every notebook, then the report)
"""
from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vitrepro"
MAX_FUNCTION_LINES = 80

LAYERS = [
    ("foundation", ["vitrepro", "vitrepro.settings", "vitrepro.jupyter", "vitrepro.store", "vitrepro.stats",
                    "vitrepro.machine", "vitrepro.typed"]),
    ("models", ["vitrepro.models", "vitrepro.models.*"]),
    ("data", ["vitrepro.data"]),
    ("evaluate", ["vitrepro.evaluate", "vitrepro.analysis", "vitrepro.baselines"]),
    ("train", ["vitrepro.train"]),
    ("experiments", ["vitrepro.experiments", "vitrepro.experiments.*"]),
    ("report", ["vitrepro.verdicts", "vitrepro.report"]),
    ("entry", ["vitrepro.experiments.run_all"]),
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _layer(module: str) -> int:
    """The highest layer whose pattern names the module (run_all is an experiments module and an entry point)."""
    found = [i for i, (_, patterns) in enumerate(LAYERS) if any(fnmatch.fnmatchcase(module, p) for p in patterns)]
    assert found, f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}"
    return max(found)


def _is_main_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
            and test.left.id == "__name__")


def _imported(module: str, path: Path) -> dict[str, int]:
    """vitrepro modules imported anywhere in the file (top level, in functions, under TYPE_CHECKING) -> line."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: dict[str, int] = {}

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if _is_main_block(child):
                continue
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                names = [target] + [f"{target}.{a.name}" for a in child.names]  # `from . import train`
            for name in names:
                if name in MODULES and name != module:
                    found.setdefault(name, child.lineno)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return found


IMPORTS = {m: _imported(m, p) for m, p in MODULES.items()}


def test_every_module_has_a_layer():
    for module in MODULES:
        _layer(module)


def test_imports_point_down():
    upward = [f"{MODULES[a].relative_to(PACKAGE.parent)}:{line}: {a} ({LAYERS[_layer(a)][0]}) imports {b} "
              f"({LAYERS[_layer(b)][0]})"
              for a, targets in IMPORTS.items() for b, line in targets.items() if _layer(b) > _layer(a)]
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def _circles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), i.e. the import circles."""
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                connect(w)
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
                circles.append(sorted(component))

    for v in edges:
        if v not in index:
            connect(v)
    return circles


def _shortest_circle(edges: dict[str, dict[str, int]], start: str, members: set[str]) -> list[str]:
    """The shortest path start -> ... -> start inside one circle (breadth first)."""
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for w in sorted(edges[path[-1]]):
            if w == start:
                return path + [start]
            if w in members and w not in seen:
                seen.add(w)
                paths.append(path + [w])
    return [start]


def test_no_import_circle():
    lines = []
    for circle in _circles(IMPORTS):
        members = set(circle)
        shortest = {}
        for m in circle:  # one entry per circle, whichever module it starts from
            path = _shortest_circle(IMPORTS, m, members)
            shortest.setdefault(frozenset(path), path)
        for path in sorted(shortest.values(), key=len)[:6]:
            lines.append("  " + " ".join(f"{a} -[{MODULES[a].name}:{IMPORTS[a][b]}]->" for a, b in zip(path, path[1:]))
                         + f" {path[-1]}")
    assert not lines, "import circles (lazy imports included), the shortest ones:\n" + "\n".join(lines)


def test_circle_finder_finds_a_lazy_circle():
    """The check itself: a circle closed by a function-level import is found; a chain is not a circle."""
    assert _circles({"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b": 1}, "b": {"c": 2}, "c": {}}) == []
    tree = ast.parse("def f():\n    from . import train\n")
    assert isinstance(tree.body[0].body[0], ast.ImportFrom)  # what _imported visits inside functions


def test_no_import_of_vitrepro_by_string():
    """No `__import__("vitrepro...")` / `importlib.import_module("vitrepro...")` with a literal name: an
    import the two tests above cannot see."""
    hits = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in (
                    "__import__", "import_module") and node.args and isinstance(node.args[0], ast.Constant) \
                    and str(node.args[0].value).startswith(("vitrepro", ".")):
                hits.append(f"{path.name}:{node.lineno}")
    assert not hits, hits


def _functions():
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                yield f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}", node.end_lineno - start + 1


@pytest.mark.parametrize("limit", [MAX_FUNCTION_LINES])
def test_no_function_over_80_lines(limit):
    long = sorted(((n, where) for where, n in _functions() if n > limit), reverse=True)
    assert not long, f"functions over {limit} lines (split them into named steps):\n" + "\n".join(
        f"  {n} lines: {where}" for n, where in long)
