"""Awaitable waits: the blocking waits of the capture and the scripted peer, for async tests.

Every wait of the capture and the peer sleeps on the capture's condition variable
(:meth:`Capture.wait_new <pytest_tunpair.Capture>`), which the relay notifies as it records.
On an event loop's thread that sleep stalls the loop: a server or client task in the same
loop cannot run, so the packet the wait is for never comes. The awaitable forms
(``await packets.wait_for_async(...)``, made by :func:`async_form`) run the very same
blocking call on a short-lived thread of its own and suspend the coroutine until it ends:
same arguments, same result, same exceptions and messages, and no polling -- the thread
sleeps on the condition and wakes the loop once, through ``loop.call_soon_threadsafe``
(asyncio) or the run's ``TrioToken`` (trio; anyio runs on either).

Cancelling the coroutine (a timeout, a task group's cancel) cancels the wait: the thread's
next or current ``wait_new`` raises at once (its :class:`CancelToken` notifies the capture's
condition), the thread ends, and only then does the cancellation propagate -- no thread or
waiter is left behind.

The blocking forms refuse to run on a thread whose event loop is running
(:func:`refuse_blocking`, a :class:`~pytest_tunpair.BlockingWaitError` naming the awaitable
form). asyncio and trio are looked up in ``sys.modules``, never imported: a test that never
imported them pays one dictionary lookup.
"""

from __future__ import annotations

import inspect
import sys
import threading
from collections.abc import Callable, Coroutine
from types import CodeType, FrameType
from typing import Any, Concatenate, ParamSpec, TypeVar

from .._errors import BlockingWaitError
from .._kernel.threads import own_thread

__all__ = [
    "CancelToken",
    "async_form",
    "cancel_token",
    "refuse_blocking",
    "run_blocking",
    "running_loop",
]

P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S")

#: How long a cancelled wait's thread may take to notice, before the coroutine goes on
#: without it (it is only ever longer while a user's predicate runs: the thread then ends
#: at its next wait).
CANCEL_JOIN = 1.0

_local = threading.local()
# The blocking methods that have an awaitable form: code object -> (blocking spelling,
# awaitable spelling), e.g. ("packets.wait_for", "packets.wait_for_async").
_FORMS: dict[CodeType, tuple[str, str]] = {}


class Cancelled(BaseException):
    """Raised inside a wait's thread when the coroutine awaiting it was cancelled (a
    ``BaseException``: no ``except Exception`` in a predicate swallows it)."""


class CancelToken:
    """The cancel switch of one wait's thread; :meth:`cancel` wakes the capture it sleeps on."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond: threading.Condition | None = None
        self.cancelled = False

    def watch(self, cond: threading.Condition) -> None:
        """About to sleep on ``cond`` (held by the caller): :meth:`cancel` notifies it."""
        with self._lock:
            if self.cancelled:
                raise Cancelled
            self._cond = cond

    def unwatch(self) -> None:
        with self._lock:
            self._cond = None

    def check(self) -> None:
        if self.cancelled:
            raise Cancelled

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            cond = self._cond
        if cond is not None:
            # Taken after our own lock is released: the sleeper holds cond when it watches,
            # then our lock -- never the other way round.
            with cond:
                cond.notify_all()


def cancel_token() -> CancelToken | None:
    """The calling thread's token if it runs an awaitable wait, else ``None``."""
    return getattr(_local, "token", None)


# -- which event loop runs on this thread ------------------------------------------------------
def running_loop() -> str | None:
    """``"trio"`` or ``"asyncio"`` when that library's loop runs on the calling thread (trio
    first: in guest mode on an asyncio loop, the calling code is a trio task), else ``None``.
    Neither library is imported for it."""
    trio = sys.modules.get("trio")
    if trio is not None:
        lowlevel = getattr(trio, "lowlevel", None)
        in_run = getattr(lowlevel, "in_trio_run", None)
        if in_run is not None:
            if in_run():
                return "trio"
        elif lowlevel is not None:  # trio before 0.23
            try:
                lowlevel.current_trio_token()
                return "trio"
            except RuntimeError:
                pass
    asyncio = sys.modules.get("asyncio")
    if asyncio is not None and asyncio._get_running_loop() is not None:
        return "asyncio"
    return None


def _outermost_form(frame: FrameType | None) -> tuple[str, str] | None:
    """The outermost blocking method with an awaitable form on the stack: the one the user
    called (``peer.expect`` calls ``packets.expect``, which calls ``wait_new``)."""
    found = None
    while frame is not None:
        form = _FORMS.get(frame.f_code)
        if form is not None:
            found = form
        frame = frame.f_back
    return found


