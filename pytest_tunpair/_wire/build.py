"""THE builders: the bytes of headers and whole packets the project writes itself.

Replies (TCP resets, ICMP errors, fragments), neighbour answers and the scripted peer's
segments and datagrams are all built here, with ``struct`` and the one Internet checksum:
no scapy, so they can run in the relay thread, which must never wait for scapy's first
import (docs/internals.md, "Import cost of scapy and pyroute2"). Addresses are packed
bytes; 4 bytes make IPv4, 16 make IPv6. Layouts: RFC 791, RFC 8200, RFC 9293, RFC 768,
RFC 792, RFC 4443; the checksum RFC 1071.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

from .headers import TCP_OPTION_NAMES
from .numbers import (
    DEFAULT_TTL,
    IPPROTO_ICMPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    TCP_MAX_OPTIONS,
    TCPOPT_EOL,
    TCPOPT_NOP,
    TCPOPT_SACK,
)

__all__ = [
    "checksum",
    "ethernet",
    "icmp",
    "ip_header",
    "ip_packet",
    "pseudo_header",
    "tcp",
    "tcp_options",
    "udp",
]

_OPTION_KINDS = {name: (kind, layout) for kind, (name, layout) in TCP_OPTION_NAMES.items()}


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``: one's-complement sum of 16-bit words."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def pseudo_header(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    """The pseudo-header a TCP, UDP or ICMPv6 checksum covers (RFC 9293 3.1, RFC 8200 8.1)."""
    if len(src) == 4:
        return struct.pack("!4s4sBBH", src, dst, 0, proto, length)
    return struct.pack("!16s16sIxxxB", src, dst, length, proto)


def ip_header(
    src: bytes,
    dst: bytes,
    proto: int,
    payload_len: int,
    *,
    ident: int = 0,
    flags: int = 0,
    ttl: int = DEFAULT_TTL,
    tos: int = 0,
    flowlabel: int = 0,
) -> bytes:
    """An IPv4 header without options (``flags`` is the flags/fragment-offset word, its
    checksum filled in), or an IPv6 header (``ttl`` the hop limit, ``tos`` the traffic
    class, ``flowlabel`` the 20-bit flow label), by the address length."""
    if len(src) == 4:
        header = struct.pack(
            "!BBHHHBBH4s4s", 0x45, tos, 20 + payload_len, ident, flags, ttl, proto, 0, src, dst
        )
        return header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    word = 6 << 28 | tos << 20 | flowlabel & 0xFFFFF
    return struct.pack("!IHBB16s16s", word, payload_len, proto, ttl, src, dst)


def ip_packet(src: bytes, dst: bytes, proto: int, payload: bytes, **header: Any) -> bytes:
    """``payload`` behind an IP header (:func:`ip_header`'s keywords)."""
    return ip_header(src, dst, proto, len(payload), **header) + payload


def _with_checksum(src: bytes, dst: bytes, proto: int, segment: bytes, at: int) -> bytes:
    csum = checksum(pseudo_header(src, dst, proto, len(segment)) + segment)
    if proto == IPPROTO_UDP and csum == 0:
        csum = 0xFFFF  # RFC 768: 0 means "no checksum"; a computed 0 is sent as all ones
    return segment[:at] + struct.pack("!H", csum) + segment[at + 2 :]


def tcp_options(options: Iterable[tuple[str | int, Any]]) -> bytes:
    """Encode an ordered options list, in the shapes ``Packet.tcp_options`` gives (scapy's
    names: ``[("MSS", 1460), ("NOP", None), ("WScale", 7), ("SAckOK", b""),
    ("Timestamp", (tsval, tsecr)), ("SAck", (left, right, ...)), (kind, b"value")]``),
    padded with end-of-list bytes to a multiple of 4, as scapy pads. A value given as
    bytes is sent as is. ``ValueError`` for an unknown name or more than 40 bytes."""
    out = b""
    for name, value in options:
        if name in ("NOP", TCPOPT_NOP):
            out += b"\x01"
            continue
        if name in ("EOL", TCPOPT_EOL):
            out += b"\x00"
            continue
        if isinstance(name, int):
            kind = name
            body = bytes(value)
        else:
            known = _OPTION_KINDS.get(name)
            if known is None:
                raise ValueError(
                    f"TCP option {name!r} is unknown: use one of "
                    f"{', '.join(_OPTION_KINDS)}, or (kind, bytes)"
                )
            kind, layout = known
            if isinstance(value, bytes | bytearray) or layout is None:
                body = bytes(value or b"")
            else:
                words = value if isinstance(value, tuple | list) else (value,)
                if kind == TCPOPT_SACK:
                    layout = f"!{len(words)}I"
                body = struct.pack(layout, *words)
        out += struct.pack("!BB", kind, 2 + len(body)) + body
    out += b"\0" * (-len(out) % 4)
    if len(out) > TCP_MAX_OPTIONS:
        raise ValueError(
            f"TCP options of {len(out)} bytes do not fit in a TCP header (at most "
            f"{TCP_MAX_OPTIONS}): {list(options)!r}"
        )
    return out


def tcp(
    src: bytes,
    dst: bytes,
    sport: int,
    dport: int,
    *,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    options: Iterable[tuple[str | int, Any]] = (),
    payload: bytes = b"",
    urgent: int = 0,
) -> bytes:
    """A TCP segment (header, options, ``payload``) with its checksum for ``src`` ->
    ``dst``; ``flags`` are the 9 flag bits (``headers.flag_bits("SA")``)."""
    opts = tcp_options(options)
    offset_flags = ((20 + len(opts)) // 4) << 12 | flags
    header = struct.pack("!HHIIHHHH", sport, dport, seq, ack, offset_flags, window, 0, urgent)
    return _with_checksum(src, dst, IPPROTO_TCP, header + opts + payload, 16)


def udp(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    """A UDP datagram with its checksum for ``src`` -> ``dst``."""
    datagram = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    return _with_checksum(src, dst, IPPROTO_UDP, datagram, 6)


def icmp(src: bytes, dst: bytes, icmp_type: int, code: int, rest: int, body: bytes) -> bytes:
    """An ICMP message (IPv4 addresses) or ICMPv6 message (IPv6, its checksum over the
    pseudo-header): type, code, checksum, the 32-bit ``rest`` of the header, ``body``."""
    message = struct.pack("!BBHI", icmp_type, code, 0, rest) + body
    if len(src) == 4:
        return message[:2] + struct.pack("!H", checksum(message)) + message[4:]
    return _with_checksum(src, dst, IPPROTO_ICMPV6, message, 2)


def ethernet(dst: bytes, src: bytes, ethertype: int, tags: bytes = b"") -> bytes:
    """An Ethernet header: destination and source MAC, any VLAN ``tags`` (4 bytes each, as
    they were in the frame answered), the Ethertype."""
    return dst + src + tags + struct.pack("!H", ethertype)
