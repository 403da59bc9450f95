"""A test's threads: the pools it reaches bound to its namespace, and what it leaves running.

From the start of a tunnel test's own part (the ``tun_pair_factory`` fixture, or the
:data:`~.scoped.VISITOR` of a module or session pair) to its end, the event loops the test
runs in have namespace-bound default executors and trio's and anyio's worker threads reach
the namespace (``_kernel/pools.py``). Loops are found where the async plugins keep them:
pytest-asyncio's runner of the test's loop scope, anyio's current test runner, the loop set
for the thread, and any loop or ``asyncio.Runner`` among the test's fixture values -- at
the start, and again just before the test function runs.

At the end, the threads started in the namespace during the test and still alive after a
short grace are reported by name and start site, by the ``--tunpair-leftovers`` policy:
a warning (``warn``, the default, and ``kill``: a thread cannot be stopped from outside),
or the teardown's failure (``fail``).
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest

from . import keys

if TYPE_CHECKING:
    from .._factory import TunPairFactory
    from .._kernel.pools import PoolGuard
    from .._kernel.threads import ThreadInfo

#: How long the end of a test waits for the threads it started to finish on their own
#: before calling them left over (a server thread told to stop needs a moment to return).
GRACE = 1.0


@dataclass
class TestThreads:
    """One test's part: the namespace, the threads there were at its start, its pools."""

    inode: int
    before: set[int]
    guard: PoolGuard
    executors: dict[int, int] = field(default_factory=dict)  # id(pair) -> pools it had


def install() -> None:
    """Remember where threads are started from now on (the reports name it)."""
    from .._kernel.threads import record_start_sites

    record_start_sites()


def uninstall() -> None:
    # Imported by install() only (with --tunpair): no import here for runs without it.
    threads = sys.modules.get(f"{__package__.rpartition('.')[0]}._kernel.threads")
    if threads is not None:
        threads.stop_recording()


def begin(request: pytest.FixtureRequest, factory: TunPairFactory) -> None:
    """The start of a test's own part of ``factory``'s namespace (the calling thread is
    inside): bind the pools it can reach."""
    from .._kernel.pools import PoolGuard
    from .._kernel.threads import task_ids

    ns = factory.netns
    assert ns is not None and ns.inode is not None
    item = request.node
    _refuse_trio_from_another_thread(item)
    state = TestThreads(
        inode=ns.inode,
        before=task_ids(),
        guard=PoolGuard(ns.fd, ns.inode),
        executors={id(pair): len(pair._executors) for pair in factory.pairs},
    )
    item.stash[keys.THREADS] = state
    state.guard.bind(loops_of(item, request))


def bind_call(item: pytest.Item) -> None:
    """Just before the test function: bind the loops that turned up since the start."""
    state = item.stash.get(keys.THREADS, None)
    if state is not None:
        state.guard.bind(loops_of(item))


def end(item: pytest.Item, factory: TunPairFactory) -> None:
    """Before the namespace closes or the test's part ends: put the pools back, and shut
    down the ``tun_pair.executor()`` pools the test made."""
    state = item.stash.get(keys.THREADS, None)
    if state is None:
        return
    state.guard.release()
    for pair in factory.pairs:
        pair._close_executors(keep=state.executors.get(id(pair), 0))


def snapshot() -> set[int]:
    """The threads of the process now (tids), for :func:`report`."""
    from .._kernel.threads import task_ids

    return task_ids()


def leftovers(item: pytest.Item) -> str | None:
    """After the test's part ended: report the threads it started in the namespace that are
    still alive (by the ``--tunpair-leftovers`` policy). Returns the message when the
    policy is ``fail`` (the caller fails the teardown with it)."""
    state = item.stash.get(keys.THREADS, None)
    if state is None:
        return None
    del item.stash[keys.THREADS]
    return report(item, state.inode, state.before)


def report(node: pytest.Item | pytest.Collector, inode: int, before: set[int]) -> str | None:
    """Report the threads in namespace ``inode`` that are not among ``before``, by the
    policy; the message under ``fail``, for the caller to fail with."""
    found = still_running(inode, before)
    if not found:
        return None
    message = describe(found)
    if node.config.stash[keys.OPTIONS].tunpair_leftovers == "fail":
        return message
    _warn(node, message)
    return None


def end_test(
    item: pytest.Item, factory: TunPairFactory, close: Callable[..., None], *args: Any
) -> None:
    """The end of a test's part: its pools put back (:func:`end`), then ``close(*args)``
    (the factory's close, or its end of one test: processes by their policy), then the
    threads it left running reported (:func:`leftovers`). Under ``fail`` the teardown
    fails with the messages alone."""
    from .._errors import LeftoverProcessError

    messages = []
    try:
        end(item, factory)
    finally:
        try:
            close(*args)
        except LeftoverProcessError as exc:
            messages.append(str(exc))
        messages.append(leftovers(item) or "")
    _fail(messages)


def close_scope(
    node: pytest.Collector | pytest.Item, factory: TunPairFactory, before: set[int]
) -> None:
    """Close a module's or the session's factory; then report the threads its fixtures
    started in its namespace (not among ``before``) and left running."""
    from .._errors import LeftoverProcessError

    inode = factory.netns.inode if factory.netns is not None else None
    messages = []
    try:
        factory.close()
    except LeftoverProcessError as exc:
        messages.append(str(exc))
    finally:
        if inode is not None:
            messages.append(report(node, inode, before) or "")
    _fail(messages)


