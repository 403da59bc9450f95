"""The pytest side: options, the marker, the fixtures. The machinery lives elsewhere."""

from __future__ import annotations

import os
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pytest

from ._errors import OptionError
from ._plugin import options
from ._plugin import report as _report

if TYPE_CHECKING:
    from ._kernel.netns import Visit
    from ._kernel.userns import Status
    from ._pair import FactoryCheckpoint, TunPair, TunPairFactory

SKIP_REASON = (
    "tunnel fixtures are off: run pytest with --tunpair "
    "(or set `tunpair = true` in the ini file) to run this test"
)

_FACTORY = pytest.StashKey["TunPairFactory"]()
_OPTIONS = pytest.StashKey[options.PluginOptions]()  # config: the plugin's options, resolved
_PCAP_STEMS = pytest.StashKey[dict[str, str]]()  # config: file stem -> test id
_REPORTED = pytest.StashKey[bool]()  # item: the packet trace is in a report already
_PCAP_FILES = pytest.StashKey[list[Path]]()  # item: pcap files named in its report
_PCAP_ERRORS = pytest.StashKey[dict[str, str]]()  # config: file -> why it was not written
_HOME = pytest.StashKey[int]()  # config: inode of the network namespace tests start in
_SCOPED = pytest.StashKey[dict[str, "TunPairFactory"]]()  # config: open module/session factories
_VISITS = pytest.StashKey[list["Visit"]]()  # config: the running test's stays in namespaces
_CHECKPOINT = pytest.StashKey[tuple["TunPairFactory", "FactoryCheckpoint"]]()  # item
# The fixtures that put a test inside a namespace; the scoped ones by their scope.
SCOPED_FACTORIES = {"tun_pair_factory_module": "module", "tun_pair_factory_session": "session"}
TUNNEL_FACTORIES = ("tun_pair_factory", *SCOPED_FACTORIES)
_VISITOR = "_tunpair_test_in_scoped_namespace"


def pytest_addoption(parser: pytest.Parser) -> None:
    options.add(parser)


@pytest.hookimpl(tryfirst=True)  # the user namespace must be entered while single-threaded
def pytest_configure(config: pytest.Config) -> None:
    config.stash[_OPTIONS] = options.resolve(config)  # a bad value stops the run here
    _configure_userns(config)
    config.stash[_HOME] = os.stat("/proc/thread-self/ns/net").st_ino
    config.stash[_SCOPED] = {}
    config.stash[_VISITS] = []
    from ._options import PairOptions

    config.addinivalue_line(
        "markers",
        "tunpair(**options): configure the tun_pair fixture (on a module, in pytestmark: "
        f"tun_pair_module too) -- {', '.join(PairOptions.names_allowed())} "
        "(see docs/options.md)",
    )
    if config.pluginmanager.hasplugin("timeout"):
        config.pluginmanager.register(_TimeoutFromAnyThread(), "tunpair-timeout")
    config.stash[_PCAP_STEMS] = {}
    config.stash[_PCAP_ERRORS] = {}


def enabled(config: pytest.Config) -> bool:
    """``--tunpair`` or ``tunpair = true``: the tunnel fixtures run (else they skip)."""
    return config.stash[_OPTIONS].tunpair


@pytest.fixture
def tun_pair_factory(request: pytest.FixtureRequest) -> Generator[TunPairFactory, None, None]:
    """Make pairs in the test's namespace: ``tun_pair_factory(**options)`` -> TunPair.

    From setup to teardown the calling thread is inside a fresh network namespace; every
    pair is torn down with the test, newest first.
    """
    if not enabled(request.config):
        pytest.skip(SKIP_REASON)
    _refuse_mixing(request.node)
    _refuse_stranding(request, "tun_pair_factory")
    from ._pair import TunPairFactory

    resolved = request.config.stash[_OPTIONS]
    seed = resolved.tunpair_seed
    defaults = {} if seed is None else {"seed": seed}
    factory = TunPairFactory(
        defaults, source="tun_pair_factory()", leftovers=resolved.tunpair_leftovers
    )
    factory.open()
    _warn_at(factory, request.node)
    request.node.stash[_FACTORY] = factory
    try:
        yield factory
    finally:
        _close(factory)


def _warn_at(factory: TunPairFactory, item: pytest.Item) -> None:
    """Leftover warnings name the test (its file and line), not the plugin's code."""
    import warnings

    from ._errors import LeftoverProcessWarning

    path, line, _name = item.location
    filename = str(item.config.rootpath / path)

    def warn(message: str) -> None:
        warnings.warn_explicit(
            LeftoverProcessWarning(message), LeftoverProcessWarning, filename, (line or 0) + 1
        )

    if factory.keeper is not None:
        factory.keeper.warn = warn


