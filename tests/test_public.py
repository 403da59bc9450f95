"""The public surface: every class the public API hands out is exported, and what users
read -- the docs, the README, the API reference's docstrings, error messages -- names only
public paths (``pytest_tunpair.X``, ``pytest_tunpair.traces.X``), never a private module.

Pure inspection (annotations, docstrings, the package's source): no tunnel, milliseconds.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import re
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest_tunpair
from pytest_tunpair import traces

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pytest_tunpair"

# A private module's dotted path (``pytest_tunpair._link.queue``; ``__version__`` is public).
PRIVATE_PATH = re.compile(r"pytest_tunpair\._[a-z]\w*(?:\.\w+)*")

# What the public API still hands out of the pair's module, which the lead rewrites on
# another branch of the 0.3 layout (TunPairFactory moves to _factory.py): its namespace
# plumbing and two docstrings naming a private module. Not checked until that merges; then
# the lead deletes this set (a test below fails once an entry in it is fixed, so it cannot
# go stale). Decided: begin() and end() stay public (how a scoped factory of one's own
# undoes a test's additions), so FactoryCheckpoint is exported as an opaque token, its
# fields private. netns and keeper are the plugin's plumbing: private, or their classes
# exported -- the lead's call, with the factory's new constructor.
KNOWN_UNTIL_MERGED: set[str] = {
    "TunPair.checkpoint() -> pytest_tunpair._pair.Checkpoint",
    "TunPairFactory.begin() -> pytest_tunpair._factory.FactoryCheckpoint",
    "TunPairFactory.keeper -> pytest_tunpair._kernel.procs.Keeper",
    "TunPairFactory.netns -> pytest_tunpair._kernel.netns.NetNamespace",
}


# -- the public names and where they live ----------------------------------------------------


def home(obj: Any) -> types.ModuleType:
    """The module that defines ``obj`` (the package rewrites its public names'
    ``__module__`` to ``pytest_tunpair``, as trio does)."""
    if obj.__module__ == "pytest_tunpair":
        return importlib.import_module(pytest_tunpair._WHERE[obj.__name__], "pytest_tunpair")
    return sys.modules[obj.__module__]


def public() -> dict[str, Any]:
    """Every public name, by the path users write: ``pytest_tunpair.X`` and the public
    module ``pytest_tunpair.traces``."""
    names = {f"pytest_tunpair.{n}": getattr(pytest_tunpair, n) for n in pytest_tunpair.__all__}
    names.update({f"pytest_tunpair.traces.{n}": getattr(traces, n) for n in traces.__all__})
    return names


def hidden_by_the_api_reference() -> list[re.Pattern[str]]:
    """Members the API reference leaves out (mkdocs.yml's mkdocstrings filters): private
    names and the relay-side methods of the capture and the rules. The rest is public."""
    text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    found = re.search(r"^\s*filters: (\[.*\])\s*$", text, re.M)
    assert found, "mkdocs.yml has no mkdocstrings filters line"
    return [re.compile(f[1:]) for f in json.loads(found.group(1)) if f.startswith("!")]


def public_members(cls: type) -> Iterator[tuple[str, Any, type]]:
    """``(name, raw attribute, defining class)`` of each member the API reference shows,
    defined by a class of the package."""
    hidden = hidden_by_the_api_reference()
    for name in dir(cls):
        if any(p.search(name) for p in hidden):
            continue
        owner = next((k for k in cls.__mro__ if name in vars(k)), None)
        if owner is None or not owner.__module__.startswith("pytest_tunpair"):
            continue
        yield name, vars(owner)[name], owner


# -- annotations, resolved as a type checker sees them ---------------------------------------


def namespace(module: types.ModuleType) -> dict[str, Any]:
    """The module's globals plus what it imports under ``if TYPE_CHECKING:``, where the
    names its annotations use often live."""
    ns = dict(vars(module))
    tree = ast.parse(inspect.getsource(module))
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            exec(compile(ast.Module(body=node.body, type_ignores=[]), module.__file__, "exec"), ns)
    return ns


def resolve(annotation: Any, ns: dict[str, Any], where: str) -> Any:
    if not isinstance(annotation, str):
        return annotation
    try:
        return eval(annotation, ns)
    except Exception as exc:
        raise AssertionError(
            f"{where}: cannot resolve the annotation {annotation!r}: {exc}"
        ) from exc


def classes_in(tp: Any) -> Iterator[type]:
    """The classes a type mentions: ``dict[str, Fault] | None`` -> dict, str, Fault."""
    if isinstance(tp, list | tuple):  # Callable's parameter list
        for item in tp:
            yield from classes_in(item)
        return
    if isinstance(tp, type) and not typing.get_args(tp):
        yield tp
    origin = typing.get_origin(tp)
    if isinstance(origin, type):
        yield origin
    for arg in typing.get_args(tp):
        yield from classes_in(arg)


def instance_annotations(cls: type) -> dict[str, str]:
    """``self.name: T = ...`` in the class's methods (attributes set in ``__init__``)."""
    tree = ast.parse(inspect.getsource(home(cls)))
    (cdef,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls.__name__]
    found = {}
    for node in ast.walk(cdef):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Attribute)
            and isinstance(node.target.value, ast.Name)
            and node.target.value.id == "self"
        ):
            found.setdefault(node.target.attr, ast.unparse(node.annotation))
    return found


