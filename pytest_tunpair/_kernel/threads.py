"""Threads and network namespaces: where each thread is, where it was started, and pools
whose workers live in a given namespace.

A thread keeps the network namespace it was started in (docs/internals.md, "Threads: a pool
worker keeps the namespace it started in"): a pool worker started at import time serves a
test from the host's namespace, and one started during a test keeps that test's namespace
-- and its devices -- alive after it. The kernel says where each thread of the process is
(docs/internals.md, "Threads: each thread's namespace in /proc/self/task"); this module
reads it, remembers where Python threads were started
(:func:`record_start_sites`), and makes thread pools whose workers enter a namespace before
their first task (:class:`NamespaceExecutor`).

No pytest here; no asyncio, anyio or trio either (``pools.py`` knows those).
"""

from __future__ import annotations

import _thread
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import FrameType
from typing import Any

from .._errors import NamespaceError
from . import linux as _linux

__all__ = [
    "NamespaceExecutor",
    "QuickThread",
    "ThreadInfo",
    "join_threads",
    "netns_of",
    "own_thread",
    "pool_threads",
    "record_start_sites",
    "start_site",
    "task_ids",
    "threads_in",
    "user_frame",
]

#: Modules whose frames are not "where a thread was started": the thread and pool
#: machinery between the user's call and ``Thread.start`` (``submit`` -> ``_adjust_thread_count``).
_MACHINERY = (
    "threading",
    "concurrent.futures",
    "asyncio",
    "anyio",
    "trio",
    "outcome",
    "sniffio",
    __package__,  # this package's kernel level (pools.py, the disposable test threads)
    f"{__package__.rpartition('.')[0]}._packets.aio",  # the awaitable waits' threads
)


#: How the package's threads are named, in Python and (``linux.set_thread_name``) for the kernel.
OWN_PREFIX = "tunpair"


def own_thread(target: Callable[[], object], name: str, comm: str = "") -> threading.Thread:
    """A daemon thread of the package, not started: ``name`` (beginning with
    :data:`OWN_PREFIX`) is its Python name and, from its first step, ``comm`` (default:
    ``name``; 15 bytes kept) its kernel name (``linux.set_thread_name``), which the
    leftover-thread check reads for a thread Python has already let go of
    (:func:`threads_in`)."""

    def run() -> None:
        _linux.set_thread_name(comm or name)
        target()

    return threading.Thread(target=run, name=name, daemon=True)


class QuickThread:
    """A package thread whose :meth:`start` does not wait for it to run, with the parts of
    ``threading.Thread`` the relay uses (``start``, ``join``, ``is_alive``, ``ident``).

    ``threading.Thread.start`` waits until the new thread has run its first steps -- a
    cross-CPU wake-up, 0.1-0.2 ms here, in every tunnel test's set-up. This one is a bare
    thread (``_thread``): alive from :meth:`start` until its target returns, named for
    the kernel like :func:`own_thread`'s (Python's ``threading.enumerate`` does not list
    it; the leftover-thread check knows it by that name). Its target must not call
    ``threading.current_thread()``, which would leave a ``_DummyThread`` behind.
    """

    daemon = True

    def __init__(self, target: Callable[[], object], name: str, comm: str = "") -> None:
        self.name = name
        self.comm = comm or name
        """Its kernel name (``/proc/self/task/TID/comm``; 15 bytes kept)."""
        self._target = target
        self._running = _thread.allocate_lock()  # held from start() until the target returns
        self._started = False
        self.ident: int | None = None
        """``threading.get_ident()`` of the thread, once started."""

    def start(self) -> None:
        if self._started:
            raise RuntimeError("threads can only be started once")
        self._started = True
        self._running.acquire()
        try:
            self.ident = _thread.start_new_thread(self._run, ())
        except BaseException:
            self._running.release()
            raise

    def _run(self) -> None:
        try:
            self.ident = _thread.get_ident()  # before start() has returned it, too
            _linux.set_thread_name(self.comm)
            self._target()
        finally:
            self._running.release()

    def is_alive(self) -> bool:
        return self._started and self._running.locked()

    def join(self, timeout: float | None = None) -> None:
        if not self._started:
            raise RuntimeError("cannot join thread before it is started")
        if self._running.acquire(timeout=-1 if timeout is None else max(timeout, 0.0)):
            self._running.release()