def _close(factory: TunPairFactory) -> None:
    from ._errors import LeftoverProcessError

    try:
        factory.close()
    except LeftoverProcessError as exc:
        message = str(exc)
    else:
        return
    pytest.fail(message, pytrace=False)  # outside the except: no "during handling of"


@pytest.fixture
def tun_pair(tun_pair_factory: TunPairFactory, request: pytest.FixtureRequest) -> TunPair:
    """A TUN pair routed through a relay thread, configured by ``@pytest.mark.tunpair``."""
    return _pair_from_marker(tun_pair_factory, request)


def _pair_from_marker(factory: TunPairFactory, request: pytest.FixtureRequest) -> TunPair:
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
        return factory.make(options, source="@pytest.mark.tunpair")
    except OptionError as exc:
        error = exc
    # Outside the except block: the failure is the option's message, said once, with no
    # "During handling of the above exception" chain.
    pytest.fail(str(error), pytrace=False)


# -- module and session pairs -----------------------------------------------------------------
# The namespace outlives the test that made it: each test that uses it joins it before its
# setup (pytest_runtest_setup) and leaves after its teardown (pytest_runtest_teardown), so
# its fixtures, body and finalizers -- the module's own, at the module's last test -- run
# inside, and other tests stay on the host network. A function-scoped fixture placed first
# among the test's function-scoped ones (_VISITOR) marks where the test's own part begins:
# what it adds to the pairs is removed at its end, and its reports show only its packets.
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


def _scoped_factory(
    request: pytest.FixtureRequest, scope: str
) -> Generator[TunPairFactory, None, None]:
    config = request.config
    if not enabled(config):
        pytest.skip(SKIP_REASON)
    name = f"tun_pair_factory_{scope}"
    _refuse_stranding(request, name)
    from ._pair import TunPairFactory

    resolved = config.stash[_OPTIONS]
    seed = resolved.tunpair_seed
    factory = TunPairFactory(
        {} if seed is None else {"seed": seed},
        source=f"{name}()",
        leftovers=resolved.tunpair_leftovers,
    )
    factory.open()
    # This thread stays inside for the rest of the test that made it, as if it had joined.
    config.stash[_VISITS].append(factory.detach())
    key = _scope_key(request.node, scope)
    config.stash[_SCOPED][key] = factory
    try:
        yield factory
    finally:
        config.stash[_SCOPED].pop(key, None)
        _close(factory)


def _scope_key(node: pytest.Item | pytest.Collector, scope: str) -> str:
    if scope == "session":
        return "session"
    module = node.getparent(pytest.Module)
    return (module or node).nodeid


def _refuse_stranding(request: pytest.FixtureRequest, name: str) -> None:
    """One line instead of a traceback through the plugin, where the test's thread could
    not come back from the namespace, or already is in another one."""
    config = request.config
    status = config.stash.get(_USERNS, None)
    from ._kernel.disposable import thread_is_disposable

    if status is not None and not status.can_return and not thread_is_disposable():
        pytest.fail(
            f"{name} was requested while the test ran (request.getfixturevalue?): in this "
            "rootless run a test that uses a tunnel runs on a thread of its own, chosen before "
            f"its setup. Request {name.replace('_factory', '')} or {name} as an argument of "
            "the test or of a fixture, or with @pytest.mark.usefixtures",
            pytrace=False,
        )
    if os.stat("/proc/thread-self/ns/net").st_ino != config.stash[_HOME]:
        pytest.fail(
            f"{name}: the test already runs inside another tunnel namespace; a test runs in "
            "one: use the pairs of one factory (tun_pair, tun_pair_module or tun_pair_session "
            "and their factories do not mix in a test)",
            pytrace=False,
        )


@pytest.fixture
def _tunpair_test_in_scoped_namespace(
    request: pytest.FixtureRequest,
) -> Generator[None, None, None]:
    item = request.node
    _refuse_mixing(item)
    names = [n for n in SCOPED_FACTORIES if n in item.fixturenames]
    factory = cast("TunPairFactory", request.getfixturevalue(names[0]))
    checkpoint = factory.begin()
    _warn_at(factory, item)
    item.stash[_CHECKPOINT] = (factory, checkpoint)
    yield
    from ._errors import LeftoverProcessError

    try:
        factory.end(checkpoint)
    except LeftoverProcessError as exc:
        message = str(exc)
    else:
        return
    pytest.fail(message, pytrace=False)


def _uses(item: pytest.Item) -> list[str]:
    """The tunnel factories in the item's fixture closure."""
    names = getattr(item, "fixturenames", ())
    return [n for n in TUNNEL_FACTORIES if n in names]


