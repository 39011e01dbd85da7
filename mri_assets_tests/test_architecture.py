"""The layout and layer rules of docs/architecture.md, checked on every import of the package.

Imports are read with `ast` from every module of `mri_assets`, function-local ones included, so
an import hidden inside a function cannot hide a cycle or a layer breach.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mri_assets"
DAGSTER_PACKAGES = {"dagster", "dagster_aws", "dagster_celery", "dagster_k8s", "dagster_mlflow"}

# The layers, bottom up (docs/architecture.md): each layer is a package of `mri_assets`, except
# the edge, which is the one module at the root.
LAYERS = {
    "core": {"core"},
    "deployment": {"deployment"},
    "resources": {"resources"},
    "assets": {"assets"},
    "triage": {"triage"},
    "wiring": {"definitions"},
    "entry": {"cli"},
}
MAY_IMPORT = {
    "core": {"core"},
    "deployment": {"deployment", "core"},
    "resources": {"resources", "deployment", "core"},
    "assets": {"assets", "resources", "core"},
    "triage": {"triage", "resources", "deployment", "core"},
    "wiring": {"wiring", "assets", "resources", "deployment", "core"},
    "entry": {"entry", "wiring", "triage", "assets", "resources", "deployment", "core"},
}
# The root holds the package marker, the edge and the layers' packages, nothing else.
ROOT_MODULES = {"mri_assets", "mri_assets.deployment"}
ASSET_SUPPORT = "mri_assets.assets.support"
# Dagster fixes an asset's partitions where it is declared, so the shard count comes from the
# deployment there; no other module of `assets/` reads the deployment.
READS_THE_DEPLOYMENT_FOR_ASSETS = "mri_assets.assets.support.partitions"


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
            if module == READS_THE_DEPLOYMENT_FOR_ASSETS and dep == "mri_assets.deployment":
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


# One module builds object-store keys (docs/architecture.md, "A wave's storage").
KEY_MODULE = "mri_assets.core.wave_keys"
LAYOUT_ROOTS = ("raw/", "staging/", "slices/", "manifests/", "embeddings/", "models/", "clusters/")
_KEY_MODULE_TREE = ast.parse(MODULES[KEY_MODULE].read_text())
KEY_FUNCTIONS = {node.name for node in _KEY_MODULE_TREE.body
                 if isinstance(node, ast.FunctionDef) and not node.name.startswith("_")}
KEY_CONSTANTS = {target.id for node in _KEY_MODULE_TREE.body if isinstance(node, ast.Assign)
                 for target in node.targets if isinstance(target, ast.Name)}


def _names(node: ast.AST) -> set[str]:
    return ({n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            | {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)})


def _names_a_wave(node: ast.AST) -> bool:
    return any(re.search(r"wave|shard|trained_on", name, re.IGNORECASE) for name in _names(node))


def _callee(node: ast.AST) -> str:
    if isinstance(node, ast.Call):
        node = node.func
    return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""


def _literal_text(node: ast.JoinedStr) -> str:
    return "".join(part.value for part in node.values if isinstance(part, ast.Constant))


def _is_key_part(node: ast.AST) -> bool:
    """A call of a key builder, a key constant, or a name that holds a prefix."""
    if isinstance(node, ast.Call):
        return _callee(node) in KEY_FUNCTIONS
    return isinstance(node, ast.Name) and (node.id in KEY_CONSTANTS or node.id.endswith("prefix"))


def key_building(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, code) of every place in `tree` that builds an object-store key of a wave itself:
    - an f-string shaped like a key ('/' in its text, no blank, not a URL or a route) that puts a
      wave or shard in, or starts with a layout root (`models/`, `raw/`, ...);
    - a string that starts with a layout root;
    - a `+` onto a key builder's result, a key constant or a prefix (`prefix + name`);
    - a path join (`'/'.join`, `posixpath.join`, `os.path.join`) that makes a name of a wave or
      shard in its arguments."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            text = _literal_text(node)
            starts_with_slash = isinstance(node.values[0], ast.Constant) and text.startswith("/")
            if ("/" in text and not re.search(r"\s", text) and "://" not in text
                    and not starts_with_slash
                    and (text.startswith(LAYOUT_ROOTS)
                         or any(isinstance(part, ast.FormattedValue) and _names_a_wave(part.value)
                                for part in node.values))):
                found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value.startswith(LAYOUT_ROOTS):
                found.append((node.lineno, repr(node.value)))
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            sides = (node.left, node.right)
            if (not any(isinstance(side, ast.Constant) and side.value == "/" for side in sides)
                    and any(_is_key_part(side) for side in sides)):
                found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Call) and _callee(node) == "join":
            owner = node.func.value if isinstance(node.func, ast.Attribute) else None
            slash_join = isinstance(owner, ast.Constant) and owner.value == "/"
            path_join = _callee(owner) in {"posixpath", "path"} if owner is not None else False
            made_here = any(isinstance(n, ast.JoinedStr | ast.BinOp)
                            for arg in node.args for n in ast.walk(arg))
            if (slash_join or path_join) and _names_a_wave(node) and (slash_join or made_here):
                found.append((node.lineno, ast.unparse(node)))
    return sorted(set(found))


def _lines(*lines: str) -> str:
    return "\n".join(lines)


def test_the_key_finder_finds_keys_built_by_hand():
    code = _lines(
        'a = f"models/pca/{wave}.npz"',
        'b = f"{wave}/labels.csv"',
        'c = store.list("raw/")',
        'd = raw_prefix(wave) + relative',
        'e = "/".join(["embeddings", wave, name])',
        'f = os.path.join(folder, f"{shard_name(shard)}.npy")',
        'g = prefix + READY_MARKER',
    )
    assert sorted({line for line, _ in key_building(ast.parse(code))}) == [1, 2, 3, 4, 5, 6, 7]
    fine = _lines(
        'a = f"wave {wave}/{shard:02d}: {n} slices"',  # a message
        'b = f"/admin/users?done={code}"',  # a route
        'c = f"s3://{bucket}/{wave}"',  # a URI
        'd = os.path.join(folder, staged_file_name(shard))',  # a local file named by the owner
        'e = prefix.strip("/") + "/"',
    )
    assert key_building(ast.parse(fine)) == []


def test_one_module_builds_object_store_keys():
    builders = {}
    for module, path in sorted(MODULES.items()):
        if module == KEY_MODULE:
            continue
        found = key_building(ast.parse(path.read_text(), str(path)))
        if found:
            builders[module] = found
    assert builders == {}, f"keys built outside {KEY_MODULE} (use its builders): {builders}"


# Dagster's private API (`dagster._…`) is used in one module, checked by its own test.
DAGSTER_PRIVATE_MODULE = "mri_assets.definitions.dagster_private"


def _private_dagster_uses(tree: ast.AST) -> list[str]:
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            uses += [alias.name for alias in node.names
                     if alias.name.split(".")[0] in DAGSTER_PACKAGES and "._" in alias.name]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            if node.module.split(".")[0] in DAGSTER_PACKAGES:
                if "._" in node.module or node.module.startswith("_"):
                    uses.append(node.module)
                uses += [f"{node.module}.{alias.name}" for alias in node.names
                         if alias.name.startswith("_")]
        elif (isinstance(node, ast.Attribute) and node.attr.startswith("_")
              and not node.attr.startswith("__")
              and isinstance(node.value, ast.Name) and node.value.id in {"dg", "dagster"}):
            uses.append(f"{node.value.id}.{node.attr}")
    return uses


def test_the_private_api_finder_finds_every_form():
    code = ("from dagster._core.origin import JobPythonOrigin\nimport dagster._config\n"
            "from dagster import _check\nx = dg._core\nfrom dagster import asset\n")
    assert _private_dagster_uses(ast.parse(code)) == [
        "dagster._core.origin", "dagster._config", "dagster._check", "dg._core"]


def test_only_one_module_uses_dagsters_private_api():
    users = {module: uses for module, path in sorted(MODULES.items())
             if module != DAGSTER_PRIVATE_MODULE
             and (uses := _private_dagster_uses(ast.parse(path.read_text(), str(path))))}
    assert users == {}, f"private Dagster API outside {DAGSTER_PRIVATE_MODULE}: {users}"


# Functions of a plain size where the web app and the label store live (issue 23): the app's
# handlers sit in routers by concern (`triage/routes/`), the store's parts one module per concern.
MAX_FUNCTION_LINES = 80
SHORT_FUNCTION_PACKAGES = ("mri_assets.triage", "mri_assets.resources.label_store")


def long_functions(tree: ast.AST, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int]]:
    """(name, lines) of every function in `tree` longer than `limit` lines, nested functions and
    methods included, each counted from its first decorator to its last line."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            lines = node.end_lineno - first + 1
            if lines > limit:
                found.append((node.name, lines))
    return sorted(found)


