"""Teardown work that need not hold up a test (``_kernel/disposal.py``): a finished tunnel
test's device fds are released on the disposer's thread while the next test runs, all of
them by the end of the run; and the package's threads carry their names into the kernel
(``threads.own_thread``), so that one Python has already joined but the kernel still lists
is never taken for a thread the test left running."""

from __future__ import annotations

import _thread
import os
import sys
import threading
from typing import Any

import pytest

from pytest_tunpair._kernel import linux
from pytest_tunpair._kernel.disposal import Disposer
from pytest_tunpair._kernel.netns import NetNamespace
from pytest_tunpair._kernel.threads import own_thread, threads_in

from .conftest import run_standalone


def test_the_disposer_runs_work_in_order_on_its_own_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pure logic: order, the thread, wait(), a failure reported (sys.unraisablehook) with
    the next piece still run, close() running what is left, work after close run at once."""
    reported: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    ran: list[tuple[int, str]] = []
    gate = threading.Event()
    disposer = Disposer()
    try:
        disposer.later(gate.wait)
        for i in range(3):
            disposer.later(lambda i=i: ran.append((i, threading.current_thread().name)))
        disposer.later(lambda: 1 / 0)
        disposer.later(lambda: ran.append((3, threading.current_thread().name)))
        assert not disposer.wait(0.05)  # held up by the gate: nothing after it ran
        assert ran == []
        gate.set()
        assert disposer.wait(5.0)
        assert ran == [(i, "tunpair-dispose") for i in range(4)]
        assert len(reported) == 1 and isinstance(reported[0].exc_value, ZeroDivisionError)
        assert "tunpair-dispose" in reported[0].err_msg
        disposer.later(lambda: ran.append((4, threading.current_thread().name)))
    finally:
        disposer.close()
    assert ran[-1] == (4, "tunpair-dispose")  # close() ran it before stopping
    assert not disposer._thread.is_alive()
    disposer.later(lambda: ran.append((5, threading.current_thread().name)))
    assert ran[-1] == (5, threading.current_thread().name)  # closed: at once, here


INNER = """
import os, subprocess, threading, pytest
from pytest_tunpair._plugin import keys

TUN = []

def tun_fds():
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "/dev/net/tun":
                fds.add(int(fd))
        except OSError:
            pass
    return fds

@pytest.mark.parametrize("i", range(4))
def test_pair(tun_pair, pytestconfig, i):
    assert subprocess.run(["ping", "-c", "1", "-W", "2", tun_pair.b.ip]).returncode == 0
    disposer = pytestconfig.stash[keys.DISPOSER]
    assert disposer.wait(10.0)
    # Every earlier test's devices are released by now: only this test's two are open,
    # and the spare's being built for the next (two more at most).
    TUN.append((len(tun_fds()), disposer.done))

def test_zz_released_while_the_next_test_ran():
    assert all(count <= 4 for count, _done in TUN), TUN
    # One release per finished pair: none during the first test, one more per test after.
    assert [done for _count, done in TUN] == [0, 1, 2, 3], TUN
"""

CONFTEST = """
import threading, pytest
from test_inner import tun_fds

@pytest.hookimpl(trylast=True)  # after the plugin's: the run is over
def pytest_unconfigure(config):
    alive = [t.name for t in threading.enumerate() if t.name == "tunpair-dispose"]
    print(f"AT THE END: {len(tun_fds())} tun fds, disposer threads {alive}")
"""


def test_a_tests_devices_are_released_while_the_next_runs_and_all_by_the_end(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_inner=INNER)
    pytester.makeconftest(CONFTEST)
    result = pytester.runpytest_subprocess("--tunpair", "-p", "no:randomly", "-p", "no:xdist")
    result.assert_outcomes(passed=5)
    result.stdout.fnmatch_lines(["AT THE END: 0 tun fds, disposer threads []"])


def _bare_thread(name: str, ns_fd: int, parked: threading.Event, release: threading.Lock) -> int:
    """A thread Python knows nothing of (``_thread``, as a joined one looks to the kernel
    check), named ``name`` for the kernel, parked inside the namespace on ``ns_fd``."""
    ready = threading.Event()
    tid: list[int] = []

    def body() -> None:
        linux.set_thread_name(name)
        linux.setns(ns_fd, linux.CLONE_NEWNET)
        tid.append(threading.get_native_id())
        ready.set()
        release.acquire()
        release.release()

    _thread.start_new_thread(body, ())
    ready.wait(5.0)
    parked.set()
    return tid[0]


def test_the_kernel_name_tells_the_packages_threads_from_a_tests() -> None:
    """threads_in() passes over a thread that Python no longer lists if the kernel knows
    it by the package's name, and still reports any other."""

    def use() -> None:
        ns = NetNamespace().enter()
        release = threading.Lock()
        release.acquire()
        try:
            assert ns.inode is not None
            before = {int(t) for t in os.listdir("/proc/self/task")}
            ours = _bare_thread("tunpair-relay-x", ns.fd, threading.Event(), release)
            theirs = _bare_thread("user-thread", ns.fd, threading.Event(), release)
            found = threads_in(ns.inode, besides=before)
            assert [t.tid for t in found] == [theirs], found
            assert found[0].name == "user-thread" and ours != theirs
        finally:
            release.release()
            ns.exit()

    run_standalone(use)


def test_own_threads_carry_their_name_into_the_kernel() -> None:
    seen: list[str] = []

    def body() -> None:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
            seen.append(f.read().strip())

    thread = own_thread(body, "tunpair-relay-tun0-tun1")
    thread.start()
    thread.join()
    assert thread.name == "tunpair-relay-tun0-tun1" and thread.daemon
    assert seen == ["tunpair-relay-t"]  # the kernel keeps 15 bytes
