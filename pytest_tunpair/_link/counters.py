"""A direction's counters, and the per-pair view of them (``tun_pair.stats``).

The relay thread adds to a direction's :class:`Counters` in the same critical section in
which it records the packets (under the capture's lock), so :meth:`Stats.as_dict` taken
with that lock agrees with what the capture shows.
"""

from __future__ import annotations

import threading

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

    __slots__ = ("counters", "lock")

    def __init__(self, lock: threading.Condition | None = None) -> None:
        self.counters: dict[str, Counters] = {d: Counters() for d in DIRECTIONS}
        self.lock = lock

    def as_dict(self) -> dict[str, dict[str, int]]:
        if self.lock is None:
            return {d: c.as_dict() for d, c in self.counters.items()}
        with self.lock:
            return {d: c.as_dict() for d, c in self.counters.items()}
