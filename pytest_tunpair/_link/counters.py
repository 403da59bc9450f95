"""A direction's counters, and the per-pair view of them (``tun_pair.stats``).

The relay thread adds to a direction's :class:`Counters` in the same critical section in
which it records the packets (under the capture's lock), so :meth:`Stats.as_dict` taken
with that lock agrees with what the capture shows.
"""

from __future__ import annotations

import threading
from typing import Any

from .._packets.packet import DIRECTIONS

__all__ = ["Counters", "Stats"]


class Counters:
    """One direction's counters; the relay thread adds to them, :class:`Stats` reads."""

    __slots__ = ("bytes", "dropped", "marked", "packets", "queue_peak")

    def __init__(self) -> None:
        #: Packets written to the other device.
        self.packets = 0
        #: Their bytes (without the virtio-net header).
        self.bytes = 0
        #: Packets the relay did not deliver (dropped by a hook, a rule, an impairment's
        #: loss, the link's queue, a failed write, or still in flight when the pair closed).
        self.dropped = 0
        #: Packets written CE-marked instead of dropped (``ecn=True``), recorded "marked".
        self.marked = 0
        #: The most packets the direction's queue held at once.
        self.queue_peak = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "packets": self.packets,
            "bytes": self.bytes,
            "dropped": self.dropped,
            "marked": self.marked,
            "queue_peak": self.queue_peak,
        }


class Stats:
    """Per-direction counters, kept even when the capture itself is bounded.

    With the capture's lock (``lock``), :meth:`as_dict` reads counters that agree with what
    the capture shows: the relay updates both in one critical section.
    """

    __slots__ = ("classes", "counters", "lock")

    def __init__(self, lock: threading.Condition | None = None) -> None:
        self.counters: dict[str, Counters] = {d: Counters() for d in DIRECTIONS}
        #: Each direction's classes (``impair(match=...)``), by name: kept after a class
        #: goes, as the direction's own counters are.
        self.classes: dict[str, dict[str, Counters]] = {d: {} for d in DIRECTIONS}
        self.lock = lock

    def of_class(self, direction: str, name: str) -> Counters:
        """The counters of class ``name`` of ``direction`` (made on first use)."""
        counters = self.classes[direction].get(name)
        if counters is None:
            counters = self.classes[direction][name] = Counters()
        return counters

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """Per direction: its totals (classes included; ``queue_peak`` is the direction's
        own queue's), and ``"classes"``, by name, when it has or had any."""
        if self.lock is None:
            return self._as_dict()
        with self.lock:
            return self._as_dict()

    def _as_dict(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for d, c in self.counters.items():
            entry: dict[str, Any] = c.as_dict()
            classes = self.classes[d]
            if classes:
                entry["classes"] = {name: k.as_dict() for name, k in classes.items()}
                for k in classes.values():
                    for key in ("packets", "bytes", "dropped", "marked"):
                        entry[key] += getattr(k, key)
            out[d] = entry
        return out
