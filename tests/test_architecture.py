"""The package's layers point one way, and no module imports itself back through others.

interfaces (cli, server) -> features (dedup, hashing, finetune, evaluation, distributed,
labelled) -> core -> components (images, encoders, knn, catalog, local) -> errors.

Every ``import`` and ``from ... import`` in ``lookalike/`` counts, at module level or inside a
function alike: a lazy import still couples two modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lookalike"

# Lower number = lower layer. A module may import its own layer or lower ones.
LAYERS: dict[str, int] = {
    "lookalike.errors": 0,
    "lookalike.images": 1,
    "lookalike.exif": 1,
    "lookalike.encoders": 1,
    "lookalike.knn": 1,
    "lookalike.knn.ray_shards": 1,  # index shards held by Ray actors: imports ray itself
    "lookalike.catalog": 1,
    "lookalike.catalog.pgvector_index": 1,  # the pgvector index's SQL, on any psycopg connection
    "lookalike.local": 1,
    "lookalike.core": 2,
    "lookalike.dedup": 3,
    "lookalike.hashing": 3,
    "lookalike.finetune": 3,
    "lookalike.evaluation": 3,
    "lookalike.distributed": 3,
    "lookalike.labelled": 3,
    "lookalike.cli": 4,
    "lookalike.server": 4,
}
LAYER_NAMES = ["errors", "components", "core", "features", "interfaces"]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> int | None:
    owners = [p for p in LAYERS if module == p or module.startswith(p + ".")]
    return LAYERS[max(owners, key=len)] if owners else None


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The lookalike modules ``path`` imports (resolved to modules that exist)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    own = module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for name in names:
            if not name.startswith("lookalike"):
                continue
            # The longest existing module the name refers to (a from-import may name a symbol).
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != own:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py") if "protos" not in p.parts}
    modules = set(files)
    graph = {name: imports_of(path, modules) for name, path in files.items()}
    # Importing a package's submodule runs the package's __init__; that edge is not a choice
    # the importing module made, so parents are not counted as imports here.
    for name, targets in graph.items():
        graph[name] = {t for t in targets if not name.startswith(t + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_module_has_a_layer() -> None:
    graph = import_graph()
    unplaced = sorted(m for m in graph if m != "lookalike" and layer_of(m) is None)
    assert not unplaced, f"modules outside every layer: {unplaced}"


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_imports_point_down() -> None:
    graph = import_graph()
    upward = []
    for source, targets in sorted(graph.items()):
        source_layer = layer_of(source)
        if source_layer is None:
            continue
        for target in sorted(targets):
            target_layer = layer_of(target)
            if target_layer is not None and target_layer > source_layer:
                upward.append(
                    f"{source} ({LAYER_NAMES[source_layer]}) -> "
                    f"{target} ({LAYER_NAMES[target_layer]})"
                )
    assert upward == []


# Besides the distributed package, the one index backend whose shards live on Ray.
RAY_MODULES = ("lookalike.distributed", "lookalike.knn.ray_shards")


def test_ray_is_imported_only_by_the_distributed_package_and_the_ray_index() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        if name.startswith(RAY_MODULES):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and any(
                a.name.split(".")[0] == "ray" for a in node.names
            ):
                offenders.append(name)
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "ray":
                offenders.append(name)
    assert offenders == []


def test_the_checker_sees_a_cycle_and_an_upward_import() -> None:
    """The checks above can fail: a made-up graph with both faults is caught."""
    graph = {"lookalike.core.a": {"lookalike.cli.x"}, "lookalike.cli.x": {"lookalike.core.a"}}
    assert cycles(graph) == [["lookalike.cli.x", "lookalike.core.a"]]
    assert layer_of("lookalike.core.a") < layer_of("lookalike.cli.x")


@pytest.mark.parametrize(
    "module",
    [
        "lookalike.core.collection",
        "lookalike.core.watch",
        "lookalike.server.rest",
        # the cold query's and the GPU path's
        "lookalike.cli.remote",
        "lookalike.server.local",
        "lookalike.core.locations",
        "lookalike.encoders.lite",
        "lookalike.encoders.prepared",
        "lookalike.encoders.devices",
        # the pgvector index: its SQL, filters as SQL, and the backend core opens
        "lookalike.catalog.pgvector_index",
        "lookalike.core.sql_filters",
        "lookalike.core.pgvector",
    ],
)
def test_known_modules_are_placed(module: str) -> None:
    assert layer_of(module) is not None
