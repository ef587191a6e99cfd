"""The package's modules import one another in one direction: no import circles.

Every import counts, those inside functions and under TYPE_CHECKING too, and importing a submodule
counts as importing the packages above it (Python runs their __init__ first).
"""
import ast
from pathlib import Path

import vggkit

PACKAGE = Path(vggkit.__file__).parent


def module_files() -> dict[str, tuple[Path, list[str]]]:
    """Module name -> (file, the package the module's relative imports start from)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ["vggkit", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
            modules[".".join(parts)] = (path, parts)
        else:
            modules[".".join(parts)] = (path, parts[:-1])
    return modules


def imported_names(path: Path, package: list[str]):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            yield module
            yield from (f"{module}.{alias.name}" for alias in node.names)  # a submodule, where it is one


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    graph = {}
    for name, (path, package) in modules.items():
        targets = set()
        for imported in imported_names(path, package):
            parts = imported.split(".")
            for end in range(2, len(parts) + 1):  # the module and the packages above it, vggkit itself aside
                target = ".".join(parts[:end])
                if target in modules and target != name and not name.startswith(target + "."):
                    targets.add(target)
        graph[name] = targets
    return graph


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while not component or node not in component:
                component.add(stack.pop())
            on_stack.difference_update(component)
            if len(component) > 1:
                found.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_package_has_no_import_circles():
    found = [sorted(c) for c in circles(import_graph())]
    assert found == []


def test_the_circle_finder_finds_a_circle_through_a_package():
    graph = {"vggkit.a": {"vggkit.p"}, "vggkit.p": {"vggkit.p.b"}, "vggkit.p.b": {"vggkit.a"}, "vggkit.c": {"vggkit.a"}}
    assert circles(graph) == [{"vggkit.a", "vggkit.p", "vggkit.p.b"}]


def test_the_graph_sees_imports_inside_functions_and_of_submodules():
    graph = import_graph()
    assert "vggkit.kernels" in graph["vggkit.optim"]  # `from .kernels import ...` inside a builder
    assert {"vggkit.data", "vggkit.data.load"} <= graph["vggkit.config"]  # `from .data.load import is_folder`
    assert "vggkit.bench" not in graph["vggkit.bench.machine"]  # a module's own package is already importing
