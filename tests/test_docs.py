"""The README and docs/ as documents: generated pages current, snippets valid, links alive. No servers, no Ray.

(``tests/test_readme.py`` runs the README's blocks against a real stack; this module only reads.)
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import essential
from essential.actors.dev import config_docs
from tests.readme_blocks import read_blocks

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
#: [text](target) links, not images' data or in-page anchors only
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _name(page: Path) -> str:
    return str(page.relative_to(REPO))


def _python_blocks() -> list[object]:
    return [
        pytest.param(page, block.line, block.text, id=f"{_name(page)}:{block.line}")
        for page in PAGES
        for block in read_blocks(page)
        if block.lang == "python"
    ]


def test_there_are_docs() -> None:
    assert DOCS.is_dir() and len(PAGES) > 5, "docs/ holds the reference pages the README links to"


def test_configuration_page_is_generated_from_the_settings() -> None:
    page = DOCS / "configuration.md"
    assert page.exists() and page.read_text() == config_docs.render(), (
        "docs/configuration.md differs from the Settings fields: run "
        "`python -m essential.actors.dev.config_docs` (from the repository, with .venv/bin/python)"
    )


def test_lifecycle_page_shows_the_lifecycle_table() -> None:
    page = (DOCS / "lifecycle.md").read_text()
    assert page == config_docs.with_moves(page), (
        "docs/lifecycle.md's moves table differs from orchestration/lifecycle.py: run "
        "`python -m essential.actors.dev.config_docs`"
    )


@pytest.mark.parametrize(("page", "line", "code"), _python_blocks())
def test_python_blocks_compile_and_import_only_public_names(page: Path, line: int, code: str) -> None:
    try:
        tree = ast.parse(code)
    except SyntaxError as exc:
        pytest.fail(f"{_name(page)} line {line + (exc.lineno or 0)}: the python block does not compile: {exc.msg}")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "essential":
            unknown = [a.name for a in node.names if a.name not in essential.__all__]
            assert not unknown, f"{_name(page)} line {line + node.lineno}: `essential` has no public {unknown}"
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in (
            "orchestration", "persistence", "actors",
        ):
            pytest.fail(f"{_name(page)} line {line + node.lineno}: import from `essential`, not `{node.module}`")


def test_relative_links_point_to_files_that_exist() -> None:
    broken = []
    for page in PAGES:
        for target in _LINK.findall(page.read_text()):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL, or an anchor in the same page
            path = target.split("#", 1)[0]
            if not (page.parent / path).exists():
                broken.append(f"{_name(page)}: {target}")
    assert not broken, "links to files that do not exist:\n" + "\n".join(broken)


def test_no_doc_mentions_a_design_document() -> None:
    mentions = [_name(p) for p in PAGES if "design.md" in p.read_text().lower()]
    assert not mentions, f"these pages mention DESIGN.md, which users do not have: {mentions}"
