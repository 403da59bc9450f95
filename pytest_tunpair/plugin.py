"""The pytest side: the marker, the fixtures and the hooks, each a few lines over the parts in
``_plugin/``: the options (``options.py``), the state (``keys.py``), module and session
pairs (``scoped.py``), rootless runs (``rootless.py``), what a failing test reports
(``report.py``) and a test's threads and thread pools (``threads.py``). The machinery lives
below and never imports pytest."""

from __future__ import annotations

import warnings
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from ._errors import OptionError
from ._plugin import keys, marks, options

# The rest of _plugin/ (live, report, rootless, scoped, threads) is imported by the hooks
# that need it, and those return at once in a run without --tunpair: a project that has the
# plugin installed and never opens a tunnel pays for the options and the markers only
# (benchmarks/run.py --only import).

if TYPE_CHECKING:
    from ._factory import TunPairFactory
    from ._pair import TunPair

SKIP_REASON = (
    "tunnel fixtures are off: run pytest with --tunpair "
    "(or set `tunpair = true` in the ini file) to run this test"
)


def pytest_addoption(parser: pytest.Parser) -> None:
    options.add(parser)


@pytest.hookimpl(tryfirst=True)  # the user namespace must be entered while single-threaded
def pytest_configure(config: pytest.Config) -> None:
    resolved = config.stash[keys.OPTIONS] = options.resolve(config)  # bad values stop the run
    if resolved.tunpair:
        from ._plugin import live, report, rootless, scoped, threads

        rootless.configure(config, resolved.tunpair_userns)
        threads.install()
        scoped.configure(config)
        report.configure(config)
        live.configure(config)
    # The option names come from the schema: listed only for `pytest --markers`, so that a
    # run that never opens a tunnel does not build it.
    tunpair = marks.tunpair_help() if config.getoption("markers", False) else "tunpair(**options)"
    config.addinivalue_line("markers", tunpair)
    config.addinivalue_line("markers", marks.HELP_IMPAIR)
    config.pluginmanager.register(marks.Checks(), "tunpair-marks")


def enabled(config: pytest.Config) -> bool:
    """``--tunpair`` or ``tunpair = true``: the tunnel fixtures run (else they skip)."""
    return config.stash[keys.OPTIONS].tunpair


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture
def tun_pair_factory(request: pytest.FixtureRequest) -> Generator[TunPairFactory, None, None]:
    """Make pairs in the test's namespace: ``tun_pair_factory(**options)`` -> TunPair.

    From setup to teardown the calling thread is inside a fresh network namespace; every
    pair is torn down with the test, newest first.
    """
    if not enabled(request.config):
        pytest.skip(SKIP_REASON)
    from ._plugin import live, rootless, scoped, threads

    rootless.refuse_tunnel(request.config)  # this machine cannot: the reason, once per test
    scoped.refuse_mixing(request.node)
    scoped.refuse_stranding(request, "tun_pair_factory")
    factory = _open(request, "tun_pair_factory()", spare=True)
    _warn_at(factory, request.node)
    request.node.stash[keys.FACTORY] = factory
    try:
        threads.begin(request, factory)
        yield factory
    finally:
        try:
            threads.end_test(request.node, factory, factory.close)
        finally:
            live.closed(request.config, factory)


@pytest.fixture
def tun_pair(tun_pair_factory: TunPairFactory, request: pytest.FixtureRequest) -> TunPair:
    """A TUN pair routed through a relay thread, configured by ``@pytest.mark.tunpair``."""
    return _pair_from_marker(tun_pair_factory, request)


# Module and session pairs: see _plugin/scoped.py for when a test joins their namespace.
@pytest.fixture(scope="module")
def tun_pair_factory_module(
    request: pytest.FixtureRequest,
) -> Generator[TunPairFactory, None, None]:
    """``tun_pair_factory`` for a whole module: pairs in one namespace, shared by the
    module's tests that request it (or ``tun_pair_module``); closed after the last one."""
    yield from _scoped_factory(request, "module")


@pytest.fixture(scope="session")
def tun_pair_factory_session(
    request: pytest.FixtureRequest,
) -> Generator[TunPairFactory, None, None]:
    """``tun_pair_factory`` for the whole session (per xdist worker): pairs in one namespace
    shared by every test that requests it (or ``tun_pair_session``)."""
    yield from _scoped_factory(request, "session")


@pytest.fixture(scope="module")
def tun_pair_module(
    tun_pair_factory_module: TunPairFactory, request: pytest.FixtureRequest
) -> TunPair:
    """A pair shared by the module's tests, configured by the module's
    ``pytestmark = pytest.mark.tunpair(...)``. Each test runs inside its namespace; what a
    test adds (hooks, impairments) is removed at its end."""
    return _pair_from_marker(tun_pair_factory_module, request)


@pytest.fixture(scope="session")
def tun_pair_session(
    tun_pair_factory_session: TunPairFactory, request: pytest.FixtureRequest
) -> TunPair:
    """A pair shared by every test of the session that requests it (per xdist worker), with
    default options (``tun_pair_factory_session(**options)`` for others)."""
    return _pair_from_marker(tun_pair_factory_session, request)