def refuse_blocking() -> None:
    """Raise :class:`~pytest_tunpair.BlockingWaitError` if the calling thread runs an event
    loop: a blocking wait here would stall it until its timeout. The message names the
    awaitable form of the method the user called (found on the stack)."""
    kind = running_loop()
    if kind is None:
        return
    form = _outermost_form(sys._getframe(1))
    called, use = form if form is not None else ("this wait", "the method's _async form")
    raise BlockingWaitError(
        f"{called}() blocks the thread it is called on, and this thread runs the {kind} "
        "event loop: the loop would stall until the timeout, and no task of it (a server, a "
        "client) could send the packet waited for. In a coroutine, await the awaitable form "
        f"instead: `await {use}(...)` (same arguments, result and errors); or call "
        f"{called}() from a worker thread (asyncio.to_thread, tun_pair.executor()).",
        use=use,
    )


# -- running a blocking wait for a coroutine -----------------------------------------------------
class _Wait:
    """One blocking call on a thread of its own; ``on_done`` is called there when it ends."""

    def __init__(self, call: Callable[[], Any], name: str) -> None:
        self.call = call
        self.token = CancelToken()
        self.value: Any = None
        self.error: BaseException | None = None
        self.on_done: Callable[[], None] = lambda: None
        # The "tunpair" prefix: the leftover-thread report leaves the package's threads out.
        self.thread = own_thread(self._run, f"tunpair-wait {name}")

    def _run(self) -> None:
        _local.token = self.token
        try:
            self.value = self.call()
        except BaseException as exc:
            self.error = exc
        finally:
            _local.token = None
            self.on_done()

    def cancel_and_join(self) -> None:
        self.token.cancel()
        self.thread.join(CANCEL_JOIN)

    def result(self) -> Any:
        __tracebackhide__ = True
        if self.error is not None:
            error, self.error = self.error, None  # no cycle through the traceback
            raise error
        return self.value


async def _wait_asyncio(wait: _Wait) -> None:
    import asyncio  # running: imported already

    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def wake() -> None:
        if not done.done():
            done.set_result(None)

    def report() -> None:  # in the wait's thread
        try:
            loop.call_soon_threadsafe(wake)
        except RuntimeError:  # the loop is closed: nobody awaits any more
            pass

    wait.on_done = report
    wait.thread.start()
    try:
        await done
    except BaseException:  # cancelled: stop the thread before the cancellation goes on
        wait.cancel_and_join()
        raise


async def _wait_trio(wait: _Wait) -> None:
    import trio  # running: imported already

    token = trio.lowlevel.current_trio_token()
    task = trio.lowlevel.current_task()
    waiting = [True]

    def wake() -> None:  # in trio's thread: no race with abort()
        if waiting[0]:
            waiting[0] = False
            trio.lowlevel.reschedule(task)

    def report() -> None:  # in the wait's thread
        try:
            token.run_sync_soon(wake)
        except trio.RunFinishedError:
            pass

    def abort(_raise_cancel: Any) -> Any:
        waiting[0] = False
        wait.cancel_and_join()
        return trio.lowlevel.Abort.SUCCEEDED

    wait.on_done = report
    wait.thread.start()
    await trio.lowlevel.wait_task_rescheduled(abort)


async def run_blocking(call: Callable[[], R], *, name: str) -> R:
    """``call()`` (a blocking wait) on a thread of its own, awaited without blocking the
    loop; its result, or its exception re-raised. ``name`` names the thread."""
    __tracebackhide__ = True
    kind = running_loop()
    if kind is None:
        raise RuntimeError(
            f"{name}() must be awaited in a coroutine that runs under asyncio or trio (anyio "
            "runs on either); outside one, call the blocking form"
        )
    wait = _Wait(call, name)
    if kind == "trio":
        await _wait_trio(wait)
    else:
        await _wait_asyncio(wait)
    # Waking the coroutine was the thread's last act: it ends at once, and no wait's thread
    # outlives the await (a busy machine may not have run its last instructions yet).
    wait.thread.join(CANCEL_JOIN)
    return wait.result()  # type: ignore[no-any-return]


def async_form(
    blocking: Callable[Concatenate[S, P], R], owner: str
) -> Callable[Concatenate[S, P], Coroutine[Any, Any, R]]:
    """The awaitable form of the blocking method ``blocking`` (in a class body:
    ``wait_for_async = async_form(wait_for, "packets")``): same parameters, same result,
    same exceptions. ``owner`` is how messages spell the object (``packets``, ``peer``)."""
    name = blocking.__name__
    spelled = f"{owner}.{name}_async"
    _FORMS[blocking.__code__] = (f"{owner}.{name}", spelled)

    async def form(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
        __tracebackhide__ = True
        return await run_blocking(lambda: blocking(self, *args, **kwargs), name=spelled)

    form.__name__ = f"{name}_async"
    form.__qualname__ = f"{blocking.__qualname__}_async"
    form.__module__ = blocking.__module__
    form.__doc__ = (
        f"``await {spelled}(...)``: :meth:`{name}` for coroutines (asyncio, trio, anyio), "
        "with the same arguments, result and exceptions; the event loop runs meanwhile."
    )
    # help(), IDEs and the API reference show the blocking form's parameters and (awaited)
    # result, in names of the blocking form's module.
    setattr(form, "__signature__", inspect.signature(blocking))  # noqa: B010
    form.__annotations__ = dict(blocking.__annotations__)
    return form
