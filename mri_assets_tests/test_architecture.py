"""The layout and layer rules of docs/architecture.md, checked on every import of the package.

Imports are read with `ast` from every module of `mri_assets`, function-local ones included, so
an import hidden inside a function cannot hide a cycle or a layer breach.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mri_assets"
DAGSTER_PACKAGES = {"dagster", "dagster_aws", "dagster_celery", "dagster_k8s", "dagster_mlflow"}

# The layers, bottom up (docs/architecture.md), and the first-level names of `mri_assets` in each.
LAYERS = {
    "core": {"core"},
    "deployment": {"deployment"},
    "resources": {"resources"},
    "assets": {"assets"},
    "triage": {"triage"},
    "wiring": {"partitions", "executors", "jobs", "sensors", "schedules", "code_location",
               "location_runs", "local_run", "smoke_run", "definitions"},
    "entry": {"operations", "simulated_clinician", "demo", "workers", "cli"},
}
MAY_IMPORT = {
    "core": {"core"},
    "deployment": {"deployment", "core"},
    "resources": {"resources", "deployment", "core"},
    "assets": {"assets", "resources", "core"},  # and `partitions`, see ASSETS_MAY_IMPORT
    "triage": {"triage", "resources", "deployment", "core"},
    "wiring": {"wiring", "assets", "resources", "deployment", "core"},
    "entry": {"entry", "wiring", "triage", "assets", "resources", "deployment", "core"},
}
ASSETS_MAY_IMPORT = {"mri_assets.partitions"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> str:
    first = module.split(".")[1] if "." in module else ""
    found = [layer for layer, names in LAYERS.items() if first in names]
    assert found or module == "mri_assets", f"{module} is in no layer of docs/architecture.md"
    return found[0] if found else "entry"


def imported(module: str, path: Path) -> tuple[set[str], set[str]]:
    """(modules of mri_assets, other top-level packages) that `module` imports anywhere."""
    ours: set[str] = set()
    others: set[str] = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                (ours if alias.name.startswith("mri_assets") else others).add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("mri_assets"):
                others.add(target)
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                ours.add(submodule if submodule in MODULES else target)
    return {m for m in ours if m in MODULES and m != module}, {o.split(".")[0] for o in others}


GRAPH = {module: imported(module, path) for module, path in MODULES.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
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
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle_hidden_behind_a_third_module():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_no_module_of_mri_assets_is_in_an_import_cycle():
    ours = {module: deps for module, (deps, _) in GRAPH.items()}
    assert cycles(ours) == []


def test_every_module_belongs_to_a_layer_and_imports_only_the_layers_below_it():
    breaches = []
    for module, (deps, _) in sorted(GRAPH.items()):
        layer = layer_of(module)
        for dep in sorted(deps):
            if layer == "assets" and dep in ASSETS_MAY_IMPORT:
                continue
            if layer_of(dep) not in MAY_IMPORT[layer]:
                breaches.append(f"{module} ({layer}) imports {dep} ({layer_of(dep)})")
    assert breaches == []


def test_core_imports_no_dagster():
    breaches = [module for module, (_, others) in GRAPH.items()
                if layer_of(module) == "core" and others & DAGSTER_PACKAGES]
    assert breaches == []


def test_the_deployment_edge_imports_no_dagster():
    _, others = GRAPH["mri_assets.deployment"]
    assert not others & DAGSTER_PACKAGES
