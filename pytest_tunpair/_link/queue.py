"""The bottleneck of one link direction: a bounded queue, its discipline, ECN, and a server.

This module is pure logic: no sockets, no threads, no clock.  The relay hands every packet
that survived the impairment engine to :meth:`LinkQueue.enqueue` (through
:class:`PacketQueue`, which speaks the relay's ``Packet``) with the time it read it, calls
:meth:`LinkQueue.advance` when :meth:`LinkQueue.deadline` has passed, and records what
comes back: :class:`Outcome` records saying which packets left (and when they are due at
the far end), which were dropped and which were ECN-marked.  One queue models one
direction.  Times are seconds on any monotonic clock, as long as they never go backwards.

The model
---------
A packet passes three places, and the direction holds it in all three::

    arrival --> [ waiting (the buffer) ] --> [ server (the wire) ] --> [ propagation ] --> due
                 limit, discipline           rate or trace             latency

* **waiting** -- the buffer in front of the bottleneck, FIFO.  The discipline decides who
  is dropped (or marked) here: on arrival (limit, PIE) or when the head is taken into
  service (CoDel).
* **server** -- takes the head when the wire is free and the server offers a transmission
  opportunity; the packet has left when its last bit has: a constant rate serialises
  ``wire_len * 8 / rate`` seconds (:class:`RateServer`), a trace server delivers at
  delivery opportunities (see :class:`Server`).  CoDel's and PIE's *sojourn* is the time
  from arrival to the start of service, as in Linux, where the qdisc hands a packet to the
  device when the device can take it.
* **propagation** -- the packet is due at the far end ``latency`` seconds after it left
  (the per-packet propagation delay plus jitter, drawn by the caller).  Packets may
  overtake each other here only if their latencies differ (jitter), as in netem.

**The bound** (``limit`` packets, ``limit_bytes`` bytes) covers everything the direction
holds -- waiting, in service and propagating -- as netem's ``limit`` covers its whole
queue: it bounds the memory a direction may pin and makes a link whose buffer is too small
for its bandwidth-delay product drop, as netem does (raise ``limit`` for a long fat link).
An arrival into an empty direction is always admitted, so a single packet larger than the
bound (a GSO super-packet with offload on) is carried, not black-holed.  Beyond the bound:

* ``"droptail"`` (and CoDel and PIE, whose own drops come on top) drops the arrival;
* ``"drophead"`` drops the oldest *waiting* packets until the arrival fits (a packet on the
  wire or propagating has left the buffer and is never taken back); if nothing waiting is
  left to drop, the arrival is dropped.

**Packet units.** A packet counts as ``count`` packets and ``size`` bytes against the bound
and the server: the caller passes them (:func:`wire_size` computes both for a GSO
super-packet: the segments it stands for and their total length on a real wire, headers
repeated), so a link with offload on is bounded and paced like one carrying MTU-sized
packets.

Disciplines
-----------
* ``"droptail"``, ``"drophead"`` -- FIFO with the bound above, nothing else.
* ``"codel"`` -- RFC 8289 (section 5, the Linux variant it documents): at dequeue, if the
  head's sojourn has stayed at or above ``target`` for ``interval`` (and more than one MTU
  is waiting), enter the dropping state: drop (or mark), and schedule the next drop
  ``interval / sqrt(count)`` later; each further drop raises ``count``; leave the state as
  soon as a head's sojourn is below ``target``.  Re-entering soon after leaving (``now -
  drop_next < 16 * interval``) resumes at ``count - lastcount`` instead of 1.
* ``"pie"`` -- RFC 8033: every ``tupdate`` (15 ms) the drop probability moves by
  ``alpha * (qdelay - target) + beta * (qdelay - qdelay_old)``, ``alpha = 0.125``,
  ``beta = 1.25`` (per second), scaled down while the probability is small (the
  auto-tuning table of section 4.2), by at most 2% per update once it is >= 10%, and
  decays by 2% per update while the delay stays zero; arrivals are dropped (or marked) at
  random with that probability, except during the burst allowance (150 ms, refilled while
  the queue is quiet), while the delay is under ``target / 2`` and the probability under
  20%, or while at most two MTUs wait.  The draw is derandomised as in section 5.4 (Linux
  does the same), or plain when ``derandomize=False``.  The delay is measured from
  timestamps (the sojourn of the last dequeued packet, 0 once the buffer is empty), as
  Linux does by default.  Updates are computed lazily, at the next arrival or dequeue, for
  every ``tupdate`` boundary that has passed: nothing changes between events, so this is
  exact and needs no timer.

**ECN** (``ecn=True``): where CoDel would drop, or PIE would drop while its probability is
at most 10% (RFC 8033 section 5.1), an ECN-capable packet (ECT(0) or ECT(1)) is marked CE
instead (:func:`set_ce`) and carries on; a not-ECT packet is dropped as before.  Limit
drops are always drops.

Determinism
-----------
PIE's draws come from ``random.Random(seed)``; nothing else is random.  The same seed, the
same packets and the same times give the same drops, marks and departure times.  The
relay's lateness does not leak into the model: departures and dues are computed from
scheduled times, never from the time :meth:`LinkQueue.advance` happens to be called.

A queue is not thread-safe; the relay thread owns it.
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate
from typing import Literal, Protocol

from .._packets.packet import Packet
from .._wire import headers as _h
from .._wire.ecn import ecn_codepoint, set_ce
from .._wire.gso import GsoPlan, wire_size
from .._wire.numbers import ECN_ECT0, ECN_ECT1
from .link import Item, Run

__all__ = [
    "DISCIPLINES",
    "Discipline",
    "LinkQueue",
    "Outcome",
    "PacketQueue",
    "QueueSpec",
    "RateServer",
    "Server",
]

Discipline = Literal["droptail", "drophead", "codel", "pie", "fq_codel"]
DISCIPLINES: tuple[Discipline, ...] = ("droptail", "drophead", "codel", "pie", "fq_codel")

#: netem's and Linux CoDel's/PIE's default ``limit``, in packets.
DEFAULT_LIMIT = 1000
#: RFC 8289 section 4.3 and 4.4: CoDel's target and interval.
CODEL_TARGET = 0.005
CODEL_INTERVAL = 0.100
#: RFC 8033 section 4 / Appendix A: PIE's QDELAY_REF, T_UPDATE, MAX_BURST, alpha, beta.
PIE_TARGET = 0.015
PIE_TUPDATE = 0.015
PIE_MAX_BURST = 0.150
PIE_ALPHA = 0.125
PIE_BETA = 1.25
#: RFC 8033 section 5.1: above this drop probability, ECN-capable packets are dropped too.
PIE_MARK_ECNTH = 0.1
#: RFC 8290 section 5.1 / Linux: fq_codel's number of flow queues; its quantum is one
#: MTU-sized packet plus the Ethernet header (MTU + 14).
FQ_FLOWS = 1024
#: The largest packet the AQMs consider "one packet" (RFC 8289's MAXPACKET, RFC 8033's
#: MEAN_PKTSIZE): an Ethernet MTU, which is also the pair's default MTU.
MTU = 1500


Action = Literal["sent", "marked", "dropped"]


@dataclass(frozen=True)
class QueueSpec:
    """How one direction's bottleneck buffer behaves (the neutral default: netem's).

    ``limit`` bounds the packets a direction holds (``None``: no bound in packets),
    ``limit_bytes`` its bytes (``None``: no bound in bytes); ``discipline`` is one of
    :data:`DISCIPLINES`; ``target`` is CoDel's or PIE's target delay in seconds (``None``:
    5 ms for CoDel, 15 ms for PIE); ``interval`` is CoDel's interval (``None``: 100 ms);
    ``ecn`` marks ECN-capable packets instead of dropping them where the AQM would drop.
    ``mtu`` is what the AQMs count as one full-sized packet. ``flows`` and ``quantum`` are
    fq_codel's number of flow queues and DRR quantum in bytes (``None``: MTU + 14).

    The values arrive checked: ``impair()``'s parameters are declared, parsed and
    validated once, in ``ImpairmentSpec`` (``_impair.py``), which builds this record.
    """

    limit: int | None = DEFAULT_LIMIT
    limit_bytes: int | None = None
    discipline: Discipline = "droptail"
    target: float | None = None
    interval: float | None = None
    ecn: bool = False
    mtu: int = MTU
    derandomize: bool = True
    flows: int = FQ_FLOWS
    quantum: int | None = None

    @property
    def effective_quantum(self) -> int:
        """fq_codel's DRR quantum in bytes (MTU + 14 when ``quantum`` is ``None``)."""
        return self.mtu + 14 if self.quantum is None else self.quantum

    @property
    def effective_target(self) -> float:
        """The target delay the AQM uses (its RFC default when ``target`` is ``None``)."""
        if self.target is not None:
            return self.target
        return PIE_TARGET if self.discipline == "pie" else CODEL_TARGET

    @property
    def effective_interval(self) -> float:
        """CoDel's interval (RFC 8289's 100 ms when ``interval`` is ``None``)."""
        return CODEL_INTERVAL if self.interval is None else self.interval