def handed_out(cls: type) -> Iterator[tuple[str, Any]]:
    """``(where, type)`` for what each public method returns and each public attribute
    holds, as annotated."""
    name = cls.__name__
    ns = namespace(home(cls))
    for member, raw, owner in public_members(cls):
        fn = raw.fget if isinstance(raw, property) else getattr(raw, "__func__", raw)
        if inspect.isfunction(fn):
            ret = fn.__annotations__.get("return")
            if ret is not None:
                owner_ns = ns if owner is cls else namespace(home(owner))
                yield f"{name}.{member}()", resolve(ret, owner_ns, f"{name}.{member}")
    hidden = hidden_by_the_api_reference()
    for klass in cls.__mro__:
        if not klass.__module__.startswith("pytest_tunpair"):
            continue
        klass_ns = ns if klass is cls else namespace(home(klass))
        attributes = {**vars(klass).get("__annotations__", {}), **instance_annotations(klass)}
        for attr, annotation in attributes.items():
            if not any(p.search(attr) for p in hidden):
                yield f"{name}.{attr}", resolve(annotation, klass_ns, f"{name}.{attr}")


def unexported() -> list[str]:
    exported = {obj for obj in public().values() if isinstance(obj, type)}
    bad = []
    for cls in sorted(exported, key=lambda c: c.__qualname__):
        for where, tp in handed_out(cls):
            for c in classes_in(tp):
                if c.__module__.startswith("pytest_tunpair") and c not in exported:
                    bad.append(f"{where} -> {home(c).__name__}.{c.__qualname__}")
    return sorted(set(bad))


def test_every_class_the_public_api_hands_out_is_exported() -> None:
    """A class a public method returns or a public attribute holds is one users get to
    hold, annotate and read about: it is in ``pytest_tunpair.__all__`` (and its lazy map)
    or in ``pytest_tunpair.traces``. Follows every exported class's methods and attributes
    (``Capture.flows() -> list[Flow]``, ``TunPair.outage() -> Outage``)."""
    bad = [b for b in unexported() if b not in KNOWN_UNTIL_MERGED]
    assert not bad, (
        "classes handed out but not exported (add each to pytest_tunpair/__init__.py's "
        "__all__, _WHERE and TYPE_CHECKING imports, and to docs/api.md):\n" + "\n".join(bad)
    )


def test_every_exported_name_is_in_the_lazy_map_and_loads() -> None:
    names = [n for n in pytest_tunpair.__all__ if n != "__version__"]
    assert sorted(names) == sorted(pytest_tunpair._WHERE)
    for name in names:
        assert getattr(pytest_tunpair, name).__module__ == "pytest_tunpair", name


