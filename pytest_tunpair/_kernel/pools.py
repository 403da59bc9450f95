"""The thread pools a test's code reaches without naming them, bound to its namespace.

A pool's worker keeps the namespace it was started in (docs/internals.md, "Threads: a pool
worker keeps the namespace it started in"). Three pools are
reached through an API rather than by the test's own reference, and live longer than a
test: an asyncio loop's default executor (``asyncio.to_thread``,
``loop.run_in_executor(None, ...)``), anyio's worker threads on asyncio
(``anyio.to_thread.run_sync``) and trio's thread cache (``trio.to_thread.run_sync``, and
anyio on trio). While a :class:`PoolGuard` is bound, each reaches the test's namespace:

- a loop's default executor is replaced by a :class:`~.threads.NamespaceExecutor`, and put
  back at :meth:`~PoolGuard.release` (a default executor the loop made during the test, with
  its workers inside, is shut down instead: it is the test's);
- anyio's idle workers outside the namespace are retired (anyio starts new ones from the
  loop's thread, inside), and so are idle ones inside at the end;
- trio's thread cache is swapped for one that runs named jobs (every ``to_thread`` call
  names its thread) on a namespace-bound pool; unnamed ones -- trio's own I/O waits in
  guest mode -- still go to trio's cache.

Any other ``ThreadPoolExecutor`` with workers outside the namespace is watched: the first
task the test submits to it gets a :class:`~pytest_tunpair.ThreadNamespaceWarning` naming
the pool and pointing at ``tun_pair.executor()``. Its behaviour is not changed.

These rely on the libraries' internals (named where used); when one has moved, binding
warns instead of failing the test. Nothing here imports asyncio, anyio or trio: each is
looked up in ``sys.modules``, so a test that never used one pays nothing for it.
"""

from __future__ import annotations

import os
import sys
import threading
import traceback
import warnings
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .._errors import ThreadNamespaceWarning
from . import threads as _threads
from .threads import NamespaceExecutor

__all__ = ["PoolGuard", "runs_no_test_code"]

#: Most worker threads a swapped-in trio cache starts (trio's own cache is unbounded; its
#: ``to_thread`` limiter, 40 by default, is what bounds them).
TRIO_WORKERS = 1024
#: How long :meth:`PoolGuard.release` waits for tasks still running on the pools it made.
RELEASE_GRACE = 1.0


@dataclass
class _BoundLoop:
    loop: weakref.ReferenceType[Any]
    previous: Any
    ours: NamespaceExecutor
    adopted: bool  # ``previous`` was made during the test: shut it down, put None back


class _TrioCache:
    """Stands in for ``trio._core._thread_cache.THREAD_CACHE`` while bound."""

    def __init__(self, previous: Any, pool: NamespaceExecutor) -> None:
        self.previous = previous
        self.pool = pool

    @property
    def _idle_workers(self) -> Any:  # trio clears it in a forked child
        return self.previous._idle_workers

    def start_thread_soon(
        self, fn: Callable[[], Any], deliver: Callable[[Any], object], name: str | None = None
    ) -> None:
        if name is None:  # trio's own work (guest mode's I/O wait), not the test's
            self.previous.start_thread_soon(fn, deliver, name)
            return
        try:
            self.pool.submit(_trio_job, fn, deliver, name)
        except RuntimeError:  # shut down: the test is over
            self.previous.start_thread_soon(fn, deliver, name)


def _trio_job(fn: Callable[[], Any], deliver: Callable[[Any], object], name: str) -> None:
    """What trio's ``WorkerThread._handle_job`` does: run, capture, deliver."""
    import outcome  # trio's dependency: present wherever trio is

    thread = threading.current_thread()
    default, thread.name = thread.name, name
    try:
        result = outcome.capture(fn)
    finally:
        thread.name = default
    del fn
    try:
        deliver(result)
    except BaseException as exc:  # as trio does: deliver must not fail, say so if it does
        print("Exception while delivering result of thread", file=sys.stderr)
        traceback.print_exception(type(exc), exc, exc.__traceback__)