# -- where each thread is ------------------------------------------------------------------------
def task_ids() -> set[int]:
    """The kernel's ids (``threading.get_native_id()``) of every thread of the process."""
    return {int(name) for name in os.listdir("/proc/self/task")}


def netns_of(tid: int) -> int | None:
    """The inode of thread ``tid``'s network namespace; ``None`` once it has exited."""
    try:
        return os.stat(f"/proc/self/task/{tid}/ns/net").st_ino
    except OSError:
        return None


@dataclass(frozen=True)
class ThreadInfo:
    """One thread of the process, for messages."""

    tid: int
    """Its kernel id (``native_id``)."""
    name: str
    """Its Python name, or the kernel's ``comm`` for a thread Python did not start."""
    started_at: str | None
    """Where it was started (``file:line in function``), when known."""
    thread: threading.Thread | None
    """The Python thread, if it is one."""

    def describe(self) -> str:
        where = f"started at {self.started_at}" if self.started_at else "start site unknown"
        if self.thread is None:
            where = "not a Python thread (started by C code)"
        return f"{self.name!r} (tid {self.tid}, {where})"


def _python_threads() -> dict[int, threading.Thread]:
    return {t.native_id: t for t in threading.enumerate() if t.native_id is not None}


def _comm(tid: int) -> str:
    try:
        with open(f"/proc/self/task/{tid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def info(tid: int, python: dict[int, threading.Thread] | None = None) -> ThreadInfo:
    thread = (python if python is not None else _python_threads()).get(tid)
    if thread is None:
        return ThreadInfo(tid, _comm(tid), None, None)
    return ThreadInfo(tid, thread.name, start_site(thread), thread)


def threads_in(
    inode: int,
    *,
    besides: Iterable[int] = (),
    skip: Callable[[threading.Thread], bool] = lambda thread: False,
) -> list[ThreadInfo]:
    """The threads of the process inside the namespace ``inode``, but ``besides`` (tids),
    the calling thread, the package's own (named ``tunpair...``: relays, hook workers, a
    test's own thread in rootless runs, awaitable waits) and Python threads ``skip`` says.

    A thread Python has let go of (joined, or ended) may still be in the kernel's list for
    a moment: one of ours says so by its kernel name (``linux.set_thread_name``)."""
    known = {*besides, threading.get_native_id()}
    python = _python_threads()
    found = []
    for tid in sorted(task_ids() - known):
        if netns_of(tid) != inode:
            continue
        thread = python.get(tid)
        if thread is not None and (thread.name.startswith(OWN_PREFIX) or skip(thread)):
            continue
        if thread is None and _comm(tid).startswith(OWN_PREFIX):
            continue
        found.append(info(tid, python))
    return found


def join_threads(threads: Iterable[threading.Thread], timeout: float) -> None:
    """Join each of ``threads`` within ``timeout`` s in all."""
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))


# -- where Python threads were started -----------------------------------------------------------
def user_frame(frame: FrameType | None) -> FrameType | None:
    """``frame`` or the first of its callers outside the thread and pool machinery."""
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if not any(module == m or module.startswith(m + ".") for m in _MACHINERY):
            return frame
        frame = frame.f_back
    return None


def _site(frame: FrameType | None) -> str | None:
    found = user_frame(frame)
    if found is None:
        return None
    return f"{found.f_code.co_filename}:{found.f_lineno} in {found.f_code.co_name}"


_SITES: weakref.WeakKeyDictionary[threading.Thread, str] = weakref.WeakKeyDictionary()
_ORIGINAL_START: Callable[[threading.Thread], None] | None = None
_RECORDERS = 0  # nested pytest runs (pytester) each turn recording on and off


def record_start_sites() -> None:
    """From now on, remember where each Python thread is started: the first frame outside
    the thread and pool machinery (for a pool's worker, the ``submit`` or ``to_thread`` that
    made the pool start it). Each call needs its :func:`stop_recording`."""
    global _ORIGINAL_START, _RECORDERS
    _RECORDERS += 1
    if _ORIGINAL_START is not None:
        return
    original = threading.Thread.start

    def start(self: threading.Thread) -> None:
        site = _site(sys._getframe(1))
        if site is not None:
            _SITES[self] = site
        original(self)

    start.__wrapped__ = original  # type: ignore[attr-defined]
    _ORIGINAL_START = original
    threading.Thread.start = start  # type: ignore[method-assign]


