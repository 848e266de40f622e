"""The package's shape, read from the source with ast (nothing is imported):

- no import cycle among the modules of ``sdexport/`` and ``runtime/``, counting imports inside
  functions (a cycle that only works because one side imports late is still a knot to untie);
- ``runtime/`` names no torch, diffusers, transformers, tokenizers or sdexport import anywhere, not
  even in a function that a test never reaches (tests/test_torch_free.py checks what really loads);
- no function over 80 lines in the two files people read first.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sdexport", "runtime")
RUNTIME_FORBIDDEN = ("torch", "diffusers", "transformers", "tokenizers", "sdexport")
MAX_FUNCTION_LINES = 80


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the two packages (``pkg/__init__.py`` is ``pkg``)."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(tree: ast.AST):
    """Every Import / ImportFrom in the tree, at any depth, except under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def absolute_stem(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` reads from (relative levels resolved)."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The most specific repository module a dotted name lies in (``a.b.func`` -> ``a.b``)."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in modules:
            return ".".join(parts)
        parts.pop()
    return None


def import_targets(module: str, path: Path, node: ast.Import | ast.ImportFrom, modules: dict[str, Path]) -> set[str]:
    """Repository modules one import statement loads: ``from a import b`` is the module ``a.b`` when
    there is one, else ``a`` (its package ``__init__`` or module file)."""
    if isinstance(node, ast.Import):
        found = {resolve(alias.name, modules) for alias in node.names}
    else:
        stem = absolute_stem(module, path, node)
        found = {f"{stem}.{a.name}" if f"{stem}.{a.name}" in modules else resolve(stem, modules) for a in node.names}
    return {m for m in found if m and m != module}


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in imports(ast.parse(path.read_text(), str(path))):
            graph[module] |= import_targets(module, path, node, modules)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (a depth-first search): the groups of modules that reach each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

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
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [g for g in groups if len(g) > 1]


def a_cycle(graph: dict[str, set[str]], group: list[str]) -> list[str]:
    """One closed path through a strongly connected group, by depth-first search from its first module."""
    members, start = set(group), group[0]
    path, seen = [start], {start}

    def walk(v: str) -> bool:
        for w in sorted(graph[v] & members):
            if w == start:
                return True
            if w not in seen:
                seen.add(w)
                path.append(w)
                if walk(w):
                    return True
                path.pop()
        return False

    walk(start)
    return path + [start]


def test_resolver_on_known_imports():
    modules = module_files()
    graph = import_graph()
    assert "runtime.backends.onnxruntime" in graph["runtime.device_loop"]  # an import inside a method
    assert "runtime.manifest" in graph["runtime.pipeline"]
    assert resolve("runtime.metrics.psnr", modules) == "runtime.metrics"
    assert resolve("numpy", modules) is None


def test_cycle_finder_reports_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    groups = strongly_connected(graph)
    assert groups == [["a", "b", "c"]] and a_cycle(graph, groups[0]) == ["a", "b", "c", "a"]


def test_no_import_cycle():
    graph = import_graph()
    cycles = [" -> ".join(a_cycle(graph, g)) for g in strongly_connected(graph)]
    assert not cycles, "import cycles (imports inside functions included):\n" + "\n".join(cycles)


def test_runtime_imports_nothing_heavy():
    offenders = []
    for module, path in module_files().items():
        if not module.startswith("runtime"):
            continue
        for node in imports(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [absolute_stem(module, path, node)]
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno}: {name}" for name in names
                          if name.split(".")[0] in RUNTIME_FORBIDDEN]
    assert not offenders, "runtime/ must stay torch-free:\n" + "\n".join(offenders)


def long_functions(path: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    return [f"{path.relative_to(ROOT)}:{n.lineno} {n.name}: {n.end_lineno - n.lineno + 1} lines"
            for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > limit]


def test_no_long_function_in_pipeline_and_cli():
    found = long_functions(ROOT / "runtime" / "pipeline.py") + long_functions(ROOT / "sdexport" / "cli.py")
    assert not found, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(found)
