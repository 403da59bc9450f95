"""Module and session pairs: which namespace a test runs in, and when it goes there.

The namespace of ``tun_pair_factory_module`` / ``_session`` outlives the test that made it:
each test that uses it joins it before its setup (:func:`join_for_setup`) and leaves after
its teardown (:func:`leave_after_teardown`), so its fixtures, body and finalizers -- the
module's own, at the module's last test -- run inside, and other tests stay on the host
network. A function-scoped fixture placed first among the test's function-scoped ones
(:data:`VISITOR`, :func:`tunnel_first`) marks where the test's own part begins: what it adds
to the pairs is removed at its end, and its reports show only its packets.

A test runs in one namespace: mixing the factories is refused (:func:`refuse_mixing`), as is
a factory requested where the test's thread could not come back (:func:`refuse_stranding`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, cast

import pytest

from . import keys

if TYPE_CHECKING:
    from .._factory import FactoryCheckpoint, TunPairFactory

# The fixtures that put a test inside a namespace; the scoped ones by their scope.
SCOPED_FACTORIES = {"tun_pair_factory_module": "module", "tun_pair_factory_session": "session"}
TUNNEL_FACTORIES = ("tun_pair_factory", *SCOPED_FACTORIES)
VISITOR = "_tunpair_test_in_scoped_namespace"


def configure(config: pytest.Config) -> None:
    config.stash[keys.HOME] = _netns_inode()
    config.stash[keys.SCOPED] = {}
    config.stash[keys.VISITS] = []


def _netns_inode() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def uses(item: pytest.Item) -> list[str]:
    """The tunnel factories in the item's fixture closure."""
    names = getattr(item, "fixturenames", ())
    return [n for n in TUNNEL_FACTORIES if n in names]


def scope_key(node: pytest.Item | pytest.Collector, scope: str) -> str:
    if scope == "session":
        return "session"
    module = node.getparent(pytest.Module)
    return (module or node).nodeid


@contextmanager
def kept(request: pytest.FixtureRequest, scope: str, factory: TunPairFactory) -> Iterator[None]:
    """While open, ``factory`` is the scope's: tests of the scope join its namespace."""
    config = request.config
    # This thread stays inside for the rest of the test that made it, as if it had joined.
    config.stash[keys.VISITS].append(factory.detach())
    key = scope_key(request.node, scope)
    config.stash[keys.SCOPED][key] = factory
    try:
        yield
    finally:
        config.stash[keys.SCOPED].pop(key, None)


def begin(request: pytest.FixtureRequest) -> tuple[TunPairFactory, FactoryCheckpoint]:
    """The start of a test's own part of a scoped factory (the :data:`VISITOR` fixture)."""
    item = request.node
    refuse_mixing(item)
    names = [n for n in SCOPED_FACTORIES if n in item.fixturenames]
    factory = cast("TunPairFactory", request.getfixturevalue(names[0]))
    checkpoint = factory.begin()
    item.stash[keys.CHECKPOINT] = (factory, checkpoint)
    return factory, checkpoint


def refuse_mixing(item: pytest.Item) -> None:
    used = uses(item)
    if len(used) > 1:
        pytest.fail(
            f"{item.name} requests {' and '.join(used)}: a test runs inside one network "
            "namespace, so it can use the pairs of one of them only",
            pytrace=False,
        )


def refuse_stranding(request: pytest.FixtureRequest, name: str) -> None:
    """One line instead of a traceback through the plugin, where the test's thread could
    not come back from the namespace, or already is in another one."""
    config = request.config
    status = config.stash.get(keys.USERNS, None)
    from .._kernel.disposable import thread_is_disposable

    if status is not None and not status.can_return and not thread_is_disposable():
        pytest.fail(
            f"{name} was requested while the test ran (request.getfixturevalue?): in this "
            "rootless run a test that uses a tunnel runs on a thread of its own, chosen before "
            f"its setup. Request {name.replace('_factory', '')} or {name} as an argument of "
            "the test or of a fixture, or with @pytest.mark.usefixtures",
            pytrace=False,
        )
    if _netns_inode() != config.stash[keys.HOME]:
        pytest.fail(
            f"{name}: the test already runs inside another tunnel namespace; a test runs in "
            "one: use the pairs of one factory (tun_pair, tun_pair_module or tun_pair_session "
            "and their factories do not mix in a test)",
            pytrace=False,
        )


def join_for_setup(item: pytest.Item) -> None:
    """A test of an open module or session pair goes into its namespace before its setup."""
    used = uses(item)
    if len(used) == 1 and used[0] in SCOPED_FACTORIES:
        key = scope_key(item, SCOPED_FACTORIES[used[0]])
        factory = item.config.stash[keys.SCOPED].get(key)
        if factory is not None and factory.netns is not None and not factory.netns.is_current():
            item.config.stash[keys.VISITS].append(factory.join())


def join_for_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """A module's or the session's pair closes in the teardown of the scope's last test, even
    one that does not use it: its finalizers (the user's daemon fixture) run inside too."""
    factory = ending(item, nextitem)
    if factory is not None and factory.netns is not None and not factory.netns.is_current():
        item.config.stash[keys.VISITS].append(factory.join())


def leave_after_teardown(item: pytest.Item) -> None:
    visits = item.config.stash.get(keys.VISITS, [])
    while visits:
        visits.pop().leave()


def ending(item: pytest.Item, nextitem: pytest.Item | None) -> TunPairFactory | None:
    """The scoped factory whose scope ends with ``item``'s teardown, if one is open (only
    for a test that runs in no other namespace)."""
    if uses(item):
        return None
    scoped = item.config.stash.get(keys.SCOPED, {})
    module = scope_key(item, "module")
    if module in scoped and (nextitem is None or scope_key(nextitem, "module") != module):
        return scoped[module]
    if nextitem is None and "session" in scoped:
        return scoped["session"]
    return None


def tunnel_first(item: pytest.Item) -> None:
    """Put the fixture that enters the namespace before the test's other function-scoped
    fixtures, whatever the order of the arguments: ``def test(server, tun_pair)`` then binds
    its server inside, not on the host (a bare EADDRNOTAVAIL)."""
    used = uses(item)
    names = getattr(item, "fixturenames", None)
    info = getattr(item, "_fixtureinfo", None)
    if not used or names is None or info is None:
        return
    # The closure is sorted by scope (wider first), and fixtures are set up in its order.
    defs = info.name2fixturedefs
    first = next(
        (i for i, n in enumerate(names) if n not in defs or defs[n][-1].scope == "function"),
        len(names),
    )
    if "tun_pair_factory" in used:
        names.remove("tun_pair_factory")
        names.insert(first, "tun_pair_factory")
    if len(used) > 1 or used[0] != "tun_pair_factory":
        names.insert(first, VISITOR)  # a test of a shared pair (or one that mixes: refused)
