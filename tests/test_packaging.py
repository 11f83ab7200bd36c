"""What gets installed: one ``essential`` namespace over the repository's folders, nothing else."""
from __future__ import annotations

import tomllib
from pathlib import Path

import essential

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_installed_under_essential() -> None:
    setuptools = PYPROJECT["tool"]["setuptools"]
    package_dir: dict[str, str] = setuptools["package-dir"]
    expected = set()
    for package, folder in package_dir.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            expected.add(".".join([package, *parts]))
    assert set(setuptools["packages"]) == expected, "pyproject's packages list and the folders differ"
    assert all(p == "essential" or p.startswith("essential.") for p in setuptools["packages"])


def test_examples_and_bench_are_not_installed() -> None:
    installed = {folder.split("/")[0] for folder in PYPROJECT["tool"]["setuptools"]["package-dir"].values()}
    assert not installed & {"examples", "bench", "tests"}


def test_the_public_names_all_resolve() -> None:
    missing = [name for name in essential.__all__ if getattr(essential, name, None) is None]
    assert not missing
    assert essential.EssentialClient.__module__ == "essential.actors.client.ray_client"


def test_an_unknown_public_name_says_what_there_is() -> None:
    try:
        essential.Jobb  # noqa: B018
    except AttributeError as exc:
        assert "Job" in str(exc) and "EssentialClient" in str(exc)
    else:
        raise AssertionError("essential.Jobb resolved")
