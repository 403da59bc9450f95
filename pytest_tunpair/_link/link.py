"""One direction of the relay: everything ``a->b`` (or ``b->a``) owns, in one object.

The relay thread owns a :class:`Link` per direction and runs each packet through its stages
in this order::

    read (stamp arrival) -> divert -> hooks -> rules -> engine -> queue -> delay timers -> write

A stage that is not configured costs one attribute test; with none configured the relay
takes its batched fast path. Other threads never write these fields: they ask the relay
(``Relay.add_hook``, ``set_engine``, ``add_rule``, ``set_divert``, ``set_queue``), which
either swaps a copy-on-write tuple (read by the relay without a lock) or hands the change
to the relay thread.

The pieces other modules plug in are defined here as protocols: a :class:`Rule` returns a
:class:`Verdict`; a divert function takes packets away from the link (a scripted peer); a
:class:`Queue` is the bottleneck (limit, AQM, rate service).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from .._packets.packet import Packet, SegmentGroup
from .._wire import gso as _gso
from .counters import Counters

if TYPE_CHECKING:
    from .hooks import Hook, HookWorker
    from .impair import ImpairmentEngine

__all__ = ["Divert", "Link", "Queue", "Rule", "Run", "Verdict"]


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a :class:`Rule` decided for a packet it does not let through.

    The packet is recorded with ``action`` and counted as dropped. Each of ``replies`` (a
    frame as the device takes it, without virtio-net header: a TCP RST, an ICMP error) is
    written back into the *source* device, so the sender's kernel receives it, and
    recorded as ``"injected"`` in the reverse direction. Each of ``forward`` (frames
    without virtio-net header, e.g. the fragments of an IPv4 packet too big for a path
    MTU) carries on *instead of* the packet, through the rules after this one, the engine
    and the queue, recorded as ``"forwarded"`` (or what the later stages make of it); the
    packet is then recorded with ``action`` but counted neither dropped nor delivered.
    """

    action: str = "dropped"
    replies: Sequence[bytes] = ()
    forward: Sequence[bytes] = ()


class Rule(Protocol):
    """A per-packet rule (an outage, a fault, a path MTU), run in the relay thread after
    the hooks and before the impairment engine. ``now`` is ``time.monotonic()``."""

    def apply(self, pkt: Packet, now: float) -> Verdict | None:
        """``None`` lets the packet pass; a :class:`Verdict` takes it off the link."""
        ...

    def in_force(self, now: float) -> bool:
        """False once the rule passes every packet from ``now`` on (a used-up fault, an
        outage that has ended): the pair then takes it off the link."""
        ...

    def describe(self) -> str:
        """One line for failure reports."""
        ...


#: Runs first, in the relay thread, for every packet read: ``True`` means "taken" (the
#: packet is recorded as ``"scripted"`` and not written to the other device).
Divert = Callable[[Packet], bool]


class Queue(Protocol):
    """The bottleneck between the engine and the write, owned by the relay thread: the
    buffer with its bound and discipline, the wire (rate or trace) and the propagation
    delay behind it (``_queue.PacketQueue``). Packets carry their frame (``Packet.frame``)
    and ``arrival``; times are ``time.monotonic()``."""

    @property
    def runs(self) -> bool:
        """It takes :class:`Run` items (drop-tail); others get one packet per segment."""
        ...

    def enqueue(self, pkt: Item, now: float, latency: float | None = None) -> Sequence[Item]:
        """Take ``pkt`` (``latency``: its propagation delay, drawn by the engine; ``None``:
        the link's own); return the packets dropped now (it, or older ones), each with its
        ``action`` set (``"dropped"``). The relay records and counts them."""
        ...

    def dequeue_ready(self, now: float) -> Sequence[tuple[Item, float | None]]:
        """What happened by ``now``, in order: packets to write, each with the time it is
        due (service end + propagation delay), and packets dropped at dequeue (CoDel), with
        ``None`` and action ``"dropped"``. ``dequeue_ready(math.inf)`` lets the link finish
        serving everything it holds."""
        ...

    def deadline(self) -> float | None:
        """When :meth:`dequeue_ready` next has something, ``None`` when empty."""
        ...

    def __len__(self) -> int:
        """Packets held now; :meth:`Relay.pending` calls it from other threads too."""
        ...

    @property
    def peak(self) -> int:
        """The most packets it held at once."""
        ...


class Run:
    """Segments ``first .. first + count - 1`` of a GSO super-packet ``source`` (a
    ``Packet`` as read) on a per-segment link, sharing one fate: what the engine and a
    drop-tail queue pass along instead of one ``Packet`` per segment.

    Each segment was decided on its own (drawn, counted against the bound, paced); a run
    is the segments that came out the same way and leave in the same flush. It goes out
    as one write (:meth:`frame`: a smaller super-packet, or one segment) and is recorded
    as its segments (:meth:`record`), made only when someone reads the capture.
    """

    __slots__ = ("action", "arrival", "ce", "count", "first", "plan", "source")

    def __init__(
        self,
        source: Packet,
        plan: _gso.GsoPlan,
        first: int,
        count: int,
        action: str,
        *,
        ce: bool = False,
    ) -> None:
        self.source = source
        self.plan = plan
        self.first = first
        self.count = count
        self.action = action
        #: ECN's CE is set on these segments.
        self.ce = ce
        self.arrival = source.arrival

    def part(self, first: int, count: int, action: str) -> Run:
        """Segments ``first .. first + count - 1`` (of the super-packet) of this run."""
        run = Run(self.source, self.plan, first, count, action, ce=self.ce)
        run.arrival = self.arrival
        return run

    @property
    def wire_len(self) -> int:
        """Bytes its segments take on the wire."""
        return self.plan.wire_len(self.first, self.count)

    def frame(self) -> tuple[bytes, memoryview]:
        """What is written, for ``os.writev``: a super-packet of these segments (one
        segment if ``count`` is 1), the TCP checksum left to the receiving device as the
        kernel leaves it; its headers, then its payload in the source's buffer."""
        return _gso.segments_parts(self.source.frame, self.plan, self.first, self.count, ce=self.ce)

    def record(self, time: float) -> SegmentGroup:
        """Its segments' records, written (or dropped) at ``time``: one group the
        capture expands when it is read."""
        src = self.source
        return SegmentGroup(
            src.frame,
            self.plan,
            self.first,
            self.count,
            off=src._off,
            mode=src.mode,
            direction=src.direction,
            action=self.action,
            arrival=self.arrival,
            time=time,
            ce=self.ce,
        )

    def __repr__(self) -> str:
        return f"<Run {self.action} segments {self.first}..{self.first + self.count - 1}>"


