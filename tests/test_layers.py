"""The import layers of the edgemesh namespace, read from the source with `ast`.

Every module under the namespace (edgemesh/ with edgemesh/lab/, mesh/,
sharding/, backends/, bench/, as pyproject maps them) belongs to one layer;
a module may import its own layer and the layers below it, never one above. No two files may
import each other, directly or around a circle. Imports inside functions
count (a lazy import is still a dependency); imports under
``if TYPE_CHECKING:`` do not (they never run). docs/ARCHITECTURE.md draws
the same rules.
"""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {
    "edgemesh": "edgemesh",
    "edgemesh.mesh": "mesh",
    "edgemesh.sharding": "sharding",
    "edgemesh.backends": "backends",
    "edgemesh.bench": "bench",
}

# Lowest first. A module named exactly belongs to that layer (a single file
# that sits in a folder of another layer); otherwise the first glob wins.
# sharding/ is three layers: package/ (the format, below backends),
# convert/ and planner/ (above them, beside the fingerprint).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "core",
        ("edgemesh", "edgemesh.errors", "edgemesh.paths", "edgemesh.reexec", "edgemesh.limits",
         "edgemesh.heap"),
    ),
    (
        "formats",  # files on disk and text: what every runtime reads
        (
            "edgemesh.tokenizer",
            "edgemesh.chat_templates",
            "edgemesh.sampling",
            "edgemesh.grammar",
            "edgemesh.sharding.package",
            "edgemesh.sharding.package.*",
            "edgemesh.graph.tensors",
            "edgemesh.graph.manifest",
            "edgemesh.graph.graph_check",
            "edgemesh.mesh.network",  # interfaces and addresses: the fingerprint's MAC
        ),
    ),
    ("client", ("edgemesh.sdk", "edgemesh.sdk.*")),
    ("backends", ("edgemesh.backends", "edgemesh.backends.*", "edgemesh.pipeline")),
    (
        "engine",  # one model's decode loop over a pipeline of backends
        ("edgemesh.engine", "edgemesh.offline", "edgemesh.sharding.pipeline"),
    ),
    (
        "choose",  # what a box is, how to convert, where layers go: no serving
        (
            "edgemesh.fingerprint",
            "edgemesh.fingerprint.*",
            "edgemesh.box_metrics",  # a box's memory/CPU: the agent's and the gateway's
            "edgemesh.sharding",
            "edgemesh.sharding.*",
        ),
    ),
    (
        "serve",  # one box: models, graph models and the HTTP gateway
        (
            "edgemesh.models",
            "edgemesh.local",
            "edgemesh.graph",
            "edgemesh.graph.*",
            "edgemesh.gateway",
            "edgemesh.gateway.*",
        ),
    ),
    ("mesh", ("edgemesh.mesh", "edgemesh.mesh.*")),
    (
        # The gateway's mesh manager (the dashboard's deploys on a mesh) runs in
        # the mesh's gateway replica and drives the router: router code that
        # lives in gateway/.
        "router",
        (
            "edgemesh.router",
            "edgemesh.router.*",
            "edgemesh.gateway.mesh_manager",
            "edgemesh.gateway.mesh_boxes",
        ),
    ),
    # Emulated boxes (namespaces, cgroups, a mesh of `edgemesh join`s) that tests,
    # examples and benchmarks share: it drives the mesh, and only bench sits above.
    ("lab", ("edgemesh.lab", "edgemesh.lab.*")),
    ("bench", ("edgemesh.bench", "edgemesh.bench.*")),
    ("cli", ("edgemesh.cli", "edgemesh.cli.*", "edgemesh.__main__")),
]

# Temporary exceptions: an edge (importer, imported) or a cycle that a file
# still holds, each with its file pair and issue; none are left. A listed one
# must still exist (test_exceptions_are_still_needed): fixed, it leaves here.
EXCEPTIONS: set[tuple[str, str]] = set()
CYCLE_EXCEPTIONS: set[frozenset[str]] = set()


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in FOLDERS.items():
        for file in (ROOT / folder).rglob("*.py"):
            parts = list(file.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if package == "edgemesh" and parts and parts[0] in ("mesh", "sharding", "backends"):
                continue  # not part of the namespace from this folder
            found[".".join([package, *parts])] = file
    return found


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node except those under ``if TYPE_CHECKING:``."""
    out: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        out.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return out


def imports(name: str, file: Path, known: dict[str, Path]) -> set[str]:
    """The namespace modules ``file`` imports (a from-import of a submodule
    counts as that submodule; of a name, as the module holding it)."""
    found = set()
    for node in _runtime_nodes(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = alias.name
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target:
                    found.add(target)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if full in known:
                    found.add(full)
                elif node.module in known:
                    found.add(node.module)
    found.discard(name)
    return found


def layer_of(name: str) -> int:
    """A module named exactly in a layer belongs there; else the first glob wins."""
    for index, (_, patterns) in enumerate(LAYERS):
        if name in patterns:
            return index
    for index, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            return index
    raise AssertionError(f"{name} is in no layer: add it to LAYERS")


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, file, known) for name, file in known.items()}


def test_every_module_has_a_layer() -> None:
    for name in modules():
        layer_of(name)


def test_no_module_imports_a_higher_layer() -> None:
    bad = []
    for name, targets in sorted(graph().items()):
        for target in sorted(targets):
            if layer_of(target) > layer_of(name) and (name, target) not in EXCEPTIONS:
                bad.append(
                    f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} "
                    f"({LAYERS[layer_of(target)][0]})"
                )
    assert bad == []


def test_exceptions_are_still_needed() -> None:
    """A fixed file must leave the exception list too."""
    edges = graph()
    assert [e for e in EXCEPTIONS if e[1] not in edges.get(e[0], set())] == []
    cycles = {frozenset(c) for c in cycles_of(edges)}
    assert [c for c in CYCLE_EXCEPTIONS if c not in cycles] == []


def cycles_of(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_files() -> None:
    left = [c for c in cycles_of(graph()) if frozenset(c) not in CYCLE_EXCEPTIONS]
    assert left == []


def test_the_checker_sees_a_lower_layer_importing_a_higher_one() -> None:
    """The rules bite: an edge from the engine to the router is caught."""
    assert layer_of("edgemesh.router.serve") > layer_of("edgemesh.engine")
    assert layer_of("edgemesh.mesh.agent") < layer_of("edgemesh.router.restore")
    assert cycles_of({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
