"""Rootless runs on pytest's side: the user namespace, and tests on threads of their own.

The machinery and the kernel's reasons are in ``_kernel/userns.py`` and
``_kernel/disposable.py``; this module only fits them into a pytest run: entering the user
namespace at configure time (:func:`configure`), running a tunnel test's whole protocol on a
disposable thread where the main thread could not come back (:func:`run_protocol`), and
pytest-timeout's timer cancelled from such a thread (:class:`TimeoutFromAnyThread`).
"""

from __future__ import annotations

import pytest

from . import keys, scoped

#: The key of ``workerinput`` that carries the controller's refusal to xdist workers.
_WORKER_KEY = "tunpair_refusal"


def configure(config: pytest.Config, mode: str) -> None:
    """Make this process able to build tunnels (``--tunpair-userns`` = ``mode``), or keep
    the reason it cannot (:func:`refusal`): then the tests that need a tunnel fail with it,
    and the others run as usual."""
    from .._errors import PrivilegeError
    from .._kernel import userns

    workerinput = getattr(config, "workerinput", None)
    inherited = workerinput.get(_WORKER_KEY) if workerinput is not None else None
    if inherited is not None:
        # The controller could not: this worker would only fail with a worse reason (it is
        # multi-threaded, so it may not enter a user namespace itself).
        config.stash[keys.REFUSAL] = inherited
        return
    try:
        # xdist workers already run execnet's thread: they use the user namespace the
        # controller entered before starting them.
        status = userns.prepare(mode, may_enter=workerinput is None)
    except PrivilegeError as exc:
        config.stash[keys.REFUSAL] = str(exc)
        config.pluginmanager.register(_Refusal(), "tunpair-refusal")
        return
    config.stash[keys.USERNS] = status
    if config.pluginmanager.hasplugin("timeout"):
        config.pluginmanager.register(TimeoutFromAnyThread(), "tunpair-timeout")


def refusal(config: pytest.Config) -> str | None:
    """Why this run cannot create tunnels (the message naming the fixes), or None."""
    return config.stash.get(keys.REFUSAL, None)


def refuse_tunnel(config: pytest.Config) -> None:
    """Fail the requesting test's setup with :func:`refusal`'s message, if there is one.

    A failure, not a skip: ``--tunpair`` asked for these tests to run, and a run that could
    not (a CI job on a machine whose ``/dev/net/tun`` is 0600) must not look green.
    """
    message = refusal(config)
    if message is not None:
        pytest.fail(message, pytrace=False)


def describe(config: pytest.Config) -> str:
    """How tunnels run here, for the report header."""
    if refusal(config) is not None:
        return "cannot create tunnels here (tests that need one fail at setup, saying why)"
    status = config.stash.get(keys.USERNS, None)
    return status.describe() if status is not None else "off (run with --tunpair)"


def summary(terminalreporter: pytest.TerminalReporter) -> None:
    """At the end of the run: how many tests failed for want of a tunnel, and why (once)."""
    message = refusal(terminalreporter.config)
    if message is None:
        return
    # Counted from the reports, so that xdist workers' failures count on the controller.
    failed = [
        r
        for r in terminalreporter.stats.get("error", [])
        if getattr(r, "when", None) == "setup" and message in str(getattr(r, "longrepr", ""))
    ]
    if not failed:
        return
    from .report import plural

    terminalreporter.section("tunpair: no tunnels in this run", sep="-", red=True)
    terminalreporter.line(
        f"{plural(len(failed), 'test')} that need{'s' if len(failed) == 1 else ''} a tunnel "
        "failed at setup; the other tests ran as usual."
    )
    terminalreporter.line(message)


class _Refusal:
    """Registered when the controller could not prepare: its xdist workers get its reason."""

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: object) -> None:
        config = getattr(node, "config", None)
        workerinput = getattr(node, "workerinput", None)
        if config is not None and workerinput is not None:
            workerinput[_WORKER_KEY] = refusal(config)


def run_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    """``pytest_runtest_protocol``: True when the test ran on a thread of its own.

    In a user namespace we entered ourselves a thread cannot come back to the host's network
    namespace (see ``_kernel/userns.py``), so a tunnel test runs, setup to teardown, on a
    thread of its own that ends with it; the main thread, and tests without a tunnel, stay
    on the host network.
    """
    status = item.config.stash.get(keys.USERNS, None)
    if status is None or status.can_return:
        return None
    if not scoped.uses(item) and scoped.ending(item, nextitem) is None:
        return None
    # What pytest's own pytest_runtest_protocol does, with the phases on the test's thread
    # (runtestprotocol is not re-exported by pytest; plugins such as pytest-rerunfailures
    # import it the same way). Hook wrappers (pytest-timeout, warnings, faulthandler) keep
    # running around this on the main thread.
    from _pytest.runner import runtestprotocol

    from .._errors import ThreadNotStopped
    from .._kernel.disposable import run_in_disposable_thread

    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    try:
        run_in_disposable_thread(
            lambda: runtestprotocol(item, nextitem=nextitem), name=f"tunpair {item.nodeid}"
        )
    except ThreadNotStopped as exc:
        pytest.exit(f"{item.nodeid}: {exc}", returncode=pytest.ExitCode.TESTS_FAILED)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


class TimeoutFromAnyThread:
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