@pytest.fixture
def _tunpair_test_in_scoped_namespace(
    request: pytest.FixtureRequest,
) -> Generator[None, None, None]:
    # scoped.VISITOR: first among the test's function-scoped fixtures (scoped.tunnel_first).
    from ._plugin import scoped, threads

    factory, checkpoint = scoped.begin(request)
    _warn_at(factory, request.node)
    threads.begin(request, factory)
    yield
    threads.end_test(request.node, factory, factory.end, checkpoint)


def _scoped_factory(
    request: pytest.FixtureRequest, scope: str
) -> Generator[TunPairFactory, None, None]:
    if not enabled(request.config):
        pytest.skip(SKIP_REASON)
    from ._plugin import live, rootless, scoped, threads

    rootless.refuse_tunnel(request.config)
    name = f"tun_pair_factory_{scope}"
    scoped.refuse_stranding(request, name)
    factory = _open(request, f"{name}()")
    before = threads.snapshot()
    try:
        with scoped.kept(request, scope, factory):
            yield factory
    finally:
        try:
            threads.close_scope(request.node, factory, before)
        finally:
            live.closed(request.config, factory)


def _open(request: pytest.FixtureRequest, source: str, *, spare: bool = False) -> TunPairFactory:
    """A factory with the run's defaults (``--tunpair-seed``, ``--tunpair-leftovers``), open:
    the calling thread is inside its namespace (``spare``: one built ahead of time, if the
    run has one for this test). Its pairs stream live with ``--tunpair-pcap-live``."""
    from ._factory import TunPairFactory
    from ._plugin import live, spares

    resolved = request.config.stash[keys.OPTIONS]
    seed = resolved.tunpair_seed
    defaults = {} if seed is None else {"seed": seed}
    factory = TunPairFactory(defaults, source=source, leftovers=resolved.tunpair_leftovers)
    live.watch(request.config, factory, request.node.nodeid)
    return factory.open(spares.take(request, defaults) if spare else None)


def _warn_at(factory: TunPairFactory, item: pytest.Item) -> None:
    """Leftover warnings name the test (its file and line), not the plugin's code."""
    from ._errors import LeftoverProcessWarning

    path, line, _name = item.location
    filename = str(item.config.rootpath / path)

    def warn(message: str) -> None:
        warnings.warn_explicit(
            LeftoverProcessWarning(message), LeftoverProcessWarning, filename, (line or 0) + 1
        )

    if factory.keeper is not None:
        factory.keeper.warn = warn


def _pair_from_marker(factory: TunPairFactory, request: pytest.FixtureRequest) -> TunPair:
    """The pair the ``tunpair`` marker describes, impaired as the ``impair`` markers say."""
    kwargs = marks.pair_options(request.node)
    try:
        pair = factory.make(kwargs, source="@pytest.mark.tunpair")
    except OptionError as exc:
        message = marks.misplaced(exc) or str(exc)
    else:
        marks.apply_impair(pair, request.node)
        return pair
    # Outside the except block: the failure is the option's message, said once, with no
    # "During handling of the above exception" chain.
    pytest.fail(message, pytrace=False)


# -- hooks ------------------------------------------------------------------------------------
# Each returns at once without --tunpair: no pair can open, nothing to order, join or report.
@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not enabled(config):
        return
    from ._plugin import scoped

    for item in items:
        scoped.tunnel_first(item)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    if not enabled(item.config):
        return None
    from ._plugin import rootless

    return rootless.run_protocol(item, nextitem)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    if enabled(item.config):
        from ._plugin import scoped

        scoped.join_for_setup(item)
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    # Errors from hooks happen in the relay thread; surface them as the test's failure
    # (pytest-httpserver's check() pattern) rather than waiting for teardown.
    __tracebackhide__ = True
    if not enabled(item.config):
        return (yield)
    from ._plugin import report, threads

    threads.bind_call(item)  # the loops the test function runs in exist by now
    result = yield
    for pair in report.pairs_of(item):
        pair.check()
    return result


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_teardown(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, None, None]:
    if not enabled(item.config):
        return (yield)
    from ._plugin import scoped

    scoped.join_for_teardown(item, nextitem)
    try:
        return (yield)
    finally:
        scoped.leave_after_teardown(item)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    # Outermost (tryfirst), so the report is final: an xfailed test is no failure here.
    result = yield
    if enabled(item.config):
        from ._plugin import report

        report.make_report(item, result)
    return result


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    # packetdrill scripts, with --tunpair (see _plugin/pkt.py).
    if file_path.suffix != ".pkt":
        return None
    from ._plugin import pkt

    return pkt.collect_file(file_path, parent)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not enabled(terminalreporter.config):
        return
    from ._plugin import live, report, rootless

    report.terminal_summary(terminalreporter)
    rootless.summary(terminalreporter)
    live.terminal_summary(terminalreporter)


def pytest_unconfigure(config: pytest.Config) -> None:
    if keys.OPTIONS not in config.stash or not enabled(config):
        return
    from ._link import core
    from ._plugin import live, spares, threads

    threads.uninstall()
    live.unconfigure(config)
    spares.close(config)
    core.join_releases()  # the last pairs' arrival-stamp rings (released on threads)


def pytest_report_header(config: pytest.Config) -> list[str]:
    if not enabled(config):
        return ["tunpair: off (run with --tunpair)"]
    from ._plugin import report, rootless

    return report.header(config, rootless.describe(config))
