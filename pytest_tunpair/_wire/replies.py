"""Packets the relay writes back to a sender: TCP resets, ICMP errors, IPv4 fragments.

Pure functions on bytes (no sockets, no scapy: they run in the relay thread, per packet).
Every builder takes the packet as it came off a device, an IP packet for TUN or an Ethernet
frame for TAP, and returns frames for the same device kind: :func:`reply_frame` strips the
Ethernet header (VLAN tags and all), builds the IP reply and puts back the header with the
MAC addresses swapped, so the reply reaches the sender's stack, on the sender's VLAN, as if
the peer had sent it. Headers are found by the one parser (:mod:`.headers`) and the
replies built by the one set of builders (:mod:`.build`).

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

from . import build as _build
from . import headers as _h
from .numbers import (
    ICMP_DEST_UNREACH,
    ICMP_ERRORS,
    ICMP_FRAG_NEEDED,
    ICMP_HOST_UNREACH,
    ICMP_PORT_UNREACH,
    ICMPV6_ADDR_UNREACH,
    ICMPV6_DEST_UNREACH,
    ICMPV6_ERRORS,
    ICMPV6_PKT_TOOBIG,
    ICMPV6_PORT_UNREACH,
    IP_DF,
    IP_MF,
    IP_OFFSET,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPV4_HLEN,
    IPV4_MIN_MTU,
    IPV6_HLEN,
    IPV6_MIN_MTU,
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
)

__all__ = [
    "ReplyError",
    "frag_needed",
    "fragment_ipv4",
    "is_too_big",
    "reply_frame",
    "tcp_reset",
    "unreachable",
]

# How much of the offending packet an error quotes: as much as fits in a 576-byte ICMP
# datagram for IPv4 (RFC 1812 4.3.2.3, which extends RFC 792's "header + 64 bits"), and
# in the IPv6 minimum MTU for ICMPv6 (RFC 4443 2.4 (c)).
_ICMP_MAX = 576
_ICMPV6_MAX = IPV6_MIN_MTU


class ReplyError(ValueError):
    """A packet cannot be answered or fragmented as asked (too short, not IP, ...)."""


def _parse_ip(ip: bytes) -> _h.Parsed:
    """The parsed headers of an IP packet the builders answer; :class:`ReplyError` unless
    its IP headers are all there."""
    f = _h.parse(ip, 0, "tun")
    if f[_h.VERSION] is None:
        what = f"version {ip[0] >> 4}" if ip else "empty"
        raise ReplyError(f"not an IP packet ({what})")
    if f[_h.HDR_END] < 0:
        raise ReplyError(
            f"IPv{f[_h.VERSION]} packet of {len(ip)} bytes: its headers are cut short or malformed"
        )
    if f[_h.END] < f[_h.HDR_END]:
        raise ReplyError(f"IPv{f[_h.VERSION]} length field shorter than its headers")
    return f


def _icmp_error_allowed(ip: bytes, f: _h.Parsed) -> bool:
    """RFC 1122 3.2.2 / RFC 4443 2.4 (e): never about an ICMP error, a non-first fragment,
    or a packet from a multicast or unspecified source."""
    if f[_h.FRAG] > 0:
        return False
    src = _h.packed_address(ip, f, 0)
    dst = _h.packed_address(ip, f, 1)
    assert src is not None and dst is not None  # _parse_ip: the headers are there
    if f[_h.VERSION] == 4:
        if src[0] >= 224 or src == b"\0\0\0\0" or dst[0] >= 224:
            return False
        errors, proto = ICMP_ERRORS, IPPROTO_ICMP
    else:
        if src[0] == 0xFF or src == bytes(16):
            return False
        errors, proto = ICMPV6_ERRORS, IPPROTO_ICMPV6
    icmp_type = _h.icmp_byte(ip, f, 0)
    return not (f[_h.IP_PROTO] == proto and icmp_type in errors)


def _icmp(ip: bytes, f: _h.Parsed, icmp_type: int, code: int, rest: int) -> bytes:
    """An ICMP (IPv4) or ICMPv6 error about ``ip`` with the 32-bit field ``rest``."""
    v4 = f[_h.VERSION] == 4
    quote_max = (_ICMP_MAX - IPV4_HLEN - 8) if v4 else (_ICMPV6_MAX - IPV6_HLEN - 8)
    quote = ip[: min(f[_h.END], len(ip), quote_max)]
    src, dst = _h.packed_address(ip, f, 1), _h.packed_address(ip, f, 0)
    assert src is not None and dst is not None
    body = _build.icmp(src, dst, icmp_type, code, rest, quote)
    return _build.ip_packet(src, dst, IPPROTO_ICMP if v4 else IPPROTO_ICMPV6, body)


def unreachable(ip: bytes, code: int | None = None) -> bytes | None:
    """An ICMP / ICMPv6 destination unreachable answering ``ip``, or None where RFC 1122 3.2.2
    or RFC 4443 2.4 (e) forbid an error (about an ICMP error, a later fragment, multicast).

    ``code`` defaults to *port unreachable* for UDP (the kernel reports ECONNREFUSED on a
    connected socket) and *host unreachable* (ICMP code 1) / *address unreachable*
    (ICMPv6 code 3) for anything else (EHOSTUNREACH).
    """
    f = _parse_ip(ip)
    if not _icmp_error_allowed(ip, f):
        return None
    udp = f[_h.IP_PROTO] == IPPROTO_UDP
    if f[_h.VERSION] == 4:
        if code is None:
            code = ICMP_PORT_UNREACH if udp else ICMP_HOST_UNREACH
        return _icmp(ip, f, ICMP_DEST_UNREACH, code, 0)
    if code is None:
        code = ICMPV6_PORT_UNREACH if udp else ICMPV6_ADDR_UNREACH
    return _icmp(ip, f, ICMPV6_DEST_UNREACH, code, 0)


def frag_needed(ip: bytes, mtu: int) -> bytes | None:
    """ICMP *fragmentation needed* (type 3 code 4) with next-hop MTU ``mtu`` (RFC 1191 4),
    or ICMPv6 *packet too big* with MTU ``mtu`` (RFC 4443 3.2); None where no error may be
    sent (see :func:`unreachable`)."""
    f = _parse_ip(ip)
    if not _icmp_error_allowed(ip, f):
        return None
    if f[_h.VERSION] == 4:
        # RFC 1191 4: the unused high 16 bits stay zero, the low 16 carry the MTU.
        return _icmp(ip, f, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, mtu & 0xFFFF)
    return _icmp(ip, f, ICMPV6_PKT_TOOBIG, 0, mtu)


def tcp_reset(ip: bytes) -> bytes | None:
    """The TCP RST a closed port would send in reply to the segment ``ip`` (RFC 793 3.4,
    "Reset Generation"): None if ``ip`` is not TCP (a fragment after the first has no TCP
    header) or is itself a reset.

    If the segment has ACK, the reset takes its sequence number from that ACK field and has
    no ACK; otherwise it has sequence number zero and acknowledges the segment's sequence
    number plus its length, SYN and FIN each counting one.
    """
    f = _parse_ip(ip)
    flags = f[_h.TCP_FLAGS]
    if f[_h.IP_PROTO] != IPPROTO_TCP or flags is None:
        return None
    if flags & TCP_RST:
        return None  # RFC 793: a reset is never answered
    l4 = f[_h.L4]
    sport, dport, seq, ack = struct.unpack_from("!HHII", ip, l4)
    if flags & TCP_ACK:
        r_seq, r_ack, r_flags = ack, 0, TCP_RST
    else:
        payload = f[_h.PAYLOAD]
        seg_len = min(f[_h.END], len(ip)) - payload if payload >= 0 else 0
        seg_len += bool(flags & TCP_SYN) + bool(flags & TCP_FIN)
        r_seq, r_ack, r_flags = 0, (seq + seg_len) & 0xFFFFFFFF, TCP_RST | TCP_ACK
    src, dst = _h.packed_address(ip, f, 1), _h.packed_address(ip, f, 0)
    assert src is not None and dst is not None
    segment = _build.tcp(src, dst, dport, sport, seq=r_seq, ack=r_ack, flags=r_flags, window=0)
    return _build.ip_packet(src, dst, IPPROTO_TCP, segment, flags=IP_DF if len(src) == 4 else 0)


def is_too_big(ip: bytes, mtu: int) -> bool:
    """True if ``ip`` is longer than ``mtu`` and may not be fragmented on the way: IPv4 with
    DF set, or any IPv6 packet (RFC 8200 5: routers never fragment)."""
    if len(ip) <= mtu or not ip:
        return False
    if ip[0] >> 4 == 6:
        return True
    return len(ip) >= IPV4_HLEN and bool(struct.unpack_from("!H", ip, 6)[0] & IP_DF)


def fragment_ipv4(ip: bytes, mtu: int) -> list[bytes]:
    """Cut the IPv4 packet ``ip`` (DF clear) into fragments of at most ``mtu`` bytes
    (RFC 791 3.2, "Fragmentation"): offsets in 8-byte units, MF on every fragment but the
    last (which keeps the original's MF, so a fragment can be fragmented again), options
    with the *copied* bit in every fragment and the others in the first only, each header
    with its checksum. A packet that already fits is returned unchanged."""
    f = _parse_ip(ip)
    if f[_h.VERSION] != 4:
        raise ReplyError("only IPv4 packets are fragmented on the way (RFC 8200 5)")
    total = min(f[_h.END], len(ip))
    if total <= mtu:
        return [ip[:total]]
    frag_field = struct.unpack_from("!H", ip, 6)[0]
    if frag_field & IP_DF:
        raise ReplyError("the packet has DF set: answer it with frag_needed() instead")
    if mtu < IPV4_MIN_MTU:
        raise ReplyError(f"an IPv4 MTU is at least {IPV4_MIN_MTU} (RFC 791), not {mtu}")
    hdr_end = f[_h.HDR_END]
    header = ip[:hdr_end]
    later_header = header[:IPV4_HLEN] + _copied_options(header[IPV4_HLEN:])
    payload = ip[hdr_end:total]
    base = (frag_field & IP_OFFSET) * 8
    last_mf = frag_field & IP_MF
    fragments: list[bytes] = []
    start = 0
    while start < len(payload):
        hdr = header if start == 0 else later_header
        room = (mtu - len(hdr)) // 8 * 8
        chunk = payload[start : start + room]
        last = start + len(chunk) >= len(payload)
        flags = (last_mf if last else IP_MF) | ((base + start) // 8)
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
    struct.pack_into("!H", h, 10, _build.checksum(bytes(h)))
    return bytes(h) + payload


def reply_frame(
    frame: bytes,
    mode: str,
    build: Callable[[bytes], bytes | list[bytes] | None],
    *,
    back: bool = True,
) -> list[bytes]:
    """Apply an IP-level builder to a device frame and return the frames it makes.

    For ``mode == "tun"`` the frame is the IP packet. For ``"tap"`` the Ethernet header,
    VLAN tags and all, is taken off, and put back on each result: with source and
    destination MAC swapped when the result goes ``back`` to the sender (a reply), so it
    reaches the sender on the VLAN it came from, and unchanged when it goes on (a
    fragment); a frame that is not IPv4/IPv6 gets nothing. ``build`` returns one packet,
    several (fragments) or None (no reply allowed): the result is a list, empty when there
    is nothing to write.
    """
    if mode == "tap":
        f = _h.parse(frame, 0, mode)
        if f[_h.VERSION] is None:
            return []
        l3 = f[_h.L3]
        eth = frame[6:12] + frame[0:6] + frame[12:l3] if back else frame[:l3]
        ip = frame[l3:]
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
