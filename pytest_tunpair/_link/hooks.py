"""Hooks: the test's functions on the wire, run per direction in a worker thread.

A hook registered with ``tun_pair.add_hook`` becomes a :class:`Hook`; the relay hands each
packet of a hooked direction to that direction's :class:`HookWorker`, which runs the chain
in its own thread (so a slow hook holds up only its own direction) and hands the result
back through a deque and a wake-up call. The relay thread then records what came of it.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from .._kernel.threads import own_thread
from .._packets.packet import Packet
from .._wire.validate import is_scapy_packet
from .link import Link

__all__ = ["Hook", "HookFailure", "HookWorker", "Result"]


class Hook:
    """A registered hook; ``remove_hook`` takes this handle.

    A hook never runs concurrently with itself: one registered for both directions is
    called from both directions' workers, one call at a time (``lock``).
    """

    __slots__ = ("direction", "fn", "lock", "name", "where")

    def __init__(self, fn: Callable[[Packet], Any], direction: str | None) -> None:
        self.fn = fn
        """The hook function, called with each :class:`Packet`."""
        self.direction = direction
        """``"a->b"``, ``"b->a"``, or ``None`` for both."""
        self.name: str = getattr(fn, "__qualname__", None) or repr(fn)
        """The function's qualified name, as reports show it."""
        code = getattr(fn, "__code__", None)
        self.where = f"{os.path.basename(code.co_filename)}:{code.co_firstlineno}" if code else "?"
        """``file.py:line`` where the function is defined."""
        self.lock = threading.Lock()
        """Held while the hook runs, so that it never runs concurrently with itself."""

    def __str__(self) -> str:
        return f"{self.name} ({self.where})"

    def __repr__(self) -> str:
        return f"<Hook {self.name} at {self.where} direction={self.direction or 'both'}>"


# What a worker hands back: (link, packet as read, outputs or None, error or None).
# An output is (bytes, action); [] means "dropped by the hooks".
Result = tuple[Link, Packet, list[tuple[bytes, str]] | None, "HookFailure | None"]


class HookFailure:
    """A hook raised or returned something unusable; the relay thread turns it into a
    :class:`HookError` once it has recorded the dropped packet (and knows its number)."""

    __slots__ = ("exc", "hook", "packet", "what")

    def __init__(self, hook: Hook, what: str, exc: BaseException | None, packet: Packet) -> None:
        self.hook = hook
        self.what = what
        self.exc = exc
        # Decoded here, in the worker: the first scapy import can take a second or more,
        # which must not stall the relay thread.
        try:
            self.packet = packet.scapy.summary()
        except Exception:
            self.packet = f"{packet.wire_len} bytes"


class HookWorker:
    """Runs the hook chain for one direction in its own thread.

    It takes ``(packet, hooks)`` from :attr:`inbox`, appends what the chain made of the
    packet to ``done`` (a deque the relay thread empties) and calls ``wake`` so the relay's
    ``poll()`` returns; it knows nothing else of the relay.
    """

    def __init__(
        self, link: Link, done: deque[Result], wake: Callable[[], None], *, name: str
    ) -> None:
        self.link = link
        self.direction = link.direction
        self.inbox: queue.SimpleQueue[tuple[Packet, tuple[Hook, ...]] | None] = queue.SimpleQueue()
        self.current: Hook | None = None
        self.stopping = False
        self._done = done
        self._wake = wake
        self.thread = own_thread(self._main, name, comm="tunpair-hooks")
        self.thread.start()

    def _main(self) -> None:
        link, done = self.link, self._done
        while True:
            item = self.inbox.get()
            if item is None:
                return
            pkt, hooks = item
            if self.stopping:  # the pair is closing: hand it back unprocessed
                done.append((link, pkt, None, None))
                continue
            outputs, failure = self._run(hooks, pkt)
            done.append((link, pkt, outputs, failure))
            self._wake()

    def _run(
        self, hooks: tuple[Hook, ...], original: Packet
    ) -> tuple[list[tuple[bytes, str]] | None, HookFailure | None]:
        items: list[Packet] = [original]
        for hook in hooks:
            nxt: list[Packet] = []
            for pkt in items:
                self.current = hook
                try:
                    with hook.lock:
                        result = hook.fn(pkt)
                    datas = _normalize(result, pkt)
                except _BadReturn as exc:
                    return None, HookFailure(hook, str(exc), None, pkt)
                # BaseException: pytest.fail() in a hook raises one, and must not kill us.
                except BaseException as exc:
                    what = f"raised {type(exc).__name__}: {exc}"
                    return None, HookFailure(hook, what, exc, pkt)
                finally:
                    self.current = None
                for data in datas:
                    if data is pkt.data:
                        nxt.append(pkt)
                    else:
                        nxt.append(
                            Packet(
                                pkt.time, pkt.direction, "modified", data, 0, pkt.mode, pkt.arrival
                            )
                        )
            items = nxt
        return _label(original.data, [p.data for p in items]), None


class _BadReturn(Exception):
    pass


def _normalize(result: Any, pkt: Packet) -> list[bytes]:
    if result is None:
        return [pkt.data]
    if isinstance(result, (list, tuple)):
        return [_one(r, pkt) for r in result]
    return [_one(result, pkt)]


def _one(item: Any, pkt: Packet) -> bytes:
    if item is None:  # inside a list: "this packet, unchanged" (so [None, None] duplicates)
        return pkt.data
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, Packet):
        return item.data
    if is_scapy_packet(item):
        try:
            return bytes(item)
        except Exception as exc:
            raise _BadReturn(
                f"returned a scapy packet that scapy cannot build ({type(exc).__name__}: {exc})"
            ) from exc
    raise _BadReturn(
        f"returned {type(item).__name__} {_short_repr(item)}: a hook returns None (forward "
        "unchanged), bytes or a scapy packet (forward that instead), or a list/tuple of "
        "those ([] drops the packet, two items duplicate it)"
    )


def _short_repr(obj: object) -> str:
    r = repr(obj)
    return r if len(r) <= 60 else r[:57] + "..."


def _label(original: bytes, outputs: list[bytes]) -> list[tuple[bytes, str]]:
    """Actions for what the hooks made of one packet: the first copy of given bytes is
    "forwarded" (unchanged) or "modified"; any further identical copy is "duplicated"."""
    seen: set[bytes] = set()
    labelled = []
    for data in outputs:
        if data in seen:
            action = "duplicated"
        else:
            action = "forwarded" if data == original else "modified"
            seen.add(data)
        labelled.append((data, action))
    return labelled