# -- servers --------------------------------------------------------------------------------


class Server(Protocol):
    """What drains a queue: a constant rate, or a trace of delivery opportunities.

    The queue calls, for the packet at its head, ``start = server.ready(t)`` with ``t`` the
    earliest moment the packet could start (it has arrived and the wire is free), then
    makes its dequeue decision (CoDel) at ``start``, then ``server.finish(size, start)``
    exactly once per packet it transmits, in transmission order.

    * ``ready(t) -> float``: the earliest time ``>= t`` at which a transmission can begin.
      Pure: it may be called several times with the same or later ``t`` without consuming
      anything.  ``math.inf`` means "never" (a trace that has ended): the packets wait.
    * ``finish(size, start) -> float``: a ``size``-byte packet starts at ``start`` (a value
      ``ready`` returned); return when its last bit has left, ``>= start``, and consume the
      capacity it used.

    A trace server in the mahimahi style (a list of delivery opportunities, each carrying
    up to 1504 bytes, looping) implements ``ready`` as "the next opportunity with bytes left
    at or after ``t``" and ``finish`` as "spend opportunities (the current one's remaining
    bytes first) until ``size`` bytes are delivered; return the time of the one that
    delivered the last byte".  Unused opportunities are not banked: ``ready`` skips those
    that passed while the queue was empty, as mahimahi's link does.
    """

    def ready(self, t: float) -> float:
        """The earliest time ``>= t`` a transmission can begin (``math.inf``: never)."""
        ...

    def finish(self, size: int, start: float) -> float:
        """A ``size``-byte packet starts at ``start``: when its last bit has left."""
        ...


class RateServer:
    """A wire of constant ``rate`` bits/s: a packet departs when its last bit has left."""

    __slots__ = ("rate",)

    def __init__(self, rate: float) -> None:
        if not (math.isfinite(rate) and rate > 0.0):
            raise ValueError(f"rate must be bits/s > 0, not {rate!r}")
        #: Bits per second.
        self.rate = rate

    def ready(self, t: float) -> float:
        """``t``: the wire is free whenever the queue asks (it asks once the last left)."""
        return t

    def finish(self, size: int, start: float) -> float:
        """``start`` plus the time ``size`` bytes take at :attr:`rate`."""
        return start + size * 8 / self.rate

    def __repr__(self) -> str:
        return f"RateServer({self.rate:g})"


class _Instant:
    """No bottleneck: a packet leaves as soon as it arrives (delay-only links)."""

    __slots__ = ()

    def ready(self, t: float) -> float:
        return t

    def finish(self, size: int, start: float) -> float:
        return start


