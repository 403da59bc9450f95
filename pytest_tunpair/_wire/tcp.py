"""Header parsing and sequence arithmetic for the scripted peer -- pure functions, no I/O.

The peer decodes every packet handed to it in the test thread to track TCP state, so this
reads the few fields it needs straight from the bytes (docs/internals.md, "scapy decode
cost": a struct parser is about 40x cheaper than a scapy decode) and leaves scapy to the user's own asserts.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

__all__ = ["Segment", "TcpOptions", "parse", "seq_add", "seq_geq", "seq_gt", "seq_lt"]

ETH_HLEN = 14  # include/uapi/linux/if_ether.h
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_ARP = 0x0806
_VLAN = (0x8100, 0x88A8)
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58
# IPv6 extension headers with the generic (next header, length in 8-octet units) layout
# (RFC 8200 4.1): hop-by-hop, routing, destination options. Fragment (44) is fixed 8 bytes.
_IPV6_EXT = frozenset({0, 43, 60})
_IPV6_FRAG = 44
# TCP flag bits in scapy's letter order (FIN first), so strings read as scapy prints them.
_FLAG_LETTERS = "FSRPAUECN"
# TCP option kinds (IANA, RFC 9293 3.2, RFC 7323, RFC 2018).
TCPOPT_EOL, TCPOPT_NOP, TCPOPT_MSS, TCPOPT_WSCALE = 0, 1, 2, 3
TCPOPT_SACK_PERM, TCPOPT_SACK, TCPOPT_TIMESTAMP = 4, 5, 8

_MOD = 1 << 32


def seq_add(a: int, n: int) -> int:
    return (a + n) % _MOD


def seq_lt(a: int, b: int) -> bool:
    """``a`` before ``b`` in 32-bit sequence space (RFC 9293 3.4: arithmetic modulo 2**32)."""
    return 0 < (b - a) % _MOD < 1 << 31


def seq_gt(a: int, b: int) -> bool:
    return seq_lt(b, a)


def seq_geq(a: int, b: int) -> bool:
    return a == b or seq_gt(a, b)


@dataclass(frozen=True)
class TcpOptions:
    """The TCP options one side put in its SYN (``conn.peer_options``): ``None``/``False``
    for an option it did not offer."""

    #: Maximum segment size (RFC 9293 3.7.1).
    mss: int | None = None
    #: Window scale shift count (RFC 7323 2).
    wscale: int | None = None
    #: SACK permitted (RFC 2018).
    sack: bool = False
    #: Timestamps offered (RFC 7323 3).
    timestamps: bool = False


@dataclass
class Segment:
    """The fields of one packet the peer tracks state from (TCP, UDP, or neither)."""

    family: int  # 4 or 6
    src: str
    dst: str
    proto: int
    sport: int = 0
    dport: int = 0
    seq: int = 0
    ack: int = 0
    flags: str = ""
    window: int = 0
    payload: bytes = b""
    tsval: int | None = None
    tsecr: int | None = None
    options: TcpOptions = field(default_factory=TcpOptions)

    def has(self, letters: str) -> bool:
        return all(c in self.flags for c in letters)

    @property
    def seg_len(self) -> int:
        """Sequence space the segment occupies: payload plus one each for SYN and FIN."""
        return len(self.payload) + ("S" in self.flags) + ("F" in self.flags)


def l3_offset(data: bytes, mode: str) -> tuple[int, int] | None:
    """(offset of the IP header, ethertype); ``None`` for a frame too short to say."""
    if mode != "tap":
        if not data:
            return None
        version = data[0] >> 4
        return 0, ETH_P_IP if version == 4 else ETH_P_IPV6 if version == 6 else 0
    if len(data) < ETH_HLEN:
        return None
    off = ETH_HLEN
    (ethertype,) = struct.unpack_from("!H", data, 12)
    while ethertype in _VLAN and len(data) >= off + 4:
        (ethertype,) = struct.unpack_from("!H", data, off + 2)
        off += 4
    return off, ethertype


def ip_header(data: bytes, off: int) -> tuple[int, bytes, bytes, int, int, int] | None:
    """(family, src, dst as packed bytes, protocol, L4 offset, L4 end) of an IP packet."""
    if len(data) < off + 20:
        return None
    version = data[off] >> 4
    if version == 4:
        ihl = (data[off] & 0x0F) * 4
        (total,) = struct.unpack_from("!H", data, off + 2)
        end = min(len(data), off + total)
        return (
            4,
            data[off + 12 : off + 16],
            data[off + 16 : off + 20],
            data[off + 9],
            off + ihl,
            end,
        )
    if version == 6 and len(data) >= off + 40:
        (plen,) = struct.unpack_from("!H", data, off + 4)
        nh = data[off + 6]
        pos = off + 40
        end = min(len(data), pos + plen)
        while nh in _IPV6_EXT or nh == _IPV6_FRAG:
            if pos + 8 > end:
                return None
            step = 8 if nh == _IPV6_FRAG else (data[pos + 1] + 1) * 8
            nh = data[pos]
            pos += step
        return 6, data[off + 8 : off + 24], data[off + 24 : off + 40], nh, pos, end
    return None


def _tcp_options(raw: bytes) -> tuple[TcpOptions, int | None, int | None]:
    mss = wscale = tsval = tsecr = None
    sack = False
    i = 0
    while i < len(raw):
        kind = raw[i]
        if kind == TCPOPT_EOL:
            break
        if kind == TCPOPT_NOP:
            i += 1
            continue
        if i + 1 >= len(raw) or raw[i + 1] < 2:
            break  # malformed: stop rather than loop
        size = raw[i + 1]
        body = raw[i + 2 : i + size]
        if kind == TCPOPT_MSS and len(body) == 2:
            (mss,) = struct.unpack("!H", body)
        elif kind == TCPOPT_WSCALE and len(body) == 1:
            wscale = body[0]
        elif kind == TCPOPT_SACK_PERM:
            sack = True
        elif kind == TCPOPT_TIMESTAMP and len(body) == 8:
            tsval, tsecr = struct.unpack("!II", body)
        i += size
    return TcpOptions(mss, wscale, sack, tsval is not None), tsval, tsecr


def parse(data: bytes, mode: str) -> Segment | None:
    """The IP/TCP/UDP fields of ``data`` (an IP packet, or an Ethernet frame on TAP)."""
    where = l3_offset(data, mode)
    if where is None or where[1] not in (ETH_P_IP, ETH_P_IPV6):
        return None
    hdr = ip_header(data, where[0])
    if hdr is None:
        return None
    family, src, dst, proto, l4, end = hdr
    seg = Segment(
        family,
        str(ipaddress.ip_address(src)),
        str(ipaddress.ip_address(dst)),
        proto,
    )
    if proto == IPPROTO_TCP and end >= l4 + 20:
        sport, dport, seq, ack, off_flags, window = struct.unpack_from("!HHIIHH", data, l4)
        doff = (off_flags >> 12) * 4
        bits = off_flags & 0x1FF
        seg.sport, seg.dport, seg.seq, seg.ack, seg.window = sport, dport, seq, ack, window
        seg.flags = "".join(c for i, c in enumerate(_FLAG_LETTERS) if bits & (1 << i))
        seg.options, seg.tsval, seg.tsecr = _tcp_options(data[l4 + 20 : l4 + doff])
        seg.payload = data[l4 + doff : end]
    elif proto == IPPROTO_UDP and end >= l4 + 8:
        seg.sport, seg.dport = struct.unpack_from("!HH", data, l4)
        seg.payload = data[l4 + 8 : end]
    return seg
