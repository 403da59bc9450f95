"""What the relay carried: the live, thread-safe ``Capture`` of ``Packet`` records.

The relay thread appends; test code reads. A ``Packet`` (:mod:`.packet`) keeps the buffer
as read; matching, flows, pcap files and plots work over the capture's snapshots. Every wait
has an awaitable form for coroutines (``wait_for_async``, ...; :mod:`.aio`).
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, overload

from .._errors import PacketTimeout
from . import aio as _aio
from . import flows as _flows
from . import match as _match
from . import plot as _plot
from .flows import Flow
from .packet import DIRECTIONS, Packet, PacketBatch, SegmentGroup, kept_len, trace
from .pcap import FORMATS, write_pcap, write_pcapng

if TYPE_CHECKING:
    from .keylog import KeyLog
    from .tls import TlsRecord

__all__ = ["Capture"]

# Lines of trace a PacketTimeout message shows at most.
TIMEOUT_TRACE_LINES = 30
#: What the ``capture_bytes`` budget charges per kept packet besides its bytes: the Packet
#: object, its timestamp, the bytes object's header, the deque slot and allocator headers
#: (measured: about 280 bytes per MTU-sized packet with CPython 3.11 on x86-64).
PACKET_OVERHEAD = 320
#: ... plus 1/2**SLACK_SHIFT of its bytes: heap the allocator cannot hand out again while
#: the capture churns through 64 KiB super-packets (measured: about 3 % of a full capture).
SLACK_SHIFT = 4


def _nothing_configured(direction: str) -> None:
    return None


def _waits(seconds: object) -> bool:
    """A valid, positive wait (a bad value gets its own error from the wait)."""
    return isinstance(seconds, int | float) and not isinstance(seconds, bool) and seconds > 0


def _no_keylog() -> None:
    return None


# Entries of the capture that stand for several packets, expanded by the first reader.
_GROUPS = (SegmentGroup, PacketBatch)
_Entry = Packet | SegmentGroup | PacketBatch


def _packets_of(item: _Entry) -> list[Packet]:
    return item.expand() if type(item) in _GROUPS else [item]  # type: ignore[union-attr,list-item]


class PullLock:
    """The capture's lock (under its condition). Taking it first runs ``pull``, if set:
    the relay's C core records packets outside Python (``_link/_core.c``), and ``pull``
    brings them in (:meth:`Capture.record_locked`), so whoever takes the lock -- a reader,
    ``tun_pair.stats``, the relay itself -- sees every packet written so far, in order."""

    __slots__ = ("_lock", "pull")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.pull: Callable[[], None] | None = None

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if not self._lock.acquire(blocking, timeout):
            return False
        pull = self.pull
        if pull is not None:
            try:
                pull()
            except BaseException:
                self._lock.release()
                raise
        return True

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()


class Capture(Sequence[Packet]):
    """A live, thread-safe sequence of :class:`Packet` (``tun_pair.packets``).

    The relay thread appends while the test reads. Reading methods work on a snapshot taken
    under the lock, so iterating never sees the sequence change underneath it. Indexes
    count the packets kept *now*: once a bound (``max_packets``, ``capture_bytes``) or
    :meth:`clear` drops old packets, ``packets[0]`` is the oldest one left.
    """

    def __init__(
        self,
        *,
        mode: str = "tun",
        max_packets: int | None = None,
        capture_bytes: int | None = None,
        snaplen: int | None = None,
        pending: Callable[[], int] | None = None,
        configured: Callable[[str], Any] | None = None,
        keylog: Callable[[], KeyLog | None] | None = None,
        interfaces: tuple[str, ...] = (),
    ) -> None:
        self.mode = mode
        """``"tun"`` or ``"tap"``: raw IP packets or Ethernet frames (and the pcap's link type)."""
        #: Packets held in the relay right now (delayed, queued, with a hook); the pair sets
        #: it, :meth:`wait_quiet` asks it.
        self.pending = pending
        self.max_packets = max_packets
        """Keep at most this many packets (the newest); ``None``: no count limit."""
        self.capture_bytes = capture_bytes
        """Byte budget of the record (packets plus bookkeeping); beyond it the oldest are forgotten.
        ``None``: no budget.
        """
        self.snaplen = snaplen
        """Keep only the first N bytes of each packet (``len(packet)`` stays the wire length);
        ``None``: whole packets.
        """
        # Packets, and groups of segments a per-segment link recorded at once: a group is
        # expanded into its packets by the first reader (_expand), off the relay's hot path.
        self._packets: deque[_Entry] = deque()
        self._count = 0  # packets kept (a group counts as its segments)
        self._groups = 0  # groups not expanded yet
        self._first_group = 0  # seq of the oldest of them
        self._bytes = 0
        self._next_seq = 0
        self._waiters = 0
        self._lock = PullLock()
        self._cond = threading.Condition(self._lock)  # type: ignore[arg-type]
        # Told how many threads wait on the condition (a source that records outside
        # Python wakes them only while some do): set with the source (set_source).
        self._on_waiters: Callable[[int], None] | None = None
        self._evicted = 0
        self.t0 = time.monotonic()
        """``time.monotonic()`` when the capture began: ``Packet.time`` counts from here."""
        self.wall_t0 = time.time()
        """``time.time()`` at the same moment: the pcap's wall-clock timestamps are ``wall_t0 +
        Packet.time``.
        """
        # What a direction's link is configured to carry, for plot()'s dashed line: bits/s,
        # a trace's server, or None. Asked of the pair's direction objects, its one record.
        self._configured = configured or _nothing_configured
        # The pair's TLS/QUIC key log, once it has one (asked of the pair, its owner): its
        # secrets go into the pcapng files written from this capture.
        self._keylog = keylog or _no_keylog
        self.interfaces = interfaces
        """How pcapng files describe the two directions, ``a->b`` first
        (``"tun0 198.18.0.1 -> tun1 198.18.0.2"``); ``()``: no descriptions."""

    # -- relay side ---------------------------------------------------------------------
    @property
    def lock(self) -> threading.Condition:
        """The capture's lock. The relay holds it while it records a batch *and* writes it
        (:meth:`record_locked`), so a reader never sees an action that changes afterwards
        (a write that fails turns "forwarded" into "dropped" before anyone can look)."""
        return self._cond

    def set_source(
        self, pull: Callable[[], None] | None, on_waiters: Callable[[int], None] | None = None
    ) -> None:
        """Packets recorded elsewhere (the relay's C core): ``pull()`` records them (called
        with the lock held, each time it is taken); ``on_waiters(n)`` is told how many
        threads wait for new packets. ``None``: no source."""
        with self._cond:
            self._lock.pull = pull
            self._on_waiters = on_waiters

    def record(self, pkt: Packet) -> None:
        """Append one packet."""
        with self._cond:
            self.record_locked((pkt,))

    def record_locked(self, pkts: Sequence[_Entry]) -> None:
        """Append packets (and groups of segments, each standing for its ``count``
        packets) in order; the caller holds :attr:`lock`.

        Cuts to ``snaplen`` and enforces the bounds. ``capture_bytes`` is charged what the
        kept packets cost the process, not just their bytes: :data:`PACKET_OVERHEAD` per
        packet and :data:`SLACK_SHIFT` for allocator slack, so that a capture at its bound
        grows the process by no more than the bound, whether it holds a thousand 64 KB
        super-packets or a hundred thousand ACKs. ``nbytes`` stays the packets' bytes.
        """
        snaplen = self.snaplen
        if snaplen is not None:
            if self._groups or any(type(p) in _GROUPS for p in pkts):
                pkts = [q for p in pkts for q in _packets_of(p)]
            for pkt in pkts:
                assert isinstance(pkt, Packet)
                if pkt.wire_len > snaplen:
                    # A copy of the first bytes: the relay writes its own reference to the
                    # whole buffer, which is then freed.
                    pkt._raw = pkt._raw[: pkt._off + snaplen]
                    pkt._data = None if pkt._off else pkt._raw
        size = 0
        seq = self._next_seq
        count = 0
        for pkt in pkts:
            pkt.seq = seq
            if not isinstance(pkt, Packet):  # a group
                if not self._groups:
                    self._first_group = seq
                self._groups += 1
                seq += pkt.count
                count += pkt.count
                size += pkt.kept
            else:
                seq += 1
                count += 1
                size += kept_len(pkt)
        self._next_seq = seq
        self._count += count
        packets = self._packets
        packets.extend(pkts)
        self._bytes += size
        if self.max_packets is not None:
            while self._count > self.max_packets:
                self._evict(self._count - self.max_packets)
        budget = self.capture_bytes
        if budget is not None:
            while (
                packets
                and self._bytes + (self._bytes >> SLACK_SHIFT) + self._count * PACKET_OVERHEAD
                > budget
            ):
                self._evict(None)
        if self._waiters:
            # Waiters wake once the caller releases the lock: after the batch's writes.
            self._cond.notify_all()

    def _evict(self, at_most: int | None) -> None:
        """Forget the oldest entry: a group whole if that is not more than ``at_most``
        packets (``None``: any group), else its first packet."""
        packets = self._packets
        old = packets.popleft()
        if not isinstance(old, Packet):  # a group
            if type(old) is PacketBatch and old.count > 1:
                # A batch of the C core may hold thousands: a bound keeps its newest,
                # trimmed from the front without making the rest into packets. Under the
                # byte budget a sixteenth at a time (it may end up to that much below).
                n = max(1, old.count // 16) if at_most is None else min(at_most, old.count - 1)
                packets.appendleft(old)
                self._bytes -= old.drop_first(n)
                self._count -= n
                self._evicted += n
                return
            self._groups -= 1
            if at_most is not None and old.count > at_most:
                expanded = old.expand()
                packets.extendleft(reversed(expanded[1:]))
                old = expanded[0]
            else:
                self._bytes -= old.kept
                self._count -= old.count
                self._evicted += old.count
                return
        self._bytes -= kept_len(old)
        self._count -= 1
        self._evicted += 1

    def _expand(self) -> deque[Packet]:
        """The kept packets, every group expanded (caller holds the lock). Packets before
        the oldest group are numbered consecutively, so it is one subtraction away."""
        packets = self._packets
        if self._groups:
            start = self._first_group - packets[0].seq if packets else 0
            if start < 0 or start > len(packets):
                start = 0
            tail = [packets.pop() for _ in range(len(packets) - start)]
            for item in reversed(tail):
                packets.extend(_packets_of(item))
            self._groups = 0
        return packets  # type: ignore[return-value]

    # -- sequence protocol ----------------------------------------------------------------
    def _snapshot(self) -> list[Packet]:
        with self._cond:
            return list(self._expand())

    def __len__(self) -> int:
        with self._cond:  # the lock pulls what the relay's C core recorded
            return self._count

    def __iter__(self) -> Iterator[Packet]:
        return iter(self._snapshot())

    def __reversed__(self) -> Iterator[Packet]:
        return reversed(self._snapshot())

    def __contains__(self, value: object) -> bool:
        return value in self._snapshot()

    def index(self, value: Any, start: int = 0, stop: int | None = None) -> int:
        """Position of ``value`` among the packets kept now (``Sequence.index``)."""
        snapshot = self._snapshot()
        return snapshot.index(value, start, len(snapshot) if stop is None else stop)

    def count(self, value: Any) -> int:
        """How many of the packets kept now equal ``value`` (``Sequence.count``)."""
        return self._snapshot().count(value)

    @overload
    def __getitem__(self, index: int) -> Packet: ...
    @overload
    def __getitem__(self, index: slice) -> list[Packet]: ...
    def __getitem__(self, index: int | slice) -> Packet | list[Packet]:
        with self._cond:
            packets = self._expand()
            if isinstance(index, slice):
                return list(packets)[index]
            return packets[index]

    def __bool__(self) -> bool:
        return len(self) > 0

    def __repr__(self) -> str:
        extra = f", {self.evicted} older not kept" if self.evicted else ""
        return f"<Capture {len(self)} packets{extra}>"

    @property
    def nbytes(self) -> int:
        """Bytes the kept packets hold, as read from the device. (``capture_bytes`` charges
        more per packet, see :meth:`record_locked`; decoded scapy objects come on top.)"""
        with self._cond:
            return self._bytes

    def clear(self) -> None:
        """Forget what was captured so far; the relay keeps running and recording.

        ``tun_pair.stats`` keeps counting from where it was.
        """
        with self._cond:
            self._packets.clear()
            self._count = self._groups = 0
            self._bytes = 0
            self._evicted = 0

    @property
    def evicted(self) -> int:
        """Packets recorded but no longer kept because of a bound (:meth:`clear` not counted)."""
        with self._cond:
            return self._evicted

    def mark(self) -> int:
        """The sequence number the next recorded packet gets: ``since(mark)`` later returns
        what was recorded from now on."""
        with self._cond:  # the lock pulls what the relay's C core recorded
            return self._next_seq

    def since(self, start: int) -> list[Packet]:
        """Kept packets whose sequence number (``Packet.seq``) is ``start`` or later, e.g.
        ``tun_pair.packets.since(tun_pair.test_start)``: the current test's packets."""
        if isinstance(start, bool) or not isinstance(start, int):
            raise TypeError(f"since({start!r}): give a sequence number (Packet.seq, mark())")
        with self._cond:
            return self._since(start - 1)

    def view(self, start: int) -> Capture:
        """A frozen :class:`Capture` of the packets :meth:`since` ``start`` (for reports and
        pcap files of one test of a longer-lived pair)."""
        out = Capture(
            mode=self.mode,
            max_packets=self.max_packets,
            capture_bytes=self.capture_bytes,
            snaplen=self.snaplen,
            configured=self._configured,
            keylog=self._keylog,
            interfaces=self.interfaces,
        )
        out.t0, out.wall_t0 = self.t0, self.wall_t0
        with self._cond:
            packets = self._since(start - 1)
            first = self._packets[0].seq if self._packets else self._next_seq
            out._evicted = max(0, min(first, self._next_seq) - start)
            out._next_seq = self._next_seq
        out._packets.extend(packets)
        out._count = len(packets)
        out._bytes = sum(kept_len(p) for p in packets)
        return out

    def _since(self, seq: int) -> list[Packet]:
        """Packets with a sequence number above ``seq`` (caller holds the lock).

        Sequence numbers are consecutive in the deque (assigned under the lock; bounds and
        ``clear`` only ever remove from the left), so the start is one subtraction away.
        """
        packets = self._expand()
        if not packets:
            return []
        start = max(0, seq + 1 - packets[0].seq)
        if start >= len(packets):
            return []
        return list(itertools.islice(packets, start, None))

    @property
    def last_seq(self) -> int:
        """``seq`` of the newest packet recorded so far (kept or not), ``-1`` before the
        first: expectations that look only at what comes next start after it."""
        with self._cond:
            return self._next_seq - 1

    def wait_for(
        self,
        match: Any = None,
        *,
        timeout: float = 2.0,
        direction: str | None = None,
        action: Any = None,
        **fields: Any,
    ) -> Packet:
        """The first packet, captured already or arriving within ``timeout`` s, that matches.

        ``match`` is a predicate (``lambda p: p.direction == "b->a"``), a scapy layer class
        (``wait_for(TCP)``) or a scapy template (see :meth:`expect`); the keywords filter as
        in :meth:`filter` (``wait_for(dport=53, direction="a->b")``). Every packet counts,
        whatever the relay did with it, unless ``action=`` says which. The match runs in
        the calling thread, outside the lock, so it may decode freely. Waiting is a
        condition variable the relay notifies on every packet: the call returns as soon as
        the packet is recorded, without polling.

        Raises :class:`~pytest_tunpair.PacketTimeout` (an ``AssertionError``) listing what
        was captured when nothing matched in time.
        """
        __tracebackhide__ = True
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0:
            raise ValueError(f"wait_for(timeout={timeout!r}): give a number of seconds >= 0")
        if _waits(timeout):
            _aio.refuse_blocking()
        by_fields = _match.packet_filter(
            direction=direction, action=action, fields=fields, what="wait_for"
        )
        what = []
        predicate = by_fields
        if match is not None:
            # Every action counts here (the relay's drops too), unlike in expect().
            matcher = _match.Matcher(match, action=_match.ANY_ACTION, what="wait_for")
            what.append(matcher.description)

            def predicate(p: Packet) -> bool:
                return by_fields(p) and matcher(p)

        what.extend(f"{k}={v!r}" for k, v in fields.items())
        what.extend(f"{k}={v!r}" for k, v in (("direction", direction), ("action", action)) if v)
        found = _match.wait_match(self, predicate, after_seq=-1, timeout=timeout)
        if found is not None:
            return found
        packets = self._snapshot()
        evicted = self._evicted
        raise PacketTimeout(
            f"no packet matched {', '.join(what) or 'anything'} within {timeout:g} s; "
            f"{len(packets)} captured:\n",
            packets=packets,
            details=lambda: trace(packets, limit=TIMEOUT_TRACE_LINES, evicted=evicted),
        )

    wait_for_async = _aio.async_form(wait_for, "packets")  # type: ignore[arg-type]
    """``await packets.wait_for_async(...)``: :meth:`wait_for` in a coroutine (asyncio, trio,
    anyio): same arguments, result and errors, and the event loop keeps running meanwhile."""

    def filter(
        self, *layers: Any, direction: str | None = None, action: Any = None, **fields: Any
    ) -> list[Packet]:
        """The kept packets with every given scapy layer (class or name) and every given
        field: ``filter(TCP, direction="b->a", dport=80, flags="SA")``.

        Fields are the :class:`Packet` attributes parsed without scapy (``src``, ``dst``,
        ``proto``, ``sport``, ``dport``, ``flags``, ...); a value is compared for equality
        or, if callable, called with the field's value (``sport=lambda p: p > 1024``;
        packets without the field never match). ``action`` is a value or a predicate too.
        An unknown keyword is a ``TypeError`` listing the valid ones.
        """
        predicate = _match.packet_filter(layers, direction=direction, action=action, fields=fields)
        return [p for p in self._snapshot() if predicate(p)]

    # -- expectations (PTF's verify_packet / verify_no_packet, packetdrill's sequences) ------
    def expect(
        self,
        template: Any,
        *,
        direction: str | None = None,
        timeout: float = 2.0,
        after: Any = None,
        ignore: Iterable[str] = (),
        action: Any = None,
    ) -> Packet:
        """The first packet matching the scapy ``template`` in the fields it sets.

        ``expect(IP(dst=pair.b.ip) / TCP(flags="SA"))`` matches a SYN-ACK to b whatever its
        ports, sequence numbers or TTL: a packet matches when its decoded layers contain
        the template's, in order, and each field the template sets explicitly is equal.
        ``ignore=("IP.ttl",)`` leaves set fields out. Packets captured after ``after`` (a
        ``Packet`` or a time like ``Packet.time``; default: all kept) or arriving within
        ``timeout`` s count, if the relay delivered them (``action=`` to choose otherwise).
        Returns the packet; raises :class:`~pytest_tunpair.PacketTimeout` showing, for the
        three closest packets, each field that differed (``TCP.flags: expected 'R', got
        'SA'``), then the trace. ``template`` may also be a predicate or a layer class.
        """
        __tracebackhide__ = True
        if _waits(timeout):
            _aio.refuse_blocking()
        return _match.expect(
            self,
            template,
            direction=direction,
            timeout=timeout,
            after=after,
            ignore=ignore,
            action=action,
        )

    expect_async = _aio.async_form(expect, "packets")
    """``await packets.expect_async(...)``: :meth:`expect` in a coroutine (asyncio, trio,
    anyio): same arguments, result and errors, and the event loop keeps running meanwhile."""

    def expect_none(
        self,
        match: Any,
        *,
        during: float = 0.5,
        direction: str | None = None,
        after: Any = None,
        ignore: Iterable[str] = (),
        action: Any = None,
    ) -> None:
        """Fail with :class:`~pytest_tunpair.UnexpectedPacket` if a delivered packet
        matching ``match`` (template, predicate or layer class) is captured within
        ``during`` s -- or was, since ``after``. A packet the relay dropped does not count
        (it never arrived) unless ``action=`` says so."""
        __tracebackhide__ = True
        if _waits(during):
            _aio.refuse_blocking()
        _match.expect_none(
            self,
            match,
            during=during,
            direction=direction,
            after=after,
            ignore=ignore,
            action=action,
        )

    expect_none_async = _aio.async_form(expect_none, "packets")
    """``await packets.expect_none_async(...)``: :meth:`expect_none` in a coroutine (asyncio,
    trio, anyio): same arguments and errors, and the event loop keeps running meanwhile."""

    def expect_sequence(
        self,
        templates: Sequence[Any],
        *,
        timeout: float = 2.0,
        direction: str | None = None,
        after: Any = None,
        action: Any = None,
    ) -> list[Packet]:
        """Each template (as in :meth:`expect`) matched by a packet after the previous
        one's match; ``timeout`` bounds the whole sequence. Returns the matched packets:
        ``syn, synack, ack = packets.expect_sequence([TCP(flags="S"), TCP(flags="SA"),
        TCP(flags="A")])``."""
        __tracebackhide__ = True
        if _waits(timeout):
            _aio.refuse_blocking()
        return _match.expect_sequence(
            self, templates, timeout=timeout, direction=direction, after=after, action=action
        )

    expect_sequence_async = _aio.async_form(expect_sequence, "packets")
    """``await packets.expect_sequence_async(...)``: :meth:`expect_sequence` in a coroutine
    (asyncio, trio, anyio): same arguments, result and errors, and the event loop keeps
    running meanwhile."""

    def wait_quiet(self, idle: float = 0.2, *, timeout: float = 5.0) -> None:
        """Return once nothing was recorded for ``idle`` s and nothing waits in the relay
        (delayed, queued, held back, with a hook): the conversation is over.

        Raises :class:`~pytest_tunpair.PacketTimeout` if the wire is still busy after
        ``timeout`` s, with the trace of the last packets.
        """
        __tracebackhide__ = True
        for name, value in (("idle", idle), ("timeout", timeout)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"wait_quiet({name}={value!r}): give a number of seconds >= 0")
        _aio.refuse_blocking()
        start = time.monotonic()
        deadline = start + timeout
        with self._cond:
            last = self._next_seq - 1
            if self._packets:
                quiet_since = min(start, self.t0 + self._packets[-1].time)
            else:  # nothing yet: quiet since the pair came up; cleared: count from now
                quiet_since = self.t0 if last < 0 else start
        pending = 0
        while True:
            now = time.monotonic()
            pending = self.pending() if self.pending is not None else 0
            if pending:
                quiet_since = now  # a held packet will be recorded when it leaves
            elif now - quiet_since >= idle:
                return
            if now >= deadline:
                break
            wake = min(deadline, quiet_since + idle) - now
            # Held packets (a delay, a hook) leave without a recording to wake us: poll them.
            new = self.wait_new(last, min(wake, 0.01) if pending else wake)
            if new:
                last = new[-1].seq
                quiet_since = time.monotonic()
            elif self.last_seq > last:  # recorded and evicted at once by a bound
                last = self.last_seq
                quiet_since = time.monotonic()
        packets = self._snapshot()
        evicted = self._evicted
        held = f", {pending} held in the relay" if pending else ""
        raise PacketTimeout(
            f"wait_quiet: the wire was not quiet for {idle:g} s within {timeout:g} s{held}; "
            f"{len(packets)} captured:\n",
            packets=packets,
            details=lambda: trace(packets, limit=TIMEOUT_TRACE_LINES, evicted=evicted),
        )

    wait_quiet_async = _aio.async_form(wait_quiet, "packets")
    """``await packets.wait_quiet_async(...)``: :meth:`wait_quiet` in a coroutine (asyncio,
    trio, anyio): same arguments and errors, and the event loop keeps running meanwhile."""

    def flows(self) -> list[Flow]:
        """The conversations in the capture, in order of their first packet: one
        :class:`~pytest_tunpair.Flow` per protocol and pair of endpoints."""
        return _flows.flows(self._snapshot())

    def summary(self, limit: int | None = None) -> str:
        """The trace, one tcpdump-like line per packet: time since the pair came up,
        direction, what the relay did, scapy's summary. Beyond ``limit`` lines, the first
        and the last packets with ``… N more`` between them."""
        if limit is not None and limit < 1:
            raise ValueError(f"summary(limit={limit!r}): give None or a number >= 1")
        return trace(self._snapshot(), limit=limit, evicted=self._evicted)

    def to_pcap(self, path: str | os.PathLike[str], *, format: str = "pcapng") -> str:
        """Write the kept packets to a capture file; return its path.

        ``format="pcapng"`` (the default): one interface per direction (``a->b``,
        ``b->a``) with the pair's link type (raw IP for TUN, Ethernet for TAP), every
        packet with its direction flags and a comment saying what the relay did
        (``lost (not delivered); sojourn ...``), and the pair's TLS/QUIC key log
        (``tun_pair.keylog``) as a Decryption Secrets Block, so that Wireshark and tshark
        open it decrypted. ``format="pcap"``: a classic pcap file, packets only, for tools
        that read nothing else. Timestamps are wall-clock times.
        """
        if format not in FORMATS:
            raise ValueError(f"to_pcap(format={format!r}): use 'pcapng' or 'pcap'")
        packets = self._snapshot()
        if format == "pcap":
            return write_pcap(
                path, packets, mode=self.mode, wall_t0=self.wall_t0, snaplen=self.snaplen
            )
        return write_pcapng(
            path,
            packets,
            mode=self.mode,
            wall_t0=self.wall_t0,
            snaplen=self.snaplen,
            secrets=self.secrets(),
            descriptions=self.interfaces,
        )

    def secrets(self) -> bytes:
        """The pair's TLS/QUIC key log (``tun_pair.keylog``) as written so far, whole lines
        only: what :meth:`to_pcap` embeds. ``b""`` without a key log. After the pair closed,
        what it held then."""
        keylog = self._keylog()
        return keylog.secrets() if keylog is not None else b""

    def tls_records(self, *, secrets: bytes | str | None = None) -> list[TlsRecord]:
        """The TLS records of every TLS-over-TCP connection in the capture, in the order
        their last bytes were captured, decrypted with the pair's key log
        (``tun_pair.keylog``) or with ``secrets`` (the text of an NSS key log).

        Each stream is read as its receiver read it: the packets the relay delivered, in
        TCP order, retransmissions once. TLS 1.3 and TLS 1.2 with AES-GCM or
        ChaCha20-Poly1305 are decrypted (``record.decrypted``); records it cannot open
        come back as they were sent. So ``b"".join(r.data for r in records if r.type ==
        "application_data" and r.direction == "a->b")`` is what a's TLS client sent, e.g.
        the HTTP/2 connection preface and frames. Needs ``cryptography``
        (``pip install 'pytest-tunpair[tls]'``).
        """
        try:
            import cryptography  # noqa: F401

            from . import tls as _tls
        except ImportError:
            raise ImportError(
                "tls_records() decrypts with the cryptography package: "
                "pip install 'pytest-tunpair[tls]'"
            ) from None
        if secrets is None:
            keys = self.secrets()
        else:
            keys = secrets.encode() if isinstance(secrets, str) else bytes(secrets)
        return _tls.tls_records(self._snapshot(), keys)

    def plot(self, path: str | os.PathLike[str], *, direction: str | None = None) -> str:
        """Write a PNG or SVG (by the extension) of the packets kept: throughput over time
        per direction (or ``direction`` only), with the configured rate or trace as a
        dashed line, above each packet's sojourn in the relay, drops marked -- the picture
        mahimahi's ``mm-throughput-graph`` gives. Returns the path.

        Needs matplotlib (``pip install 'pytest-tunpair[plot]'``); without it an
        ``ImportError`` says so. Import matplotlib before the test's tunnel (at the top of
        the test module): numpy's OpenBLAS starts worker threads when it loads, and threads
        started inside a test's namespace are reported as left running.
        """
        if direction is not None and direction not in DIRECTIONS:
            raise ValueError(f"plot(direction={direction!r}): use 'a->b', 'b->a' or None")
        # A trace server draws as its capacity per time bin; a rate as a level line.
        configured = {}
        for d in DIRECTIONS:
            link = self._configured(d)
            if link is not None:
                configured[d] = getattr(link, "capacity", link)
        return str(_plot.plot(self._snapshot(), path, direction=direction, configured=configured))

    def to_mahimahi_log(
        self, path: str | os.PathLike[str], *, direction: str = "a->b", drops: bool = True
    ) -> str:
        """Write ``direction``'s packets in the link-log format of mahimahi's ``mm-link``
        (``+`` arrivals, ``-`` departures with their delay, ``d`` drops, ``#`` a trace's
        delivery opportunities; ms since the pair came up), which mahimahi's
        ``mm-throughput-graph`` and ``mm-delay-graph`` read. ``drops=False`` leaves out the
        ``d`` lines, which the graph script in mahimahi's repository does not know.
        Returns the path."""
        if direction not in DIRECTIONS:
            raise ValueError(f"to_mahimahi_log(direction={direction!r}): use 'a->b' or 'b->a'")
        packets = self._snapshot()
        link: Any = self._configured(direction)
        opportunities: Any = ()
        if hasattr(link, "opportunity_times"):
            end = max((p.time for p in packets), default=0.0)
            opportunities = link.opportunity_times(end)
        return str(
            _plot.to_mahimahi_log(
                packets, path, direction=direction, drops=drops, opportunities=opportunities
            )
        )

    # -- live followers (the command line's trace) ---------------------------------------------
    def wait_new(self, after_seq: int, timeout: float) -> list[Packet]:
        """Kept packets recorded after sequence number ``after_seq`` (``-1``: from the start),
        waiting up to ``timeout`` s for the first one; ``[]`` if none came.

        For a follower thread that prints as the relay records (``tunpair run``): it sleeps on
        the capture's condition, so the relay pays for a ``notify`` only while someone waits.
        A jump in ``seq`` between calls means packets were evicted by the capture bounds.

        A wait on an event loop's thread raises :class:`~pytest_tunpair.BlockingWaitError`
        (the scripted peer's waits come through here); in an awaitable wait's own thread
        the wait ends as soon as the coroutine is cancelled (:mod:`.aio`).
        """
        token = _aio.cancel_token()
        if token is None and timeout > 0:
            _aio.refuse_blocking()
        with self._cond:
            new = self._since(after_seq)
            if new or timeout <= 0:
                return new
            if token is not None:
                token.watch(self._cond)
            self._waiters += 1
            try:
                if self._on_waiters is not None:
                    # Told first, then pulled: what the source records after the pull
                    # comes with a wake-up (see set_source).
                    self._on_waiters(self._waiters)
                    if self._lock.pull is not None:
                        self._lock.pull()
                    new = self._since(after_seq)
                    if new:
                        return new
                self._cond.wait(timeout)
            finally:
                self._waiters -= 1
                if self._on_waiters is not None:
                    self._on_waiters(self._waiters)
                if token is not None:
                    token.unwatch()
            if token is not None:
                token.check()
            return self._since(after_seq)