# -- the queue ------------------------------------------------------------------------------


@dataclass(slots=True)
class Outcome:
    """What became of one packet the queue held.

    ``action`` is ``"sent"`` (it left and is due at the far end at ``time``), ``"marked"``
    (the same, with CE set in ``data``) or ``"dropped"`` (at ``time``; ``reason`` says
    who: ``"limit"``, ``"codel"`` or ``"pie"``).
    """

    action: Action
    data: bytes
    """The packet as it leaves: the bytes given to :meth:`LinkQueue.enqueue`, CE set if marked."""
    tag: object
    """Whatever the caller passed with the packet."""
    arrival: float
    """When it was enqueued."""
    time: float
    """When it is due at the far end (sent, marked), or when it was dropped."""
    sojourn: float
    """Its time in the buffer: arrival to start of service (to the drop, if dropped)."""
    departed: float
    """When its last bit left the server (``nan`` if dropped)."""
    reason: str = ""
    first: int = 0
    """For a run of segments (:meth:`LinkQueue.enqueue_run`): the first segment it covers;
    ``time`` is then the last one's due time."""
    count: int = 1
    """How many segments of the run it covers (1 for a packet)."""


class _Entry:
    __slots__ = (
        "arrival",
        "count",
        "data",
        "departed",
        "flow",
        "latency",
        "marked",
        "size",
        "start",
        "tag",
        "taken",
    )

    def __init__(
        self, data: bytes, tag: object, size: int, count: int, arrival: float, latency: float
    ) -> None:
        self.data = data
        self.tag = tag
        self.size = size
        self.count = count
        self.arrival = arrival
        self.latency = latency
        self.marked = False
        self.taken = False  # fq_codel: served or dropped (left lazily in the arrival order)
        self.flow: _Flow | None = None
        self.start = math.nan  # when service began; nan while waiting
        self.departed = math.nan  # when its last bit left the server


class _RunEntry:
    """Admitted segments of a run on a drop-tail link: each one's due time, in order."""

    __slots__ = ("arrival", "dues", "first", "plan", "pos", "starts", "tag")

    def __init__(
        self, tag: object, plan: GsoPlan, first: int, arrival: float, dues: list[float],
        starts: list[float],
    ) -> None:  # fmt: skip
        self.tag = tag
        self.plan = plan
        self.first = first
        self.arrival = arrival
        self.dues = dues
        self.starts = starts
        self.pos = 0  # dues[:pos] have been released


