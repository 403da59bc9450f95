"""The pytest side: options, the marker, the fixtures. The machinery lives elsewhere."""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from ._pair import TunPair, TunPairFactory

SKIP_REASON = (
    "tunnel fixtures are off: run pytest with --tunpair "
    "(or set `tunpair = true` in the ini file) to run this test"
)

_FACTORY = pytest.StashKey["TunPairFactory"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tunpair", "pytest-tunpair: in-kernel TUN/TAP pair fixtures")
    help_enable = (
        "turn on the tun_pair / tun_pair_factory fixtures (tests using them are skipped otherwise)"
    )
    group.addoption("--tunpair", action="store_true", default=None, help=help_enable)
    parser.addini("tunpair", type="bool", default=False, help=help_enable)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "tunpair(**options): configure the tun_pair fixture -- mode, names, ipv4, ipv6, mtu, "
        "table, offload, max_packets, snaplen, capture_bytes, seed (see the README)",
    )


def enabled(config: pytest.Config) -> bool:
    opt = config.getoption("tunpair", None)
    if opt is not None:
        return bool(opt)
    return bool(config.getini("tunpair"))


@pytest.fixture
def tun_pair_factory(request: pytest.FixtureRequest) -> Generator[TunPairFactory, None, None]:
    """Make pairs in the test's namespace: ``tun_pair_factory(**options)`` -> TunPair.

    From setup to teardown the calling thread is inside a fresh network namespace; every
    pair is torn down with the test, newest first.
    """
    if not enabled(request.config):
        pytest.skip(SKIP_REASON)
    from ._pair import TunPairFactory

    factory = TunPairFactory(source="tun_pair_factory()")
    factory.open()
    request.node.stash[_FACTORY] = factory
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def tun_pair(tun_pair_factory: TunPairFactory, request: pytest.FixtureRequest) -> TunPair:
    """A TUN pair routed through a relay thread, configured by ``@pytest.mark.tunpair``."""
    from ._errors import OptionError

    marker = request.node.get_closest_marker("tunpair")
    options: dict[str, Any] = {}
    if marker is not None:
        if marker.args:
            pytest.fail(
                "@pytest.mark.tunpair takes keyword options only, e.g. "
                f"@pytest.mark.tunpair(mtu=9000); got positional {marker.args!r}",
                pytrace=False,
            )
        options = dict(marker.kwargs)
    try:
        return tun_pair_factory.make(options, source="@pytest.mark.tunpair")
    except OptionError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    # Errors from hooks happen in the relay thread; surface them as the test's failure
    # (pytest-httpserver's check() pattern) rather than waiting for teardown.
    result = yield
    factory = item.stash.get(_FACTORY, None)
    if factory is not None:
        for pair in factory.pairs:
            pair.check()
    return result