def _refuse_mixing(item: pytest.Item) -> None:
    uses = _uses(item)
    if len(uses) > 1:
        pytest.fail(
            f"{item.name} requests {' and '.join(uses)}: a test runs inside one network "
            "namespace, so it can use the pairs of one of them only",
            pytrace=False,
        )


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    uses = _uses(item)
    if len(uses) == 1 and uses[0] in SCOPED_FACTORIES:
        key = _scope_key(item, SCOPED_FACTORIES[uses[0]])
        factory = item.config.stash[_SCOPED].get(key)
        if factory is not None and factory.netns is not None and not factory.netns.is_current():
            item.config.stash[_VISITS].append(factory.join())
    return (yield)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_teardown(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, None, None]:
    # A module's or the session's pair closes in the teardown of the scope's last test, even
    # one that does not use it: its finalizers (the user's daemon fixture) run inside too.
    ending = _ending(item, nextitem)
    if ending is not None and ending.netns is not None and not ending.netns.is_current():
        item.config.stash[_VISITS].append(ending.join())
    try:
        return (yield)
    finally:
        visits = item.config.stash.get(_VISITS, [])
        while visits:
            visits.pop().leave()


def _ending(item: pytest.Item, nextitem: pytest.Item | None) -> TunPairFactory | None:
    """The scoped factory whose scope ends with ``item``'s teardown, if one is open (only
    for a test that runs in no other namespace)."""
    if _uses(item):
        return None
    scoped = item.config.stash.get(_SCOPED, {})
    module = _scope_key(item, "module")
    if module in scoped and (nextitem is None or _scope_key(nextitem, "module") != module):
        return scoped[module]
    if nextitem is None and "session" in scoped:
        return scoped["session"]
    return None


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        _tunnel_first(item)


def _tunnel_first(item: pytest.Item) -> None:
    """Put the fixture that enters the namespace before the test's other function-scoped
    fixtures, whatever the order of the arguments: ``def test(server, tun_pair)`` then binds
    its server inside, not on the host (a bare EADDRNOTAVAIL)."""
    uses = _uses(item)
    names = getattr(item, "fixturenames", None)
    info = getattr(item, "_fixtureinfo", None)
    if not uses or names is None or info is None:
        return
    # The closure is sorted by scope (wider first), and fixtures are set up in its order.
    defs = info.name2fixturedefs
    first = next(
        (i for i, n in enumerate(names) if n not in defs or defs[n][-1].scope == "function"),
        len(names),
    )
    if "tun_pair_factory" in uses:
        names.remove("tun_pair_factory")
        names.insert(first, "tun_pair_factory")
    if len(uses) > 1 or uses[0] != "tun_pair_factory":
        names.insert(first, _VISITOR)  # a test of a shared pair (or one that mixes: refused)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    # Errors from hooks happen in the relay thread; surface them as the test's failure
    # (pytest-httpserver's check() pattern) rather than waiting for teardown.
    __tracebackhide__ = True
    result = yield
    for pair in _test_pairs(item):
        pair.check()
    return result


def _test_pairs(item: pytest.Item) -> list[TunPair]:
    factory = item.stash.get(_FACTORY, None)
    if factory is not None:
        return factory.pairs
    scoped = item.stash.get(_CHECKPOINT, None)
    return scoped[0].pairs if scoped is not None else []


def _reported(item: pytest.Item) -> list[TunPair | _report.TestSlice]:
    """What the test's reports show: its pairs, or its part of a module or session pair."""
    factory = item.stash.get(_FACTORY, None)
    if factory is not None:
        return list(factory.pairs)
    scoped = item.stash.get(_CHECKPOINT, None)
    if scoped is None:
        return []
    return [_report.TestSlice(*entry) for entry in scoped[0].slices(scoped[1])]


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    # Outermost (tryfirst), so the report is final: an xfailed test is no failure here.
    report = yield
    pairs = _reported(item)
    if not pairs:
        return report
    resolved = item.config.stash[_OPTIONS]
    first_failure = report.failed and not item.stash.get(_REPORTED, False)
    notes: list[str] = []
    if resolved.tunpair_pcap is not None and (
        first_failure
        or (
            report.when == "teardown"
            and (resolved.tunpair_pcap_mode == "all" or _PCAP_FILES in item.stash)
        )
    ):
        notes = _write_pcaps(item, pairs, resolved.tunpair_pcap)
    if first_failure:
        # Once per test: a teardown error after a failed call would only repeat it.
        item.stash[_REPORTED] = True
        report.sections.append(
            (
                _report.section_title(report.when),
                _report.format_section(pairs, notes, replay=_replay_hint),
            )
        )
        if item.config.pluginmanager.hasplugin("html"):
            # pytest-html shows a report's ``extras`` in the test's row.
            plots = [p.with_suffix(".png") for p in item.stash.get(_PCAP_FILES, [])]
            images = plots if resolved.tunpair_plot else []
            extras = _report.html_extras(pairs, notes, replay=_replay_hint, images=images)
            extras = [*getattr(report, "extras", []), *extras]
            setattr(report, "extras", extras)  # noqa: B010 (TestReport declares no such field)
    return report