def test_the_api_reference_lists_every_public_name() -> None:
    page = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"^::: (pytest_tunpair[\w.]*)$", page, re.M))
    missing = [
        f"pytest_tunpair.{n}"
        for n in pytest_tunpair.__all__
        if n != "__version__" and f"pytest_tunpair.{n}" not in listed
    ]
    assert not missing, f"docs/api.md has no '::: NAME' line for {missing}"
    # The module's members, listed (the module has names that are not its API, TraceKind).
    found = re.search(
        r"^::: pytest_tunpair\.traces\n.*?^      members: \[(.*?)\]$", page, re.M | re.S
    )
    assert found, "docs/api.md: ::: pytest_tunpair.traces with its members"
    assert sorted(found.group(1).split(", ")) == sorted(traces.__all__)


# -- what users read names public paths -------------------------------------------------------


def user_pages() -> list[Path]:
    return [
        ROOT / "README.md",
        ROOT / "CHANGELOG.md",
        *sorted((ROOT / "docs").rglob("*.md")),
        *sorted((ROOT / "docs" / "recipes").glob("*")),
    ]


def test_the_docs_name_only_public_paths() -> None:
    """The docs, the README and the changelog never send users to a private module
    (``pytest_tunpair._link.queue.Server`` is ``pytest_tunpair.traces.Server``); a source
    file they cite (``pytest_tunpair/_kernel/routing.py``, for how it works) exists."""
    bad = []
    for page in user_pages():
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            where = f"{page.relative_to(ROOT)}:{n}"
            bad.extend(f"{where}: {m.group()}" for m in PRIVATE_PATH.finditer(line))
            for path in re.findall(r"pytest_tunpair/[\w/]+\.py", line):
                if not (ROOT / path).exists():
                    bad.append(f"{where}: {path} does not exist")
    assert not bad, "private paths in the docs:\n" + "\n".join(bad)


def _strings(tree: ast.AST) -> Iterator[ast.Constant]:
    """String constants that are not docstrings: messages, help texts, reprs."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            docstrings.add(id(node.value))  # attribute docstrings
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
        ):
            yield node


def test_messages_name_only_public_paths() -> None:
    """Error messages, help texts and reprs say ``pytest_tunpair.Packet``, never where a
    class happens to live (``python -m pytest_tunpair._option_tables``, a maintainer's
    command, is named in comments and docstrings only)."""
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in _strings(tree):
            for m in PRIVATE_PATH.finditer(node.value):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {m.group()}")
    assert not bad, "private paths in user-facing strings:\n" + "\n".join(bad)


def api_docstrings() -> Iterator[tuple[str, str]]:
    """``(public path, docstring)`` of each name and member the API reference renders."""
    for path, obj in public().items():
        if not callable(obj):
            continue
        yield path, inspect.getdoc(obj) or ""
        if isinstance(obj, type):
            for member, raw, _owner in public_members(obj):
                fn = raw.fget if isinstance(raw, property) else getattr(raw, "__func__", raw)
                doc = getattr(fn, "__doc__", None)
                if inspect.isfunction(fn) and doc:
                    yield f"{path}.{member}", doc


def test_the_api_reference_names_only_public_paths() -> None:
    """The docstrings the API reference renders point at public names
    (``:class:`~pytest_tunpair.Outage```), never a private module."""
    found = {
        f"docstring of {path}: {m.group()}"
        for path, doc in api_docstrings()
        for m in PRIVATE_PATH.finditer(doc)
    }
    bad = sorted(found - KNOWN_UNTIL_MERGED)
    assert not bad, "private paths in the API reference:\n" + "\n".join(bad)


def test_known_exceptions_are_still_there() -> None:
    """``KNOWN_UNTIL_MERGED`` lists only what is still wrong: delete an entry once fixed."""
    found = set(unexported())
    found |= {
        f"docstring of {path}: {m.group()}"
        for path, doc in api_docstrings()
        for m in PRIVATE_PATH.finditer(doc)
    }
    stale = sorted(KNOWN_UNTIL_MERGED - found)
    assert not stale, f"fixed: delete from KNOWN_UNTIL_MERGED: {stale}"
