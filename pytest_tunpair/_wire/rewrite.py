"""Rewriting addresses and ports in place, with incrementally updated checksums (NAT).

A translation changes a few 16-bit words of a packet: an address, a port (or an ICMP query
identifier). Every checksum over them is updated by RFC 1624's ``HC' = ~(~HC + ~m + m')``
for each changed word rather than recomputed: the IPv4 header checksum, the TCP/UDP
checksum (which covers the addresses through the pseudo-header), ICMPv6's (pseudo-header
too), ICMPv4's (no pseudo-header: only the identifier counts). A UDP checksum of 0 over
IPv4 means "none" (RFC 768) and stays 0. ICMP errors quote the packet they answer: its
addresses and ports are translated too (RFC 5508 for NAT), the quoted checksums updated
when the quote reaches them, and the ICMP checksum follows every changed byte.

Offsets come from the one parser (:mod:`.headers`). Layouts: RFC 791, 8200, 9293, 768,
792, 4443.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import headers as _h
from .numbers import IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP

__all__ = [
    "ICMP_ECHO_TYPES",
    "ICMP_ERROR_TYPES",
    "Endpoints",
    "csum_adjust",
    "endpoints",
    "inner_start",
    "translate",
    "translate_error",
]

#: Query types whose identifier a NAT maps like a port (RFC 5508 3.1): echo request and
#: reply, ICMPv4 and ICMPv6.
ICMP_ECHO_TYPES = {IPPROTO_ICMP: (8, 0), IPPROTO_ICMPV6: (128, 129)}
#: Error types that quote the packet they answer, which a NAT translates too (RFC 5508
#: 4.2): unreachable, source quench, redirect, time exceeded, parameter problem (RFC 792);
#: unreachable, too big, time exceeded, parameter problem (RFC 4443).
ICMP_ERROR_TYPES = {
    IPPROTO_ICMP: frozenset({3, 4, 5, 11, 12}),
    IPPROTO_ICMPV6: frozenset({1, 2, 3, 4}),
}

# Where each protocol keeps its checksum, from the transport header.
_CSUM_AT = {IPPROTO_TCP: 16, IPPROTO_UDP: 6, IPPROTO_ICMP: 2, IPPROTO_ICMPV6: 2}


def _fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def csum_adjust(csum: int, old: bytes, new: bytes) -> int:
    """``csum`` (a checksum field's value) after the bytes ``old`` became ``new`` (equal
    even lengths, aligned to 16-bit words of the checksummed data): RFC 1624, eqn. 3."""
    total = ~csum & 0xFFFF
    for i in range(0, len(old), 2):
        total += (~(old[i] << 8 | old[i + 1]) & 0xFFFF) + (new[i] << 8 | new[i + 1])
    return ~_fold(total) & 0xFFFF


@dataclass(frozen=True)
class Endpoints:
    """What a NAT looks at in one packet: the protocol, both addresses (packed), both
    ports (an ICMP query's identifier as both; ``None`` when there are none), and where
    the packet starts (after an Ethernet header, on TAP)."""

    proto: int
    src: bytes
    dst: bytes
    sport: int | None
    dport: int | None
    l3: int
    l4: int
    icmp_type: int | None


def endpoints(data: bytes, f: _h.Parsed) -> Endpoints | None:
    """The :class:`Endpoints` of a parsed IP packet; ``None`` when it is not IP."""
    src = _h.packed_address(data, f, 0)
    dst = _h.packed_address(data, f, 1)
    proto = f[_h.IP_PROTO]
    if src is None or dst is None or proto is None or f[_h.ARP]:
        return None
    l4 = f[_h.L4]
    sport, dport = f[_h.SPORT], f[_h.DPORT]
    icmp_type = None
    if proto in ICMP_ECHO_TYPES and l4 >= 0 and len(data) >= l4 + 8:
        icmp_type = data[l4]
        if icmp_type in ICMP_ECHO_TYPES[proto]:
            sport = dport = data[l4 + 4] << 8 | data[l4 + 5]
    return Endpoints(proto, src, dst, sport, dport, f[_h.L3], l4, icmp_type)


def _put(buf: bytearray, at: int, new: bytes) -> bytes:
    old = bytes(buf[at : at + len(new)])
    buf[at : at + len(new)] = new
    return old


def _adjust_field(buf: bytearray, at: int, old: bytes, new: bytes, *, udp: bool = False) -> None:
    """Update the checksum field at ``at`` for ``old`` -> ``new`` elsewhere in the data."""
    if at + 2 > len(buf) or old == new:
        return
    csum = buf[at] << 8 | buf[at + 1]
    if udp and csum == 0:
        return  # IPv4 UDP without a checksum (RFC 768): nothing to keep right
    csum = csum_adjust(csum, old, new)
    if udp and csum == 0:
        csum = 0xFFFF  # a computed 0 is sent as all ones
    buf[at] = csum >> 8
    buf[at + 1] = csum & 0xFF


def _translate_ip(
    buf: bytearray, f: _h.Parsed, which: int, addr: bytes | None, port: int | None
) -> tuple[bytes, bytes]:
    """Rewrite the source (``which=0``) or destination address and port of the IP packet
    ``f`` describes, in ``buf``; returns the (old, new) bytes every checksum covering both
    the addresses and the ports must follow (the transport checksum's share), having fixed
    the IP header's and the transport's own."""
    l3, l4 = f[_h.L3], f[_h.L4]
    v4 = f[_h.VERSION] == 4
    proto = f[_h.IP_PROTO]
    old_all = bytearray()
    new_all = bytearray()
    if addr is not None:
        at = l3 + (12 if v4 else 8) + len(addr) * which
        old = _put(buf, at, addr)
        if v4:
            _adjust_field(buf, l3 + 10, old, addr)  # the IPv4 header checksum
        if proto != IPPROTO_ICMP:  # ICMPv4 has no pseudo-header
            old_all += old
            new_all += addr
    if port is not None and l4 >= 0 and proto is not None:
        if proto in (IPPROTO_TCP, IPPROTO_UDP):
            at = l4 + 2 * which
        elif proto in ICMP_ECHO_TYPES:
            at = l4 + 4  # the query identifier, whichever way the query goes
        else:
            at = -1
        if at >= 0 and at + 2 <= len(buf):
            new = port.to_bytes(2, "big")
            old = _put(buf, at, new)
            old_all += old
            new_all += new
    if l4 >= 0 and proto in _CSUM_AT and f[_h.FRAG] <= 0:
        _adjust_field(
            buf, l4 + _CSUM_AT[proto], bytes(old_all), bytes(new_all), udp=proto == IPPROTO_UDP
        )
    return bytes(old_all), bytes(new_all)


def translate(data: bytes, f: _h.Parsed, which: int, addr: bytes | None, port: int | None) -> bytes:
    """``data`` with its source (``which=0``) or destination (1) address set to ``addr``
    and port (or ICMP query identifier) to ``port`` (``None``: unchanged), checksums
    updated. A non-first fragment has no transport header: only its address changes."""
    buf = bytearray(data)
    _translate_ip(buf, f, which, addr, port)
    return bytes(buf)


def inner_start(data: bytes, f: _h.Parsed) -> int:
    """Where the quoted packet of an ICMP error starts in ``data``; -1 if ``f`` is no
    ICMP error (or its quote is cut short)."""
    proto, l4 = f[_h.IP_PROTO], f[_h.L4]
    if proto not in ICMP_ERROR_TYPES or l4 < 0 or len(data) < l4 + 8 + 20:
        return -1
    if data[l4] not in ICMP_ERROR_TYPES[proto]:
        return -1
    return l4 + 8


def translate_error(
    data: bytes,
    f: _h.Parsed,
    which: int,
    addr: bytes,
    start: int,
    inner_addr: bytes,
    inner_port: int | None,
) -> bytes:
    """An ICMP error translated: the outer ``which`` address becomes ``addr``, and in the
    quoted packet (from ``start``, :func:`inner_start`) the *other* end -- the quote is the
    packet the error answers, going the opposite way -- becomes ``inner_addr`` and
    ``inner_port``: the quote's IP header checksum and, when the quote reaches it, its
    transport checksum updated, then the ICMP checksum for every word that changed (and
    for the outer address, which ICMPv6's pseudo-header covers)."""
    buf = bytearray(data)
    l4 = f[_h.L4]
    proto = f[_h.IP_PROTO]
    before = bytes(data[start:])
    quote = bytearray(before)
    inner = _h.parse(before, 0, "tun")
    _translate_ip(quote, inner, 1 - which, inner_addr, inner_port)
    buf[start:] = quote
    # The ICMP checksum covers the quote, which starts 8 bytes into the ICMP message (so
    # its 16-bit words are the message's): follow every word that changed.
    old_words = bytearray()
    new_words = bytearray()
    for i in range(0, len(before) - 1, 2):
        if before[i : i + 2] != quote[i : i + 2]:
            old_words += before[i : i + 2]
            new_words += quote[i : i + 2]
    if len(before) % 2 and before[-1] != quote[-1]:
        old_words += before[-1:] + b"\0"
        new_words += quote[-1:] + b"\0"
    _adjust_field(buf, l4 + 2, bytes(old_words), bytes(new_words))
    l3 = f[_h.L3]
    v4 = f[_h.VERSION] == 4
    at = l3 + (12 if v4 else 8) + len(addr) * which
    old = _put(buf, at, addr)
    if v4:
        _adjust_field(buf, l3 + 10, old, addr)
    if proto == IPPROTO_ICMPV6:
        _adjust_field(buf, l4 + 2, old, addr)
    return bytes(buf)
