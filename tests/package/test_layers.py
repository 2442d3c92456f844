"""Layering: every module imports only from its own layer or the layers below, and the
module import graph (lazy imports inside functions included) has no cycle.

    core      dualrs_route.experts   statistics, noise, smoothing, engine protocol, config, folders
    backends  dualrs_route.export    export time (ONNX, int8, TensorRT build) and run time (counters)
    routing   dualrs_route.router    dual, cascade, labels, training, calibration, runs, results
    top       dualrs_route, .api, .cli
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"dualrs_route.experts": ROOT / "experts", "dualrs_route.export": ROOT / "export",
            "dualrs_route.router": ROOT / "router", "dualrs_route": ROOT / "dualrs_route"}
LAYERS = {"dualrs_route.experts": 0, "dualrs_route.export": 1, "dualrs_route.router": 2, "dualrs_route": 3}
NAMES = ("core", "backends", "routing", "top")


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def layer_of(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """Every project module ``module`` imports, anywhere in its body."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [prefix] + [f"{prefix}.{alias.name}" for alias in node.names]
        for target in targets:
            # the longest known module that the name starts with
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != module:
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {m: imports_of(m, p, known) for m, p in found.items()}


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in sorted(edges.items()):
        for target in sorted(targets):
            if layer_of(target) > layer_of(module):
                bad.append(f"{module} ({NAMES[layer_of(module)]}) imports {target} ({NAMES[layer_of(target)]})")
    return bad


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of size > 1 (Tarjan), ignoring a package's own __init__ re-exports."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w.startswith(v + "."):  # a package importing its own submodules is not a cycle
                continue
            if v.startswith(w + ".") and w in PACKAGES:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_every_package_folder_is_scanned():
    found = modules()
    assert "dualrs_route.experts.stats" in found and "dualrs_route.export.runtime" in found
    assert "dualrs_route.router.dual" in found and "dualrs_route.cli" in found


def test_no_module_imports_a_higher_layer():
    assert upward_imports(graph()) == []


def test_the_import_graph_has_no_cycle():
    assert cycles(graph()) == []


def test_the_checks_catch_a_planted_upward_import_and_cycle():
    edges = graph()
    edges["dualrs_route.experts.stats"] = edges["dualrs_route.experts.stats"] | {"dualrs_route.router.dual"}
    assert upward_imports(edges) == [
        "dualrs_route.experts.stats (core) imports dualrs_route.router.dual (routing)"]
    assert any("dualrs_route.experts.stats" in c for c in cycles(edges))


@pytest.mark.parametrize("old", ["experts", "export", "router"])
def test_no_module_imports_the_old_top_level_names(old):
    offenders = [m for m, p in modules().items()
                 if any(isinstance(n, (ast.Import, ast.ImportFrom)) and not getattr(n, "level", 0)
                        and any(name == old or name.startswith(old + ".")
                                for name in ([a.name for a in n.names] if isinstance(n, ast.Import) else [n.module or ""]))
                        for n in ast.walk(ast.parse(p.read_text())))]
    assert offenders == []