def test_the_long_function_finder_counts_nested_handlers_and_decorators():
    statements = [f"x{k} = {k}" for k in range(78)]
    at_limit = ["@decorated", "def at_limit():"] + [f"    {s}" for s in statements]
    outer = (["def outer():", "    @app.get('/')", "    def handler():"]
             + [f"        {s}" for s in statements] + ["    return handler"])
    code = "\n".join(at_limit + outer)
    assert long_functions(ast.parse(code)) == [("outer", 82)]
    assert long_functions(ast.parse(code), limit=79) == [
        ("at_limit", 80), ("handler", 80), ("outer", 82)]


def test_no_function_in_the_triage_app_or_the_label_store_is_over_80_lines():
    long = {module: found for module, path in sorted(MODULES.items())
            if module.startswith(SHORT_FUNCTION_PACKAGES)
            and (found := long_functions(ast.parse(path.read_text(), str(path))))}
    assert long == {}, f"functions over {MAX_FUNCTION_LINES} lines (split them): {long}"


def test_the_root_holds_only_the_edge_and_the_layer_packages():
    root_modules = {m for m, path in MODULES.items()
                    if m.count(".") <= 1 and path.name != "__init__.py" or m == "mri_assets"}
    assert root_modules == ROOT_MODULES
    packages = {path.parent.name for path in PACKAGE.glob("*/__init__.py")}
    assert packages == set().union(*LAYERS.values()) - {"deployment"}