class LinkQueue:
    """One direction's buffer, discipline, server and propagation line (see the module doc).

    ``server`` drains the buffer (``None``: no bottleneck, packets leave on arrival and
    only the propagation line holds them); ``offset`` is where the packet starts in the
    bytes passed to :meth:`enqueue` (after the virtio-net header, if any), ``tap`` that it
    is an Ethernet frame (used to find the IP header to ECN-mark); ``delay`` is the
    latency of a packet enqueued without one; ``seed`` seeds PIE's draws.
    """

    def __init__(
        self,
        spec: QueueSpec | None = None,
        server: Server | None = None,
        *,
        offset: int = 0,
        tap: bool = False,
        delay: float = 0.0,
        seed: int | str = 0,
    ) -> None:
        self.spec = spec = spec if spec is not None else QueueSpec()
        self.server: Server = server if server is not None else _Instant()
        self.offset = offset
        self.tap = tap
        self.delay = delay
        # Drop-tail decides everything when a packet arrives (admit, when it starts and
        # leaves: FIFO, nothing taken back), so it computes departures then -- the same
        # times the step-by-step model gives -- and holds packets only on the line.
        self._eager = spec.discipline == "droptail"
        self._limit = spec.limit if spec.limit is not None else math.inf
        self._limit_bytes = spec.limit_bytes if spec.limit_bytes is not None else math.inf
        self._waiting: deque[_Entry] = deque()
        self._waiting_bytes = 0
        self._waiting_count = 0
        self._busy: _Entry | None = None
        self._busy_until = -math.inf
        self._free = -math.inf  # when the wire finished its last transmission
        # (due, seq, entry): propagating (drop-tail: everything admitted)
        self._line: list[tuple[float, int, _Entry | _RunEntry]] = []
        self._seq = 0
        self._clock = -math.inf
        self._out: list[Outcome] = []
        self.packets = 0
        """Packets held now (waiting, on the wire, propagating), in the units of ``limit``."""
        self.bytes = 0
        """Bytes held now, in the units of ``limit_bytes``."""
        self.peak = 0
        """The most packets held at any time."""
        self.dropped = 0
        """Packets (outcomes) dropped so far, by the bound or the AQM."""
        self.marked = 0
        """Packets ECN-marked so far."""
        self._aqm: _Aqm | None
        if spec.discipline == "codel":
            self._aqm = _CoDel(self, spec)
        elif spec.discipline == "pie":
            self._aqm = _Pie(self, spec, random.Random(seed))
        elif spec.discipline == "fq_codel":
            self._aqm = _FqCoDel(self, spec, random.Random(seed).getrandbits(32))
        else:
            self._aqm = None

    @property
    def delays_only(self) -> bool:
        """No bottleneck and drop-tail: each packet leaves ``delay`` after it arrives, in
        order, unless the bound drops it on arrival (what the relay's C core emulates)."""
        return type(self.server) is _Instant and self.spec.discipline == "droptail"

    # -- the relay's interface -------------------------------------------------------------
    def enqueue(
        self,
        data: bytes,
        now: float,
        *,
        tag: object = None,
        size: int | None = None,
        count: int = 1,
        latency: float | None = None,
    ) -> list[Outcome]:
        """Offer one packet arriving at ``now``; return every outcome up to ``now``.

        ``size`` is its length on the wire (default ``len(data) - offset``: what the server
        serialises and ``limit_bytes`` counts), ``count`` the packets it stands for (a GSO
        super-packet's segments: what ``limit`` counts), ``latency`` its propagation delay
        after leaving the server (default: ``delay``).  The list
        holds what :meth:`advance` would have returned for ``now`` plus this packet's own
        fate if it was decided at once (a drop; or ``"sent"`` if nothing delays it).
        """
        self._advance(now)
        now = self._clock
        if size is None:
            size = len(data) - self.offset
        entry = _Entry(data, tag, size, count, now, self.delay if latency is None else latency)
        if self._eager:
            if self._overflows(entry):
                self._drop(entry, now, "limit")
            else:
                self._hold(entry)
                self._serve(entry)
            self._advance(now)
            return self._take()
        if self.spec.discipline == "fq_codel":
            assert isinstance(self._aqm, _FqCoDel)
            self._aqm.on_enqueue(entry, now)
            self._waiting.append(entry)
            self._waiting_bytes += entry.size
            self._waiting_count += entry.count
            self._hold(entry)
            while self.packets > self._limit or self.bytes > self._limit_bytes:
                if not self._aqm.drop_fattest(now):
                    break
            self._advance(now)
            return self._take()
        if self._overflows(entry) and not self._make_room(entry):
            if self._aqm is not None:
                self._aqm.on_overflow()
            self._drop(entry, now, "limit")
        else:
            verdict = self._aqm.on_enqueue(entry, now) if self._aqm is not None else None
            if verdict == "drop":
                self._drop(entry, now, self.spec.discipline)
            else:
                if verdict == "mark":
                    self._mark(entry)
                self._waiting.append(entry)
                self._waiting_bytes += entry.size
                self._waiting_count += entry.count
                self._hold(entry)
        self._advance(now)
        return self._take()

    def enqueue_run(
        self,
        tag: object,
        plan: GsoPlan,
        first: int,
        count: int,
        now: float,
        *,
        latency: float | None = None,
    ) -> list[Outcome]:
        """Offer segments ``first .. first + count - 1`` of the super-packet ``plan`` (all
        arriving at ``now``), each counted, bounded, paced and delivered as a packet of its
        own; return the outcomes up to ``now``. Drop-tail only (:attr:`runs`): outcomes
        cover runs of consecutive segments (``first``, ``count``); a run's ``time`` is when
        its last segment is due, each of them due by the ``now`` that releases it."""
        if not self._eager:
            raise ValueError("enqueue_run() is for a drop-tail queue")
        self._advance(now)
        now = self._clock
        lat = self.delay if latency is None else latency
        server = self.server
        rate = server.rate if type(server) is RateServer else 0.0
        instant = type(server) is _Instant
        limit, limit_bytes = self._limit, self._limit_bytes
        full = plan.header_len + plan.mss
        last = plan.count - 1
        last_size = plan.header_len + plan.payload - last * plan.mss
        packets, nbytes, free, peak = self.packets, self.bytes, self._free, self.peak
        end = first + count
        if (rate or instant) and packets + count <= limit:
            total = plan.wire_len(first, count)
            if nbytes + total <= limit_bytes:
                # All of them fit: their departures in one pass (the loop below would
                # compute the same times, one segment at a time).
                start = free if free > now else now
                if rate:
                    sizes = [full] * count
                    if end - 1 == last:
                        sizes[-1] = last_size
                    scale = 8 / rate
                    ends = [start + c * scale for c in accumulate(sizes)]
                    starts = [start, *ends[:-1]]
                    dues = [e + lat for e in ends] if lat else ends
                    free = ends[-1]
                else:
                    starts = [start] * count
                    dues = [start + lat] * count
                    free = start
                packets += count
                self.packets, self.bytes, self._free = packets, nbytes + total, free
                if packets > peak:
                    self.peak = packets
                self._line_run(tag, plan, first, now, dues, starts)
                self._advance(now)
                return self._take()
        dues = []
        starts = []
        run_first = first
        drop_first = -1
        for i in range(first, end):
            size = full if i != last else last_size
            if packets and (packets + 1 > limit or nbytes + size > limit_bytes):
                if dues:
                    self._line_run(tag, plan, run_first, now, dues, starts)
                    dues, starts = [], []
                if drop_first < 0:
                    drop_first = i
                run_first = i + 1
                continue
            if drop_first >= 0:
                self._drop_run(tag, now, drop_first, i - drop_first)
                drop_first = -1
            packets += 1
            nbytes += size
            if packets > peak:
                peak = packets
            start = free if free > now else now
            if rate:
                free = start + size * 8 / rate
            elif instant:
                free = start
            else:
                start = server.ready(start)
                free = math.inf if start == math.inf else server.finish(size, start)
            starts.append(start)
            dues.append(free + lat)
        if drop_first >= 0:
            self._drop_run(tag, now, drop_first, end - drop_first)
        self.packets, self.bytes, self._free, self.peak = packets, nbytes, free, peak
        if dues:
            self._line_run(tag, plan, run_first, now, dues, starts)
        self._advance(now)
        return self._take()

    def _drop_run(self, tag: object, now: float, first: int, count: int) -> None:
        """Segments ``first .. first + count - 1`` of a run dropped by the bound."""
        self.dropped += count
        self._out.append(
            Outcome("dropped", b"", tag, now, now, 0.0, math.nan, "limit", first, count)
        )

    @property
    def runs(self) -> bool:
        """It takes runs of segments (:meth:`enqueue_run`): a drop-tail queue."""
        return self._eager

    def _line_run(
        self, tag: object, plan: GsoPlan, first: int, arrival: float, dues: list[float],
        starts: list[float],
    ) -> None:  # fmt: skip
        self._seq += 1
        heapq.heappush(
            self._line, (dues[0], self._seq, _RunEntry(tag, plan, first, arrival, dues, starts))
        )

    def advance(self, now: float) -> list[Outcome]:
        """Run the model up to ``now``; return the outcomes that happened by then, in order."""
        self._advance(now)
        return self._take()

    def deadline(self) -> float | None:
        """When :meth:`advance` next has something to do, or ``None`` if nothing is held."""
        due = self._line[0][0] if self._line else math.inf
        if self._busy is not None:
            due = min(due, self._busy_until)
        elif self._waiting_count:
            due = min(due, self._next_start())
        return None if due == math.inf else due

    @property
    def waiting(self) -> int:
        """Packets in the buffer now (not yet on the wire), in the units of ``limit``."""
        return self._waiting_count

    # -- the model --------------------------------------------------------------------------
    def _advance(self, now: float) -> None:
        # Times never go backwards: a late caller's "now" from before the last event is the
        # last event's time.
        if now > self._clock:
            self._clock = now
        now = self._clock
        server = self.server
        while True:
            busy = self._busy
            if busy is not None:
                if self._busy_until > now:
                    break
                self._busy = None
                self._free = self._busy_until
                self._propagate(busy, self._busy_until)
            if not self._waiting_count:
                break
            start = self._next_start()
            if start > now:
                break
            entry = self._aqm.on_dequeue(start) if self._aqm is not None else self._pop()
            if entry is None:
                continue
            entry.start = start
            self._busy = entry
            self._busy_until = server.finish(entry.size, start)
        line = self._line
        while line and line[0][0] <= now:
            due, _seq, held = heapq.heappop(line)
            if isinstance(held, _RunEntry):
                self._release_run(held, now)
            else:
                self._release(held, due)

    def _serve(self, entry: _Entry) -> None:
        """Drop-tail: ``entry`` starts when the wire is free and the server ready, and goes
        onto the line at once (nothing can change its times any more)."""
        server = self.server
        start = server.ready(max(self._free, entry.arrival))
        entry.start = start
        departed = math.inf if start == math.inf else server.finish(entry.size, start)
        self._free = departed
        self._propagate(entry, departed)

    def _release_run(self, entry: _RunEntry, now: float) -> None:
        """The segments of ``entry`` due by ``now``, as one outcome; the rest back onto
        the line."""
        dues = entry.dues
        k = entry.pos
        j = bisect.bisect_right(dues, now, k)
        if j == k:  # pragma: no cover - popped only once its next due has come
            j = k + 1
        first = entry.first + k
        n = j - k
        self.packets -= n
        self.bytes -= entry.plan.wire_len(first, n)
        start = entry.starts[k]
        self._out.append(
            Outcome(
                "sent", b"", entry.tag, entry.arrival, dues[j - 1], start - entry.arrival,
                dues[j - 1], "", first, n,
            )
        )  # fmt: skip
        entry.pos = j
        if j < len(dues):
            self._seq += 1
            heapq.heappush(self._line, (dues[j], self._seq, entry))

    def _next_start(self) -> float:
        waiting = self._waiting
        while waiting[0].taken:  # fq_codel serves out of arrival order
            waiting.popleft()
        head = waiting[0]
        return self.server.ready(max(self._free, head.arrival))

    def _pop(self) -> _Entry | None:
        """Take the head of the buffer into service (``None`` when it is empty)."""
        if not self._waiting:
            return None
        entry = self._waiting.popleft()
        self._waiting_bytes -= entry.size
        self._waiting_count -= entry.count
        return entry

    def _propagate(self, entry: _Entry, departed: float) -> None:
        entry.departed = departed
        self._seq += 1
        heapq.heappush(self._line, (departed + entry.latency, self._seq, entry))

    def _release(self, entry: _Entry, due: float) -> None:
        """``entry`` reaches the far end at ``due``."""
        self._unhold(entry)
        self._out.append(
            Outcome(
                "marked" if entry.marked else "sent",
                entry.data,
                entry.tag,
                entry.arrival,
                due,
                entry.start - entry.arrival,
                entry.departed,
            )
        )

    def _drop(self, entry: _Entry, now: float, reason: str) -> None:
        self.dropped += 1
        self._out.append(
            Outcome(
                "dropped",
                entry.data,
                entry.tag,
                entry.arrival,
                now,
                now - entry.arrival,
                math.nan,
                reason,
            )
        )

    def _drop_waiting(self, entry: _Entry, now: float, reason: str) -> None:
        """Drop a packet already taken out of the buffer (CoDel at dequeue, drophead)."""
        self._unhold(entry)
        self._drop(entry, now, reason)

    def _mark(self, entry: _Entry) -> bool:
        marked = set_ce(entry.data, self.offset, tap=self.tap)
        if marked is None:
            return False
        entry.data = marked
        if not entry.marked:
            entry.marked = True
            self.marked += 1
        return True

    def _hold(self, entry: _Entry) -> None:
        self.packets += entry.count
        self.bytes += entry.size
        if self.packets > self.peak:
            self.peak = self.packets

    def _unhold(self, entry: _Entry) -> None:
        self.packets -= entry.count
        self.bytes -= entry.size

    def _overflows(self, entry: _Entry) -> bool:
        if self.packets == 0:
            return False  # an empty direction always takes a packet, however large
        return (
            self.packets + entry.count > self._limit or self.bytes + entry.size > self._limit_bytes
        )

    def _make_room(self, entry: _Entry) -> bool:
        """drophead: drop the oldest waiting packets until ``entry`` fits; False if it
        cannot (then nothing was dropped)."""
        if self.spec.discipline != "drophead":
            return False
        # Whether dropping every waiting packet would be enough, before dropping any.
        left_count = self.packets - self._waiting_count
        left_bytes = self.bytes - self._waiting_bytes
        if left_count > 0 and (
            left_count + entry.count > self._limit or left_bytes + entry.size > self._limit_bytes
        ):
            return False
        now = self._clock
        while self._waiting and self._overflows(entry):
            victim = self._pop()
            assert victim is not None
            self._drop_waiting(victim, now, "limit")
        return True

    def _take(self) -> list[Outcome]:
        out = self._out
        if not out:
            return []
        self._out = []
        if len(out) > 1:
            out.sort(key=_outcome_time)  # stable: equal times keep their order
        return out


