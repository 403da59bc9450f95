"""ARP and IPv6 neighbour answers a scripted peer sends on TAP -- pure functions, no I/O.

Built with ``struct``, not scapy: they are made in the relay thread, which must never wait
for scapy's first import (docs/internals.md, "Import cost of scapy and pyroute2").
"""

from __future__ import annotations

import ipaddress
import struct

from .replies import checksum
from .tcp import ETH_P_ARP, ETH_P_IPV6, IPPROTO_ICMPV6, ip_header, l3_offset

__all__ = ["is_neighbour_query", "mac_bytes", "neighbour_answer"]

ARPOP_REQUEST, ARPOP_REPLY = 1, 2  # include/uapi/linux/if_arp.h
ND_NEIGHBOR_SOLICIT, ND_NEIGHBOR_ADVERT = 135, 136  # RFC 4861 4.3, 4.4
ND_OPT_SOURCE_LINKADDR, ND_OPT_TARGET_LINKADDR = 1, 2  # RFC 4861 4.6.1
# RFC 4861 4.4: Router, Solicited, Override bits of the advertisement's first word.
_NA_SOLICITED, _NA_OVERRIDE = 0x40000000, 0x20000000
_ALL_NODES = ipaddress.IPv6Address("ff02::1").packed
_UNSPECIFIED = bytes(16)


def mac_bytes(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


def neighbour_answer(
    frame: bytes, *, mac: bytes, v4: bytes | None, v6: bytes | None
) -> bytes | None:
    """The ARP reply or neighbour advertisement answering ``frame`` (an Ethernet frame)
    when it asks for ``v4``/``v6`` (packed addresses); ``None`` for any other frame."""
    where = l3_offset(frame, "tap")
    if where is None:
        return None
    off, ethertype = where
    if ethertype == ETH_P_ARP:
        return _arp_reply(frame, off, mac, v4) if v4 is not None else None
    if ethertype == ETH_P_IPV6 and v6 is not None:
        return _neighbour_advert(frame, off, mac, v6)
    return None


def is_neighbour_query(frame: bytes, *, v4: bytes | None, v6: bytes | None) -> bool:
    """An ARP request or neighbour solicitation for one of the given addresses."""
    return neighbour_answer(frame, mac=bytes(6), v4=v4, v6=v6) is not None


def _arp_reply(frame: bytes, off: int, mac: bytes, ip: bytes) -> bytes | None:
    if len(frame) < off + 28:
        return None
    htype, ptype, hlen, plen, op = struct.unpack_from("!HHBBH", frame, off)
    if (htype, ptype, hlen, plen, op) != (1, 0x0800, 6, 4, ARPOP_REQUEST):
        return None
    sha, spa = frame[off + 8 : off + 14], frame[off + 14 : off + 18]
    tpa = frame[off + 24 : off + 28]
    if tpa != ip:
        return None
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, ARPOP_REPLY) + mac + ip + sha + spa
    return sha + mac + struct.pack("!H", ETH_P_ARP) + arp


def _neighbour_advert(frame: bytes, off: int, mac: bytes, ip6: bytes) -> bytes | None:
    hdr = ip_header(frame, off)
    if hdr is None or hdr[3] != IPPROTO_ICMPV6:
        return None
    _family, src, _dst, _proto, l4, end = hdr
    if end < l4 + 24 or frame[l4] != ND_NEIGHBOR_SOLICIT or frame[l4 + 24 - 16 : l4 + 24] != ip6:
        return None
    # Answer to the link-layer address the solicitation names, else to its sender's.
    dst_mac = frame[6:12]
    pos = l4 + 24
    while pos + 8 <= end and frame[pos + 1]:
        if frame[pos] == ND_OPT_SOURCE_LINKADDR:
            dst_mac = frame[pos + 2 : pos + 8]
        pos += frame[pos + 1] * 8
    # RFC 4861 7.2.4: to the solicitation's source; to all-nodes, unsolicited, when that
    # was the unspecified address (duplicate address detection).
    if src == _UNSPECIFIED:
        dst, flags = _ALL_NODES, _NA_OVERRIDE
        dst_mac = b"\x33\x33" + _ALL_NODES[-4:]
    else:
        dst, flags = src, _NA_SOLICITED | _NA_OVERRIDE
    body = struct.pack("!BBHI", ND_NEIGHBOR_ADVERT, 0, 0, flags) + ip6
    body += struct.pack("!BB", ND_OPT_TARGET_LINKADDR, 1) + mac
    pseudo = ip6 + dst + struct.pack("!I3xB", len(body), IPPROTO_ICMPV6)
    body = body[:2] + struct.pack("!H", checksum(pseudo + body)) + body[4:]
    # RFC 4861 7.1.2: hop limit 255, so the receiver knows it came from the link.
    ip = struct.pack("!IHBB", 6 << 28, len(body), IPPROTO_ICMPV6, 255) + ip6 + dst
    return dst_mac + mac + struct.pack("!H", ETH_P_IPV6) + ip + body
