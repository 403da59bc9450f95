"""Packets the relay writes back to a sender: TCP resets, ICMP errors, IPv4 fragments.

Pure functions on bytes (no sockets, no scapy: they run in the relay thread, per packet).
Every builder takes the packet as it came off a device, an IP packet for TUN or an Ethernet
frame for TAP, and returns frames for the same device kind: :func:`reply_frame` strips the
Ethernet header, builds the IP reply and puts back a header with the MAC addresses swapped,
so the reply reaches the sender's stack as if the peer had sent it.

A reply's source address is the original packet's destination. The relay has no address of
its own, and the routing recipe (docs/internals.md, "The routing recipe") only delivers to
a side packets that look as if they came from the other side; the kernel matches an ICMP
error to its socket by the quoted header, never by the error's source (docs/internals.md,
"ICMP errors reach the socket by the quoted header"), so path-MTU discovery and error
reporting work all the same.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

__all__ = [
    "ICMP6_ADDR_UNREACH",
    "ICMP6_PORT_UNREACH",
    "ICMP_HOST_UNREACH",
    "ICMP_PORT_UNREACH",
    "IPV4_MIN_MTU",
    "IPV6_MIN_MTU",
    "ReplyError",
    "checksum",
    "frag_needed",
    "fragment_ipv4",
    "ip_header",
    "is_too_big",
    "l3",
    "reply_frame",
    "tcp_reset",
    "unreachable",
]

# Protocol numbers (IANA; include/uapi/linux/in.h, in6.h).
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58
_IPV6_EXT_HEADERS = {0, 43, 60}  # hop-by-hop, routing, destination options (RFC 8200 4)
IPPROTO_FRAGMENT = 44

# ICMP types and codes (RFC 792, include/uapi/linux/icmp.h).
ICMP_DEST_UNREACH = 3
ICMP_HOST_UNREACH = 1
ICMP_PORT_UNREACH = 3
ICMP_FRAG_NEEDED = 4
# ICMPv6 (RFC 4443, include/uapi/linux/icmpv6.h).
ICMPV6_DEST_UNREACH = 1
ICMP6_ADDR_UNREACH = 3
ICMP6_PORT_UNREACH = 4
ICMPV6_PKT_TOOBIG = 2
# Error types: no ICMP error is ever sent about one of these (RFC 1122 3.2.2, RFC 4443 2.4).
_ICMP_ERRORS = {3, 4, 5, 11, 12}
_ICMPV6_ERRORS = {1, 2, 3, 4}

IPV4_MIN_MTU = 68  # RFC 791: every IPv4 module must forward a 68-byte datagram
IPV6_MIN_MTU = 1280  # RFC 8200 5
# How much of the offending packet an error quotes: as much as fits in a 576-byte ICMP
# datagram for IPv4 (RFC 1812 4.3.2.3, which extends RFC 792's "header + 64 bits"), and
# in the IPv6 minimum MTU for ICMPv6 (RFC 4443 2.4 (c)).
_ICMP_MAX = 576
_ICMPV6_MAX = IPV6_MIN_MTU

_DF = 0x4000
_MF = 0x2000
_OFFSET_MASK = 0x1FFF

ETH_HLEN = 14
_ETH_P_IP = 0x0800
_ETH_P_IPV6 = 0x86DD

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_ACK = 0x10

_TTL = 64


class ReplyError(ValueError):
    """A packet cannot be answered or fragmented as asked (too short, not IP, ...)."""


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``: one's-complement sum of 16-bit words."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ip_header(
    src: bytes, dst: bytes, proto: int, payload_len: int, *, ident: int = 0, flags: int = 0
) -> bytes:
    """An IPv4 header without options, or an IPv6 header, by the address length."""
    if len(src) == 4:
        header = struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 20 + payload_len, ident, flags, _TTL, proto, 0, src, dst
        )
        return header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return struct.pack("!IHBB16s16s", 6 << 28, payload_len, proto, _TTL, src, dst)


def _pseudo_header(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    if len(src) == 4:
        return struct.pack("!4s4sBBH", src, dst, 0, proto, length)
    return struct.pack("!16s16sIxxxB", src, dst, length, proto)


class _Parsed:
    """Where the parts of an IP packet are, as far as the builders need them."""

    __slots__ = ("dst", "first_fragment", "l4", "proto", "src", "total", "version")

    def __init__(self, ip: bytes) -> None:
        if not ip:
            raise ReplyError("empty packet")
        self.version = ip[0] >> 4
        if self.version == 4:
            if len(ip) < 20:
                raise ReplyError(f"IPv4 packet of {len(ip)} bytes is shorter than its header")
            ihl = (ip[0] & 0x0F) * 4
            total = struct.unpack_from("!H", ip, 2)[0]
            if ihl < 20 or total < ihl or len(ip) < ihl:
                raise ReplyError("malformed IPv4 header")
            self.total = min(total, len(ip))
            self.proto = ip[9]
            self.src, self.dst = ip[12:16], ip[16:20]
            self.l4 = ihl
            self.first_fragment = struct.unpack_from("!H", ip, 6)[0] & _OFFSET_MASK == 0
        elif self.version == 6:
            if len(ip) < 40:
                raise ReplyError(f"IPv6 packet of {len(ip)} bytes is shorter than its header")
            self.total = min(40 + struct.unpack_from("!H", ip, 4)[0], len(ip))
            self.src, self.dst = ip[8:24], ip[24:40]
            proto, offset = ip[6], 40
            self.first_fragment = True
            # Walk the extension headers RFC 8200 4 lets a packet carry before TCP/UDP.
            while proto in _IPV6_EXT_HEADERS or proto == IPPROTO_FRAGMENT:
                if offset + 8 > len(ip):
                    raise ReplyError("truncated IPv6 extension header")
                if proto == IPPROTO_FRAGMENT:
                    frag = struct.unpack_from("!H", ip, offset + 2)[0]
                    self.first_fragment = frag >> 3 == 0
                    proto, offset = ip[offset], offset + 8
                else:
                    proto, offset = ip[offset], offset + (ip[offset + 1] + 1) * 8
            self.proto = proto
            self.l4 = offset
        else:
            raise ReplyError(f"not an IP packet (version {self.version})")


def _icmp_error_allowed(ip: bytes, p: _Parsed) -> bool:
    """RFC 1122 3.2.2 / RFC 4443 2.4 (e): never about an ICMP error, a non-first fragment,
    or a packet from a multicast or unspecified source."""
    if not p.first_fragment:
        return False
    if p.version == 4:
        if p.src[0] >= 224 or p.src == b"\0\0\0\0" or p.dst[0] >= 224:
            return False
        if p.proto == IPPROTO_ICMP and len(ip) > p.l4 and ip[p.l4] in _ICMP_ERRORS:
            return False
    else:
        if p.src[0] == 0xFF or p.src == bytes(16):
            return False
        if p.proto == IPPROTO_ICMPV6 and len(ip) > p.l4 and ip[p.l4] in _ICMPV6_ERRORS:
            return False
    return True


def _icmp(ip: bytes, p: _Parsed, icmp_type: int, code: int, rest: int) -> bytes:
    """An ICMP (IPv4) or ICMPv6 error about ``ip`` with the 32-bit field ``rest``."""
    quote_max = (_ICMP_MAX - 20 - 8) if p.version == 4 else (_ICMPV6_MAX - 40 - 8)
    quote = ip[: min(p.total, quote_max)]
    body = struct.pack("!BBHI", icmp_type, code, 0, rest) + quote
    src, dst = p.dst, p.src
    if p.version == 4:
        csum = checksum(body)
        proto = IPPROTO_ICMP
    else:
        proto = IPPROTO_ICMPV6
        csum = checksum(_pseudo_header(src, dst, proto, len(body)) + body)
    body = body[:2] + struct.pack("!H", csum) + body[4:]
    return ip_header(src, dst, proto, len(body)) + body


def unreachable(ip: bytes, code: int | None = None) -> bytes | None:
    """An ICMP / ICMPv6 destination unreachable answering ``ip``, or None where RFC 1122 3.2.2
    or RFC 4443 2.4 (e) forbid an error (about an ICMP error, a later fragment, multicast).

    ``code`` defaults to *port unreachable* for UDP (the kernel reports ECONNREFUSED on a
    connected socket) and *host unreachable* (ICMP code 1) / *address unreachable*
    (ICMPv6 code 3) for anything else (EHOSTUNREACH).
    """
    p = _Parsed(ip)
    if not _icmp_error_allowed(ip, p):
        return None
    if p.version == 4:
        if code is None:
            code = ICMP_PORT_UNREACH if p.proto == IPPROTO_UDP else ICMP_HOST_UNREACH
        return _icmp(ip, p, ICMP_DEST_UNREACH, code, 0)
    if code is None:
        code = ICMP6_PORT_UNREACH if p.proto == IPPROTO_UDP else ICMP6_ADDR_UNREACH
    return _icmp(ip, p, ICMPV6_DEST_UNREACH, code, 0)


def frag_needed(ip: bytes, mtu: int) -> bytes | None:
    """ICMP *fragmentation needed* (type 3 code 4) with next-hop MTU ``mtu`` (RFC 1191 4),
    or ICMPv6 *packet too big* with MTU ``mtu`` (RFC 4443 3.2); None where no error may be
    sent (see :func:`unreachable`)."""
    p = _Parsed(ip)
    if not _icmp_error_allowed(ip, p):
        return None
    if p.version == 4:
        # RFC 1191 4: the unused high 16 bits stay zero, the low 16 carry the MTU.
        return _icmp(ip, p, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, mtu & 0xFFFF)
    return _icmp(ip, p, ICMPV6_PKT_TOOBIG, 0, mtu)


def tcp_reset(ip: bytes) -> bytes | None:
    """The TCP RST a closed port would send in reply to the segment ``ip`` (RFC 793 3.4,
    "Reset Generation"): None if ``ip`` is not TCP or is itself a reset.

    If the segment has ACK, the reset takes its sequence number from that ACK field and has
    no ACK; otherwise it has sequence number zero and acknowledges the segment's sequence
    number plus its length, SYN and FIN each counting one.
    """
    p = _Parsed(ip)
    if p.proto != IPPROTO_TCP or not p.first_fragment or p.total < p.l4 + 20:
        return None
    sport, dport, seq, ack, offset_byte, flags = struct.unpack_from("!HHIIBB", ip, p.l4)
    if flags & TCP_RST:
        return None  # RFC 793: a reset is never answered
    if flags & TCP_ACK:
        r_seq, r_ack, r_flags = ack, 0, TCP_RST
    else:
        seg_len = p.total - p.l4 - (offset_byte >> 4) * 4
        seg_len += bool(flags & TCP_SYN) + bool(flags & TCP_FIN)
        r_seq, r_ack, r_flags = 0, (seq + seg_len) & 0xFFFFFFFF, TCP_RST | TCP_ACK
    src, dst = p.dst, p.src
    segment = struct.pack("!HHIIBBHHH", dport, sport, r_seq, r_ack, 5 << 4, r_flags, 0, 0, 0)
    csum = checksum(_pseudo_header(src, dst, IPPROTO_TCP, len(segment)) + segment)
    segment = segment[:16] + struct.pack("!H", csum) + segment[18:]
    return ip_header(src, dst, IPPROTO_TCP, len(segment), flags=_DF if p.version == 4 else 0) + (
        segment
    )


def is_too_big(ip: bytes, mtu: int) -> bool:
    """True if ``ip`` is longer than ``mtu`` and may not be fragmented on the way: IPv4 with
    DF set, or any IPv6 packet (RFC 8200 5: routers never fragment)."""
    if len(ip) <= mtu or not ip:
        return False
    if ip[0] >> 4 == 6:
        return True
    return len(ip) >= 20 and bool(struct.unpack_from("!H", ip, 6)[0] & _DF)


def fragment_ipv4(ip: bytes, mtu: int) -> list[bytes]:
    """Cut the IPv4 packet ``ip`` (DF clear) into fragments of at most ``mtu`` bytes
    (RFC 791 3.2, "Fragmentation"): offsets in 8-byte units, MF on every fragment but the
    last (which keeps the original's MF, so a fragment can be fragmented again), options
    with the *copied* bit in every fragment and the others in the first only, each header
    with its checksum. A packet that already fits is returned unchanged."""
    p = _Parsed(ip)
    if p.version != 4:
        raise ReplyError("only IPv4 packets are fragmented on the way (RFC 8200 5)")
    if p.total <= mtu:
        return [ip[: p.total]]
    frag_field = struct.unpack_from("!H", ip, 6)[0]
    if frag_field & _DF:
        raise ReplyError("the packet has DF set: answer it with frag_needed() instead")
    if mtu < IPV4_MIN_MTU:
        raise ReplyError(f"an IPv4 MTU is at least {IPV4_MIN_MTU} (RFC 791), not {mtu}")
    header = ip[: p.l4]
    later_header = header[:20] + _copied_options(header[20:])
    payload = ip[p.l4 : p.total]
    base = (frag_field & _OFFSET_MASK) * 8
    last_mf = frag_field & _MF
    fragments: list[bytes] = []
    start = 0
    while start < len(payload):
        hdr = header if start == 0 else later_header
        room = (mtu - len(hdr)) // 8 * 8
        chunk = payload[start : start + room]
        last = start + len(chunk) >= len(payload)
        flags = (last_mf if last else _MF) | ((base + start) // 8)
        fragments.append(_with_header(hdr, chunk, flags))
        start += len(chunk)
    return fragments


def _copied_options(options: bytes) -> bytes:
    """The IPv4 options a later fragment keeps: those with the copied flag (RFC 791 3.1),
    padded with EOL to a multiple of four bytes."""
    kept = b""
    i = 0
    while i < len(options):
        kind = options[i]
        if kind == 0:  # end of option list
            break
        if kind == 1:  # no-operation, one byte, not copied
            i += 1
            continue
        if i + 1 >= len(options) or options[i + 1] < 2:
            break  # malformed: keep what was parsed
        length = options[i + 1]
        if kind & 0x80:
            kept += options[i : i + length]
        i += length
    return kept + b"\0" * (-len(kept) % 4)


def _with_header(header: bytes, payload: bytes, frag_field: int) -> bytes:
    ihl = len(header) // 4
    h = bytearray(header)
    h[0] = 0x40 | ihl
    struct.pack_into("!H", h, 2, len(header) + len(payload))
    struct.pack_into("!H", h, 6, frag_field)
    struct.pack_into("!H", h, 10, 0)
    struct.pack_into("!H", h, 10, checksum(bytes(h)))
    return bytes(h) + payload


def reply_frame(
    frame: bytes,
    mode: str,
    build: Callable[[bytes], bytes | list[bytes] | None],
    *,
    back: bool = True,
) -> list[bytes]:
    """Apply an IP-level builder to a device frame and return the frames it makes.

    For ``mode == "tun"`` the frame is the IP packet. For ``"tap"`` the Ethernet header is
    taken off, and put back on each result, with source and destination MAC swapped when
    the result goes ``back`` to the sender (a reply) and unchanged when it goes on (a
    fragment); a frame that is not IPv4/IPv6 gets nothing. ``build``
    returns one packet, several (fragments) or None (no reply allowed): the result is a
    list, empty when there is nothing to write.
    """
    if mode == "tap":
        if len(frame) < ETH_HLEN:
            return []
        ethertype = struct.unpack_from("!H", frame, 12)[0]
        if ethertype not in (_ETH_P_IP, _ETH_P_IPV6):
            return []
        eth = frame[6:12] + frame[0:6] + frame[12:14] if back else frame[:ETH_HLEN]
        ip = frame[ETH_HLEN:]
    else:
        eth = b""
        ip = frame
    try:
        built = build(ip)
    except ReplyError:
        return []
    if built is None:
        return []
    packets = built if isinstance(built, list) else [built]
    return [eth + packet for packet in packets]


def l3(frame: bytes, mode: str) -> bytes:
    """The IP packet inside a device frame (TAP frames lose their Ethernet header)."""
    return frame[ETH_HLEN:] if mode == "tap" else frame
