"""The package's modules import each other without a circle.

The graph is built from the source with ``ast``, not by importing it: an edge ``a -> b`` for every
``import``/``from ... import`` in ``a`` that names a module (or package) ``b`` of
``acpo_lightning``, at module level or inside a function (a deferred import is still a runtime
import, and the circle it closes still runs on the first call). Imports under
``if TYPE_CHECKING:`` are left out: they never run. A package's ``__init__`` is the node of the
package's name; importing ``a.b.c`` also runs ``a`` and ``a.b``, but those implicit edges are left
out (every submodule would otherwise close a circle with a package ``__init__`` that re-exports it).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "acpo_lightning"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = ast.unparse(node.test)
    return test in ("TYPE_CHECKING", "typing.TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of ``tree`` outside ``if TYPE_CHECKING:`` blocks."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            visit(child)

    visit(tree)
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """``module -> the package's modules it imports at run time``."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from the module's own package
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                # ``from pkg import sub`` imports the submodule ``pkg.sub`` when there is one
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                    for a in node.names
                ]
            for target in targets:
                while target and target not in modules:  # ``import a.b.C`` -> a.b
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def package_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}
    return import_graph(modules)


def test_the_graph_sees_a_deferred_import_circle_and_skips_type_checking_imports(
    tmp_path: Path,
) -> None:
    """The checker itself: a circle closed by an import inside a function is found; one closed
    only under ``if TYPE_CHECKING:`` is not."""
    files = {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg import b\n",
        "pkg/b.py": "def f():\n    from pkg.a import g\n",
        "pkg/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.d import x\n",
        "pkg/d.py": "import pkg.c\n",
    }
    for relative, text in files.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(text)
    modules = {
        ".".join(p.relative_to(tmp_path).with_suffix("").parts).removesuffix(".__init__"): p
        for p in sorted(tmp_path.rglob("*.py"))
    }
    graph = import_graph(modules)
    assert graph["pkg.b"] == {"pkg.a"} and graph["pkg.c"] == set() and graph["pkg.d"] == {"pkg.c"}
    assert circles(graph) == [frozenset({"pkg.a", "pkg.b"})]


def test_the_cli_modules_import_each_other_in_one_direction() -> None:
    graph = package_graph()
    cli, cache, export = (
        "acpo_lightning.cli",
        "acpo_lightning.cache_latents",
        "acpo_lightning.export",
    )
    assert {cache, export} <= graph[cli]
    assert cli not in graph[cache] and cli not in graph[export]


def test_no_import_circle_in_the_package() -> None:
    """Each circle is named by its modules. (At the start of issue 15, cli <-> cache_latents was
    one; module.py <-> rollout.py imported each other only under ``TYPE_CHECKING``.)"""
    found = circles(package_graph())
    assert not found, [sorted(c) for c in found]