def _outcome_time(outcome: Outcome) -> float:
    return outcome.time


class PacketQueue:
    """A :class:`LinkQueue` as the relay uses it (``_link.Queue``): relay ``Packet`` (or a
    :class:`~pytest_tunpair._link.link.Run` of segments, drop-tail only) in, ``(item,
    due)`` out, times on ``time.monotonic()``.

    A packet is sized by :func:`wire_size` (a GSO super-packet passed whole counts as its
    segments and their length on a real wire). What leaves is relabelled: ``"delayed"`` if
    the link held it at all, ``"marked"`` (in a new ``Packet`` around the CE-marked frame)
    if ECN marked it; a drop comes back with ``due`` ``None`` and action ``"dropped"``.
    """

    __slots__ = ("_ready", "queue", "vnet_len")

    def __init__(self, queue: LinkQueue, vnet_len: int) -> None:
        self.queue = queue
        self.vnet_len = vnet_len
        self._ready: list[tuple[Item, float | None]] = []

    @property
    def runs(self) -> bool:
        """It takes runs of segments (drop-tail): the relay hands it those, not packets."""
        return self.queue.runs

    def enqueue(self, pkt: Item, now: float, latency: float | None = None) -> list[Item]:
        """Take ``pkt`` (read at ``now``; ``latency``: its propagation delay, default the
        queue's ``delay``); return the packets dropped now. What became ready meanwhile
        waits for the next :meth:`dequeue_ready`."""
        if isinstance(pkt, Packet):
            frame = pkt.frame
            size, count = wire_size(frame, self.vnet_len, tap=self.queue.tap)
            outcomes = self.queue.enqueue(
                frame, now, tag=pkt, size=size, count=count, latency=latency
            )
        else:
            outcomes = self.queue.enqueue_run(
                pkt, pkt.plan, pkt.first, pkt.count, now, latency=latency
            )
        dropped = []
        for outcome in outcomes:
            pkt_out, due = self._convert(outcome)
            if due is None:
                dropped.append(pkt_out)
            else:
                self._ready.append((pkt_out, due))
        return dropped

    def dequeue_ready(self, now: float) -> list[tuple[Item, float | None]]:
        """Packets due at the far end by ``now`` and packets the AQM dropped by then, in
        order; ``dequeue_ready(math.inf)`` lets the link serve everything it holds."""
        ready, self._ready = self._ready, []
        ready.extend(self._convert(o) for o in self.queue.advance(now))
        return ready

    def deadline(self) -> float | None:
        if self._ready:
            return -math.inf
        return self.queue.deadline()

    def __len__(self) -> int:
        """Packets held now, in the units of ``limit`` (read from any thread)."""
        return self.queue.packets

    @property
    def peak(self) -> int:
        return self.queue.peak

    def _convert(self, outcome: Outcome) -> tuple[Item, float | None]:
        pkt = outcome.tag
        if not isinstance(pkt, Packet):
            # A run: the part this outcome covers, relabelled as a packet would be.
            assert isinstance(pkt, Run)
            if outcome.action == "dropped":
                return pkt.part(outcome.first, outcome.count, "dropped"), None
            action = pkt.action
            if action == "forwarded" and outcome.time > outcome.arrival:
                action = "delayed"
            if outcome.first == pkt.first and outcome.count == pkt.count:
                pkt.action = action
                return pkt, outcome.time
            return pkt.part(outcome.first, outcome.count, action), outcome.time
        if outcome.action == "dropped":
            pkt.action = "dropped"
            return pkt, None
        if outcome.action == "marked":
            action = "marked" if pkt.action in _MARKABLE else pkt.action
            marked = Packet(
                pkt.arrival, pkt.direction, action, outcome.data, self.vnet_len, pkt.mode,
                pkt.arrival,
            )  # fmt: skip
            return marked, outcome.time
        if pkt.action == "forwarded" and outcome.time > outcome.arrival:
            pkt.action = "delayed"
        return pkt, outcome.time