def stop_recording() -> None:
    """Undo one :func:`record_start_sites`; the last one puts ``Thread.start`` back (if
    nobody has replaced it since)."""
    global _ORIGINAL_START, _RECORDERS
    _RECORDERS = max(0, _RECORDERS - 1)
    original = _ORIGINAL_START
    if original is None or _RECORDERS:
        return
    ours = getattr(threading.Thread.start, "__wrapped__", None) is original
    if ours:
        threading.Thread.start = original  # type: ignore[method-assign,assignment]
    _ORIGINAL_START = None


def start_site(thread: threading.Thread) -> str | None:
    """Where ``thread`` was started, if it was started while :func:`record_start_sites` was on."""
    return _SITES.get(thread)


# -- pools -------------------------------------------------------------------------------------
def pool_threads(pool: ThreadPoolExecutor) -> list[threading.Thread]:
    """The worker threads ``pool`` has started so far (``ThreadPoolExecutor._threads``)."""
    return list(getattr(pool, "_threads", ()))


def pool_of(thread: threading.Thread) -> ThreadPoolExecutor | None:
    """The ``ThreadPoolExecutor`` ``thread`` is a worker of, while it runs: its target is
    ``concurrent.futures.thread._worker``, whose first argument is a weak reference to the
    pool (CPython 3.11 to 3.14)."""
    import concurrent.futures.thread as cft

    if getattr(thread, "_target", None) is not cft._worker:
        return None
    args = getattr(thread, "_args", ())
    ref = args[0] if args else None
    pool = ref() if isinstance(ref, weakref.ReferenceType) else None
    return pool if isinstance(pool, ThreadPoolExecutor) else None


class NamespaceExecutor(ThreadPoolExecutor):
    """A ``ThreadPoolExecutor`` whose workers enter the network namespace open on
    ``netns_fd`` before anything else, whichever thread made the pool start them.

    A pool starts a worker from the thread that calls ``submit`` when no idle worker is
    left, so a worker inherits *that* thread's namespace; ``setns()`` first thing in the
    worker makes the pool's namespace not depend on who submits. In a user namespace the
    process entered by itself the worker cannot come back to the host's namespace
    (docs/internals.md, "A thread cannot return to the host's namespace"): it need not, it
    ends with the pool. The pool keeps its own duplicate of the fd until every worker it
    started has entered, then closes it at :meth:`shutdown`.
    """

    def __init__(
        self,
        netns_fd: int,
        max_workers: int | None = None,
        thread_name_prefix: str = "",
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
    ) -> None:
        self._tunpair_fd: int | None = os.dup(netns_fd)
        self._tunpair_cond = threading.Condition()
        self._tunpair_entered = 0  # workers past their setns(), whether it worked or not
        try:
            super().__init__(
                max_workers,
                thread_name_prefix,
                initializer=self._tunpair_enter,
                initargs=(initializer, initargs),
            )
        except BaseException:
            os.close(self._tunpair_fd)
            raise

    def _tunpair_enter(self, initializer: Callable[..., object] | None, initargs: Any) -> None:
        try:
            with self._tunpair_cond:
                fd = self._tunpair_fd
                assert fd is not None  # closed only once every started worker got here
                try:
                    _linux.setns(fd, _linux.CLONE_NEWNET)
                except OSError as exc:
                    raise NamespaceError(
                        "a worker of tun_pair.executor() (or of a pool bound to the pair's "
                        f"namespace) could not enter the namespace: {exc}"
                    ) from exc
        finally:
            with self._tunpair_cond:
                self._tunpair_entered += 1
                self._tunpair_cond.notify_all()
        if initializer is not None:
            initializer(*initargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        super().shutdown(wait, cancel_futures=cancel_futures)
        # No worker starts after shutdown(), but one started just before may not have run
        # its initializer yet (Thread.start returns first): the fd stays until it has.
        with self._tunpair_cond:
            self._tunpair_cond.wait_for(
                lambda: self._tunpair_entered >= len(pool_threads(self)), timeout=5.0
            )
            fd, self._tunpair_fd = self._tunpair_fd, None
        if fd is not None:
            os.close(fd)
