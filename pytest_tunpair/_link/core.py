"""Whether the relay runs its C core (``_core.c``): built, and not turned off.

The core is an optional extension (setup.py): where it was not built (no C compiler or no
Python headers at install time) or ``TUNPAIR_RELAY=python`` is set, the relay runs its
Python loop for every packet -- same behaviour, more CPU time and latency per packet
(docs/timing.md, "The relay's C core").
"""

from __future__ import annotations

import os
import threading
from types import ModuleType
from typing import Any

from .._kernel.threads import own_thread

__all__ = ["CORE_ENV", "describe", "join_releases", "load", "release_later"]

#: ``TUNPAIR_RELAY=python`` keeps the relay in its Python loop even where the core is built:
#: to compare the two, or to rule the core out when hunting a bug.
CORE_ENV = "TUNPAIR_RELAY"


def load() -> ModuleType | None:
    """The core's module, or ``None`` (not built, or turned off by :data:`CORE_ENV`)."""
    if os.environ.get(CORE_ENV, "").lower() == "python":
        return None
    try:
        from . import _core  # type: ignore[attr-defined]
    except ImportError:
        return None
    module: ModuleType = _core
    return module


def describe() -> str:
    """One line for the run's header: which loop the relay runs, and why."""
    if os.environ.get(CORE_ENV, "").lower() == "python":
        return f"relay: Python loop ({CORE_ENV}=python)"
    try:
        from . import _core  # type: ignore[attr-defined]  # noqa: F401
    except ImportError as exc:
        return (
            f"relay: Python loop (its C core was not built: {exc}; reinstall with a C "
            "compiler and Python's headers, e.g. apt-get install gcc python3-dev)"
        )
    return "relay: C core"


# Threads releasing arrival-stamp rings (release_later), oldest first.
_releasing: list[threading.Thread] = []
_releasing_lock = threading.Lock()
#: At most this many releases at once: one more waits for the oldest.
MAX_RELEASING = 16


def release_later(core: Any) -> None:
    """Unmap a closed core's arrival-stamp rings on a thread of its own.

    The packet sockets go with their rings, and releasing a packet socket waits for an RCU
    grace period, ~15 ms here (docs/internals.md, "A packet socket stamps what a device is
    sent"): not something a test's teardown should wait for. The thread is named
    ``tunpair-release`` (the leftover-thread checks pass over the package's own threads) and
    ends when the rings are gone; :func:`join_releases` waits for all of them.
    """
    thread = own_thread(core.release, "tunpair-release")
    with _releasing_lock:
        _releasing[:] = [t for t in _releasing if t.is_alive()]
        oldest = _releasing[0] if len(_releasing) >= MAX_RELEASING else None
        _releasing.append(thread)
    if oldest is not None:
        oldest.join()
    thread.start()


def join_releases(timeout: float = 5.0) -> bool:
    """Wait until every :func:`release_later` has finished; False if some had not within
    ``timeout`` s."""
    with _releasing_lock:
        threads = list(_releasing)
    for thread in threads:
        thread.join(timeout)
    with _releasing_lock:
        _releasing[:] = [t for t in _releasing if t.is_alive()]
        return not _releasing