# Labels a CE mark replaces: those saying only *when* a packet left. The others (modified,
# corrupted, duplicated) say more about the bytes the receiver got, and are kept.
_MARKABLE = frozenset({"forwarded", "delayed", "reordered", "marked"})


# -- disciplines ------------------------------------------------------------------------------


class _Aqm(Protocol):
    def on_enqueue(self, entry: _Entry, now: float) -> Literal["drop", "mark"] | None: ...

    def on_overflow(self) -> None: ...

    def on_dequeue(self, now: float) -> _Entry | None: ...


class _CoDel:
    """RFC 8289 section 5, state and control law; drops (or marks) at dequeue."""

    __slots__ = (
        "count",
        "drop_next",
        "dropping",
        "first_above_time",
        "interval",
        "lastcount",
        "mtu",
        "pop",
        "queue",
        "target",
    )

    def __init__(
        self, queue: LinkQueue, spec: QueueSpec, pop: Callable[[], _Entry | None] | None = None
    ) -> None:
        self.queue = queue
        #: Takes the head of the queue it controls (a flow's, under fq_codel).
        self.pop = queue._pop if pop is None else pop
        self.target = spec.effective_target
        self.interval = spec.effective_interval
        self.mtu = spec.mtu
        self.first_above_time = 0.0  # 0: "not above target" (RFC 8289's sentinel)
        self.drop_next = 0.0
        self.count = 0
        self.lastcount = 0
        self.dropping = False

    def on_enqueue(self, entry: _Entry, now: float) -> None:
        return None

    def on_overflow(self) -> None:
        pass

    def _control_law(self, t: float) -> float:
        return t + self.interval / math.sqrt(self.count)

    def _dodequeue(self, now: float) -> tuple[_Entry | None, bool]:
        """RFC 8289's dodequeue(): the head and whether it is OK to drop it."""
        entry = self.pop()
        if entry is None:
            self.first_above_time = 0.0
            return None, False
        sojourn = now - entry.arrival
        # RFC 8289: below target, or no more than one packet's worth left in the buffer
        # (a lone packet cannot be a standing queue).
        if sojourn < self.target or self.queue._waiting_bytes <= self.mtu:
            self.first_above_time = 0.0
            return entry, False
        if self.first_above_time == 0.0:
            self.first_above_time = now + self.interval
            return entry, False
        return entry, now >= self.first_above_time

    def _drop_or_mark(self, entry: _Entry, now: float) -> bool:
        """True if ``entry`` was marked (and is to be sent), False if it was dropped."""
        queue = self.queue
        if queue.spec.ecn and queue._mark(entry):
            return True
        queue._drop_waiting(entry, now, "codel")
        return False

    def on_dequeue(self, now: float) -> _Entry | None:
        entry, ok_to_drop = self._dodequeue(now)
        if entry is None:
            self.dropping = False
            return None
        if self.dropping:
            if not ok_to_drop:
                self.dropping = False
            while entry is not None and self.dropping and now >= self.drop_next:
                self.count += 1
                if self._drop_or_mark(entry, now):
                    # A mark delivers this packet: schedule the next signal and stop here.
                    self.drop_next = self._control_law(self.drop_next)
                    return entry
                entry, ok_to_drop = self._dodequeue(now)
                if entry is None or not ok_to_drop:
                    self.dropping = False
                else:
                    self.drop_next = self._control_law(self.drop_next)
        elif ok_to_drop:
            if not self._drop_or_mark(entry, now):
                entry, _ = self._dodequeue(now)
            self.dropping = True
            # RFC 8289: if we left the dropping state only recently, the drop rate that
            # controlled the queue then is a good starting point now.
            delta = self.count - self.lastcount
            self.count = 1
            if delta > 1 and now - self.drop_next < 16 * self.interval:
                self.count = delta
            self.drop_next = self._control_law(now)
            self.lastcount = self.count
        return entry


