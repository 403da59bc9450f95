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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, overload

from .._errors import PacketTimeout
from .._kernel import linux as _linux
from .._wire import headers as _fields

if TYPE_CHECKING:
    from .flows import Flow

__all__ = ["Capture", "Counters", "GsoInfo", "Packet", "Stats"]

DIRECTIONS = ("a->b", "b->a")
#: Actions of packets that reached the receiving side: written to the other device (or,
#: ``"scripted"``, taken by a scripted peer standing in for it; ``"marked"`` went CE-marked
#: instead of dropped). Any other action -- a hook's or a rule's drop (``"dropped"`` or the
#: rule's own label), an impairment's loss -- means the receiver never got it.
DELIVERED = frozenset(
    {
        "forwarded",
        "injected",
        "modified",
        "duplicated",
        "delayed",
        "reordered",
        "corrupted",
        "marked",
        "scripted",
    }
)
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
    """The GSO type: ``"tcpv4"``, ``"tcpv6"``, ``"udp"`` for a super-packet, ``"none"`` otherwise."""
    size: int
    """The segment size (the MSS for TCP) a super-packet is to be cut into; 0 when not one."""
    hdr_len: int
    """Length of the headers that every segment repeats (IP + TCP), as the kernel gave it."""
    needs_csum: bool
    """True: the TCP/UDP checksum holds only the pseudo-header sum (partial, as with offload)."""
    csum_start: int
    """Where checksumming starts, in bytes from the start of the packet (with ``needs_csum``)."""
    csum_offset: int
    """Where the checksum goes, in bytes from ``csum_start`` (with ``needs_csum``)."""
    ecn: bool = False
    """True: the TCP segments carry ECN's CWR, which the segmenter must keep on the first only."""

    @property
    def is_super_packet(self) -> bool:
        """True for a GSO super-packet: one ``Packet`` holding many segments' worth of data."""
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
    ``"corrupted"``, ``"scripted"``; from the scenario rules ``"reset"``,
    ``"unreachable"``, ``"too-big"``, ``"fragmented"``); ``data`` is the IP packet (TUN) or
    Ethernet frame
    (TAP), without the virtio-net header; ``scapy`` decodes it on first access.

    ``seq`` is the packet's number in the capture, given when it is recorded -- that is,
    once its action is final. A hook sees a packet before that (``seq == -1``); a hook that
    drops a packet or fails on it gets that same object recorded, so the number a
    :class:`~pytest_tunpair.HookError` names is then the packet's ``seq``.
    """

    # ``_f`` (the parsed header offsets) is left unset by ``__init__``: the relay builds a
    # Packet per packet read, most are never looked at, and an unset slot costs nothing.
    __slots__ = (
        "_data",
        "_f",
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

    _f: _fields.Parsed

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
        self.time = time
        """When the relay wrote (or dropped) it: seconds since the pair came up."""
        self.arrival = time if arrival is None else arrival
        """When the relay read it, in seconds since the pair came up (``time`` if injected)."""
        self.direction = direction
        """``"a->b"`` or ``"b->a"``: the device it came from, and the one it went to."""
        self.action = action
        """What the relay did: ``"forwarded"``, ``"injected"``, ``"dropped"``, ``"modified"``,
        ``"duplicated"``, ``"lost"``, ``"delayed"``, ``"reordered"`` or ``"corrupted"``.
        """
        self._raw = raw
        self._off = off
        self._data: bytes | None = None if off else raw
        self._scapy: Any = None
        self.mode = mode
        """``"tun"`` or ``"tap"``: whether ``data`` is an IP packet or an Ethernet frame."""
        self.wire_len = len(raw) - off
        """Its length on the wire (also ``len(packet)``), even when ``snaplen`` kept less."""
        self.seq = -1
        """The packet's number in its pair's capture, in the order packets were recorded: 0 for the
        first, counting across both directions. Numbers are never reused: packets that a bound or
        :meth:`Capture.clear` forgot leave a gap, so ``seq`` orders and identifies packets where
        indexes into ``tun_pair.packets`` shift. ``-1`` until the capture records it.
        """

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
        """The IP packet (TUN) or Ethernet frame (TAP) as read, without the virtio-net header."""
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
        """``layer in packet``: scapy's ``haslayer``, answered from the header bytes for
        the outer layers the parser knows (see :meth:`__contains__`)."""
        return layer in self

    # -- header fields, without scapy ------------------------------------------------------
    def _parsed(self) -> _fields.Parsed:
        try:
            return self._f
        except AttributeError:
            self._f = f = _fields.parse(self._raw, self._off, self.mode)
            return f

    @property
    def ip_version(self) -> int | None:
        """4 or 6; ``None`` for ARP and anything else that is not IP."""
        return self._parsed()[_fields.VERSION]

    @property
    def src(self) -> str | None:
        """Source IP address (for ARP the sender's protocol address, scapy's ``psrc``)."""
        return _fields.address(self._raw, self._parsed(), 0)

    @property
    def dst(self) -> str | None:
        """Destination IP address (for ARP the target's protocol address, ``pdst``)."""
        return _fields.address(self._raw, self._parsed(), 1)

    @property
    def ip_proto(self) -> int | None:
        """The transport protocol number, after any IPv6 extension headers (6 for TCP)."""
        return self._parsed()[_fields.IP_PROTO]

    @property
    def proto(self) -> str | None:
        """``"tcp"``, ``"udp"``, ``"icmp"``, ``"icmpv6"``, ``"arp"`` or ``None``."""
        f = self._parsed()
        if f[_fields.ARP]:
            return "arp"
        return _fields.PROTO_NAMES.get(f[_fields.IP_PROTO])

    @property
    def sport(self) -> int | None:
        """TCP/UDP (and SCTP, UDP-Lite) source port; ``None`` for other packets and for
        fragments after the first."""
        return self._parsed()[_fields.SPORT]

    @property
    def dport(self) -> int | None:
        """Destination port, as :attr:`sport`."""
        return self._parsed()[_fields.DPORT]

    @property
    def flags(self) -> str | None:
        """TCP flags in scapy's letters and order (``"S"``, ``"SA"``, ``"PA"``, ``"FA"``)."""
        flags = self._parsed()[_fields.TCP_FLAGS]
        return None if flags is None else _fields.FLAG_STRINGS[flags]

    @property
    def tcp_seq(self) -> int | None:
        """TCP sequence number."""
        return _fields.tcp_word(self._raw, self._parsed(), 4, 4)

    @property
    def tcp_ack(self) -> int | None:
        """TCP acknowledgment number (whether or not the A flag is set)."""
        return _fields.tcp_word(self._raw, self._parsed(), 8, 4)

    @property
    def window(self) -> int | None:
        """TCP window field as sent (not scaled)."""
        return _fields.tcp_word(self._raw, self._parsed(), 14, 2)

    @property
    def payload(self) -> bytes | None:
        """The L4 payload: after the TCP header and options, the UDP header, or ICMP's
        8-byte header; for other IP protocols what follows the IP headers. A GSO
        super-packet's is the whole super-packet's; ``snaplen`` cuts it."""
        f = self._parsed()
        poff = f[_fields.PAYLOAD]
        if poff < 0:
            return None
        return self._raw[poff : f[_fields.END]]

    @property
    def ttl(self) -> int | None:
        """IPv4 TTL or IPv6 hop limit."""
        return self._parsed()[_fields.TTL]

    @property
    def ecn(self) -> str | None:
        """The ECN codepoint: ``"not-ect"``, ``"ect1"``, ``"ect0"`` or ``"ce"``."""
        tclass = self._parsed()[_fields.TCLASS]
        return None if tclass is None else _fields.ECN_NAMES[tclass & 3]

    @property
    def icmp_type(self) -> int | None:
        """ICMP or ICMPv6 type (8 echo request, 128 ICMPv6 echo request, ...)."""
        return _fields.icmp_byte(self._raw, self._parsed(), 0)

    @property
    def icmp_code(self) -> int | None:
        """ICMP or ICMPv6 code."""
        return _fields.icmp_byte(self._raw, self._parsed(), 1)

    # -- scapy's container protocol ----------------------------------------------------------
    def __contains__(self, layer: Any) -> bool:
        """``TCP in packet``, as on the scapy packet.

        Layer classes ``Ether``, ``ARP``, ``IP``, ``IPv6``, ``TCP``, ``UDP`` and ``ICMP``
        (or their names) are answered from the header bytes; a "no" is confirmed by scapy
        when the packet may carry another packet inside (IP-in-IP, GRE, UDP tunnels), and
        any other layer is asked of scapy.
        """
        if isinstance(layer, str):
            name: str | None = layer
        elif str(getattr(layer, "__module__", "")).startswith("scapy."):
            name = getattr(layer, "__name__", None)
        else:
            name = None  # someone else's class of the same name
        if name in _fields.LAYERS:
            f = self._parsed()
            if _fields.has_layer(name, self.mode, f):
                return True
            if not _fields.may_tunnel(f):
                return False
        return bool(self.scapy.haslayer(layer))

    def __getitem__(self, layer: Any) -> Any:
        """``packet[TCP]``: that layer of the scapy decode (``IndexError`` if absent)."""
        return self.scapy[layer]

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
        pending: Callable[[], int] | None = None,
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
        self._packets: deque[Packet] = deque()
        self._bytes = 0
        self._next_seq = 0
        self._waiters = 0
        self._cond = threading.Condition(threading.Lock())
        self.evicted = 0
        """Packets recorded but no longer kept because of a bound (:meth:`clear` not counted)."""
        self.t0 = time.monotonic()
        """``time.monotonic()`` when the capture began: ``Packet.time`` counts from here."""
        self.wall_t0 = time.time()
        """``time.time()`` at the same moment: the pcap's wall-clock timestamps are ``wall_t0 +
        Packet.time``.
        """
        #: What each direction's link is configured to carry, for :meth:`plot`'s dashed
        #: line: bits/s, or a function giving the bytes it could carry in ``[t0, t1)``
        #: (seconds since the pair came up). The pair keeps it in step with ``impair()``.
        self.configured: dict[str, Any] = {}

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
        more per packet, see :meth:`record_locked`; decoded scapy objects come on top.)"""
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
        from .match import ANY_ACTION, Matcher, packet_filter, wait_match

        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0:
            raise ValueError(f"wait_for(timeout={timeout!r}): give a number of seconds >= 0")
        by_fields = packet_filter(
            direction=direction, action=action, fields=fields, what="wait_for"
        )
        what = []
        predicate = by_fields
        if match is not None:
            # Every action counts here (the relay's drops too), unlike in expect().
            matcher = Matcher(match, action=ANY_ACTION, what="wait_for")
            what.append(matcher.description)

            def predicate(p: Packet) -> bool:
                return by_fields(p) and matcher(p)

        what.extend(f"{k}={v!r}" for k, v in fields.items())
        what.extend(f"{k}={v!r}" for k, v in (("direction", direction), ("action", action)) if v)
        found = wait_match(self, predicate, after_seq=-1, timeout=timeout)
        if found is not None:
            return found
        packets = self._snapshot()
        evicted = self.evicted
        raise PacketTimeout(
            f"no packet matched {', '.join(what) or 'anything'} within {timeout:g} s; "
            f"{len(packets)} captured:\n",
            packets=packets,
            details=lambda: trace(packets, limit=TIMEOUT_TRACE_LINES, evicted=evicted),
        )

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
        from .match import packet_filter

        predicate = packet_filter(layers, direction=direction, action=action, fields=fields)
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
        from .match import expect

        return expect(
            self,
            template,
            direction=direction,
            timeout=timeout,
            after=after,
            ignore=ignore,
            action=action,
        )

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
        from .match import expect_none

        expect_none(
            self,
            match,
            during=during,
            direction=direction,
            after=after,
            ignore=ignore,
            action=action,
        )

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
        from .match import expect_sequence

        return expect_sequence(
            self, templates, timeout=timeout, direction=direction, after=after, action=action
        )

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
        evicted = self.evicted
        held = f", {pending} held in the relay" if pending else ""
        raise PacketTimeout(
            f"wait_quiet: the wire was not quiet for {idle:g} s within {timeout:g} s{held}; "
            f"{len(packets)} captured:\n",
            packets=packets,
            details=lambda: trace(packets, limit=TIMEOUT_TRACE_LINES, evicted=evicted),
        )

    def flows(self) -> list[Flow]:
        """The conversations in the capture, in order of their first packet: one
        :class:`~pytest_tunpair.Flow` per protocol and pair of endpoints."""
        from .flows import flows

        return flows(self._snapshot())

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
        from .pcap import write_pcap

        return write_pcap(
            path, self._snapshot(), mode=self.mode, wall_t0=self.wall_t0, snaplen=self.snaplen
        )

    def plot(self, path: str | os.PathLike[str], *, direction: str | None = None) -> str:
        """Write a PNG or SVG (by the extension) of the packets kept: throughput over time
        per direction (or ``direction`` only), with the configured rate or trace as a
        dashed line, above each packet's sojourn in the relay, drops marked -- the picture
        mahimahi's ``mm-throughput-graph`` gives. Returns the path.

        Needs matplotlib (``pip install 'pytest-tunpair[plot]'``); without it an
        ``ImportError`` says so.
        """
        from .plot import plot

        if direction is not None and direction not in DIRECTIONS:
            raise ValueError(f"plot(direction={direction!r}): use 'a->b', 'b->a' or None")
        # A trace server draws as its capacity per time bin; a rate as a level line.
        configured = {d: getattr(link, "capacity", link) for d, link in self.configured.items()}
        return str(plot(self._snapshot(), path, direction=direction, configured=configured))

    def to_mahimahi_log(
        self, path: str | os.PathLike[str], *, direction: str = "a->b", drops: bool = True
    ) -> str:
        """Write ``direction``'s packets in the link-log format of mahimahi's ``mm-link``
        (``+`` arrivals, ``-`` departures with their delay, ``d`` drops, ``#`` a trace's
        delivery opportunities; ms since the pair came up), which mahimahi's
        ``mm-throughput-graph`` and ``mm-delay-graph`` read. ``drops=False`` leaves out the
        ``d`` lines, which the graph script in mahimahi's repository does not know.
        Returns the path."""
        from .plot import to_mahimahi_log

        if direction not in DIRECTIONS:
            raise ValueError(f"to_mahimahi_log(direction={direction!r}): use 'a->b' or 'b->a'")
        packets = self._snapshot()
        link: Any = self.configured.get(direction)
        opportunities: Any = ()
        if hasattr(link, "opportunity_times"):
            end = max((p.time for p in packets), default=0.0)
            opportunities = link.opportunity_times(end)
        return str(
            to_mahimahi_log(
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