def _fail(messages: list[str]) -> None:
    if any(messages):
        # Outside any except block: no "during handling of" chain.
        pytest.fail("\n".join(m for m in messages if m), pytrace=False)


def still_running(inode: int, before: Iterable[int], grace: float = GRACE) -> list[ThreadInfo]:
    """The threads in namespace ``inode`` not among ``before`` (tids), once those that end
    within ``grace`` s have."""
    from .._kernel.pools import runs_no_test_code
    from .._kernel.threads import join_threads, netns_of, threads_in

    found = threads_in(inode, besides=before, skip=runs_no_test_code)
    if not found:
        return []
    deadline = time.monotonic() + grace
    join_threads([t.thread for t in found if t.thread is not None], grace)
    while any(t.thread is None and netns_of(t.tid) == inode for t in found):
        if time.monotonic() >= deadline:  # threads Python did not start: no join to wait on
            break
        time.sleep(0.01)
    return [t for t in found if netns_of(t.tid) == inode]


def describe(found: list[ThreadInfo]) -> str:
    count = "1 thread" if len(found) == 1 else f"{len(found)} threads"
    return (
        f"{count} started in the tunnel namespace during the test still running at its end: "
        f"{'; '.join(t.describe() for t in found)}. A thread keeps the namespace, and with "
        "it the devices, alive. Stop and join the threads a test starts before it ends "
        "(in the fixture that starts them), or run the work on tun_pair.executor(), which "
        "is shut down at teardown; a thread cannot be killed, so --tunpair-leftovers=kill "
        "reports it too, and --tunpair-leftovers=fail fails the test"
    )


def _warn(item: pytest.Item | pytest.Collector, message: str) -> None:
    """A :class:`~pytest_tunpair.LeftoverThreadWarning` pointing at the test."""
    from .._errors import LeftoverThreadWarning

    location = getattr(item, "location", None)
    if location is None:
        warnings.warn(LeftoverThreadWarning(message), stacklevel=2)
        return
    path, line, _name = location
    filename = str(item.config.rootpath / path)
    warnings.warn_explicit(
        LeftoverThreadWarning(message), LeftoverThreadWarning, filename, (line or 0) + 1
    )


def _refuse_trio_from_another_thread(item: pytest.Item) -> None:
    """One line instead of trio's "must be called from async context" deep in a test.

    Where tunnel tests run on threads of their own (rootless), anyio's trio test runner
    kept alive by a module or session async fixture was started on an earlier test's
    thread, and a trio run belongs to the thread that started it (docs/internals.md,
    "Threads: a trio run belongs to the thread that started it").
    """
    anyio_plugin = sys.modules.get("anyio.pytest_plugin")
    runner: Any = getattr(anyio_plugin, "_current_runner", None)
    if type(runner).__module__ != "anyio._backends._trio" or runner._send_stream is None:
        return
    # trio keeps its run in a thread-local of the thread that started it (setup_runner).
    run_context = getattr(sys.modules.get("trio._core._run"), "GLOBAL_RUN_CONTEXT", None)
    if getattr(run_context, "runner", None) is None:
        pytest.fail(
            f"{item.name}: anyio's trio runner was started on another thread by an earlier "
            "test (a module or session async fixture keeps it), and a trio run belongs to the "
            "thread that started it. In a rootless run each tunnel test runs on a thread of "
            "its own: make the async fixtures function-scoped for the trio backend, or run "
            "under `unshare -Urn` or as root, where tests run on the main thread",
            pytrace=False,
        )


# -- the event loops a test runs in -----------------------------------------------------------
def loops_of(item: pytest.Item, request: pytest.FixtureRequest | None = None) -> list[Any]:
    """The asyncio loops ``item`` runs in, as far as they exist yet (none if asyncio was
    never imported)."""
    asyncio: Any = sys.modules.get("asyncio")
    if asyncio is None:
        return []
    values: list[Any] = list(getattr(item, "funcargs", {}).values())
    if request is not None:
        # pytest-asyncio (>= 0.24) runs the test in the loop of its "_<scope>_scoped_runner"
        # fixture, which it adds to the test's fixtures after ours: set it up now, so that
        # the test's async fixtures already find the loop bound.
        for name in list(getattr(item, "fixturenames", ())):
            if name.startswith("_") and name.endswith("_scoped_runner"):
                values.append(request.getfixturevalue(name))
    anyio_plugin = sys.modules.get("anyio.pytest_plugin")
    runner = getattr(anyio_plugin, "_current_runner", None)
    if runner is not None and hasattr(runner, "get_loop"):  # anyio's asyncio test runner
        values.append(runner.get_loop())
    # The loop set for this thread (pytest-asyncio's runners set theirs), read without
    # asyncio.get_event_loop(), which could make one.
    policy = getattr(asyncio.events, "_event_loop_policy", None)
    values.append(getattr(getattr(policy, "_local", None), "_loop", None))
    runner_type = getattr(asyncio, "Runner", None)
    loops: list[Any] = []
    for value in values:
        if runner_type is not None and isinstance(value, runner_type):
            value = getattr(value, "_loop", None)  # None until the runner made its loop
        if isinstance(value, asyncio.AbstractEventLoop) and value not in loops:
            loops.append(value)
    return loops
