"""Closing work that need not hold up a test's teardown, done on a thread of its own.

Closing a finished pair's two devices is ``TUNSETPERSIST`` and ``close()`` on each fd, and
every one of those four calls takes the kernel's RTNL lock -- which the next test's spare
namespace is being built under, and the kernel's clean-up of the last test's namespace
holds (docs/internals.md, "What a pair's set-up costs"). Nothing that comes after the
teardown waits for it: the devices are in the finished test's namespace, which nobody
enters again and which goes when its last reference does. So the plugin hands that work
to a :class:`Disposer` (``TunPairFactory.dispose``), whose thread runs it while the next
test runs, on the other CPU.

The thread is started where the run starts (outside every test's namespace: it holds none
alive and no leftover-thread check meets it) and :meth:`Disposer.close` waits for all the
work handed to it; a failure in that work reaches ``sys.unraisablehook`` (pytest reports
it as a warning), as one in a finaliser would. No pytest here.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable
from types import TracebackType

__all__ = ["Disposer"]


class Disposer:
    """Runs what :meth:`later` is given, in order, on a thread named ``tunpair-dispose``."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Callable[[], object] | threading.Event | None] = (
            queue.SimpleQueue()
        )
        self._closed = False
        self.done = 0
        """How many pieces of work (:meth:`later`) have run."""
        self._thread = threading.Thread(target=self._run, name="tunpair-dispose", daemon=True)
        self._thread.start()

    def later(self, work: Callable[[], object]) -> None:
        """Run ``work`` on the disposer's thread (at once, here, once it is closed)."""
        if self._closed:
            work()
            return
        self._queue.put(work)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until everything given so far has run; False after ``timeout`` s."""
        if self._closed:
            return True
        event = threading.Event()
        self._queue.put(event)  # set once everything before it has run
        return event.wait(timeout)

    def close(self) -> None:
        """Run what is left and stop the thread."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (work := self._queue.get()) is not None:
            if isinstance(work, threading.Event):
                work.set()
                continue
            try:
                work()
            except BaseException as exc:  # reported, and the next piece still runs
                hook = sys.unraisablehook
                hook(_Unraisable(exc, f"Exception in {work!r} on tunpair-dispose"))
            self.done += 1


class _Unraisable:
    """What ``sys.unraisablehook`` expects (the shape of ``sys.UnraisableHookArgs``)."""

    def __init__(self, exc: BaseException, message: str) -> None:
        self.exc_type: type[BaseException] = type(exc)
        self.exc_value: BaseException | None = exc
        self.exc_traceback: TracebackType | None = exc.__traceback__
        self.err_msg: str | None = message
        self.object: object = None
