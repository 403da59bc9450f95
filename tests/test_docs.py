"""The README's promises: its set-up lines are the ones CI runs, its quickstart is a file CI
runs, and the version lives in one place."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
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


def test_python_in_the_docs_is_included_from_files_ci_runs() -> None:
    """Every ```python block of the site (and the README, past its quickstart) is a snippet
    include (--8<--) of a file CI runs, never pasted code."""
    pasted: dict[str, list[str]] = {}
    for page in sorted((ROOT / "docs").glob("*.md")):
        for block in fenced(page.read_text(), "python"):
            lines = [line for line in block.splitlines() if line.strip()]
            if not lines or not all(line.startswith("--8<-- ") for line in lines):
                pasted.setdefault(page.name, []).append(lines[0] if lines else "")
    assert not pasted, pasted


def test_snippets_come_from_files_ci_runs() -> None:
    """An included file is an example (``examples/``, which the README's first command
    runs) or a recipe CI validates (``docs/recipes``): never one nothing runs."""
    includes = re.findall(
        r'^--8<-- "([^":]+)',
        "\n".join(
            (ROOT / "docs" / name).read_text()
            for name in sorted(os.listdir(ROOT / "docs"))
            if name.endswith(".md")
        ),
        flags=re.M,
    )
    assert includes
    allowed = ("examples/", "docs/recipes/", "CHANGELOG.md")
    assert all(path.startswith(allowed) for path in includes), includes
    for path in includes:
        assert (ROOT / path).is_file(), path


# -- the README's wheel route, as written, on a fresh checkout ---------------------------------
def install_lines() -> list[str]:
    section = README.split("## Install in your project", 1)[1].split("\n## ", 1)[0]
    (block,) = fenced(section, "sh")
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_readme_wheel_route_works_on_a_fresh_checkout(tmp_path: Path) -> None:
    """``pip wheel`` in a fresh clone, then ``pip install dist/...whl`` in a new venv: the
    lines as the README writes them (``/path/to/pytest-tunpair`` is the clone)."""
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("needs a git checkout to clone (the rootless tier runs on a copy)")
    if os.geteuid() != 0:
        pytest.skip("pip downloads the build backend and dependencies: run as root, as CI")
    clone = tmp_path / "pytest-tunpair"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    lines = [line for line in install_lines() if "wheel" in line or "dist/" in line]
    assert len(lines) == 2, lines
    env = dict(os.environ, PATH=f"{venv / 'bin'}:{os.environ['PATH']}")
    env.pop("PYTHONPATH", None)
    for line in lines:
        command = line.replace("/path/to/pytest-tunpair", str(clone))
        run = subprocess.run(
            command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
            timeout=600,
        )  # fmt: skip
        assert run.returncode == 0, f"{command}\n{run.stdout}\n{run.stderr}"
    probe = "import pytest_tunpair, pytest_tunpair.plugin; print(pytest_tunpair.__file__)"
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", probe], cwd="/", capture_output=True, text=True
    )
    assert str(venv) in where.stdout, where.stderr


# -- the built site: the API page lists everything public, readably --------------------------
@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site CI built (``TUNPAIR_SITE``, set by .ci/run), or one built here."""
    built = os.environ.get("TUNPAIR_SITE")
    if built:
        return Path(built)
    pytest.importorskip("mkdocs", reason="building the site needs the docs extra")
    out = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(out)],
        cwd=ROOT, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return out


def _page_ids(site: Path) -> set[str]:
    return set(re.findall(r'id="(pytest_tunpair[^"]*)"', (site / "api/index.html").read_text()))


def _hidden_by_the_site() -> list[str]:
    """mkdocs.yml's member filters (relay-side methods a test never calls)."""
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    (mkdocstrings,) = [p["mkdocstrings"] for p in config["plugins"] if isinstance(p, dict)]
    filters: list[str] = mkdocstrings["handlers"]["python"]["options"]["filters"]
    return [f[1:] for f in filters if f.startswith("!")]


def test_the_api_page_lists_every_public_name_and_attribute(site: Path) -> None:
    griffe = pytest.importorskip("griffe", reason="griffe comes with the docs extra")
    ids = _page_ids(site)
    missing = [n for n in pytest_tunpair.__all__ if f"pytest_tunpair.{n}" not in ids]
    package = griffe.load("pytest_tunpair", search_paths=[str(ROOT)], resolve_aliases=True)
    hidden = [re.compile(f) for f in _hidden_by_the_site()]
    for name in pytest_tunpair.__all__:
        if name.startswith("_"):
            continue
        in_schema = _schema_documented(name)  # on the options page, generated
        for member in package[name].members:
            if member in in_schema or any(f.search(member) for f in hidden):
                continue
            if f"pytest_tunpair.{name}.{member}" not in ids:
                missing.append(f"{name}.{member}")
    assert not missing, f"not on the API page: {missing}"
    assert "pytest_tunpair.traces.constant" in ids  # the public module beside __all__


def test_the_api_page_signatures_are_formatted(site: Path) -> None:
    """Signatures are wrapped by a formatter (ruff, from the docs extra): no line of one is
    wider than the 100 columns a code block shows."""
    import html

    page = (site / "api/index.html").read_text()
    blocks = re.findall(r'<div class="doc-signature[^"]*"[^>]*>(.*?)</div>', page, re.S)
    assert len(blocks) > 100
    wide = []
    for block in blocks:
        text = html.unescape(re.sub(r"<[^>]+>", "", block))
        wide += [line for line in text.splitlines() if len(line) > 100]
    assert not wide, wide[:5]
