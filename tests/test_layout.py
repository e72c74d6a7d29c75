"""The package layout: no import cycles between modules, and dependencies between packages that go one way.

Every ``import`` / ``from ... import`` in src/ (seqpack and the seqpack_cli command beside it) is read with ``ast`` — at module level and inside functions
(lazy imports count); ``if TYPE_CHECKING:`` blocks are skipped (they never run). ``from pkg import name`` is an
import of the module ``pkg.name`` when that is a module, else of ``pkg``. Only static imports are seen (the CLI's
``importlib.import_module`` of its subcommands is not an import of theirs).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Bottom to top. A module may import its own package and packages of lower layers, never a package of its own
# layer or above. ``seqpack`` is the top-level package (its __init__: the public API).
LAYERS = [
    ("batch", "atomic", "versions", "cli_types"),    # the packed-batch contract, atomic writes, version floors,
                                                     # range-checked command-line numbers
    ("ops",),                                        # step-level operations: losses, tiled MLP, fused kernels
    ("parallel",),                                   # topology, collectives, Ulysses heads, SP shards, FSDP2
    ("ssm",),                                        # Mamba / Mamba-2 on packed rows
    ("attention",),                                  # attn_implementation="seqpack", kernels, dispatch
    ("models",),                                     # native models, load_model
    ("data",),                                       # ftdp files, packing strategies, the loader, the corpus
    ("seqpack",),                                    # the public API (seqpack/__init__.py)
    ("compat",),                                     # InternEvo / XTuner names
    ("train",),                                      # the training engine and the causal LM task
    ("multimodal", "diffusion", "hf", "convert"),    # tasks (LLaVA, Flux) and integrations (Trainer, checkpoints)
    ("tasks", "bench"),                              # picking a run's task; benchmarks
    ("plan", "demo"),                                # the planner (uses the benchmarks), the demo
    ("seqpack_cli",),                                # the ``seqpack`` command (beside the package: no torch import)
    ("cli",),                                        # ``python -m seqpack.cli``
]


def module_files(src: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under ``src`` (a package is its __init__.py)."""
    out = {}
    for path in sorted(src.rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(node: ast.AST):
    """Every Import / ImportFrom under ``node`` (functions and classes included), skipping TYPE_CHECKING blocks."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.orelse:
                yield from _import_nodes(ast.Module(body=[stmt], type_ignores=[]))
            continue
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        yield from _import_nodes(child)


def import_graph(src: Path) -> dict[str, dict[str, int]]:
    """module -> {imported module of the same tree: line of the first such import}."""
    modules = module_files(src)
    graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        here = name.split(".") if is_package else name.split(".")[:-1]  # the package relative imports start from
        edges: dict[str, int] = {}
        for node in _import_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    up = here[:len(here) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                if target in modules and target != name:
                    edges.setdefault(target, node.lineno)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import cycle as [m0, m1, ..., m0], or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


BESIDE = {"seqpack_cli"}  # top-level packages next to seqpack: each is one layer of its own


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] not in BESIDE else parts[0]


def layer_violations(graph: dict[str, dict[str, int]], layers, src: Path) -> list[str]:
    """Imports of a package in the same layer or above, as 'file:line: a imports b (...)'."""
    rank = {pkg: i for i, group in enumerate(layers) for pkg in group}
    files = module_files(src)
    out = []
    for module, edges in sorted(graph.items()):
        for target, line in sorted(edges.items()):
            a, b = package_of(module), package_of(target)
            if a != b and rank[b] >= rank[a]:
                out.append(f"{files[module].relative_to(src)}:{line}: {module} imports {target} — {a} "
                           f"(layer {rank[a]}) may import only lower layers, and {b} is layer {rank[b]}")
    return out


def _describe_cycle(cycle: list[str], graph, src: Path) -> str:
    files = module_files(src)
    return "\n".join(f"  {files[a].relative_to(src)}:{graph[a][b]}: {a} imports {b}" for a, b in zip(cycle, cycle[1:]))


GRAPH = import_graph(SRC)


def test_no_import_cycles_between_modules():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle (lazy imports count):\n" + _describe_cycle(cycle, GRAPH, SRC)


def test_packages_depend_one_way():
    bad = layer_violations(GRAPH, LAYERS, SRC)
    assert not bad, "imports against the layer order (tests/test_layout.py LAYERS):\n" + "\n".join(bad)


def test_every_package_has_a_layer():
    known = {pkg for group in LAYERS for pkg in group}
    missing = sorted({package_of(m) for m in GRAPH} - known)
    assert not missing, f"packages or top-level modules missing from LAYERS in tests/test_layout.py: {missing}"


def test_the_walker_sees_lazy_imports_and_skips_type_checking(tmp_path):
    """The checks can fail: a lazy import closes a cycle, a TYPE_CHECKING import does not, and an upward import of
    a lower layer is named with its file and line."""
    pkg = tmp_path / "p"
    (pkg / "low").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low" / "__init__.py").write_text("")
    (pkg / "low" / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import b\n"
                                      "def f():\n    from ..high import c\n")
    (pkg / "low" / "b.py").write_text("from . import a\n")
    (pkg / "high.py").write_text("c = 1\nfrom .low.b import a\n")
    graph = import_graph(tmp_path)
    assert graph["p.low.a"] == {"p.high": 5} and graph["p.low.b"] == {"p.low.a": 1}
    assert find_cycle(graph) == ["p.high", "p.low.b", "p.low.a", "p.high"]
    bad = layer_violations(graph, [("low",), ("high",)], tmp_path)
    assert bad == [f"{Path('p/low/a.py')}:5: p.low.a imports p.high — low (layer 0) may import only lower layers, "
                   "and high is layer 1"]
    assert layer_violations({"p.high": {"p.low.b": 2}}, [("low",), ("high",)], tmp_path) == []


@pytest.mark.parametrize("module, imported", [("seqpack.attention.hf", "seqpack.ssm"),        # inside dispatch()
                                              ("seqpack.diffusion.task", "seqpack.train.task"),
                                              ("seqpack.tasks", "seqpack.diffusion.task")])
def test_the_graph_holds_known_imports(module, imported):
    assert imported in GRAPH[module]
