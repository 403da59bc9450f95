"""The package's layers, read from the code: what may import what, and that it all ships.

Each module lives on one level (``LEVELS``, the table of CONTRIBUTING.md's map). A module
may import its own level and the levels below; an import of a level above is an upward
arrow, and a circle of imports is a cycle -- both fail, naming the file, the line and the
rule. "Import" means every ``import``/``from ... import`` in the module, inside functions
too; imports under ``if TYPE_CHECKING:`` are types, not arrows, and are left out. The
package's ``__init__.py`` is exempt: its PEP 562 map loads the public names lazily, from
every level, by design.

The AST is read from the source tree (no module is imported), so the test runs in
milliseconds and sees the imports a run would only reach on some path.
"""

from __future__ import annotations

import ast
import fnmatch
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pytest_tunpair"
NAME = "pytest_tunpair"

# Bottom up. A room is a module or a subpackage (every module in it); the longest dotted
# prefix wins. A new module must find its room here before the test passes.
LEVELS: dict[str, int] = {
    # 0 base: errors and the option declarations every layer validates with.
    "_errors": 0,
    "_schema": 0,
    "_options": 0,
    # 1 bytes: one parser, one builder set, checks on packet bytes.
    "_wire": 1,
    # 2 kernel: namespaces, devices, routing, processes, sockets, timers.
    "_kernel": 2,
    # 3 packets: the captured packet, the capture, matching, flows, pcap, plots.
    "_packets": 3,
    # 4 link: the relay loop, queues, impairments, rules, and the public trace servers.
    "_link": 4,
    "traces": 4,
    # 5 peer: the scripted peer.
    "_peer": 5,
    # 6 pair: TunPair and its factory.
    "_pair": 6,
    "_factory": 6,
    # 7 front: pytest, the command line, the docs' tables; the package's public names.
    "plugin": 7,
    "_plugin": 7,
    "_cli": 7,
    "__main__": 7,
    "_option_tables": 7,
    "": 7,
}
LEVEL_NAMES = ["base", "bytes", "kernel", "packets", "link", "peer", "pair", "front"]


@dataclass(frozen=True)
class Arrow:
    source: str  # dotted, without the package name ("" is the package itself)
    target: str
    path: Path
    line: int

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_package(name: str) -> bool:
    return (PACKAGE.joinpath(*name.split(".")) / "__init__.py").exists() if name else True


def level_of(name: str) -> int | None:
    parts = name.split(".") if name else []
    for n in range(len(parts), -1, -1):
        room = ".".join(parts[:n])
        if room in LEVELS and (n or not name):
            return LEVELS[room]
    return None


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import under ``node``, function bodies included, ``if TYPE_CHECKING:`` not."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _type_checking(child.test):
            for stmt in child.orelse:
                yield from _import_nodes_of(stmt)
            continue
        yield from _import_nodes_of(child)


