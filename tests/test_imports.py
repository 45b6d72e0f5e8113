"""The import graph of mm/, index/ and service/: no cycles, and the layers import one way.

Read from the source with ``ast`` (nothing is imported). Every import counts, the ones at module level
and the lazy ones inside functions alike: a lazy import that closes a circle is the same dependency,
only deferred. Imports under ``if TYPE_CHECKING:`` are for the type checker and do not count.

``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg`` (its
``__init__``). The implicit import of a package's ``__init__`` when one of its submodules is imported is
not an edge (Python initialises the parent first, so it cannot deadlock a circle by itself).

Layer rule (docs/architecture.md): ``mm`` imports neither ``index`` nor ``service``; ``index`` imports
neither ``mm`` nor ``service``; ``service`` may import both.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mm", "index", "service")
FORBIDDEN = {"mm": ("index", "service"), "index": ("mm", "service")}


def module_files(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under the packages (``__init__`` is the package)."""
    out = {}
    for pkg in packages:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = f
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement in ``tree`` (at any depth), except those under ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:  # the ``else:`` branch runs
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """Module -> the modules of ``packages`` it imports (see the module docstring for what counts)."""
    files = module_files(root, packages)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
                continue
            base = _absolute(name, is_package, node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.add(sub if sub in files else base)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component that has one (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_cycle_in(graph, set(comp)) for comp in components]


def _cycle_in(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A shortest circle through the first module of a strongly connected component (BFS back to it)."""
    start = min(comp)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(comp)}")


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for mod, targets in sorted(graph.items()):
        banned = FORBIDDEN.get(mod.split(".")[0], ())
        out += [f"{mod} -> {t}" for t in sorted(targets) if t.split(".")[0] in banned]
    return out


# the project ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(ROOT)


def test_graph_covers_the_packages(graph: dict[str, set[str]]) -> None:
    # a sanity floor, so that a broken file walk cannot make the checks below pass vacuously
    assert {"mm.model", "mm.quantize", "index.collection", "service.app"} <= set(graph)
    assert "mm.backbone" in graph["mm.model"]


def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    cycles = find_cycles(graph)  # one per circle of mutually importing modules; fix, rerun, repeat
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_layers_import_one_way(graph: dict[str, set[str]]) -> None:
    bad = layer_violations(graph)
    assert not bad, "layer rule broken (mm imports neither index nor service; index not mm/service):\n" + (
        "\n".join(bad)
    )


def test_loading_an_adapter_does_not_import_the_trainer(graph: dict[str, set[str]]) -> None:
    """A server that puts an adapter on its model needs the adapter files and math, not the trainer."""
    seen, todo = set(), ["mm.adapter"]
    while todo:
        for w in graph[todo.pop()] - seen:
            seen.add(w)
            todo.append(w)
    assert "mm.lora" in seen
    assert not seen & {"mm.train", "mm.finetune", "mm.features"}, sorted(seen)


# Optional extras (pyproject.toml): nothing imports them unless asked, so no module may import one at its
# top level (a lazy import inside the function that needs it is the one way in).
OPTIONAL = ("llama_cpp", "ray")


def eager_imports(tree: ast.Module) -> set[str]:
    """Top-level names imported when the module itself is imported (outside functions), as written."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def test_optional_extras_are_imported_only_where_asked_for() -> None:
    eager, lazy = [], set()
    for name, path in module_files(ROOT, PACKAGES).items():
        tree = ast.parse(path.read_text(), str(path))
        eager += [f"{name} imports {m} at import time" for m in sorted(eager_imports(tree)) if m in OPTIONAL]
        lazy |= {(name, a.name) for n in _imports(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not eager, "\n".join(eager)
    # a floor, so that a broken walk cannot pass vacuously: the gguf backend imports llama_cpp lazily
    assert ("service.generation.backends.gguf", "llama_cpp") in lazy


# the checker itself ----------------------------------------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)


def test_checker_finds_a_lazy_cycle_and_ignores_type_checking(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "pa/__init__.py": "",
            "pa/one.py": "from pa import two\n",
            "pa/two.py": "def f():\n    from .three import g\n",  # lazy and relative: still an edge
            "pa/three.py": "import pa.one\n",
            "pa/hint.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pa.four import X\n",
            "pa/four.py": "import pa.hint\n",  # hint -> four only for the type checker: no cycle
        },
    )
    g = import_graph(tmp_path, ("pa",))
    assert g["pa.two"] == {"pa.three"}
    assert g["pa.hint"] == set()
    assert find_cycles(g) == [["pa.one", "pa.two", "pa.three", "pa.one"]]


def test_checker_reports_layer_violations(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "mm/__init__.py": "",
            "mm/a.py": "def f():\n    from index.b import x\n",
            "index/__init__.py": "",
            "index/b.py": "x = 1\n",
            "service/__init__.py": "",
            "service/c.py": "import mm.a\nimport index.b\n",  # service may import both
        },
    )
    g = import_graph(tmp_path)
    assert layer_violations(g) == ["mm.a -> index.b"]
    assert find_cycles(g) == []


def test_eager_imports_leave_out_functions_and_type_checking() -> None:
    text = (
        "import ray.data\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import llama_cpp\n"
        "def f():\n    import llama_cpp\nclass C:\n    from llama_cpp import Llama\n"
    )
    assert eager_imports(ast.parse(text)) == {"ray", "typing", "llama_cpp"}  # a class body runs at import
