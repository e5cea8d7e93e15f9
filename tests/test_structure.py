"""The shape of the library, read statically from the sources: import direction, no cycles, file sizes.

Every import counts, wherever it stands: at module level, inside a function, under TYPE_CHECKING.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cluster", "router", "experts")
MAX_LINES = 400

# Inside cluster/, a part may import only parts of a lower layer (and itself):
# cli -> {batch, serve} -> instance -> {transport, metrics, options}, with the Python API (engine) between
# batch and instance, and two leaves everything may use.
CLUSTER_LAYERS = {
    "cli": 5,
    "serve_app": 5,  # the Serve import path earlier versions wrote: it re-exports serve.app
    "batch": 4,
    "serve": 4,
    "engine": 3,
    "instance": 2,
    "transport": 1,
    "metrics": 1,
    "options": 1,
    "errors": 0,
    "demo": 0,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(path: Path, module: str) -> set[str]:
    """Every module `path` imports, resolved to absolute names (relative imports included)."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def internal_graph() -> dict[str, set[str]]:
    """module -> the project's modules it imports (a `from pkg import name` of a module counts as it)."""
    modules = sources()
    return {
        name: {m for m in imports_of(path, name) if m in modules and m != name}
        for name, path in modules.items()
    }


def cluster_part(module: str) -> str:
    return module.split(".")[1]


def test_every_cluster_part_has_a_layer():
    parts = {cluster_part(m) for m in sources() if m.startswith("cluster.")}
    assert parts == set(CLUSTER_LAYERS), "a new part of cluster/ needs its place in CLUSTER_LAYERS"


def test_imports_point_one_way():
    wrong = []
    for module, targets in internal_graph().items():
        top = module.split(".")[0]
        for target in targets:
            target_top = target.split(".")[0]
            if top == "experts" and target_top != "experts":
                wrong.append(f"{module} -> {target} (experts imports nothing of the project)")
            elif top == "router" and target_top == "cluster":
                wrong.append(f"{module} -> {target} (router never imports cluster)")
            elif top == "cluster" and target_top == "cluster" and cluster_part(module) != cluster_part(target):
                if CLUSTER_LAYERS[cluster_part(target)] >= CLUSTER_LAYERS[cluster_part(module)]:
                    wrong.append(f"{module} -> {target} (against cli -> batch/serve -> instance -> ...)")
    assert not wrong, "imports against the one-way direction:\n" + "\n".join(sorted(wrong))


def test_router_and_experts_do_not_import_ray():
    offenders = [
        f"{name} imports {m}"
        for name, path in sources().items()
        if name.split(".")[0] in ("router", "experts")
        for m in imports_of(path, name)
        if m == "ray" or m.startswith("ray.")
    ]
    assert not offenders, offenders


def test_no_import_cycles():
    graph = internal_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("module", sorted(sources()))
def test_library_files_stay_small(module):
    lines = len(sources()[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines; split it by job (at most {MAX_LINES})"


def test_the_checker_sees_a_cycle_and_a_wrong_direction(tmp_path, monkeypatch):
    """The graph code itself: a planted cycle and a planted upward import are both found."""
    pkg = tmp_path / "cluster"
    (pkg / "instance").mkdir(parents=True)
    (pkg / "serve").mkdir()
    for init in (pkg / "__init__.py", pkg / "instance" / "__init__.py", pkg / "serve" / "__init__.py"):
        init.write_text("")
    (pkg / "instance" / "a.py").write_text("def f():\n    from cluster.serve import b\n")
    (pkg / "serve" / "b.py").write_text("from cluster.instance import a\n")
    this = sys.modules[__name__]
    monkeypatch.setattr(this, "ROOT", tmp_path)
    monkeypatch.setattr(this, "PACKAGES", ("cluster",))
    graph = internal_graph()
    assert "cluster.serve.b" in graph["cluster.instance.a"]
    assert "cluster.instance.a" in graph["cluster.serve.b"]
    with pytest.raises(AssertionError, match="cluster.instance.a -> cluster.serve.b"):
        test_imports_point_one_way()
    with pytest.raises(AssertionError, match="import cycles"):
        test_no_import_cycles()