def _replay_hint(seed: int) -> str:
    return f"replay with --tunpair-seed={seed}"


def _write_pcaps(
    item: pytest.Item, pairs: list[TunPair | _report.TestSlice], directory: Path
) -> list[str]:
    # Written at the first failure (so the report can name the files) and again when the
    # test is over, pairs closed, so the files hold teardown's traffic too.
    paths = item.stash.get(_PCAP_FILES, None)
    if paths is None:
        stem = _report.pcap_stem(item.nodeid, item.config.stash[_PCAP_STEMS])
        names = [pair.options.names for pair in pairs]
        paths = item.stash[_PCAP_FILES] = _report.pcap_paths(directory, stem, names)
    notes = []
    for path, error in _report.write_pcaps(pairs[: len(paths)], paths):
        notes.append(_report.pcap_note(path, error))
        if error is not None:
            item.config.stash[_PCAP_ERRORS][str(path)] = f"{item.nodeid}: {notes[-1]}"
    if item.config.stash[_OPTIONS].tunpair_plot:
        # One note per pair: the plot's line goes under its pcap's.
        for i, (path, problem) in enumerate(_report.write_plots(pairs[: len(paths)], paths)):
            note = _report.plot_note(path, problem)
            notes[i] += "\n" + note
            if problem is not None:
                item.config.stash[_PCAP_ERRORS][str(path)] = f"{item.nodeid}: {note}"
    return notes


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    # A passing test's file (--tunpair-pcap-mode=all) has no report to name a failure in.
    errors = terminalreporter.config.stash.get(_PCAP_ERRORS, {})
    if errors:
        terminalreporter.section("tunpair: pcap files not written", sep="-", yellow=True)
        for line in errors.values():
            terminalreporter.line(line)


# -- rootless runs (machinery and the reasons in _userns.py) --------------------------------
_USERNS = pytest.StashKey["Status"]()


def _configure_userns(config: pytest.Config) -> None:
    if not enabled(config):
        return
    from ._errors import PrivilegeError
    from ._kernel import userns as _userns

    mode = config.stash[_OPTIONS].tunpair_userns
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
    if not _uses(item) and _ending(item, nextitem) is None:
        return None
    # What pytest's own pytest_runtest_protocol does, with the phases on the test's thread
    # (runtestprotocol is not re-exported by pytest; plugins such as pytest-rerunfailures
    # import it the same way). Hook wrappers (pytest-timeout, warnings, faulthandler) keep
    # running around this on the main thread.
    from _pytest.runner import runtestprotocol

    from ._errors import ThreadNotStopped
    from ._kernel.disposable import run_in_disposable_thread

    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    try:
        run_in_disposable_thread(
            lambda: runtestprotocol(item, nextitem=nextitem), name=f"tunpair {item.nodeid}"
        )
    except ThreadNotStopped as exc:
        pytest.exit(f"{item.nodeid}: {exc}", returncode=pytest.ExitCode.TESTS_FAILED)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


class _TimeoutFromAnyThread:
    """pytest-timeout's timer, cancelled from a test's own thread (registered only when
    pytest-timeout is present).

    Its signal method arms SIGALRM on the main thread, but also cancels it from
    pytest_exception_interact -- on the test's thread when tests run on threads of their
    own, where ``signal.signal()`` raises ValueError (an INTERNALERROR for every failing
    test). Stopping the timer works from any thread; pytest-timeout's wrapper around the
    whole protocol cancels again on the main thread, restoring the SIGALRM handler there.
    """

    @pytest.hookimpl(tryfirst=True)
    def pytest_timeout_cancel_timer(self, item: pytest.Item) -> bool | None:
        import threading

        if threading.current_thread() is threading.main_thread():
            return None  # pytest-timeout's own cancel
        cancel = getattr(item, "cancel_timeout", None)
        if cancel is not None:
            try:
                cancel()
            except ValueError:  # signal.signal() off the main thread, after the timer stopped
                import signal

                signal.setitimer(signal.ITIMER_REAL, 0)
        return True  # firstresult: done
