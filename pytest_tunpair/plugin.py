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
_SEED = pytest.StashKey[int | None]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tunpair", "pytest-tunpair: in-kernel TUN/TAP pair fixtures")
    help_enable = (
        "turn on the tun_pair / tun_pair_factory fixtures (tests using them are skipped otherwise)"
    )
    group.addoption("--tunpair", action="store_true", default=None, help=help_enable)
    parser.addini("tunpair", type="bool", default=False, help=help_enable)
    help_seed = (
        "default seed of tun_pair.impair() for the run (a failing test's report states the "
        "seed it used; pass it here to replay). Default: random per test"
    )
    group.addoption("--tunpair-seed", metavar="N", default=None, help=help_seed)
    parser.addini("tunpair_seed", default="", help=help_seed)


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_SEED] = run_seed(config)  # a bad value stops the run before any test
    config.addinivalue_line(
        "markers",
        "tunpair(**options): configure the tun_pair fixture -- mode, names, ipv4, ipv6, mtu, "
        "table, offload, max_packets, snaplen, capture_bytes, seed (see the README)",
    )


def run_seed(config: pytest.Config) -> int | None:
    """--tunpair-seed, else ini tunpair_seed, else None (the marker's seed= beats both)."""
    for value, where in (
        (config.getoption("tunpair_seed", None), "--tunpair-seed"),
        (config.getini("tunpair_seed"), "ini key tunpair_seed"),
    ):
        if value is None or str(value).strip() == "":
            continue
        try:
            seed = int(str(value))
            if seed < 0:
                raise ValueError
        except ValueError:
            raise pytest.UsageError(
                f"{where}={value!r}: the seed is a whole number >= 0, e.g. {where}=1234"
            ) from None
        return seed
    return None


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

    seed = request.config.stash[_SEED]
    defaults = {} if seed is None else {"seed": seed}
    factory = TunPairFactory(defaults, source="tun_pair_factory()")
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
    __tracebackhide__ = True
    factory = item.stash.get(_FACTORY, None)
    pairs = factory.pairs if factory is not None else []
    try:
        result = yield
        for pair in pairs:
            pair.check()
    except BaseException:
        # The seed must be in a failing test's report, so it can be replayed. describe()
        # has lines beyond the first only for pairs with impairments or hooks.
        wired = [d for p in pairs if "\n" in (d := p.describe())]
        if wired:
            item.add_report_section("call", "tunpair wire", "\n".join(wired))
        raise
    return result