class PoolGuard:
    """The known pools of the process, bound to the namespace open on ``netns_fd`` (inode
    ``inode``) from :meth:`bind` to :meth:`release`. The caller keeps the namespace open
    meanwhile."""

    def __init__(self, netns_fd: int, inode: int) -> None:
        self._fd = netns_fd
        self._inode = inode
        self._loops: list[_BoundLoop] = []
        self._trio: tuple[Any, _TrioCache] | None = None
        self._watched: list[tuple[ThreadPoolExecutor, Callable[..., Any]]] = []
        self._retired: list[threading.Thread] = []

    # -- binding --------------------------------------------------------------------------
    def bind(self, loops: Iterable[Any] = ()) -> None:
        """Bind ``loops``' default executors, trio's cache and anyio's workers, and watch the
        other pools. Call again when more loops turn up; each is bound once."""
        loops = list(loops)
        steps: tuple[tuple[str, Callable[[], None]], ...] = (
            ("an asyncio loop's default executor", lambda: self._bind_loops(loops)),
            ("trio's thread cache", self._bind_trio),
            ("anyio's worker threads", lambda: self._retire_anyio(inside=False)),
            ("the other thread pools", self._watch_pools),
        )
        for what, step in steps:
            try:
                step()
            except Exception as exc:  # a library's internals moved: say so, go on
                warnings.warn(
                    ThreadNamespaceWarning(
                        f"pytest-tunpair could not bind {what} to the test's namespace "
                        f"({type(exc).__name__}: {exc}): work run there may not reach the "
                        "pair. Use tun_pair.executor(), and please report this with the "
                        "library's version"
                    ),
                    stacklevel=2,
                )

    def _bind_loops(self, loops: list[Any]) -> None:
        for loop in loops:
            self._bind_loop(loop)

    def _bind_loop(self, loop: Any) -> None:
        if loop.is_closed() or any(b.loop() is loop for b in self._loops):
            return
        previous = getattr(loop, "_default_executor", None)  # asyncio's BaseEventLoop
        adopted = False
        if isinstance(previous, ThreadPoolExecutor):
            workers = _threads.pool_threads(previous)
            adopted = bool(workers) and all(self._inside(t) for t in workers)
        ours = NamespaceExecutor(self._fd, thread_name_prefix="asyncio")
        loop.set_default_executor(ours)
        self._loops.append(_BoundLoop(weakref.ref(loop), previous, ours, adopted))

    def _bind_trio(self) -> None:
        cache_module: Any = sys.modules.get("trio._core._thread_cache")
        if cache_module is None or self._trio is not None:
            return
        previous = cache_module.THREAD_CACHE
        pool = NamespaceExecutor(self._fd, TRIO_WORKERS, thread_name_prefix="Trio thread")
        cache = _TrioCache(previous, pool)
        cache_module.THREAD_CACHE = cache
        self._trio = (cache_module, cache)

    def _retire_anyio(self, *, inside: bool) -> None:
        """Stop anyio's idle asyncio workers outside (or inside) the namespace, as anyio
        stops an expired one (``WorkerThread.stop``, with its root task's callback removed)."""
        backend = sys.modules.get("anyio._backends._asyncio")
        worker_type = getattr(backend, "WorkerThread", None)
        if worker_type is None:
            return
        for worker in threading.enumerate():
            if not isinstance(worker, worker_type) or worker.native_id is None:
                continue
            # Its idle list belongs to the loop's thread: only touch it while that loop
            # is not running.
            if worker.loop.is_running() or worker not in worker.idle_workers:
                continue
            if self._inside(worker) != inside:
                continue
            worker.root_task.remove_done_callback(worker.stop)
            worker.stop()
            self._retired.append(worker)

    def _watch_pools(self) -> None:
        """Wrap ``submit`` of each other ``ThreadPoolExecutor`` with workers outside: the
        first task submitted from inside the namespace warns."""
        ours = {id(b.ours) for b in self._loops} | {id(b.previous) for b in self._loops}
        if self._trio is not None:
            ours.add(id(self._trio[1].pool))
        seen: set[int] = set()
        for thread in threading.enumerate():
            pool = _threads.pool_of(thread)
            if pool is None or id(pool) in seen or id(pool) in ours:
                continue
            seen.add(id(pool))
            if isinstance(pool, NamespaceExecutor) or "submit" in vars(pool):
                continue  # bound already, or wrapped by someone (us, at an earlier bind)
            if not any(not self._inside(t) for t in _threads.pool_threads(pool)):
                continue
            self._watch(pool)

    def _watch(self, pool: ThreadPoolExecutor) -> None:
        original = pool.submit
        inode = self._inode
        warned = [False]

        def submit(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
            if not warned[0] and os.stat("/proc/thread-self/ns/net").st_ino == inode:
                outside = [t for t in _threads.pool_threads(pool) if _netns(t) != inode]
                if outside:
                    warned[0] = True
                    _warn_foreign(pool, fn, outside)
            return original(fn, *args, **kwargs)

        pool.submit = submit  # type: ignore[method-assign]
        self._watched.append((pool, submit))

    def _inside(self, thread: threading.Thread) -> bool:
        return _netns(thread) == self._inode

    # -- releasing ------------------------------------------------------------------------
    def release(self, grace: float = RELEASE_GRACE) -> None:
        """Put every pool back as it was, shut down the pools made for the test (tasks still
        running get ``grace`` s in all; a thread still busy then is the caller's to report),
        and retire anyio's idle workers that were started inside."""
        made: list[ThreadPoolExecutor] = []
        for bound in reversed(self._loops):
            loop = bound.loop()
            if loop is not None and getattr(loop, "_default_executor", None) is bound.ours:
                # No public way to put None back (set_default_executor wants a pool).
                loop._default_executor = None if bound.adopted else bound.previous
            made.append(bound.ours)
            if bound.adopted:
                made.append(bound.previous)
        self._loops.clear()
        if self._trio is not None:
            cache_module, cache = self._trio
            if cache_module.THREAD_CACHE is cache:
                cache_module.THREAD_CACHE = cache.previous
            made.append(cache.pool)
            self._trio = None
        for pool, submit in self._watched:
            if vars(pool).get("submit") is submit:
                del pool.submit
        self._watched.clear()
        for pool in made:
            pool.shutdown(wait=False)
        try:
            self._retire_anyio(inside=True)
        except Exception:  # bind() warned already if anyio's internals moved
            pass
        busy = [t for pool in made for t in _threads.pool_threads(pool)]
        _threads.join_threads([*busy, *self._retired], grace)
        self._retired.clear()


def runs_no_test_code(thread: threading.Thread) -> bool:
    """True for a thread of trio's own cache that is idle or doing trio's own work (guest
    mode's I/O wait: a job without a name, so the thread keeps its default name).

    anyio runs trio in guest mode, which waits for I/O on a cache thread (docs/internals.md,
    "Threads: a trio run belongs to the thread that started it"): when the first
    such wait comes during a test, trio starts that thread inside the test's namespace,
    and it stays blocked there, between tests, for as long as the test runner lives. It
    runs no code of the test (work the test gives trio has gone to the bound pool), so a
    report of threads the test left running leaves it out.
    """
    cache_module: Any = sys.modules.get("trio._core._thread_cache")
    target = getattr(thread, "_target", None)
    worker = getattr(target, "__self__", None)
    if cache_module is None or not isinstance(worker, cache_module.WorkerThread):
        return False
    return bool(thread.name == worker._default_name)


def _netns(thread: threading.Thread) -> int | None:
    return None if thread.native_id is None else _threads.netns_of(thread.native_id)


def _warn_foreign(
    pool: ThreadPoolExecutor, fn: Callable[..., Any], outside: list[threading.Thread]
) -> None:
    workers = _threads.pool_threads(pool)
    name = getattr(pool, "_thread_name_prefix", "") or type(pool).__name__
    started = _threads.start_site(outside[0])
    where = f", first started at {started}" if started else ""
    what = getattr(fn, "__qualname__", None) or repr(fn)
    message = (
        f"{what} was submitted to the thread pool {name!r}{where}, whose worker threads "
        f"({len(outside)} of {len(workers)}) live in another network namespace than this "
        "test's (the host's, or an earlier test's): it runs there, where the pair's "
        "addresses lead off the machine, not to the pair. Run it on tun_pair.executor(), "
        "whose workers live in the pair's namespace, or on a pool made during the test"
    )
    frame = _threads.user_frame(sys._getframe(2))
    if frame is None:
        warnings.warn(ThreadNamespaceWarning(message), stacklevel=3)
        return
    warnings.warn_explicit(
        ThreadNamespaceWarning(message),
        ThreadNamespaceWarning,
        frame.f_code.co_filename,
        frame.f_lineno,
        module=frame.f_globals.get("__name__"),
    )