def _import_nodes_of(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
    yield from _import_nodes(node)


def _in_package(dotted: str) -> str | None:
    """``pytest_tunpair.x.y`` -> ``x.y``; ``pytest_tunpair`` -> ``""``; others -> None."""
    if dotted == NAME:
        return ""
    if dotted.startswith(NAME + "."):
        return dotted[len(NAME) + 1 :]
    return None


def arrows(name: str, path: Path, known: dict[str, Path]) -> Iterator[Arrow]:
    """The package modules ``name`` imports, each where it does so."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    # The package a relative import starts from: a package's own, a module's parent.
    here = [NAME, *name.split(".")] if name else [NAME]
    if not is_package(name):
        here.pop()
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _in_package(alias.name)
                if target is not None:
                    yield Arrow(name, target, path, node.lineno)
            continue
        if node.level:
            base = here[: len(here) - (node.level - 1)]
            dotted = ".".join([*base, node.module] if node.module else base)
        else:
            dotted = node.module or ""
        target = _in_package(dotted)
        if target is None:
            continue
        for alias in node.names:
            # ``from . import linux`` imports the module ``linux``; ``from .x import f``, x.
            sub = f"{target}.{alias.name}" if target else alias.name
            yield Arrow(name, sub if sub in known else target, path, node.lineno)


def graph() -> list[Arrow]:
    known = modules()
    found = []
    for name, path in known.items():
        if name == "":
            continue  # the lazy PEP 562 map of public names
        # A module importing itself is no arrow: ``python -m`` runs a file as ``__main__``,
        # which then calls the package's own copy of it.
        found.extend(a for a in arrows(name, path, known) if a.target != name)
    return found


def _label(name: str) -> str:
    return f"{NAME}.{name}" if name else NAME


def _rule(level: int) -> str:
    below = ", ".join(LEVEL_NAMES[: level + 1])
    return f"level {level} ({LEVEL_NAMES[level]}) may import only {below}"


def test_every_module_has_a_level() -> None:
    missing = [_label(name) for name in modules() if level_of(name) is None]
    assert not missing, f"modules with no room in tests/test_layers.py's LEVELS: {missing}"


def test_every_import_names_a_module_that_exists() -> None:
    known = modules()
    bad = [f"{a.where}: imports {_label(a.target)}" for a in graph() if a.target not in known]
    assert not bad, "imports of modules the package does not have:\n" + "\n".join(bad)


def test_no_upward_import() -> None:
    """A lower layer never imports an upper one, not even inside a function."""
    bad = []
    for a in graph():
        src, dst = level_of(a.source), level_of(a.target)
        if src is None or dst is None or dst <= src:
            continue
        bad.append(
            f"{a.where}: {_label(a.source)} imports {_label(a.target)} "
            f"(level {dst}, {LEVEL_NAMES[dst]}): {_rule(src)}"
        )
    assert not bad, "upward imports:\n" + "\n".join(bad)


def _edges(found: list[Arrow]) -> dict[str, dict[str, Arrow]]:
    edges: dict[str, dict[str, Arrow]] = {}
    for a in found:
        edges.setdefault(a.source, {}).setdefault(a.target, a)
    return edges


def _components(edges: dict[str, dict[str, Arrow]]) -> list[list[str]]:
    """The strongly connected components of the graph (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
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
            components.append(component)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return components


def _cycles(edges: dict[str, dict[str, Arrow]]) -> list[list[Arrow]]:
    """One cycle through each strongly connected component of more than one module (or a
    module importing itself)."""
    found = []
    for component in _components(edges):
        members = set(component)
        start = min(component)
        if len(component) == 1 and start not in edges.get(start, {}):
            continue
        # A shortest way back to ``start`` inside the component (breadth first).
        paths: dict[str, list[Arrow]] = {start: []}
        frontier = [start]
        cycle: list[Arrow] | None = None
        while frontier and cycle is None:
            nxt = []
            for v in frontier:
                for w, arrow in sorted(edges.get(v, {}).items()):
                    if w == start:
                        cycle = [*paths[v], arrow]
                        break
                    if w in members and w not in paths:
                        paths[w] = [*paths[v], arrow]
                        nxt.append(w)
                if cycle is not None:
                    break
            frontier = nxt
        assert cycle is not None
        found.append(cycle)
    return found


def test_no_import_cycle() -> None:
    """No circle of imports, function-level ones included: a circle hidden behind an
    import inside a function is still a circle, and the first thing a split breaks."""
    edges = _edges(graph())
    bad = []
    for cycle in _cycles(edges):
        chain = " -> ".join(f"{_label(a.source)} ({a.where})" for a in cycle)
        bad.append(f"{chain} -> {_label(cycle[0].source)}")
        # Every arrow among the circle's modules: cutting only the one above may leave
        # another circle through them.
        members = {a.source for a in cycle}
        for component in _components(edges):
            if members <= set(component):
                inside = sorted(
                    (a.where, _label(a.source), _label(a.target))
                    for v in component
                    for w, a in edges.get(v, {}).items()
                    if w in component
                )
                bad.extend(f"    {where}: {s} imports {t}" for where, s, t in inside)
    assert not bad, "import cycles (no module may import itself around a circle):\n" + "\n".join(
        bad
    )


def test_the_checker_sees_function_level_imports_and_skips_type_checking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / NAME
    (package / "_wire").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "_wire" / "__init__.py").write_text("")
    (package / "_wire" / "x.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from .._pair import TunPair\n"
        "else:\n"
        "    from .. import _errors\n"
        "def f():\n"
        "    from .._link import relay\n"
        "    import pytest_tunpair._kernel.linux\n"
    )
    known = {
        "": package / "__init__.py",
        "_wire": package / "_wire" / "__init__.py",
        "_wire.x": package / "_wire" / "x.py",
        "_errors": package / "_errors.py",
        "_link.relay": package / "_link" / "relay.py",
        "_kernel.linux": package / "_kernel" / "linux.py",
    }
    monkeypatch.setattr(f"{__name__}.PACKAGE", package)
    found = [(a.target, a.line) for a in arrows("_wire.x", known["_wire.x"], known)]
    assert found == [("_errors", 5), ("_link.relay", 7), ("_kernel.linux", 8)]


def test_the_checker_finds_a_cycle() -> None:
    def arrow(s: str, t: str) -> Arrow:
        return Arrow(s, t, PACKAGE / "x.py", 1)

    edges = {
        "a": {"b": arrow("a", "b")},
        "b": {"c": arrow("b", "c"), "a": arrow("b", "a")},
        "c": {"a": arrow("c", "a")},
        "d": {"a": arrow("d", "a")},
    }
    (cycle,) = _cycles(edges)
    assert [(a.source, a.target) for a in cycle] == [("a", "b"), ("b", "a")]
    assert level_of("_link.relay") == 4 and level_of("") == 7 and level_of("_nowhere") is None


# -- shipping ----------------------------------------------------------------------------------


def test_every_package_directory_is_shipped() -> None:
    """Every directory of the package is a regular package (an ``__init__.py``) that
    pyproject's ``packages.find`` picks up: a subpackage left out builds a wheel that
    imports nowhere but the source tree. (.ci/run compares the built wheel's file list
    with the tree's.)"""
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"][
        "find"
    ]
    include, exclude = find.get("include", ["*"]), find.get("exclude", [])
    assert find.get("where", ["."]) == ["."]
    bad = []
    for directory in sorted({p.parent for p in PACKAGE.rglob("*.py")}):
        dotted = ".".join(directory.relative_to(ROOT).parts)
        if not (directory / "__init__.py").exists():
            bad.append(f"{directory.relative_to(ROOT)}: has modules but no __init__.py")
        elif not any(fnmatch.fnmatchcase(dotted, p) for p in include) or any(
            fnmatch.fnmatchcase(dotted, p) for p in exclude
        ):
            bad.append(f"{dotted}: not in [tool.setuptools.packages.find] (include {include})")
    assert not bad, "\n".join(bad)


