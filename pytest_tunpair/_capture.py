"""What the relay carried: ``Packet`` records and the live, thread-safe ``Capture``.

The relay thread appends; test code reads. Recording is kept cheap because it sits in the
hot path (docs/internals.md, "Recording cost per packet": a tuple per packet cost 10-15% of
throughput): a ``Packet`` keeps
the buffer exactly as read from the device and slices off the virtio-net header, decodes
the GSO metadata and builds the scapy object only when someone asks.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

from . import _linux
from ._errors import PacketTimeout

__all__ = ["Capture", "Counters", "GsoInfo", "Packet", "Stats"]

DIRECTIONS = ("a->b", "b->a")
# Lines of trace a PacketTimeout message shows at most.
TIMEOUT_TRACE_LINES = 30
#: What the ``capture_bytes`` budget charges per kept packet besides its bytes: the Packet
#: object, its timestamp, the bytes object's header, the deque slot and allocator headers
#: (measured: about 280 bytes per MTU-sized packet with CPython 3.11 on x86-64).
PACKET_OVERHEAD = 320
#: ... plus 1/2**SLACK_SHIFT of its bytes: heap the allocator cannot hand out again while
#: the capture churns through 64 KiB super-packets (measured: about 3 % of a full capture).
SLACK_SHIFT = 4

_GSO_NAMES = {
    _linux.VIRTIO_NET_HDR_GSO_NONE: "none",
    _linux.VIRTIO_NET_HDR_GSO_TCPV4: "tcpv4",
    _linux.VIRTIO_NET_HDR_GSO_UDP: "udp",
    _linux.VIRTIO_NET_HDR_GSO_TCPV6: "tcpv6",
}


@dataclass(frozen=True)
class GsoInfo:
    """The virtio-net header that came with a packet when offload is on.

    ``type`` is ``"tcpv4"``/``"tcpv6"`` for a GSO super-packet (TCP data the kernel will
    cut into ``size``-byte segments on a real wire), ``"none"`` otherwise.
    ``needs_csum`` means the TCP/UDP checksum field holds only the pseudo-header sum (the
    "hardware" would finish it): a capture of such a packet shows a bad checksum, exactly as
    tcpdump on a host with offload does.
    """

    type: str
    size: int
    hdr_len: int
    needs_csum: bool
    csum_start: int
    csum_offset: int
    ecn: bool = False

    @property
    def is_super_packet(self) -> bool:
        return self.type != "none"


def _load_scapy() -> tuple[Any, Any, Any, Any]:
    # Importing the layers is what costs (docs/internals.md, "Import cost of scapy and
    # pyroute2": 0.3 s for inet); do it once, lazily.
    from scapy.layers.inet import IP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw

    return IP, IPv6, Ether, Raw


class Packet:
    """One packet the relay saw.

    ``time`` is seconds since the pair came up, when the relay wrote the packet (or dropped
    it); ``arrival`` when the relay read it (``sojourn`` is the difference: what delay,
    rate, hooks and queueing added); ``direction`` is ``"a->b"`` or ``"b->a"``;
    ``action`` says what the relay did (``"forwarded"``, ``"injected"``, ``"dropped"``,
    ``"modified"``, ``"duplicated"``, ``"lost"``, ``"delayed"``, ``"reordered"``,
    ``"corrupted"``, ``"scripted"``); ``data`` is the IP packet (TUN) or Ethernet frame
    (TAP), without the virtio-net header; ``scapy`` decodes it on first access.

    ``seq`` is the packet's number in the capture, given when it is recorded -- that is,
    once its action is final. A hook sees a packet before that (``seq == -1``); a hook that
    drops a packet or fails on it gets that same object recorded, so the number a
    :class:`~pytest_tunpair.HookError` names is then the packet's ``seq``.
    """

    __slots__ = (
        "_data",
        "_off",
        "_raw",
        "_scapy",
        "action",
        "arrival",
        "direction",
        "mode",
        "seq",
        "time",
        "wire_len",
    )

    def __init__(
        self,
        time: float,
        direction: str,
        action: str,
        raw: bytes,
        off: int = 0,
        mode: str = "tun",
        arrival: float | None = None,
    ) -> None:
        #: Seconds since the pair came up when the packet was written (or dropped).
        self.time = time
        #: Seconds since the pair came up when the relay read it (``time`` if injected).
        self.arrival = time if arrival is None else arrival
        self.direction = direction
        self.action = action
        self._raw = raw
        self._off = off
        self._data: bytes | None = None if off else raw
        self._scapy: Any = None
        self.mode = mode
        self.wire_len = len(raw) - off
        self.seq = -1

    @property
    def sojourn(self) -> float:
        """Seconds the relay held the packet: ``time - arrival`` (0 for injected ones)."""
        return self.time - self.arrival

    @property
    def vnet_header(self) -> bytes:
        """The virtio-net header the packet came with (``b""`` when offload is off)."""
        return self._raw[: self._off]

    @property
    def frame(self) -> bytes:
        """What the device gave (or takes): the virtio-net header, if any, then ``data``.

        The relay writes this, so an unchanged packet keeps its "GSO"/"checksum still to
        do" header. (Cut to ``snaplen`` once recorded.)"""
        return self._raw

    @property
    def data(self) -> bytes:
        if self._data is None:
            self._data = self._raw[self._off :]
        return self._data

    def __len__(self) -> int:
        return self.wire_len

    def __bytes__(self) -> bytes:
        return self.data

    @property
    def gso(self) -> GsoInfo | None:
        """The virtio-net header, or ``None`` when the pair runs without offload."""
        if self._off < _linux.VIRTIO_NET_HDR_LEN:
            return None
        flags, gtype, hdr_len, size, cstart, coff = _linux.VIRTIO_NET_HDR.unpack_from(self._raw)
        return GsoInfo(
            type=_GSO_NAMES.get(gtype & ~_linux.VIRTIO_NET_HDR_GSO_ECN, str(gtype)),
            size=size,
            hdr_len=hdr_len,
            needs_csum=bool(flags & _linux.VIRTIO_NET_HDR_F_NEEDS_CSUM),
            csum_start=cstart,
            csum_offset=coff,
            ecn=bool(gtype & _linux.VIRTIO_NET_HDR_GSO_ECN),
        )

    @property
    def scapy(self) -> Any:
        """The packet decoded by scapy (``IP``/``IPv6`` for TUN, ``Ether`` for TAP)."""
        if self._scapy is None:
            IP, IPv6, Ether, Raw = _load_scapy()
            data = self.data
            if self.mode == "tap":
                self._scapy = Ether(data)
            elif data and data[0] >> 4 == 4:
                self._scapy = IP(data)
            elif data and data[0] >> 4 == 6:
                self._scapy = IPv6(data)
            else:
                self._scapy = Raw(data)
        return self._scapy

    def haslayer(self, layer: Any) -> bool:
        return bool(self.scapy.haslayer(layer))

    def summary(self) -> str:
        """One tcpdump-like line: time, direction, action, scapy's summary, length."""
        try:
            what = self.scapy.summary()
        except Exception as exc:  # a summary must never hide the rest of a report
            what = f"<{len(self.data)} bytes, undecodable: {exc}>"
        gso = self.gso
        if gso and gso.is_super_packet:
            size = f"length {self.wire_len} [gso {gso.type} segments of {gso.size}]"
        else:
            size = f"length {self.wire_len}"
        if len(self.data) < self.wire_len:
            size += f" [{len(self.data)} kept]"
        sojourn = self.sojourn
        if self.action in _HELD_ACTIONS or sojourn >= SHOW_SOJOURN:
            size += f" (sojourn {_format_seconds(sojourn)})"
        return f"{self.time:10.6f} {self.direction} {self.action:<10} {what}, {size}"

    def __repr__(self) -> str:
        number = f"#{self.seq}" if self.seq >= 0 else "(not recorded yet)"
        return (
            f"<Packet {number} t={self.time:.6f} {self.direction} {self.action} "
            f"{self.wire_len} bytes>"
        )


