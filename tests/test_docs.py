"""The README's promises: its set-up lines are the ones CI runs, its quickstart is a file CI
runs, and the version lives in one place."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

import pytest_tunpair

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def fenced(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.M | re.S)


def setup_lines() -> list[str]:
    section = README.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    blocks = fenced(section, "sh")
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def test_readme_setup_is_an_apt_line_and_two_commands() -> None:
    lines = setup_lines()
    assert len(lines) == 3, lines
    apt, install, tests = lines
    assert apt.startswith("apt-get update && ") and "python3-venv" in apt
    assert (
        install.startswith("python3 -m venv .venv && ") and "pytest --tunpair examples/" in install
    )
    assert tests.startswith(".venv/bin/python -m pytest --tunpair")


def test_ci_runs_the_readme_setup_first_and_verbatim() -> None:
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    commands = [
        line
        for line in ci
        if line.strip() and not line.lstrip().startswith(("#", "set ", "cd ", "START=", "tier"))
    ]
    assert commands[:3] == setup_lines(), "the README's set-up must be .ci/run's first commands"


def test_readme_quickstart_is_the_example_ci_runs() -> None:
    (quickstart, *_rest) = fenced(README, "python")
    assert quickstart == (ROOT / "examples" / "test_quickstart.py").read_text()


def test_the_version_lives_in_one_place() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"]
    assert project["project"]["dynamic"] == ["version"]
    attr = project["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "pytest_tunpair.__version__"
    assert re.fullmatch(r"\d+\.\d+\.\d+", pytest_tunpair.__version__)


def _schema_documented(name: str) -> set[str]:
    """Fields whose help lives in the option schema (one declaration per fact): the API
    reference links to docs/options.md, generated from it, instead of repeating it."""
    from pytest_tunpair._schema import declared

    obj = getattr(pytest_tunpair, name)
    try:
        return {f.name for f, decl in declared(obj) if decl.help}
    except TypeError:  # not a dataclass
        return set()


def test_every_public_attribute_has_a_docstring() -> None:
    """What the API reference renders (mkdocstrings hides members without a docstring)."""
    griffe = pytest.importorskip("griffe", reason="griffe comes with the docs extra")
    # With the site's extension: ``#:`` comments document attributes too, as Sphinx reads them.
    extensions = griffe.load_extensions(str(ROOT / "docs/_ext/sphinx_roles.py") + ":SphinxRoles")
    package = griffe.load(
        "pytest_tunpair", search_paths=[str(ROOT)], resolve_aliases=True, extensions=extensions
    )
    missing = []
    for name in pytest_tunpair.__all__:
        if name.startswith("_"):
            continue
        obj = package[name]
        if not obj.docstring:
            missing.append(name)
        in_schema = _schema_documented(name)
        for member_name, member in obj.members.items():
            if member_name.startswith("_") or member_name in in_schema:
                continue
            if not member.docstring:
                missing.append(f"{name}.{member_name}")
    assert not missing, f"public names without a docstring: {missing}"


# Pages whose owners still show API shapes as pasted fragments (``...`` bodies); listed
# here, not skipped: the test fails when this list stops matching the pages, either way.
PASTED_PENDING = {"scenarios.md"}


def test_python_in_the_docs_is_included_from_files_ci_runs() -> None:
    """Every ```python block of the site is a snippet include (--8<--), never pasted code."""
    pasted: dict[str, list[str]] = {}
    for page in sorted((ROOT / "docs").glob("*.md")):
        for block in fenced(page.read_text(), "python"):
            lines = [line for line in block.splitlines() if line.strip()]
            if not lines or not all(line.startswith("--8<-- ") for line in lines):
                pasted.setdefault(page.name, []).append(lines[0] if lines else "")
    assert set(pasted) == PASTED_PENDING, pasted
