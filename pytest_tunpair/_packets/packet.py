"""One packet the relay saw: ``Packet``, with its header fields parsed without scapy.

Recording is kept cheap because it sits in the relay's hot path (docs/internals.md,
"Recording cost per packet": a tuple per packet cost 10-15% of throughput): a ``Packet``
keeps the buffer exactly as read from the device and slices off the virtio-net header,
parses the headers (:mod:`.._wire.headers`), decodes the GSO metadata and builds the scapy
object only when someone asks.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .._wire import gso as _gso
from .._wire import headers as _h
from .._wire.numbers import ECN_NAMES, PROTO_NAMES

__all__ = [
    "BATCH_RECORD",
    "DELIVERED",
    "DIRECTIONS",
    "FIELDS",
    "GsoInfo",
    "Packet",
    "PacketBatch",
    "SegmentGroup",
    "kept_len",
    "parsed",
    "segment_records",
    "trace",
]

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
#: Every field a ``Packet`` parses without scapy, as ``filter()``/``wait_for()`` keywords.
FIELDS = (
    "ip_version",
    "src",
    "dst",
    "proto",
    "ip_proto",
    "sport",
    "dport",
    "flags",
    "tcp_seq",
    "tcp_ack",
    "window",
    "tcp_options",
    "payload",
    "ttl",
    "ecn",
    "icmp_type",
    "icmp_code",
)


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
    it); ``arrival`` when it reached the link -- when the relay read it, or, in a direction
    the relay's C core delays, when it entered the sending device (docs/timing.md,
    "Arrival times") -- and ``sojourn`` is the difference: what delay, rate, hooks and
    queueing added; ``direction`` is ``"a->b"`` or ``"b->a"``;
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

    # ``_f`` (the parsed header offsets) starts as None and is parsed on the first field
    # read. Not left unset: reading an unset slot raises AttributeError, and catching it
    # made the first read cost several times the parse (docs/internals.md, "Header fields:
    # offsets, not scapy"), where one more store in __init__ costs nothing measurable.
    __slots__ = (
        "_data",
        "_f",
        "_off",
        "_raw",
        "_scapy",
        "action",
        "arrival",
        "direction",
        "link_class",
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
        self.time = time
        """When the relay wrote (or dropped) it: seconds since the pair came up."""
        self.arrival = time if arrival is None else arrival
        """When it reached the link, in seconds since the pair came up: when the relay read it,
        or when it entered the sending device in a direction the C core delays (``time`` if
        injected)."""
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
        self._f: _h.Parsed | None = None
        self.mode = mode
        """``"tun"`` or ``"tap"``: whether ``data`` is an IP packet or an Ethernet frame."""
        self.wire_len = len(raw) - off
        """Its length on the wire (also ``len(packet)``), even when ``snaplen`` kept less."""
        self.link_class: str | None = None
        """The name of the class (``impair(match=..., name=...)``) whose link carried it;
        ``None`` for the direction's own link."""
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
        if self._off < _gso.VIRTIO_NET_HDR_LEN:
            return None
        flags, gtype, hdr_len, size, cstart, coff = _gso.VIRTIO_NET_HDR.unpack_from(self._raw)
        return GsoInfo(
            type=_gso.GSO_NAMES.get(gtype & ~_gso.VIRTIO_NET_HDR_GSO_ECN, str(gtype)),
            size=size,
            hdr_len=hdr_len,
            needs_csum=bool(flags & _gso.VIRTIO_NET_HDR_F_NEEDS_CSUM),
            csum_start=cstart,
            csum_offset=coff,
            ecn=bool(gtype & _gso.VIRTIO_NET_HDR_GSO_ECN),
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
    def _parsed(self) -> _h.Parsed:
        f = self._f
        if f is None:
            self._f = f = _h.parse(self._raw, self._off, self.mode)
        return f

    @property
    def ip_version(self) -> int | None:
        """4 or 6; ``None`` for ARP and anything else that is not IP."""
        return self._parsed()[_h.VERSION]

    @property
    def src(self) -> str | None:
        """Source IP address (for ARP the sender's protocol address, scapy's ``psrc``)."""
        return _h.address(self._raw, self._parsed(), 0)

    @property
    def dst(self) -> str | None:
        """Destination IP address (for ARP the target's protocol address, ``pdst``)."""
        return _h.address(self._raw, self._parsed(), 1)

    @property
    def ip_proto(self) -> int | None:
        """The transport protocol number, after any IPv6 extension headers (6 for TCP)."""
        return self._parsed()[_h.IP_PROTO]

    @property
    def proto(self) -> str | None:
        """``"tcp"``, ``"udp"``, ``"icmp"``, ``"icmpv6"``, ``"arp"`` or ``None``."""
        f = self._parsed()
        if f[_h.ARP]:
            return "arp"
        return PROTO_NAMES.get(f[_h.IP_PROTO])

    @property
    def sport(self) -> int | None:
        """TCP/UDP (and SCTP, UDP-Lite) source port; ``None`` for other packets and for
        fragments after the first."""
        return self._parsed()[_h.SPORT]

    @property
    def dport(self) -> int | None:
        """Destination port, as :attr:`sport`."""
        return self._parsed()[_h.DPORT]

    @property
    def flags(self) -> str | None:
        """TCP flags in scapy's letters and order (``"S"``, ``"SA"``, ``"PA"``, ``"FA"``)."""
        flags = self._parsed()[_h.TCP_FLAGS]
        return None if flags is None else _h.FLAG_STRINGS[flags]

    @property
    def tcp_seq(self) -> int | None:
        """TCP sequence number."""
        return _h.tcp_word(self._raw, self._parsed(), 4, 4)

    @property
    def tcp_ack(self) -> int | None:
        """TCP acknowledgment number (whether or not the A flag is set)."""
        return _h.tcp_word(self._raw, self._parsed(), 8, 4)

    @property
    def window(self) -> int | None:
        """TCP window field as sent (not scaled)."""
        return _h.tcp_word(self._raw, self._parsed(), 14, 2)

    @property
    def tcp_options(self) -> list[tuple[str | int, Any]] | None:
        """TCP options in the order sent, in scapy's names and value shapes (as
        ``packet[TCP].options``): ``[("MSS", 1460), ("SAckOK", b""), ("Timestamp", (tsval,
        tsecr)), ("NOP", None), ("WScale", 7)]``; ``("SAck", (left, right, ...))`` for SACK
        blocks, ``("EOL", None)`` where an end-of-list ends it, ``(kind, bytes)`` for any
        other kind. NOPs are kept, so the list says what the sender put where. ``[]`` for a
        segment without options; ``None`` for other packets."""
        return _h.tcp_options(self._raw, self._parsed())

    @property
    def payload(self) -> bytes | None:
        """The L4 payload: after the TCP header and options, the UDP header, or ICMP's
        8-byte header; for other IP protocols what follows the IP headers. A GSO
        super-packet's is the whole super-packet's; ``snaplen`` cuts it."""
        f = self._parsed()
        poff = f[_h.PAYLOAD]
        if poff < 0:
            return None
        return self._raw[poff : f[_h.END]]

    @property
    def ttl(self) -> int | None:
        """IPv4 TTL or IPv6 hop limit."""
        return self._parsed()[_h.TTL]

    @property
    def ecn(self) -> str | None:
        """The ECN codepoint: ``"not-ect"``, ``"ect1"``, ``"ect0"`` or ``"ce"``."""
        tclass = self._parsed()[_h.TCLASS]
        return None if tclass is None else ECN_NAMES[tclass & 3]

    @property
    def icmp_type(self) -> int | None:
        """ICMP or ICMPv6 type (8 echo request, 128 ICMPv6 echo request, ...)."""
        return _h.icmp_byte(self._raw, self._parsed(), 0)

    @property
    def icmp_code(self) -> int | None:
        """ICMP or ICMPv6 code."""
        return _h.icmp_byte(self._raw, self._parsed(), 1)

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
        if name in _h.LAYERS:
            f = self._parsed()
            if _h.has_layer(name, self.mode, f):
                return True
            if not _h.may_tunnel(f):
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


class _Segment(Packet):
    """One wire-sized segment of a GSO super-packet the relay split (a per-segment link),
    recorded without its bytes: they are made from the super-packet on first use, with a
    full TCP checksum and no offload work left (as a wire carries it, and as the kernel
    sends it with offload off). Everything else is a ``Packet``'s."""

    __slots__ = ("_built", "_ce", "_index", "_plan", "_source")
    _built: bytes | None
    _ce: bool
    _index: int
    _plan: _gso.GsoPlan
    _source: bytes

    @property
    def _raw(self) -> bytes:
        built = self._built
        if built is None:
            data = _gso.segments(
                self._source, self._plan, self._index, 1, vnet=False, partial=False, ce=self._ce
            )
            built = self._built = bytes(self._off) + data if self._off else data
        return built

    @_raw.setter
    def _raw(self, value: bytes) -> None:
        self._built = value


def segment_records(
    source: bytes,
    plan: _gso.GsoPlan,
    first: int,
    count: int,
    *,
    off: int,
    mode: str,
    direction: str,
    action: str,
    arrival: float,
    time: float,
    ce: bool = False,
    link_class: str | None = None,
) -> list[Packet]:
    """The records of segments ``first .. first + count - 1`` of the super-packet
    ``source`` (as read, virtio-net header included): one ``Packet`` each, its bytes made
    on first use. ``off``: the virtio-net header length records carry (zeroed)."""
    new = _Segment.__new__
    header_len = plan.header_len
    mss = plan.mss
    payload = plan.payload
    out: list[Packet] = []
    for i in range(first, first + count):
        p = new(_Segment)
        p.time = time
        p.arrival = arrival
        p.direction = direction
        p.action = action
        p._built = None
        p._source = source
        p._plan = plan
        p._index = i
        p._ce = ce
        p._off = off
        p._data = None
        p._scapy = None
        p._f = None
        p.mode = mode
        p.wire_len = header_len + min(mss, payload - i * mss)
        p.link_class = link_class
        p.seq = -1
        out.append(p)
    return out


class SegmentGroup:
    """Segments of one super-packet recorded at once, as one entry of the capture: what a
    per-segment link records in its hot path instead of one ``Packet`` per segment. The
    capture expands it into those packets (:meth:`expand`, numbered from ``seq``) the
    first time anyone reads it, in the reader's thread."""

    __slots__ = (
        "action",
        "arrival",
        "ce",
        "count",
        "direction",
        "first",
        "link_class",
        "mode",
        "off",
        "plan",
        "seq",
        "source",
        "time",
        "wire_len",
    )

    def __init__(
        self,
        source: bytes,
        plan: _gso.GsoPlan,
        first: int,
        count: int,
        *,
        off: int,
        mode: str,
        direction: str,
        action: str,
        arrival: float,
        time: float,
        ce: bool = False,
    ) -> None:
        self.source = source
        self.plan = plan
        self.first = first
        #: How many packets (segments) it stands for.
        self.count = count
        self.off = off
        self.mode = mode
        self.direction = direction
        self.action = action
        self.arrival = arrival
        self.time = time
        self.ce = ce
        #: As :attr:`Packet.link_class`, for each of them.
        self.link_class: str | None = None
        self.seq = -1
        #: Their bytes on the wire.
        self.wire_len = plan.wire_len(first, count)

    @property
    def kept(self) -> int:
        """What its packets' records hold (virtio-net headers included)."""
        return self.count * self.off + self.wire_len

    def expand(self) -> list[Packet]:
        """Its packets, numbered ``seq``, ``seq + 1``, ..."""
        out = segment_records(
            self.source,
            self.plan,
            self.first,
            self.count,
            off=self.off,
            mode=self.mode,
            direction=self.direction,
            action=self.action,
            arrival=self.arrival,
            time=self.time,
            ce=self.ce,
            link_class=self.link_class,
        )
        seq = self.seq
        for p in out:
            p.seq = seq
            seq += 1
        return out


#: One record of a :class:`PacketBatch`'s metadata (``_link/_core.c``'s ``Meta``): time,
#: arrival, offset of its frame in the batch's frames, length, direction, action.
BATCH_RECORD = struct.Struct("<ddQIBBxx")


class PacketBatch:
    """Packets the relay's C core recorded (``_link/_core.c``), as one entry of the capture:
    like :class:`SegmentGroup`, expanded into its packets (:meth:`expand`, numbered from
    ``seq``) by the first reader, so the relay thread makes no Python object per packet.

    ``frames`` holds the frames end to end, ``meta`` a :data:`BATCH_RECORD` per packet;
    ``directions`` names the direction indexes, ``actions`` the action codes. A bound
    trims the oldest (:meth:`drop_first`) without expanding the rest."""

    __slots__ = (
        "actions",
        "count",
        "directions",
        "frames",
        "kept",
        "meta",
        "mode",
        "off",
        "seq",
        "start",
        "time",
    )

    def __init__(
        self,
        frames: bytes,
        meta: bytes,
        *,
        off: int,
        mode: str,
        directions: tuple[str, str],
        actions: tuple[str, ...],
    ) -> None:
        self.frames = frames
        self.meta = meta
        self.off = off
        self.mode = mode
        self.directions = directions
        self.actions = actions
        self.start = 0  # records before it were trimmed by a bound
        #: How many packets it stands for.
        self.count = len(meta) // BATCH_RECORD.size
        #: What its packets' records hold (virtio-net headers included).
        self.kept = len(frames)
        self.seq = -1
        #: When the last of them was recorded.
        self.time = (
            BATCH_RECORD.unpack_from(meta, len(meta) - BATCH_RECORD.size)[0] if meta else 0.0
        )

    def drop_first(self, n: int) -> int:
        """Forget the oldest ``n`` packets (fewer than :attr:`count`); their kept bytes."""
        size = BATCH_RECORD.size
        unpack = BATCH_RECORD.unpack_from
        meta = self.meta
        dropped: int = sum(unpack(meta, i * size)[3] for i in range(self.start, self.start + n))
        self.start += n
        self.count -= n
        self.seq += n
        self.kept -= dropped
        return dropped

    def expand(self) -> list[Packet]:
        """Its packets, numbered ``seq``, ``seq + 1``, ..."""
        off, mode, directions, actions = self.off, self.mode, self.directions, self.actions
        frames = self.frames
        out = []
        seq = self.seq
        size = BATCH_RECORD.size
        for t, arrival, offset, length, d, action in BATCH_RECORD.iter_unpack(
            memoryview(self.meta)[self.start * size :]
        ):
            p = Packet(
                t,
                directions[d],
                actions[action],
                frames[offset : offset + length],
                off,
                mode,
                arrival,
            )
            p.seq = seq
            seq += 1
            out.append(p)
        return out


def kept_len(p: Packet) -> int:
    """Bytes ``p``'s record holds (``len(p.frame)``), without making a segment's bytes."""
    if type(p) is _Segment and p._built is None:
        return p._off + p.wire_len
    return len(p._raw)


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


def parsed(p: Packet) -> _h.Parsed:
    """``p``'s headers as :func:`.._wire.headers.parse` gives them, offsets into
    ``p.frame``: for the readers below ``Packet``'s fields (matching, flows, rules, the
    scripted peer). Parsed once per packet."""
    return p._parsed()


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