#: What moves through a link's engine, queue and timers: a packet, or a run of segments.
Item = Packet | Run

# What a timer heap entry is: (due, tie-break, packet or run, frame to write: None for a
# run, which makes its own).
_Timer = tuple[float, int, Item, bytes | None]


class Link:
    """One direction's state: its stages, hook worker, back-pressure and counters.

    ``src``/``dst`` are the devices it reads from and writes to (anything with ``fd``,
    ``name``, ``mode`` and ``hdr_len``).
    """

    __slots__ = (
        "_tseq",
        "backlog",
        "classes",
        "counters",
        "direction",
        "divert",
        "dst",
        "engine",
        "held",
        "held_arrival",
        "hooks",
        "match",
        "name",
        "paused",
        "queue",
        "rules",
        "split",
        "src",
        "timers",
        "worker",
    )

    def __init__(self, direction: str, src: _Device, dst: _Device, counters: Counters) -> None:
        self.direction = direction
        self.src = src
        self.dst = dst
        self.counters = counters
        #: Copy-on-write: the relay thread reads it without a lock.
        self.hooks: tuple[Hook, ...] = ()
        #: Copy-on-write, like ``hooks``.
        self.rules: tuple[Rule, ...] = ()
        #: Copy-on-write: the direction's classes (``impair(match=...)``), each a link of
        #: its own (engine, queue, timers, counters) for the packets its ``match`` takes,
        #: tried in order after the rules; the first that matches gets the packet.
        self.classes: tuple[Link, ...] = ()
        #: A class's name and predicate (``None`` for a direction's own link).
        self.name: str | None = None
        self.match: Callable[[Packet], object] | None = None
        self.divert: Divert | None = None
        self.engine: ImpairmentEngine | None = None
        self.queue: Queue | None = None
        #: Decide per wire packet: GSO super-packets are split before the engine and queue.
        self.split = False
        self.worker: HookWorker | None = None
        #: Packets handed to the hook worker and not handed back yet.
        self.backlog = 0
        #: The relay stopped polling ``src`` (the backlog reached ``MAX_BACKLOG``).
        self.paused = False
        self.timers: list[_Timer] = []
        #: 1 while the engine holds a packet back (for reordering); kept by the relay thread
        #: so that other threads can count it without touching the engine.
        self.held = 0
        #: When that packet was read.
        self.held_arrival = 0.0
        self._tseq = itertools.count()

    def plain(self) -> bool:
        """Nothing configured and nothing in flight through the worker: the fast path."""
        return not (
            self.hooks
            or self.backlog
            or self.engine
            or self.rules
            or self.divert
            or self.classes
            or self.queue is not None  # not its truth: an empty queue has len() 0
        )

    def wants_segments(self) -> bool:
        """A stage that must see wire-sized packets (not GSO super-packets) is set."""
        return bool(self.hooks or self.rules or self.divert)

    def schedule(self, due: float, pkt: Item, frame: bytes | None) -> None:
        heapq.heappush(self.timers, (due, next(self._tseq), pkt, frame))

    def pop_due(self, now: float) -> list[tuple[Item, bytes | None]]:
        """Timers due by ``now``, earliest first."""
        timers = self.timers
        out = []
        while timers and timers[0][0] <= now:
            _due, _seq, pkt, frame = heapq.heappop(timers)
            out.append((pkt, frame))
        return out

    def deadline(self) -> float | None:
        """The earliest time this link has something to do (timer, engine hold, queue)."""
        due = self.timers[0][0] if self.timers else None
        for source in (self.engine, self.queue):
            if source is not None:
                d = source.deadline()
                if d is not None and (due is None or d < due):
                    due = d
        return due

    def pending(self) -> int:
        """Packets this link holds now: with the hook worker, on a timer, in the engine
        (a packet held for reordering), in the queue."""
        queue = self.queue
        return self.backlog + len(self.timers) + self.held + (len(queue) if queue else 0)

    def __repr__(self) -> str:
        what = f" class {self.name}" if self.name is not None else ""
        return f"<Link {self.direction}{what} hooks={len(self.hooks)} pending={self.pending()}>"


class _Device(Protocol):
    """What a link needs of a device (a ``TunDevice``, or a socket stand-in in tests)."""

    @property
    def fd(self) -> int | None: ...
    @property
    def name(self) -> str: ...
    @property
    def mode(self) -> str: ...
    @property
    def hdr_len(self) -> int: ...
