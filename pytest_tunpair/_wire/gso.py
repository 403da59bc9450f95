"""The virtio-net header that comes before each packet when offload is on, and what a GSO
super-packet stands for on a real wire.

The layout is the kernel's (include/uapi/linux/virtio_net.h): the TUN driver reads and
writes it in front of every packet of a device opened with ``IFF_VNET_HDR``
(docs/internals.md, "Offload: GSO super-packets through the relay").
"""

from __future__ import annotations

import struct

from . import headers as _h
from .numbers import IPPROTO_TCP

__all__ = [
    "GSO_NAMES",
    "VIRTIO_NET_HDR",
    "VIRTIO_NET_HDR_F_NEEDS_CSUM",
    "VIRTIO_NET_HDR_GSO_ECN",
    "VIRTIO_NET_HDR_GSO_NONE",
    "VIRTIO_NET_HDR_GSO_TCPV4",
    "VIRTIO_NET_HDR_GSO_TCPV6",
    "VIRTIO_NET_HDR_GSO_UDP",
    "VIRTIO_NET_HDR_LEN",
    "ZERO_VNET_HDR",
    "GsoPlan",
    "finish_checksum",
    "plan",
    "segments",
    "segments_parts",
    "wire_size",
]

# include/uapi/linux/virtio_net.h: struct virtio_net_hdr (the 10-byte legacy layout the TUN
# driver uses by default): flags u8, gso_type u8, hdr_len u16, gso_size u16, csum_start u16,
# csum_offset u16 -- in the host's byte order for legacy virtio.
VIRTIO_NET_HDR = struct.Struct("=BBHHHH")
VIRTIO_NET_HDR_LEN = VIRTIO_NET_HDR.size
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_ECN = 0x80
#: "No offload work to do": what goes before a packet the relay builds or changes.
ZERO_VNET_HDR = bytes(VIRTIO_NET_HDR_LEN)

#: ``GsoInfo.type`` by ``gso_type`` (without the ECN bit).
GSO_NAMES = {
    VIRTIO_NET_HDR_GSO_NONE: "none",
    VIRTIO_NET_HDR_GSO_TCPV4: "tcpv4",
    VIRTIO_NET_HDR_GSO_UDP: "udp",
    VIRTIO_NET_HDR_GSO_TCPV6: "tcpv6",
}
_TCP_GSO = (VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6)