def asset_modules() -> list[str]:
    """The modules of `mri_assets.assets` that declare assets (all but `assets.support`)."""
    return sorted(m for m in MODULES if m.startswith("mri_assets.assets.")
                  and not m.startswith(ASSET_SUPPORT))


def test_assets_support_declares_no_asset():
    for module, path in MODULES.items():
        if module.startswith(ASSET_SUPPORT):
            assert "@dg.asset" not in path.read_text() and "multi_asset" not in path.read_text(), module


def test_no_asset_module_imports_another():
    breaches = [f"{module} imports {dep}"
                for module in asset_modules() for dep in sorted(GRAPH[module][0])
                if dep in asset_modules()]
    assert breaches == []


# Thin assets (issue 23): an asset body loads, calls core, writes and says what it did; the
# metadata and the MLflow runs are built by helpers (`assets/support/reports.py`, core).
MAX_ASSET_LINES = 60
ASSET_DECORATORS = {"asset", "multi_asset", "graph_asset", "asset_check", "multi_asset_check"}


def long_assets(tree: ast.AST, limit: int = MAX_ASSET_LINES) -> list[tuple[str, int]]:
    """(name, lines) of every asset- or check-decorated function in `tree` longer than `limit`
    lines, counted from its `def` line to its last line (signature and docstring included)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and any(
                _callee(decorator) in ASSET_DECORATORS for decorator in node.decorator_list):
            lines = node.end_lineno - node.lineno + 1
            if lines > limit:
                found.append((node.name, lines))
    return sorted(found)


def test_the_long_asset_finder_counts_decorated_assets_only():
    body = [f"    x{k} = {k}" for k in range(59)]
    code = "\n".join(["@dg.asset(group_name='g')", "def at_limit():", *body,
                      "@asset", "def over():", *body, "    y = 1",
                      "@dg.asset_check(asset='a')", "def check():", *body, "    y = 1",
                      "def plain():", *body, "    y = 1"])
    assert long_assets(ast.parse(code)) == [("check", 61), ("over", 61)]


def test_no_asset_body_is_over_60_lines():
    long = {module: found for module in asset_modules()
            if (found := long_assets(ast.parse(MODULES[module].read_text())))}
    assert long == {}, f"asset bodies over {MAX_ASSET_LINES} lines (move metadata and MLflow " \
                       f"logging into helpers): {long}"
