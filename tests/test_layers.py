"""Import rules: the domain stays free of infrastructure, rooms depend one way, and nothing forms a cycle.

Every import counts, including one inside a function (a function-local import
only postpones a cycle, it does not remove it); imports under ``if TYPE_CHECKING:``
do not run and are not counted.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: the installed namespace: each package and the folder it lives in (pyproject's package-dir)
PACKAGES = {
    "essential": ROOT / "essential",
    "essential.orchestration": ROOT / "orchestration",
    "essential.persistence": ROOT / "persistence",
    "essential.actors": ROOT / "actors",
}
THIRD_PARTY_FORBIDDEN = {
    "essential.orchestration": {"ray", "pymongo", "bson", "motor", "aiokafka", "fastapi", "starlette"},
    "essential.persistence": {"ray", "aiokafka", "fastapi", "starlette"},
}
#: importer prefix -> project prefixes it must not import (at all)
PROJECT_FORBIDDEN = {
    "essential.orchestration": ("essential.persistence", "essential.actors"),
    "essential.persistence": ("essential.actors",),
}
#: rooms nothing outside them imports: the command line, and the dev stack (only the CLI may use it)
PRIVATE_ROOMS = {
    "essential.actors.cli": (),
    "essential.actors.dev": ("essential.actors.cli",),
}
#: rooms that must not import the saga runtime when they are imported (a call may, once it needs to)
LIGHT_ROOMS = ("essential.actors.client", "essential.actors.kafka", "essential.actors.http")
RUNTIME = "essential.actors.sagas"


@dataclass(frozen=True)
class Edge:
    target: str
    line: int
    top_level: bool  # runs when the module is imported (not inside a function)


def module_files() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package, folder in PACKAGES.items():
        if package == "essential":
            found[package] = folder / "__init__.py"
            continue
        for path in sorted(folder.rglob("*.py")):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(path: Path, module: str, known: set[str]) -> tuple[list[Edge], set[str]]:
    """Project modules ``path`` imports (resolved to modules, not packages, where it names one), and third parties."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = _type_checking_lines(tree)
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    edges: list[Edge] = []
    third: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or node.lineno in skip:
            continue
        top = node.lineno not in in_function
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "essential":
                    edges.append(Edge(alias.name, node.lineno, top))
                else:
                    third.add(alias.name.split(".")[0])
            continue
        if node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        if source.split(".")[0] != "essential":
            third.add(source.split(".")[0])
            continue
        for alias in node.names:
            full = f"{source}.{alias.name}"
            edges.append(Edge(full if full in known else source, node.lineno, top))
    return edges, third


def import_graph() -> tuple[dict[str, list[Edge]], dict[str, set[str]]]:
    files = module_files()
    known = set(files)
    graph, third = {}, {}
    for module, path in files.items():
        graph[module], third[module] = imports_of(path, module, known)
    return graph, third


def cycles(graph: dict[str, list[Edge]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each a cycle to break."""
    adjacency = {m: {e.target for e in edges if e.target in graph and e.target != m} for m, edges in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in adjacency[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(adjacency):
        if v not in index:
            visit(v)
    return found


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def violations(graph: dict[str, list[Edge]], third: dict[str, set[str]]) -> list[str]:
    """Every broken rule, as ``importer:line -> imported (rule)``."""
    out: list[str] = []
    for group in cycles(graph):
        out.append(f"import cycle: {' -> '.join(group)}")
    for module, edges in graph.items():
        for layer, names in THIRD_PARTY_FORBIDDEN.items():
            if within(module, layer) and third[module] & names:
                out.append(f"{module} -> {sorted(third[module] & names)} (the {layer} layer must not use them)")
        for edge in edges:
            where = f"{module}:{edge.line} -> {edge.target}"
            for layer, banned in PROJECT_FORBIDDEN.items():
                if within(module, layer) and any(within(edge.target, b) for b in banned):
                    out.append(f"{where} (layers point downwards only)")
            if within(module, "essential.orchestration") or within(module, "essential.persistence") or within(
                module, "essential.actors"
            ):
                if edge.target == "essential":
                    out.append(f"{where} (the public facade is for users; Essential's own modules import the module)")
            for room, allowed in PRIVATE_ROOMS.items():
                if within(edge.target, room) and not within(module, room) and not any(within(module, a) for a in allowed):
                    out.append(f"{where} (nothing imports {room})")
            if edge.top_level and any(within(module, r) for r in LIGHT_ROOMS) and within(edge.target, RUNTIME):
                out.append(f"{where} ({module.split('.')[2]} must not load the saga runtime at import time)")
    return out


def test_the_package_obeys_its_import_rules() -> None:
    graph, third = import_graph()
    assert len(graph) > 60, f"only {len(graph)} modules found: the package map in this test is stale"
    problems = violations(graph, third)
    assert not problems, "import rules broken:\n" + "\n".join(problems)


def _graph_with(module: str, source: str, tmp_path: Path) -> tuple[dict[str, list[Edge]], dict[str, set[str]]]:
    graph, third = import_graph()
    path = tmp_path / "probe.py"
    path.write_text(source)
    graph[module], third[module] = imports_of(path, module, set(graph) | {module})
    return graph, third


@pytest.mark.parametrize(
    ("module", "source", "broken"),
    [
        # a function-local import that closes a cycle: the runtime's supervisor back to the client
        ("essential.actors.sagas.supervisor",
         "def f():\n    from essential.actors.client.ray_client import EssentialClient\n", "import cycle"),
        ("essential.orchestration.dsl", "import ray\n", "must not use them"),
        ("essential.orchestration.dsl", "def f():\n    from essential.persistence.store import MongoSagaStore\n",
         "layers point downwards"),
        ("essential.actors.kafka.gateway", "from essential.actors.dev.stack import LocalStack\n", "nothing imports"),
        ("essential.actors.sagas.placement", "from essential.actors.cli.main import main\n", "nothing imports"),
        ("essential.actors.client.ray_client", "from essential.actors.sagas.supervisor import Supervisor\n",
         "at import time"),
        ("essential.actors.metrics", "from essential import Job\n", "public facade"),
    ],
)  # fmt: skip
def test_the_check_catches_a_deliberate_violation(module: str, source: str, broken: str, tmp_path: Path) -> None:
    graph, third = _graph_with(module, source, tmp_path)
    problems = violations(graph, third)
    assert any(broken in p for p in problems), problems


def test_a_function_local_import_is_still_an_edge(tmp_path: Path) -> None:
    path = tmp_path / "probe.py"
    path.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import essential.actors.names\n"
                    "def f():\n    import essential.actors.settings\n")  # fmt: skip
    edges, _ = imports_of(path, "essential.actors.probe", {"essential.actors.settings", "essential.actors.names"})
    assert [(e.target, e.top_level) for e in edges] == [("essential.actors.settings", False)]


@pytest.mark.parametrize(
    ("statement", "not_loaded"),
    [
        ("import essential.actors.client.ray_client", ("pymongo", "aiokafka", "essential.actors.sagas")),
        ("from essential import Job, StepContext, StepFailed", ("ray", "pymongo", "aiokafka")),
        ("import essential.actors.sagas.sweep", ("ray", "aiokafka")),
    ],
)
def test_importing_the_client_or_the_dsl_stays_light(statement: str, not_loaded: tuple[str, ...]) -> None:
    """The client needs only Ray; a job module that imports the DSL pulls in no infrastructure; the
    supervisor's sweep runs without Ray (tests/test_sweep.py drives it in process)."""
    probe = f"import sys\n{statement}\nprint(','.join(m for m in {not_loaded!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "", f"{statement} loaded {out.stdout.strip()}"