# The trace shows how long the relay held packets it delayed on purpose, and any other
# packet held this long (a slow hook, a queue).
_HELD_ACTIONS = frozenset({"delayed", "reordered"})
SHOW_SOJOURN = 0.001


def _format_seconds(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:.3f}s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f}ms"
    return f"{seconds * 1e6:.1f}us"


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


def _matcher(match: Any) -> tuple[Callable[[Packet], Any], str]:
    """``wait_for``'s argument as a predicate, plus the name its timeout message uses."""
    if isinstance(match, type) and hasattr(match, "fields_desc"):
        # A scapy layer class is callable too (it builds a packet, always truthy): without
        # this, wait_for(TCP) would "match" the first packet of any kind.
        return (lambda p: p.scapy.haslayer(match)), f"layer {match.__name__}"
    if not callable(match):
        raise TypeError(
            f"wait_for() takes a callable (packet -> bool) or a scapy layer class, "
            f"not {type(match).__name__}: e.g. wait_for(lambda p: p.direction == 'b->a')"
        )
    return match, getattr(match, "__qualname__", None) or repr(match)


def trace(packets: Sequence[Packet], *, limit: int | None = None, evicted: int = 0) -> str:
    """One tcpdump-like line per packet; beyond ``limit`` lines, the first and last ones
    with ``… N more`` between them (the start shows how a conversation began, the end what
    happened last)."""
    lines = []
    if evicted:
        lines.append(f"… {evicted} older packets not kept (capture bound)")
    if limit is not None and len(packets) > limit:
        head = max(1, limit // 4) if limit > 1 else 0
        tail = limit - head
        lines.extend(p.summary() for p in packets[:head])
        lines.append(f"… {len(packets) - limit} more")
        lines.extend(p.summary() for p in packets[len(packets) - tail :])
    else:
        lines.extend(p.summary() for p in packets)
    return "\n".join(lines) if lines else "(no packets)"


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
    ) -> None:
        self.mode = mode
        self.max_packets = max_packets
        self.capture_bytes = capture_bytes
        self.snaplen = snaplen
        self._packets: deque[Packet] = deque()
        self._bytes = 0
        self._next_seq = 0
        self._waiters = 0
        self._cond = threading.Condition(threading.Lock())
        #: Packets recorded but no longer kept because of a bound (not :meth:`clear`).
        self.evicted = 0
        self.t0 = time.monotonic()
        self.wall_t0 = time.time()

    # -- relay side ---------------------------------------------------------------------
    @property
    def lock(self) -> threading.Condition:
        """The capture's lock. The relay holds it while it records a batch *and* writes it
        (:meth:`record_locked`), so a reader never sees an action that changes afterwards
        (a write that fails turns "forwarded" into "dropped" before anyone can look)."""
        return self._cond

    def record(self, pkt: Packet) -> None:
        """Append one packet."""
        with self._cond:
            self.record_locked((pkt,))

    def record_many(self, pkts: Sequence[Packet]) -> None:
        """Append packets in order under one lock."""
        with self._cond:
            self.record_locked(pkts)

    def record_locked(self, pkts: Sequence[Packet]) -> None:
        """Append packets in order; the caller holds :attr:`lock`.

        Cuts to ``snaplen`` and enforces the bounds. ``capture_bytes`` is charged what the
        kept packets cost the process, not just their bytes: :data:`PACKET_OVERHEAD` per
        packet and :data:`SLACK_SHIFT` for allocator slack, so that a capture at its bound
        grows the process by no more than the bound, whether it holds a thousand 64 KB
        super-packets or a hundred thousand ACKs. ``nbytes`` stays the packets' bytes.
        """
        snaplen = self.snaplen
        if snaplen is not None:
            for pkt in pkts:
                if pkt.wire_len > snaplen:
                    # A copy of the first bytes: the relay writes its own reference to the
                    # whole buffer, which is then freed.
                    pkt._raw = pkt._raw[: pkt._off + snaplen]
                    pkt._data = None if pkt._off else pkt._raw
        size = 0
        seq = self._next_seq
        for pkt in pkts:
            pkt.seq = seq
            seq += 1
            size += len(pkt._raw)
        self._next_seq = seq
        packets = self._packets
        packets.extend(pkts)
        self._bytes += size
        if self.max_packets is not None:
            while len(packets) > self.max_packets:
                self._bytes -= len(packets.popleft()._raw)
                self.evicted += 1
        budget = self.capture_bytes
        if budget is not None:
            while (
                packets
                and self._bytes + (self._bytes >> SLACK_SHIFT) + len(packets) * PACKET_OVERHEAD
                > budget
            ):
                self._bytes -= len(packets.popleft()._raw)
                self.evicted += 1
        if self._waiters:
            # Waiters wake once the caller releases the lock: after the batch's writes.
            self._cond.notify_all()

    # -- sequence protocol ----------------------------------------------------------------
    def _snapshot(self) -> list[Packet]:
        with self._cond:
            return list(self._packets)

    def __len__(self) -> int:
        return len(self._packets)

    def __iter__(self) -> Iterator[Packet]:
        return iter(self._snapshot())

    def __reversed__(self) -> Iterator[Packet]:
        return reversed(self._snapshot())

    def __contains__(self, value: object) -> bool:
        return value in self._snapshot()

    def index(self, value: Any, start: int = 0, stop: int | None = None) -> int:
        snapshot = self._snapshot()
        return snapshot.index(value, start, len(snapshot) if stop is None else stop)

    def count(self, value: Any) -> int:
        return self._snapshot().count(value)

    @overload
    def __getitem__(self, index: int) -> Packet: ...
    @overload
    def __getitem__(self, index: slice) -> list[Packet]: ...
    def __getitem__(self, index: int | slice) -> Packet | list[Packet]:
        with self._cond:
            if isinstance(index, slice):
                return list(self._packets)[index]
            return self._packets[index]

    def __bool__(self) -> bool:
        return bool(self._packets)

    def __repr__(self) -> str:
        extra = f", {self.evicted} older not kept" if self.evicted else ""
        return f"<Capture {len(self)} packets{extra}>"

    @property
    def nbytes(self) -> int:
        """Bytes the kept packets hold, as read from the device. (``capture_bytes`` charges
        more per packet, see :meth:`record_many`; decoded scapy objects come on top.)"""
        return self._bytes

    def clear(self) -> None:
        """Forget what was captured so far; the relay keeps running and recording.

        ``tun_pair.stats`` keeps counting from where it was.
        """
        with self._cond:
            self._packets.clear()
            self._bytes = 0
            self.evicted = 0

    def mark(self) -> int:
        """The sequence number the next recorded packet gets: ``since(mark)`` later returns
        what was recorded from now on."""
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
        )
        out.t0, out.wall_t0 = self.t0, self.wall_t0
        with self._cond:
            packets = self._since(start - 1)
            first = self._packets[0].seq if self._packets else self._next_seq
            out.evicted = max(0, min(first, self._next_seq) - start)
            out._next_seq = self._next_seq
        out._packets.extend(packets)
        out._bytes = sum(len(p._raw) for p in packets)
        return out

    def _since(self, seq: int) -> list[Packet]:
        """Packets with a sequence number above ``seq`` (caller holds the lock).

        Sequence numbers are consecutive in the deque (assigned under the lock; bounds and
        ``clear`` only ever remove from the left), so the start is one subtraction away.
        """
        packets = self._packets
        if not packets:
            return []
        start = max(0, seq + 1 - packets[0].seq)
        if start >= len(packets):
            return []
        return list(itertools.islice(packets, start, None))

    def wait_for(self, match: Callable[[Packet], Any] | type, *, timeout: float = 2.0) -> Packet:
        """The first packet, captured already or arriving within ``timeout`` s, that matches.

        ``match`` is a predicate (``lambda p: p.direction == "b->a"``) or a scapy layer class
        (``wait_for(TCP)``). It runs in the calling thread, outside the lock, so it may decode
        freely. Waiting is a condition variable the relay notifies on every packet: the call
        returns as soon as the packet is recorded, without polling.

        Raises :class:`~pytest_tunpair.PacketTimeout` (an ``AssertionError``) listing what
        was captured when nothing matched in time.
        """
        __tracebackhide__ = True
        predicate, what = _matcher(match)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0:
            raise ValueError(f"wait_for(timeout={timeout!r}): give a number of seconds >= 0")
        deadline = time.monotonic() + timeout
        last = -1
        while True:
            with self._cond:
                new = self._since(last)
                if not new:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._waiters += 1
                    try:
                        self._cond.wait(remaining)
                    finally:
                        self._waiters -= 1
                    continue
                # Under steady traffic there is always something new, so the deadline is
                # checked here too; a batch taken after it is still examined, so every
                # packet recorded in time gets its chance.
                expired = time.monotonic() >= deadline
            for pkt in new:
                last = pkt.seq
                if predicate(pkt):
                    return pkt
            if expired:
                break
        packets = self._snapshot()
        evicted = self.evicted
        raise PacketTimeout(
            f"no packet matched {what} within {timeout:g} s; {len(packets)} captured:\n",
            packets=packets,
            details=lambda: trace(packets, limit=TIMEOUT_TRACE_LINES, evicted=evicted),
        )

    def filter(self, *layers: Any, direction: str | None = None) -> list[Packet]:
        """Packets holding every given scapy layer (class or name), optionally in one
        direction only: ``filter(TCP, direction="b->a")``."""
        if direction is not None and direction not in DIRECTIONS:
            raise ValueError(f"direction must be 'a->b', 'b->a' or None, not {direction!r}")
        return [
            p
            for p in self._snapshot()
            if (direction is None or p.direction == direction)
            and all(p.scapy.haslayer(layer) for layer in layers)
        ]

    def summary(self, limit: int | None = None) -> str:
        """The trace, one tcpdump-like line per packet: time since the pair came up,
        direction, what the relay did, scapy's summary. Beyond ``limit`` lines, the first
        and the last packets with ``… N more`` between them."""
        if limit is not None and limit < 1:
            raise ValueError(f"summary(limit={limit!r}): give None or a number >= 1")
        return trace(self._snapshot(), limit=limit, evicted=self.evicted)

    def to_pcap(self, path: str | os.PathLike[str]) -> str:
        """Write a pcap file (raw-IP link type for TUN, Ethernet for TAP); return its path.

        ``tcpdump -r`` and Wireshark read it; timestamps are wall-clock times.
        """
        from ._pcap import write_pcap

        return write_pcap(
            path, self._snapshot(), mode=self.mode, wall_t0=self.wall_t0, snaplen=self.snaplen
        )

    # -- live followers (the command line's trace) ---------------------------------------------
    def wait_new(self, after_seq: int, timeout: float) -> list[Packet]:
        """Kept packets recorded after sequence number ``after_seq`` (``-1``: from the start),
        waiting up to ``timeout`` s for the first one; ``[]`` if none came.

        For a follower thread that prints as the relay records (``tunpair run``): it sleeps on
        the capture's condition, so the relay pays for a ``notify`` only while someone waits.
        A jump in ``seq`` between calls means packets were evicted by the capture bounds.
        """
        with self._cond:
            new = self._since(after_seq)
            if new or timeout <= 0:
                return new
            self._waiters += 1
            try:
                self._cond.wait(timeout)
            finally:
                self._waiters -= 1
            return self._since(after_seq)
