"""ARP and IPv6 neighbour answers a scripted peer sends on TAP -- pure functions, no I/O.

Read with the one parser and built with the one set of builders, not scapy: they are made
in the relay thread, which must never wait for scapy's first import (docs/internals.md,
"Import cost of scapy and pyroute2"). A question that came on a VLAN is answered on it:
the answer keeps the frame's tags.
"""

from __future__ import annotations

import ipaddress
import struct

from . import build as _build
from . import headers as _h
from .numbers import (
    ARPHRD_ETHER,
    ARPOP_REPLY,
    ARPOP_REQUEST,
    ETH_ALEN,
    ETH_P_ARP,
    ETH_P_IP,
    ETH_P_IPV6,
    IPPROTO_ICMPV6,
    ND_NEIGHBOR_ADVERT,
    ND_NEIGHBOR_SOLICIT,
    ND_OPT_SOURCE_LINKADDR,
    ND_OPT_TARGET_LINKADDR,
)

__all__ = ["is_neighbour_query", "mac_bytes", "neighbour_answer"]

# RFC 4861 4.4: Router, Solicited, Override bits of the advertisement's first word.
_NA_SOLICITED, _NA_OVERRIDE = 0x40000000, 0x20000000
_ALL_NODES = ipaddress.IPv6Address("ff02::1").packed
_UNSPECIFIED = bytes(16)
# RFC 826 for Ethernet/IPv4: hardware type, protocol type, their lengths, the operation.
_ARP = struct.Struct("!HHBBH")
_ARP_REQUEST = (ARPHRD_ETHER, ETH_P_IP, ETH_ALEN, 4, ARPOP_REQUEST)
# RFC 4861 4.3: a solicitation's type, code, checksum, reserved word, then the target.
_NS_TARGET = 8
_NS_LEN = 24
# RFC 4861 7.1.2: hop limit 255, so the receiver knows the advertisement came from the link.
_ND_HOP_LIMIT = 255


def mac_bytes(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


def neighbour_answer(
    frame: bytes, *, mac: bytes, v4: bytes | None, v6: bytes | None
) -> bytes | None:
    """The ARP reply or neighbour advertisement answering ``frame`` (an Ethernet frame)
    when it asks for ``v4``/``v6`` (packed addresses); ``None`` for any other frame."""
    f = _h.parse(frame, 0, "tap")
    ethertype = f[_h.ETHERTYPE]
    if ethertype == ETH_P_ARP:
        return _arp_reply(frame, f, mac, v4) if v4 is not None else None
    if ethertype == ETH_P_IPV6 and v6 is not None:
        return _neighbour_advert(frame, f, mac, v6)
    return None


def is_neighbour_query(frame: bytes, *, v4: bytes | None, v6: bytes | None) -> bool:
    """An ARP request or neighbour solicitation for one of the given addresses."""
    return neighbour_answer(frame, mac=bytes(6), v4=v4, v6=v6) is not None


def _tags(frame: bytes, f: _h.Parsed) -> bytes:
    """The frame's VLAN tags (each TPID and TCI), between the MACs and the Ethertype."""
    return frame[12 : f[_h.L3] - 2]


def _arp_reply(frame: bytes, f: _h.Parsed, mac: bytes, ip: bytes) -> bytes | None:
    off = f[_h.L3]
    if len(frame) < off + 28 or _ARP.unpack_from(frame, off) != _ARP_REQUEST:
        return None
    sha, spa = frame[off + 8 : off + 14], frame[off + 14 : off + 18]
    if _h.packed_address(frame, f, 1) != ip:
        return None
    arp = _ARP.pack(ARPHRD_ETHER, ETH_P_IP, ETH_ALEN, 4, ARPOP_REPLY) + mac + ip + sha + spa
    return _build.ethernet(sha, mac, ETH_P_ARP, _tags(frame, f)) + arp


def _neighbour_advert(frame: bytes, f: _h.Parsed, mac: bytes, ip6: bytes) -> bytes | None:
    l4 = f[_h.L4]
    end = min(f[_h.END], len(frame))
    if (
        f[_h.IP_PROTO] != IPPROTO_ICMPV6
        or l4 < 0
        or end < l4 + _NS_LEN
        or frame[l4] != ND_NEIGHBOR_SOLICIT
        or frame[l4 + _NS_TARGET : l4 + _NS_LEN] != ip6
    ):
        return None
    # Answer to the link-layer address the solicitation names, else to its sender's.
    dst_mac = frame[ETH_ALEN : 2 * ETH_ALEN]
    pos = l4 + _NS_LEN
    while pos + 8 <= end and frame[pos + 1]:
        if frame[pos] == ND_OPT_SOURCE_LINKADDR:
            dst_mac = frame[pos + 2 : pos + 8]
        pos += frame[pos + 1] * 8
    # RFC 4861 7.2.4: to the solicitation's source; to all-nodes, unsolicited, when that
    # was the unspecified address (duplicate address detection).
    src = _h.packed_address(frame, f, 0)
    if src == _UNSPECIFIED:
        dst, flags = _ALL_NODES, _NA_OVERRIDE
        dst_mac = b"\x33\x33" + _ALL_NODES[-4:]
    else:
        assert src is not None  # an ICMPv6 header was found: the IPv6 header is there
        dst, flags = src, _NA_SOLICITED | _NA_OVERRIDE
    option = struct.pack("!BB", ND_OPT_TARGET_LINKADDR, 1) + mac
    body = _build.icmp(ip6, dst, ND_NEIGHBOR_ADVERT, 0, flags, ip6 + option)
    ip = _build.ip_packet(ip6, dst, IPPROTO_ICMPV6, body, ttl=_ND_HOP_LIMIT)
    return _build.ethernet(dst_mac, mac, ETH_P_IPV6, _tags(frame, f)) + ip
