"""The pytest side: options, the marker, the fixtures. The machinery lives elsewhere."""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from ._pair import TunPair, TunPairFactory
    from ._userns import Status

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
    _addoption_userns(group, parser)


@pytest.hookimpl(tryfirst=True)  # the user namespace must be entered while single-threaded
def pytest_configure(config: pytest.Config) -> None:
    _configure_userns(config)
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


# -- rootless runs (machinery and the reasons in _userns.py) --------------------------------
_USERNS = pytest.StashKey["Status"]()


def _addoption_userns(group: pytest.OptionGroup, parser: pytest.Parser) -> None:
    help_userns = (
        "auto (default): enter a user namespace when the process lacks CAP_NET_ADMIN or "
        "CAP_SYS_ADMIN, so that a normal user can build tunnels; always: even as root; "
        "never: refuse to run unprivileged"
    )
    group.addoption("--tunpair-userns", choices=("auto", "always", "never"), help=help_userns)
    parser.addini("tunpair_userns", default="auto", help=help_userns)


def _configure_userns(config: pytest.Config) -> None:
    if not enabled(config):
        return
    from . import _userns
    from ._errors import PrivilegeError

    mode = config.getoption("tunpair_userns", None)
    if mode is None:
        mode = str(config.getini("tunpair_userns")).strip()
        if mode not in _userns.MODES:
            raise pytest.UsageError(
                f"ini key tunpair_userns = {mode!r}: use one of {', '.join(_userns.MODES)}"
            )
    try:
        # xdist workers already run execnet's thread: they use the user namespace the
        # controller entered before starting them.
        status = _userns.prepare(mode, may_enter=not hasattr(config, "workerinput"))
    except PrivilegeError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[_USERNS] = status


def pytest_report_header(config: pytest.Config) -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    status: Status | None = config.stash.get(_USERNS, None)
    how = status.describe() if status is not None else "off (run with --tunpair)"
    versions = []
    for dist in ("pyroute2", "scapy"):  # metadata only: importing them costs seconds
        try:
            versions.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            versions.append(f"{dist} not installed")
    return [f"tunpair: {how}; {', '.join(versions)}"]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    # In a user namespace we entered ourselves a thread cannot come back to the host's
    # network namespace (see _userns.py), so a tunnel test runs, setup to teardown, on a
    # thread of its own that ends with it; the main thread, and tests without a tunnel,
    # stay on the host network.
    status = item.config.stash.get(_USERNS, None)
    if status is None or status.can_return:
        return None
    if "tun_pair_factory" not in getattr(item, "fixturenames", ()):
        return None
    # What pytest's own pytest_runtest_protocol does, with the phases on the test's thread
    # (runtestprotocol is not re-exported by pytest; plugins such as pytest-rerunfailures
    # import it the same way). Hook wrappers (pytest-timeout, warnings, faulthandler) keep
    # running around this on the main thread.
    from _pytest.runner import runtestprotocol

    from ._userns import ThreadNotStopped, run_in_disposable_thread

    _cancel_timeout_from_any_thread(item)
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    try:
        run_in_disposable_thread(
            lambda: runtestprotocol(item, nextitem=nextitem), name=f"tunpair {item.nodeid}"
        )
    except ThreadNotStopped as exc:
        pytest.exit(f"{item.nodeid}: {exc}", returncode=pytest.ExitCode.TESTS_FAILED)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


def _cancel_timeout_from_any_thread(item: pytest.Item) -> None:
    # pytest-timeout (signal method) arms SIGALRM on the main thread, but also cancels it
    # from pytest_exception_interact -- on the test's thread here, where signal.signal()
    # raises ValueError (an INTERNALERROR for every failing test). Stopping the timer works
    # from any thread; its own wrapper restores the handler on the main thread afterwards.
    cancel = getattr(item, "cancel_timeout", None)
    if cancel is None:
        return

    def cancel_anywhere() -> None:
        try:
            cancel()
        except ValueError:
            import signal

            signal.setitimer(signal.ITIMER_REAL, 0)

    item.cancel_timeout = cancel_anywhere  # type: ignore[attr-defined]
