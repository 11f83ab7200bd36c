"""The domain layer must stay free of Ray, PyMongo/BSON and aiokafka: it describes sagas; the infrastructure runs them."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "orchestration": {"ray", "pymongo", "bson", "motor", "aiokafka", "persistence", "actors"},
    "persistence": {"ray", "aiokafka", "actors"},
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layer_imports_point_downwards_only(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no modules found in {package}/"
    offenders = {
        str(f.relative_to(ROOT)): sorted(imported_modules(f) & FORBIDDEN[package]) for f in files
    }
    offenders = {f: names for f, names in offenders.items() if names}
    assert not offenders, f"{package} must not import these: {offenders}"


def test_the_check_itself_catches_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import ray\nfrom pymongo import MongoClient\n")
    assert imported_modules(bad) & FORBIDDEN["orchestration"] == {"ray", "pymongo"}