def wire_size(frame: bytes, vnet_len: int = 0, *, tap: bool = False) -> tuple[int, int]:
    """``(bytes, packets)`` that ``frame`` stands for on a real wire.

    ``frame`` starts with a ``vnet_len``-byte virtio-net header (0 without offload).  A TCP
    GSO super-packet (``gso_type`` TCPV4/TCPV6) is ``ceil(payload / gso_size)`` segments,
    each repeating the Ethernet (TAP, with its VLAN tags), IP (with options or extension
    headers) and TCP headers; anything else is one packet of its own length.  Cheap: a
    header unpack, and a parse only for a super-packet.
    """
    length = len(frame) - vnet_len
    if vnet_len < VIRTIO_NET_HDR_LEN or len(frame) < vnet_len:
        return length, 1
    _flags, gso_type, _hdr_len, gso_size, _cs, _co = VIRTIO_NET_HDR.unpack_from(frame)
    if gso_size == 0 or gso_type & ~VIRTIO_NET_HDR_GSO_ECN not in _TCP_GSO:
        return length, 1
    f = _h.parse(frame, vnet_len, "tap" if tap else "tun")
    headers = f[_h.PAYLOAD]  # Ethernet + IP + TCP end: what every segment repeats
    if f[_h.IP_PROTO] != IPPROTO_TCP or headers < 0:
        return length, 1
    payload = len(frame) - headers
    if payload <= gso_size:
        return length, 1
    segments = -(-payload // gso_size)
    per_segment = headers - vnet_len
    return length + (segments - 1) * per_segment, segments


# -- the segmenter ------------------------------------------------------------------------------
# What the kernel's GSO does to a TCP super-packet on a device without TSO
# (net/ipv4/tcp_offload.c tcp_gso_segment, net/ipv4/af_inet.c inet_gso_segment,
# net/ipv6/ip6_offload.c ipv6_gso_segment; docs/internals.md, "What the kernel's GSO makes
# of a super-packet"): every segment repeats the headers; IPv4 total length (IPv6 payload
# length) is the segment's, the IPv4 ID counts up from the super-packet's and the header
# checksum is redone; the TCP sequence number advances by gso_size per segment; CWR stays on
# the first segment only, FIN and PSH on the last only; the TCP checksum is the segment's,
# in full where the device cannot checksum, else the pseudo-header sum with
# NEEDS_CSUM in the virtio-net header ("partial").

_TCP_CWR = 0x80
_TCP_FIN_PSH = 0x09
_IPV4_ECN_CE = 0x03
_IPV6_ECN_CE = 0x30  # in the second byte of the IPv6 header


class GsoPlan:
    """Where one TCP super-packet's headers are and how it splits (:func:`plan`).

    Offsets index the frame as read (virtio-net header included). ``count`` segments of
    ``mss`` payload bytes each (the last may be shorter); each segment on the wire is
    ``header_len`` bytes of headers (Ethernet with its tags for TAP, IP, TCP) plus its
    payload.
    """

    __slots__ = (
        "addr_sum",
        "count",
        "end",
        "gso_type",
        "header_len",
        "l3",
        "l4",
        "mss",
        "payload",
        "poff",
        "v4",
        "vnet_len",
    )

    def __init__(
        self, vnet_len: int, l3: int, l4: int, poff: int, end: int, mss: int, v4: bool,
        gso_type: int, addr_sum: int,
    ) -> None:  # fmt: skip
        self.vnet_len = vnet_len
        self.l3 = l3
        self.l4 = l4
        self.poff = poff
        self.end = end
        self.mss = mss
        self.v4 = v4
        self.gso_type = gso_type
        #: The ones' complement sum of the source and destination addresses.
        self.addr_sum = addr_sum
        self.payload = end - poff
        self.count = -(-self.payload // mss)
        self.header_len = poff - vnet_len

    def wire_len(self, first: int, count: int) -> int:
        """Bytes segments ``first .. first + count - 1`` take on the wire, headers repeated."""
        mss = self.mss
        start = first * mss
        stop = min(self.payload, (first + count) * mss)
        return count * self.header_len + stop - start

    def __repr__(self) -> str:
        return f"<GsoPlan {self.count} x {self.mss} + {self.header_len} header bytes>"


def plan(frame: bytes, vnet_len: int, mode: str = "tun") -> GsoPlan | None:
    """How the TCP GSO super-packet ``frame`` (behind a ``vnet_len``-byte virtio-net header)
    splits into wire-sized segments; ``None`` if it is not one (no GSO, a single segment's
    worth of payload, not TCP, headers cut short)."""
    if vnet_len < VIRTIO_NET_HDR_LEN or len(frame) <= vnet_len:
        return None
    _flags, gso_type, _hdr_len, mss, _cs, _co = VIRTIO_NET_HDR.unpack_from(frame)
    if mss == 0 or gso_type & ~VIRTIO_NET_HDR_GSO_ECN not in _TCP_GSO:
        return None
    f = _h.parse(frame, vnet_len, mode)
    poff = f[_h.PAYLOAD]
    l4 = f[_h.L4]
    if f[_h.IP_PROTO] != IPPROTO_TCP or poff < 0 or l4 < 0 or f[_h.FRAG] >= 0:
        return None
    end = min(f[_h.END], len(frame))
    if end - poff <= mss:
        return None
    l3 = f[_h.L3]
    v4 = f[_h.VERSION] == 4
    addrs = frame[l3 + 12 : l3 + 20] if v4 else frame[l3 + 8 : l3 + 40]
    return GsoPlan(vnet_len, l3, l4, poff, end, mss, v4, gso_type, _ones_sum(addrs))


def _ones_sum(data: bytes | bytearray | memoryview) -> int:
    """The 16-bit ones' complement sum of ``data`` (RFC 1071), not complemented: the big
    integer modulo 0xFFFF is that sum (2**16 is 1 modulo 0xFFFF), computed in C."""
    n = len(data)
    value = int.from_bytes(data, "big")
    if n % 2:
        value <<= 8
    s = value % 0xFFFF
    if s == 0 and value:
        return 0xFFFF
    return s


def _fold(s: int) -> int:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def segments(
    frame: bytes,
    p: GsoPlan,
    first: int = 0,
    count: int = 1,
    *,
    vnet: bool = True,
    partial: bool = True,
    ce: bool = False,
) -> bytes:
    """Segments ``first .. first + count - 1`` of the super-packet ``frame`` as one frame
    (see :func:`segments_parts`)."""
    head, start, stop = _head(frame, p, first, count, vnet=vnet, partial=partial, ce=ce)
    return head + frame[start:stop]


def segments_parts(
    frame: bytes, p: GsoPlan, first: int = 0, count: int = 1, *, ce: bool = False
) -> tuple[bytes, memoryview]:
    """:func:`segments` (virtio-net header, checksum left partial) as its headers and a
    view of its payload in ``frame``, for ``os.writev``: no copy of the payload."""
    head, start, stop = _head(frame, p, first, count, vnet=True, partial=True, ce=ce)
    return head, memoryview(frame)[start:stop]


def _head(
    frame: bytes,
    p: GsoPlan,
    first: int,
    count: int,
    *,
    vnet: bool,
    partial: bool,
    ce: bool,
) -> tuple[bytes, int, int]:
    """Segments ``first .. first + count - 1`` of the super-packet ``frame`` as one frame.

    One segment (``count == 1``) is the packet the kernel's GSO makes of it; several are a
    smaller super-packet standing for exactly those segments (what a device with TSO
    would be handed), so a run of segments that share their fate goes out in one write.
    ``vnet``: start with a virtio-net header (for a device that has one): a super-packet's
    says GSO; ``partial`` leaves the TCP checksum to the receiving device (NEEDS_CSUM with
    the pseudo-header sum in place, as the kernel leaves it for a device that checksums);
    otherwise it is computed in full (as on a wire). ``ce`` sets ECN's Congestion
    Experienced in the IP header.
    """
    mss = p.mss
    start = p.poff + first * mss
    stop = min(p.end, start + count * mss)
    last = first + count >= p.count
    header = bytearray(frame[p.vnet_len : p.poff])
    l3 = p.l3 - p.vnet_len
    l4 = p.l4 - p.vnet_len
    tcp_len = p.poff - p.l4 + stop - start
    if p.v4:
        total = p.poff - p.l3 + stop - start
        ident = (frame[p.l3 + 4] << 8 | frame[p.l3 + 5]) + first & 0xFFFF
        header[l3 + 2] = total >> 8
        header[l3 + 3] = total & 0xFF
        header[l3 + 4] = ident >> 8
        header[l3 + 5] = ident & 0xFF
        if ce:
            header[l3 + 1] |= _IPV4_ECN_CE
        header[l3 + 10] = header[l3 + 11] = 0
        csum = ~_ones_sum(header[l3:l4]) & 0xFFFF
        header[l3 + 10] = csum >> 8
        header[l3 + 11] = csum & 0xFF
    else:
        plen = p.poff - p.l3 - 40 + stop - start
        header[l3 + 4] = plen >> 8
        header[l3 + 5] = plen & 0xFF
        if ce:
            header[l3 + 1] |= _IPV6_ECN_CE
    seq = (int.from_bytes(frame[p.l4 + 4 : p.l4 + 8], "big") + first * mss) & 0xFFFFFFFF
    header[l4 + 4 : l4 + 8] = seq.to_bytes(4, "big")
    flags = header[l4 + 13]
    if first:
        flags &= ~_TCP_CWR
    if not last:
        flags &= ~_TCP_FIN_PSH
    header[l4 + 13] = flags
    pseudo = _fold(p.addr_sum + IPPROTO_TCP + tcp_len)
    csum_offset = 16
    if partial:
        header[l4 + 16] = pseudo >> 8
        header[l4 + 17] = pseudo & 0xFF
    else:
        header[l4 + 16] = header[l4 + 17] = 0
        s = _fold(pseudo + _ones_sum(header[l4:]) + _ones_sum(memoryview(frame)[start:stop]))
        if (p.poff - p.l4) % 2:  # pragma: no cover - TCP headers are whole 32-bit words
            raise ValueError("odd TCP header length")
        csum = ~s & 0xFFFF
        header[l4 + 16] = csum >> 8
        header[l4 + 17] = csum & 0xFF
    if not vnet:
        return bytes(header), start, stop
    if partial:
        flags_v = VIRTIO_NET_HDR_F_NEEDS_CSUM
        cstart = l4
    else:
        flags_v = cstart = 0
        csum_offset = 0
    if count > 1:
        gso_type = p.gso_type
        if first:
            gso_type &= ~VIRTIO_NET_HDR_GSO_ECN  # CWR is on the first segment only
        vhdr = VIRTIO_NET_HDR.pack(flags_v, gso_type, p.header_len, mss, cstart, csum_offset)
    else:
        vhdr = VIRTIO_NET_HDR.pack(flags_v, VIRTIO_NET_HDR_GSO_NONE, 0, 0, cstart, csum_offset)
    return vhdr + bytes(header), start, stop


def finish_checksum(frame: bytes, vnet_len: int) -> bytes:
    """The packet behind ``frame``'s virtio-net header with its checksum done, as a device
    that checksums would send it (``skb_checksum_help``): with NEEDS_CSUM, the ones'
    complement of the sum from ``csum_start`` to the end goes at ``csum_start +
    csum_offset`` (a UDP checksum that comes out 0 is sent as 0xFFFF, RFC 768); without,
    the packet as it is. For a packet whose bytes the relay is about to change."""
    data = frame[vnet_len:]
    if vnet_len < VIRTIO_NET_HDR_LEN or not frame[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM:
        return data
    _flags, _gso_type, _hdr_len, _size, cstart, coff = VIRTIO_NET_HDR.unpack_from(frame)
    at = cstart + coff
    if at + 2 > len(data):
        return data
    csum = ~_ones_sum(memoryview(data)[cstart:]) & 0xFFFF
    if csum == 0 and coff == 6:
        csum = 0xFFFF
    return data[:at] + csum.to_bytes(2, "big") + data[at + 2 :]