class _Pie:
    """RFC 8033: drop probability updated every ``tupdate``, drops (or marks) at enqueue."""

    __slots__ = (
        "accu_prob",
        "burst_allowance",
        "derandomize",
        "drop_prob",
        "ecn",
        "mtu",
        "next_update",
        "qdelay",
        "qdelay_old",
        "queue",
        "rng",
        "target",
        "tupdate",
    )

    def __init__(self, queue: LinkQueue, spec: QueueSpec, rng: random.Random) -> None:
        self.queue = queue
        self.rng = rng
        self.target = spec.effective_target
        self.tupdate = PIE_TUPDATE
        self.mtu = spec.mtu
        self.ecn = spec.ecn
        self.derandomize = spec.derandomize
        self.drop_prob = 0.0
        self.accu_prob = 0.0
        self.qdelay = 0.0
        self.qdelay_old = 0.0
        self.burst_allowance = PIE_MAX_BURST
        self.next_update = math.nan  # set by the first event: updates run on its grid

    def _catch_up(self, now: float) -> None:
        """Run every periodic update whose time has come by ``now``."""
        if self.next_update != self.next_update:  # nan: first event
            self.next_update = now + self.tupdate
            return
        while self.next_update <= now:
            if self._at_rest():
                # Nothing changes until the next packet: skip the idle updates at once.
                steps = math.floor((now - self.next_update) / self.tupdate) + 1
                self.next_update += steps * self.tupdate
                return
            self._update()
            self.next_update += self.tupdate

    def _at_rest(self) -> bool:
        return (
            self.drop_prob == 0.0
            and self.qdelay == 0.0
            and self.qdelay_old == 0.0
            and self.burst_allowance == PIE_MAX_BURST
            and not self.queue._waiting
        )

    def _update(self) -> None:
        """RFC 8033 section 4.2-4.4: calculate_drop_prob()."""
        qdelay, qdelay_old = self.qdelay, self.qdelay_old
        p = PIE_ALPHA * (qdelay - self.target) + PIE_BETA * (qdelay - qdelay_old)
        prob = self.drop_prob
        # Auto-tuning (section 4.2): small steps while the probability is small, so a
        # light load is not hit by a jump of several percent.
        if prob < 0.000001:
            p /= 2048
        elif prob < 0.00001:
            p /= 512
        elif prob < 0.0001:
            p /= 128
        elif prob < 0.001:
            p /= 32
        elif prob < 0.01:
            p /= 8
        elif prob < 0.1:
            p /= 2
        if prob >= 0.1 and p > 0.02:
            p = 0.02  # cap the step at 2% once the probability is high
        prob += p
        if qdelay == 0.0 and qdelay_old == 0.0:
            prob *= 0.98  # decay exponentially once congestion is gone
        self.drop_prob = min(1.0, max(0.0, prob))
        self.burst_allowance = max(0.0, self.burst_allowance - self.tupdate)
        # Section 4.4: a quiet queue earns its burst allowance back.
        if self.drop_prob == 0.0 and qdelay < self.target / 2 and qdelay_old < self.target / 2:
            self.burst_allowance = PIE_MAX_BURST
            self.accu_prob = 0.0
        self.qdelay_old = qdelay

    def on_enqueue(self, entry: _Entry, now: float) -> Literal["drop", "mark"] | None:
        self._catch_up(now)
        if not self._drop_early():
            return None
        self.accu_prob = 0.0
        if (
            self.ecn
            and self.drop_prob <= PIE_MARK_ECNTH
            and ecn_codepoint(entry.data, self.queue.offset, tap=self.queue.tap)
            in (ECN_ECT0, ECN_ECT1)
        ):
            return "mark"
        return "drop"

    def on_overflow(self) -> None:
        self.accu_prob = 0.0  # RFC 8033 enque(): a drop is a drop, whoever made it

    def _drop_early(self) -> bool:
        """RFC 8033 section 4.1 and 5.4: drop_early()."""
        if self.burst_allowance > 0.0:
            return False
        prob = self.drop_prob
        if self.qdelay_old < self.target / 2 and prob < 0.2:
            return False
        if self.queue._waiting_bytes <= 2 * self.mtu:
            return False
        if not self.derandomize:
            return self.rng.random() < prob
        if prob == 0.0:
            self.accu_prob = 0.0
        self.accu_prob += prob
        # Section 5.4: no drop until 0.85 is accumulated, a certain drop at 8.5: the gaps
        # between drops are kept from being very short or very long.
        if self.accu_prob < 0.85:
            return False
        if self.accu_prob >= 8.5:
            return True
        return self.rng.random() < prob

    def on_dequeue(self, now: float) -> _Entry | None:
        self._catch_up(now)
        entry = self.queue._pop()
        if entry is None:
            return None
        # Timestamp-based delay (Linux's default): the sojourn of the packet leaving, or 0
        # once the buffer is empty, so an idle link reads as "no delay".
        self.qdelay = now - entry.arrival if self.queue._waiting else 0.0
        return entry


