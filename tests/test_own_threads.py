"""The package's threads carry their names into the kernel (``threads.own_thread``,
``threads.QuickThread``), so that one Python has already joined but the kernel still lists
is never taken for a thread the test left running; and the relay's thread is started
without waiting for it."""

from __future__ import annotations

import _thread
import os
import threading

import pytest

from pytest_tunpair._kernel import linux
from pytest_tunpair._kernel.netns import NetNamespace
from pytest_tunpair._kernel.threads import QuickThread, own_thread, threads_in

from .conftest import run_standalone


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


def test_a_quick_thread_is_alive_from_start_until_its_target_returns() -> None:
    """Pure logic over real threads: alive at once (start() did not wait for it to run),
    its ident the one the thread itself has, its kernel name, join() with and without a
    timeout, and the errors of misuse."""
    go = threading.Event()
    seen: list[tuple[int, str]] = []

    def body() -> None:
        go.wait(5.0)
        with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
            seen.append((threading.get_ident(), f.read().strip()))

    thread = QuickThread(body, "tunpair-relay-tun0-tun1", comm="tunpair-relay")
    with pytest.raises(RuntimeError):
        thread.join()
    assert not thread.is_alive()
    thread.start()
    assert thread.is_alive() and thread.ident is not None
    thread.join(0.05)  # times out: the target waits for go
    assert thread.is_alive()
    go.set()
    thread.join()
    assert not thread.is_alive()
    assert seen == [(thread.ident, "tunpair-relay")]
    with pytest.raises(RuntimeError):
        thread.start()
    assert not any(t.name == thread.name for t in threading.enumerate())  # not Python's
