"""Disposable threads: run a test on a thread that may end inside another network namespace.

In a user namespace the process entered by itself, a thread that left the host's network
namespace cannot come back (``_userns.py`` says why). The plugin then runs each tunnel
test, setup to teardown, on a thread of its own that simply ends with it; the main thread
never leaves the host namespace. This module is that machinery: starting the thread,
waiting interruptibly, and forwarding an interruption (Ctrl-C, pytest-timeout) into it.

No pytest import here.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from .._errors import ThreadNotStopped

__all__ = ["run_in_disposable_thread", "thread_is_disposable"]

T = TypeVar("T")

_local = threading.local()


def thread_is_disposable() -> bool:
    """True on a thread started by :func:`run_in_disposable_thread`.

    Such a thread need not return from the network namespace it enters (``NetNamespace``
    then only drops its references): it ends right after, and the namespace with it.
    """
    return bool(getattr(_local, "disposable", False))


def _clone_exception_type(exc: BaseException, landed: threading.Event) -> type[BaseException]:
    """A subclass of ``type(exc)`` whose no-argument construction recreates ``exc``.

    ``PyThreadState_SetAsyncExc`` takes a type on Python 3.11 and builds the instance with
    no arguments, in the target thread, when the exception lands there: this keeps the
    message (e.g. pytest-timeout's "Timeout (>5.0s)") and tells us it has landed.
    """
    base = type(exc)

    def __init__(self: BaseException) -> None:
        try:
            base.__init__(self, *exc.args)
        except TypeError:
            BaseException.__init__(self, *exc.args)
        self.__dict__.update(getattr(exc, "__dict__", {}))
        landed.set()

    return type(
        base.__name__,
        (base,),
        {"__init__": __init__, "__module__": base.__module__, "__qualname__": base.__qualname__},
    )


def _raise_in_thread(ident: int, exc: BaseException, landed: threading.Event) -> None:
    set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
    set_async_exc.argtypes = (ctypes.c_ulong, ctypes.py_object)
    set_async_exc(ident, _clone_exception_type(exc, landed))


_POLL = 0.1


def _wait(event: threading.Event, timeout: float | None = None) -> bool:
    """``event.wait(timeout)`` that lets the calling thread run its signal handlers.

    A lock wait is woken by a signal only if the kernel delivers it to this very thread,
    and it need not (measured: a SIGINT sent by another of our threads with ``kill()``
    left the main thread asleep for good, its handler pending). Returning to the
    interpreter every 0.1 s lets the main thread run pending handlers -- raising
    KeyboardInterrupt or pytest-timeout's failure -- wherever the signal landed.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        step = _POLL if deadline is None else min(_POLL, deadline - time.monotonic())
        if step <= 0:
            return event.is_set()
        if event.wait(step):
            return True


def run_in_disposable_thread(fn: Callable[[], T], *, name: str, grace: float = 5.0) -> T:
    """Run ``fn`` on a fresh thread that may end inside another network namespace.

    The calling thread waits interruptibly. An exception that reaches it while it waits --
    KeyboardInterrupt from Ctrl-C, pytest-timeout's failure from SIGALRM, both delivered
    to the main thread only -- is raised in the worker too, at its next Python instruction,
    so the test fails or stops there as it would have on the main thread, and its teardown
    runs. A thread blocked in a system call (``time.sleep``, a ``recv`` without timeout)
    only sees it when the call returns: if it has not landed within ``grace`` seconds,
    KeyboardInterrupt is raised here at once and anything else becomes
    :class:`ThreadNotStopped`; the worker is left behind (a daemon thread).
    """
    outcome: dict[str, object] = {}
    running, done = threading.Event(), threading.Event()

    def body() -> None:
        _local.disposable = True
        try:
            try:
                running.set()
                outcome["value"] = fn()
            except BaseException as exc:
                outcome["error"] = exc
        except BaseException as late:  # an interruption that landed after fn returned
            outcome.setdefault("error", late)
        finally:
            done.set()

    worker = threading.Thread(target=body, name=name, daemon=True)
    try:
        # start() waits for the thread to boot, by which time fn may be running: an
        # interruption there must be forwarded too.
        worker.start()
        _wait(done)
    except BaseException as exc:
        if done.is_set() or not running.wait(grace) or worker.ident is None:
            raise  # finished, or never started
        landed = threading.Event()
        _raise_in_thread(worker.ident, exc, landed)
        if not _wait(landed, grace) and not done.is_set():
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            raise ThreadNotStopped(
                f"{exc.__class__.__name__}: {exc} -- and the test's thread {name!r} did not "
                f"stop within {grace:g} s (it is blocked in a system call, which only the "
                "main thread's signal handlers can interrupt). Use pytest-timeout's thread "
                "method (timeout_method = thread), or run under `unshare -Urn` or as root, "
                "where tests run on the main thread."
            ) from exc
        _wait(done)
    if "error" in outcome:
        error = outcome["error"]
        assert isinstance(error, BaseException)
        raise error
    return outcome["value"]  # type: ignore[return-value]