class _Flow:
    """One fq_codel flow queue: its packets, DRR deficit and CoDel state."""

    __slots__ = ("backlog", "codel", "deficit", "entries", "listed")

    def __init__(self, queue: LinkQueue, spec: QueueSpec) -> None:
        self.entries: deque[_Entry] = deque()
        self.backlog = 0  # bytes waiting
        self.deficit = 0
        self.listed = False  # on the new or the old list
        self.codel = _CoDel(queue, spec, self.pop)
        self.codel.queue = queue

    def pop(self) -> _Entry | None:
        if not self.entries:
            return None
        entry = self.entries.popleft()
        self.backlog -= entry.size
        entry.taken = True
        queue = self.codel.queue
        queue._waiting_bytes -= entry.size
        queue._waiting_count -= entry.count
        return entry


class _FqCoDel:
    """RFC 8290: packets hashed by their 5-tuple (with a seeded perturbation) into
    ``flows`` queues, each under its own CoDel (RFC 8289), served by deficit round robin
    with a ``quantum`` of bytes: flows that just became active (the new list) go before
    the others (the old list), so a sparse flow's packets skip the bulk flows' queues. At
    the bound, packets are dropped from the head of the flow with the largest backlog
    (Linux's fq_codel_drop), not from the arriving flow."""

    __slots__ = ("flows", "new", "old", "perturbation", "quantum", "queue", "spec", "table")

    def __init__(self, queue: LinkQueue, spec: QueueSpec, perturbation: int) -> None:
        self.queue = queue
        self.spec = spec
        self.flows = spec.flows
        self.quantum = spec.effective_quantum
        self.perturbation = perturbation
        self.table: dict[int, _Flow] = {}  # flow queues made when first used
        self.new: deque[_Flow] = deque()
        self.old: deque[_Flow] = deque()

    def classify(self, data: bytes) -> int:
        """The flow queue of a packet: its 5-tuple hashed with the perturbation (a packet
        that is not TCP/UDP/... hashes by addresses and protocol)."""
        queue = self.queue
        f = _h.parse(data, queue.offset, "tap" if queue.tap else "tun")
        src = _h.packed_address(data, f, 0) or b""
        dst = _h.packed_address(data, f, 1) or b""
        key = b"%b|%b|%d|%d|%d" % (
            src,
            dst,
            f[_h.IP_PROTO] or 0,
            f[_h.SPORT] or 0,
            f[_h.DPORT] or 0,
        )
        return zlib.crc32(key, self.perturbation) % self.flows

    def on_enqueue(self, entry: _Entry, now: float) -> None:
        index = self.classify(entry.data)
        flow = self.table.get(index)
        if flow is None:
            flow = self.table[index] = _Flow(self.queue, self.spec)
        entry.flow = flow
        flow.entries.append(entry)
        flow.backlog += entry.size
        if not flow.listed:  # RFC 8290 4.1.1: a newly active flow joins the new list
            flow.listed = True
            flow.deficit = self.quantum
            self.new.append(flow)

    def on_overflow(self) -> None:
        pass

    def drop_fattest(self, now: float) -> bool:
        """Drop the head of the flow queue holding the most bytes; False if none waits."""
        fattest = max(self.table.values(), key=_backlog, default=None)
        if fattest is None or not fattest.entries:
            return False
        entry = fattest.pop()
        assert entry is not None
        self.queue._drop_waiting(entry, now, "limit")
        return True

    def on_dequeue(self, now: float) -> _Entry | None:
        """RFC 8290 4.1.2: the next packet by DRR over the new, then the old list."""
        new, old = self.new, self.old
        while True:
            if new:
                flows = new
            elif old:
                flows = old
            else:
                return None
            flow = flows[0]
            if flow.deficit <= 0:
                flow.deficit += self.quantum
                flows.popleft()
                old.append(flow)
                continue
            entry = flow.codel.on_dequeue(now)
            if entry is None:
                flows.popleft()
                # An emptied new flow goes through the old list once before it is
                # forgotten (RFC 8290 4.1.2): it cannot starve the old ones by coming back.
                if flows is new and old:
                    old.append(flow)
                else:
                    flow.listed = False
                continue
            flow.deficit -= entry.size
            return entry


def _backlog(flow: _Flow) -> int:
    return flow.backlog
