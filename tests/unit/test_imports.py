"""No import circle among raytune_ft's modules, lazy (in-function) imports included: data flows one way, YAML ->
config -> data -> model -> training -> search -> export -> serving -> bench -> report, and a module that needs a
name from further along takes it from a leaf (raytune_ft.layout for file names)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "raytune_ft"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package's modules PATH imports, at any depth of its code. `from pkg import sub` imports the submodule
    `sub` (its package was already being imported); `from pkg import name` imports `pkg`."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    [*package.split(".")[: len(package.split(".")) - node.level + 1], *filter(None, [base])]
                )
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != me:
                found.add(name)
    return found


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def package_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports_of(path, set(paths)) for name, path in paths.items()}


def test_no_module_of_the_package_imports_itself_through_others():
    graph = package_graph()
    assert len(graph) > 60 and graph["raytune_ft.modelcard"] == {"raytune_ft.layout"}
    assert circles(graph) == []


def test_the_circle_finder_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_layout_module_is_a_leaf():
    assert package_graph()["raytune_ft.layout"] == set()


def test_the_architecture_page_lists_who_imports_whom_as_the_code_does():
    """docs/architecture.md's import table is read by people deciding where a new module goes: each row's
    packages import exactly the packages that row names (a dotted name counts as its package), so the page cannot
    drift from the code."""
    page = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    section = page.split("## Who may import whom", 1)[1]
    rows = [line.split("|")[1:3] for line in section.splitlines() if line.startswith("| `")]
    top = lambda name: name.split(".")[1] if "." in name else "raytune_ft"  # noqa: E731
    actual: dict[str, set[str]] = {}
    for module, deps in package_graph().items():
        actual.setdefault(top(module), set()).update(top(d) for d in deps if top(d) != top(module))
    listed = set()
    for who, whom in rows:
        named = {n.split(".")[0] for n in re.findall(r"`([\w.]+)`", whom)}
        for package in re.findall(r"`([\w.]+)`", who):
            listed.add(package)
            if "everything" in whom:
                continue
            expected = {"raytune_ft" if n == "__version__" else n for n in named}
            assert actual.get(package, set()) == expected, f"architecture.md's row for {package}"
    assert listed == set(actual) - {"raytune_ft"}, "architecture.md's import table misses a package"


def test_the_architecture_page_maps_every_module():
    """The module map names each module (`data/split.py`), or its package's files in a package row (`bench/`:
    `train.py`, ...): a module added without a line there fails here."""
    page = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    section = page.split("## Module map", 1)[1].split("\n## ", 1)[0]
    named = set()
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        who, what = line.split("|")[1:3]
        for name in re.findall(r"`([\w/.]+)`", who):
            if name.endswith("/"):  # a package row lists its files in its description
                named |= {name + f for f in re.findall(r"`(\w+\.py)`", what)}
            named.add(name.removeprefix("raytune_ft/"))
    modules = {
        str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")
    }
    assert sorted(modules - named) == [], "docs/architecture.md's module map misses these"
