"""The pytest side: options, the marker, the fixtures. The machinery lives elsewhere."""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from . import _report
from ._errors import OptionError

if TYPE_CHECKING:
    from ._pair import TunPair, TunPairFactory
    from ._userns import Status

SKIP_REASON = (
    "tunnel fixtures are off: run pytest with --tunpair "
    "(or set `tunpair = true` in the ini file) to run this test"
)

_FACTORY = pytest.StashKey["TunPairFactory"]()
_PCAP = pytest.StashKey[_report.PcapSettings]()  # config: --tunpair-pcap, resolved
_PCAP_STEMS = pytest.StashKey[dict[str, str]]()  # config: file stem -> test id
_REPORTED = pytest.StashKey[bool]()  # item: the packet trace is in a report already
_PCAP_FILES = pytest.StashKey[list[Path]]()  # item: pcap files named in its report
_PCAP_ERRORS = pytest.StashKey[dict[str, str]]()  # config: file -> why it was not written
_SEED = pytest.StashKey[int | None]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tunpair", "pytest-tunpair: in-kernel TUN/TAP pair fixtures")
    help_enable = (
        "turn on the tun_pair / tun_pair_factory fixtures (tests using them are skipped otherwise)"
    )
    group.addoption("--tunpair", action="store_true", default=None, help=help_enable)
    parser.addini("tunpair", type="bool", default=False, help=help_enable)
    help_pcap = (
        "write the packet capture of each failed test that used a tunnel to DIR, one pcap "
        "file per pair named after the test id (created if missing)"
    )
    group.addoption("--tunpair-pcap", metavar="DIR", default=None, help=help_pcap)
    parser.addini("tunpair_pcap", default="", help=help_pcap)
    help_mode = (
        "which tests --tunpair-pcap writes a file for: 'failed' (default) or 'all' "
        "(every test that used a tunnel)"
    )
    group.addoption("--tunpair-pcap-mode", metavar="MODE", default=None, help=help_mode)
    parser.addini("tunpair_pcap_mode", default="failed", help=help_mode)
    help_seed = (
        "default seed of tun_pair.impair() for the run (a failing test's report states the "
        "seed it used; pass it here to replay). Default: random per test"
    )
    group.addoption("--tunpair-seed", metavar="N", default=None, help=help_seed)
    parser.addini("tunpair_seed", default="", help=help_seed)
    _addoption_userns(group, parser)


@pytest.hookimpl(tryfirst=True)  # the user namespace must be entered while single-threaded
def pytest_configure(config: pytest.Config) -> None:
    _configure_userns(config)
    config.stash[_SEED] = run_seed(config)  # a bad value stops the run before any test
    from ._options import PairOptions

    config.addinivalue_line(
        "markers",
        "tunpair(**options): configure the tun_pair fixture -- "
        f"{', '.join(PairOptions.names_allowed())} (see docs/options.md)",
    )
    if config.pluginmanager.hasplugin("timeout"):
        config.pluginmanager.register(_TimeoutFromAnyThread(), "tunpair-timeout")
    try:
        config.stash[_PCAP] = _report.pcap_settings(
            cli_dir=config.getoption("tunpair_pcap", None),
            ini_dir=str(config.getini("tunpair_pcap")),
            cli_mode=config.getoption("tunpair_pcap_mode", None),
            ini_mode=str(config.getini("tunpair_pcap_mode")),
            invocation_dir=config.invocation_params.dir,
            ini_base=config.inipath.parent if config.inipath else config.rootpath,
            ini_file=str(config.inipath) if config.inipath else None,
        )
    except OptionError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[_PCAP_STEMS] = {}
    config.stash[_PCAP_ERRORS] = {}


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
        error = exc
    # Outside the except block: the failure is the option's message, said once, with no
    # "During handling of the above exception" chain.
    pytest.fail(str(error), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    # Errors from hooks happen in the relay thread; surface them as the test's failure
    # (pytest-httpserver's check() pattern) rather than waiting for teardown.
    __tracebackhide__ = True
    factory = item.stash.get(_FACTORY, None)
    pairs = factory.pairs if factory is not None else []
    result = yield
    for pair in pairs:
        pair.check()
    return result


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    # Outermost (tryfirst), so the report is final: an xfailed test is no failure here.
    report = yield
    factory = item.stash.get(_FACTORY, None)
    if factory is None or not factory.pairs:
        return report
    settings = item.config.stash[_PCAP]
    first_failure = report.failed and not item.stash.get(_REPORTED, False)
    notes: list[str] = []
    if settings.directory is not None and (
        first_failure
        or (report.when == "teardown" and (settings.mode == "all" or _PCAP_FILES in item.stash))
    ):
        notes = _write_pcaps(item, factory.pairs, settings.directory)
    if first_failure:
        # Once per test: a teardown error after a failed call would only repeat it.
        item.stash[_REPORTED] = True
        report.sections.append(
            (
                _report.section_title(report.when),
                _report.format_section(factory.pairs, notes, replay=_replay_hint),
            )
        )
    return report


def _replay_hint(seed: int) -> str:
    return f"replay with --tunpair-seed={seed}"


def _write_pcaps(item: pytest.Item, pairs: list[TunPair], directory: Path) -> list[str]:
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


def _addoption_userns(group: pytest.OptionGroup, parser: pytest.Parser) -> None:
    help_userns = (
        "auto (default): enter a user namespace when the process lacks CAP_NET_ADMIN or "
        "CAP_SYS_ADMIN, so that a normal user can build tunnels; always: even as root; "
        "never: refuse to run unprivileged"
    )
    from ._userns import MODES  # no heavy import: _userns uses only the standard library

    group.addoption("--tunpair-userns", choices=MODES, help=help_userns)
    parser.addini("tunpair_userns", default="auto", help=help_userns)


def _configure_userns(config: pytest.Config) -> None:
    if not enabled(config):
        return
    from . import _userns
    from ._errors import PrivilegeError

    mode = config.getoption("tunpair_userns", None)
    if mode is None:
        try:
            mode = _userns.check_mode(
                str(config.getini("tunpair_userns")).strip(),
                option="tunpair_userns",
                source=f"ini file {config.inipath}" if config.inipath else "ini file",
            )
        except OptionError as exc:
            raise pytest.UsageError(str(exc)) from None
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

    from ._disposable import run_in_disposable_thread
    from ._errors import ThreadNotStopped

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
