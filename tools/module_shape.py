"""The shape of a package's code: how long its functions are, and which of its modules import which.

    python tools/module_shape.py [PACKAGE_DIR] [--check]

Prints (a) the histogram of function lengths (every def, methods and nested ones included, measured from
the AST as end_lineno - lineno + 1) in bins of 20 lines, and the functions over 60 lines by name; (b) the
import graph between the package's modules, module-level imports and function-level imports separately,
and every circle (a strongly connected component, with one path around it). With --check it exits 1 when
a function is over 80 lines or the module-level imports make a circle.

Rules for the graph: `from pkg.a import b` imports pkg.a.b when that is a module, else pkg.a. An import of a
package that contains the importer (`from kdcache import __version__` in kdcache.data.prepare) is left
out: Python imports a module's parent packages before the module, so such an import never starts one.
Imports under `if TYPE_CHECKING:` never run and are left out. An import in a class body runs at import
time: it is module-level.
"""

import argparse
import ast
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Set, Tuple

BIN = 20
REPORT_OVER = 60      # named in the report
LIMIT = 80            # --check fails above this


@dataclass(frozen=True)
class Function:
    module: str
    name: str         # Class.method or outer.inner
    lineno: int
    length: int


Graph = Dict[str, Set[str]]


def module_names(package_dir: Path) -> Dict[str, Path]:
    """Dotted module name -> file, for every .py file under package_dir (its __init__.py is the package)."""
    package_dir = Path(package_dir)
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def functions(module: str, tree: ast.AST) -> List[Function]:
    found = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                found.append(Function(module, name, child.lineno, child.end_lineno - child.lineno + 1))
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)
    visit(tree, "")
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(tree: ast.AST) -> Iterable[Tuple[ast.stmt, bool]]:
    """(import statement, whether it runs inside a function) for every import that can run."""
    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for other in child.orelse:
                    yield from visit_one(other, in_function)
                continue
            yield from visit_one(child, in_function)

    def visit_one(child, in_function):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, in_function
        else:
            yield from visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                        ast.Lambda)))
    yield from visit(tree, False)


def _targets(node: ast.stmt, importer: str, is_package: bool, known: Set[str]) -> Set[str]:
    def existing(name: str) -> Optional[str]:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = importer if is_package else importer.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
    out = {existing(n) for n in names} - {None}
    # a package holding the importer is already imported (see the module docstring)
    return {t for t in out if not (importer == t or importer.startswith(t + "."))}


def build(package_dir: Path) -> Tuple[List[Function], Graph, Graph]:
    """Every function, and the module-level and function-level import graphs of the package's modules."""
    modules = module_names(package_dir)
    known = set(modules)
    found: List[Function] = []
    top: Graph = defaultdict(set)
    inner: Graph = defaultdict(set)
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        found += functions(module, tree)
        for node, in_function in imports(tree):
            targets = _targets(node, module, path.name == "__init__.py", known)
            (inner if in_function else top)[module] |= targets
    return found, dict(top), dict(inner)


def merged(*graphs: Graph) -> Graph:
    out: Graph = defaultdict(set)
    for graph in graphs:
        for a, targets in graph.items():
            out[a] |= targets
    return dict(out)


def strongly_connected(graph: Graph) -> List[List[str]]:
    """Tarjan's algorithm (iterative); the components with a circle (two modules or more, or a self-import)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    on_stack: Set[str] = set()
    stack: List[str] = []
    components = []
    nodes = sorted(set(graph) | {t for ts in graph.values() for t in ts})
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            advanced = False
            for nxt in successors:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph.get(node, ()):
                    components.append(sorted(component))
    return sorted(components)


def one_circle(graph: Graph, component: List[str]) -> List[str]:
    """A path a -> ... -> a through the component (breadth-first, so a shortest one from its first module)."""
    members = set(component)
    start = component[0]
    previous = {start: None}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                path = [node]
                while previous[path[-1]] is not None:
                    path.append(previous[path[-1]])
                return list(reversed(path)) + [start]
            if nxt in members and nxt not in previous:
                previous[nxt] = node
                queue.append(nxt)
    return [start]


def histogram(found: List[Function]) -> List[Tuple[str, int]]:
    top = max((f.length for f in found), default=0) // BIN
    counts = [0] * (top + 1)
    for f in found:
        counts[f.length // BIN] += 1
    return [(f"{b * BIN}-{b * BIN + BIN - 1}", n) for b, n in enumerate(counts)]


def _print_graph(title: str, graph: Graph) -> None:
    edges = sum(len(t) for t in graph.values())
    print(f"\n{title}: {edges} edges")
    for module in sorted(graph):
        if graph[module]:
            print(f"  {module} -> {', '.join(sorted(graph[module]))}")


def _print_circles(title: str, graph: Graph) -> List[List[str]]:
    circles = strongly_connected(graph)
    print(f"\ncircles ({title}): {len(circles) or 'none'}")
    for component in circles:
        print(f"  {{{', '.join(component)}}}: {' -> '.join(one_circle(graph, component))}")
    return circles


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package", nargs="?", default=str(Path(__file__).resolve().parent.parent / "kdcache"),
                        help="the package directory (default: kdcache/ of this checkout)")
    parser.add_argument("--check", action="store_true",
                        help=f"exit 1 when a function is over {LIMIT} lines or module-level imports make a circle")
    args = parser.parse_args(argv)
    found, top, inner = build(Path(args.package))
    print(f"function lengths ({len(found)} functions, lines from def to its last line)")
    for label, n in histogram(found):
        print(f"  {label:>9}: {n}")
    long = sorted((f for f in found if f.length > REPORT_OVER), key=lambda f: -f.length)
    print(f"\nover {REPORT_OVER} lines: {len(long) or 'none'}")
    for f in long:
        print(f"  {f.length:4d}  {f.module}:{f.name} (line {f.lineno})")
    _print_graph("module-level imports", top)
    _print_graph("function-level imports", inner)
    module_circles = _print_circles("module-level imports", top)
    _print_circles("module- and function-level imports together", merged(top, inner))
    if args.check:
        too_long = [f for f in found if f.length > LIMIT]
        failures = [f"{f.module}:{f.name} is {f.length} lines (limit {LIMIT})" for f in too_long]
        failures += [f"module-level import circle: {' -> '.join(one_circle(top, c))}" for c in module_circles]
        for line in failures:
            print(f"check: {line}", file=sys.stderr)
        return 1 if failures else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