# -- CONTRIBUTING.md's map of the package ----------------------------------------------------

_HEADING = re.compile(r"^### (\d+) (\w+): ")
_ITEM = re.compile(r"^- `([\w/]+\.py)` — \S")


def contributing_map() -> dict[str, list[int | None]]:
    """Each module CONTRIBUTING.md's Layout lists (relative to ``pytest_tunpair/``), with the
    level of each heading it is listed under."""
    text = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    level: int | None = None
    listed: dict[str, list[int | None]] = {}
    for line in section.splitlines():
        if line.startswith("### "):
            heading = _HEADING.match(line)
            level = int(heading.group(1)) if heading else None
            if heading:
                assert heading.group(2) == LEVEL_NAMES[level], f"CONTRIBUTING.md: {line}"
        elif item := _ITEM.match(line):
            listed.setdefault(item.group(1), []).append(level)
    return listed


def test_contributing_maps_every_module_under_its_level() -> None:
    """CONTRIBUTING.md's Layout has one line per module of the package, under the heading
    of its level, and no line for a module that is gone."""
    listed = contributing_map()
    tree = {p.relative_to(PACKAGE).as_posix(): name for name, p in modules().items()}
    bad = [f"missing: - `{path}` — ..." for path in sorted(set(tree) - set(listed))]
    bad += [f"no such module: {path}" for path in sorted(set(listed) - set(tree))]
    for path, levels in sorted(listed.items()):
        if path not in tree:
            continue
        want = level_of(tree[path])
        if levels != [want]:
            bad.append(f"{path}: listed under level(s) {levels}, its level is {want}")
    assert not bad, "CONTRIBUTING.md's map of the package (## Layout):\n" + "\n".join(bad)
