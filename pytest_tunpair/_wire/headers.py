"""THE header parser: where the headers of one packet are, read from its bytes without scapy.

scapy decodes a packet in about 0.24 ms; a test that filters a capture of a download by
port pays that for every packet. :func:`parse` reads the few offsets and numbers in a
couple of microseconds, once per packet (``Packet`` caches the tuple), and the helpers here
slice the bytes on demand. Every reader of packet bytes uses it: the capture's fields,
matching and flows (through ``Packet``), the scripted peer, replies, the path MTU rule,
ECN marking, GSO accounting, validation and neighbour answers.

It takes an IP packet (TUN) or an Ethernet frame with any number of 802.1Q / 802.1ad tags
(TAP), from an offset (after the virtio-net header: parsing the buffer as read saves
copying it). Layouts: RFC 791 (IPv4, with options), RFC 8200 (IPv6 and its extension
headers), RFC 9293 (TCP), RFC 768 (UDP), RFC 826 (ARP), IEEE 802.1Q (VLAN tags). A
fragment other than the first has no transport header: no ports, flags or payload, however
its bytes look (docs/internals.md, "Header fields: offsets, not scapy").
"""

from __future__ import annotations

import socket
import struct
from typing import Any, Final

from .numbers import (
    ETH_P_ARP,
    ETH_P_IP,
    ETH_P_IPV6,
    IPPROTO_FRAGMENT,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_NONE,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPV6_EXT_HEADERS,
    PORT_PROTOS,
    TCP_FLAG_LETTERS,
    TCPOPT_EOL,
    TCPOPT_MSS,
    TCPOPT_NOP,
    TCPOPT_SACK,
    TCPOPT_SACK_PERM,
    TCPOPT_TIMESTAMP,
    TCPOPT_WINDOW,
    VLAN_TPIDS,
)

__all__ = [
    "FLAG_STRINGS",
    "LAYERS",
    "TCP_OPTION_NAMES",
    "Parsed",
    "address",
    "flag_bits",
    "has_layer",
    "icmp_byte",
    "may_tunnel",
    "packed_address",
    "parse",
    "tcp_options",
    "tcp_word",
]

#: Flag letter strings by flag bits (``FLAG_STRINGS[0x12] == "SA"``), built once.
FLAG_STRINGS = tuple(
    "".join(letter for bit, letter in enumerate(TCP_FLAG_LETTERS) if n >> bit & 1)
    for n in range(512)
)

# Indexes into the tuple parse() returns.
VERSION: Final = 0  # 4, 6, or None (ARP, another Ethertype, junk)
IP_PROTO: Final = 1  # the transport protocol, after IPv6 extension headers (a fragment's too)
L3: Final = 2  # offset of the network header (after Ethernet and tags), -1: too short for one
L4: Final = 3  # offset of the transport header, -1: none (non-first fragment, cut short, ...)
END: Final = 4  # end of the IP packet by its length field (trailing bytes are not payload)
SPORT: Final = 5
DPORT: Final = 6
TTL: Final = 7  # also says the fixed IP header is all there (None when cut short)
TCLASS: Final = 8  # IPv4 TOS or IPv6 traffic class byte
TCP_FLAGS: Final = 9  # the 9 flag bits, when the 20-byte TCP header is there
PAYLOAD: Final = 10  # offset of the L4 payload, -1 when there is none
ARP: Final = 11  # True for ARP
ETHERTYPE: Final = 12  # after the tags (TAP); TUN: ETH_P_IP / ETH_P_IPV6 by the version
HDR_END: Final = 13  # end of the IP headers (IPv4 options, IPv6 extensions), -1: cut short
FRAG: Final = 14  # fragment offset in bytes; -1: not a fragment, 0: the first fragment
MF: Final = 15  # more fragments follow
FRAG_HDR: Final = 16  # offset of the IPv6 fragment header, -1 for none (IPv4: in its header)

#: What :func:`parse` returns, by the index constants above.
Parsed = tuple[
    int | None,  # VERSION
    int | None,  # IP_PROTO
    int,  # L3
    int,  # L4
    int,  # END
    int | None,  # SPORT
    int | None,  # DPORT
    int | None,  # TTL
    int | None,  # TCLASS
    int | None,  # TCP_FLAGS
    int,  # PAYLOAD
    bool,  # ARP
    int | None,  # ETHERTYPE
    int,  # HDR_END
    int,  # FRAG
    bool,  # MF
    int,  # FRAG_HDR
]

# Version/IHL, TOS, total length, (id skipped), flags/fragment offset, TTL, protocol.
_V4 = struct.Struct("!BBH2xHBB")
# Version/traffic class/flow label word, payload length, next header, hop limit.
_V6 = struct.Struct("!IHBB")
# Ports, (sequence and acknowledgment numbers skipped), data offset/NS byte, flags byte.
_TCP = struct.Struct("!HH8xBB")
_PORT_PAIR = struct.Struct("!HH")

_NOTHING: Parsed = (
    None, None, -1, -1, 0, None, None, None, None, None, -1, False, None, -1, -1, False, -1
)  # fmt: skip


def _l3_only(version: int | None, off: int, n: int, etype: int | None, arp: bool) -> Parsed:
    """A packet whose bytes end before its IP header does (or that is not IP)."""
    return (version, None, off, -1, n, None, None, None, None, None, -1, arp, etype, -1, -1, False, -1)  # fmt: skip


def parse(data: bytes, start: int, mode: str) -> Parsed:
    """Offsets (into ``data``) and small numbers of one packet: see the index constants.

    The packet starts ``start`` bytes into ``data``. It is an IP packet (``mode="tun"``) or
    an Ethernet frame (``"tap"``). Short or malformed packets give ``None`` / ``-1`` for
    what their bytes do not reach, never an exception: a capture cut by ``snaplen`` keeps
    its headers.
    """
    n = len(data)
    off = start
    if mode == "tap":
        if n < off + 14:
            return _NOTHING
        etype = data[off + 12] << 8 | data[off + 13]
        off += 14
        while etype in VLAN_TPIDS and n >= off + 4:
            etype = data[off + 2] << 8 | data[off + 3]
            off += 4
        if etype != ETH_P_IP and etype != ETH_P_IPV6:
            return _l3_only(None, off, n, etype, etype == ETH_P_ARP)
    if n <= off:
        return _NOTHING if mode != "tap" else _l3_only(None, off, n, etype, False)
    version = data[off] >> 4
    frag = -1
    mf = False
    fhdr = -1
    if version == 4:
        if n < off + 20:
            return _l3_only(4, off, n, ETH_P_IP, False)
        vihl, tclass, total, word, ttl, ip_proto = _V4.unpack_from(data, off)
        # A GSO super-packet above 64 KiB (BIG TCP) carries total length 0
        # (docs/internals.md, "Header fields: offsets, not scapy").
        end = off + total if total else n
        hdr_end = off + (vihl & 0x0F) * 4
        if hdr_end < off + 20 or hdr_end > n:
            hdr_end = -1
        l4 = hdr_end
        if word & 0x3FFF:  # MF or an offset: a fragment
            frag = (word & 0x1FFF) * 8
            mf = word & 0x2000 != 0
            if frag:  # only the first fragment carries the transport header
                l4 = -1
        etype = ETH_P_IP
    elif version == 6:
        if n < off + 40:
            return _l3_only(6, off, n, ETH_P_IPV6, False)
        word, plen, ip_proto, ttl = _V6.unpack_from(data, off)
        tclass = word >> 20 & 0xFF
        hdr_end = off + 40
        end = hdr_end + plen if plen else n  # 0: jumbogram (RFC 2675) or BIG TCP
        while True:
            if ip_proto in IPV6_EXT_HEADERS:
                if n < hdr_end + 2:
                    hdr_end = -1
                    break
                ip_proto = data[hdr_end]
                hdr_end += (data[hdr_end + 1] + 1) * 8
            elif ip_proto == IPPROTO_FRAGMENT:
                if n < hdr_end + 8:
                    hdr_end = -1
                    break
                fhdr = hdr_end
                ip_proto = data[hdr_end]
                frag = (data[hdr_end + 2] << 8 | data[hdr_end + 3]) & 0xFFF8
                mf = data[hdr_end + 3] & 1 == 1
                hdr_end += 8
                if frag:  # the rest is the middle of the original packet, not headers
                    break
            else:
                break
        if hdr_end > n:
            hdr_end = -1
        l4 = -1 if frag > 0 or ip_proto == IPPROTO_NONE else hdr_end
        etype = ETH_P_IPV6
    else:
        return _l3_only(None, off, n, etype if mode == "tap" else None, False)
    sport = dport = flags = None
    poff = -1
    # END stays the length field's end, past the bytes kept when snaplen cut the packet
    # (the retransmission count needs the real length); reads stop at what is there.
    lim = end if end < n else n
    if 0 <= l4 < lim:
        if ip_proto == IPPROTO_TCP:
            if lim >= l4 + 20:
                sport, dport, doff, flags = _TCP.unpack_from(data, l4)
                flags |= (doff & 1) << 8
                poff = l4 + (doff >> 4) * 4
            elif lim >= l4 + 4:
                sport, dport = _PORT_PAIR.unpack_from(data, l4)
        else:
            if ip_proto in PORT_PROTOS and lim >= l4 + 4:
                sport, dport = _PORT_PAIR.unpack_from(data, l4)
            # UDP's header, and ICMP's type, code, checksum and 4 bytes of rest-of-header.
            poff = (
                l4 + 8
                if ip_proto == IPPROTO_UDP or ip_proto == IPPROTO_ICMP or ip_proto == IPPROTO_ICMPV6
                else l4
            )
        if poff > lim:
            poff = -1
    return (
        version, ip_proto, off, l4, end, sport, dport, ttl, tclass, flags, poff, False,
        etype, hdr_end, frag, mf, fhdr,
    )  # fmt: skip


def packed_address(data: bytes, f: Parsed, which: int) -> bytes | None:
    """Source (``which=0``) or destination (1) address, packed; for ARP the protocol
    (IPv4) addresses, ``psrc`` / ``pdst`` in scapy's terms."""
    off = f[L3]
    if f[ARP]:
        # RFC 826 for Ethernet/IPv4: hardware sender at 8, protocol sender at 14, target
        # protocol address at 24.
        at = off + (14 if which == 0 else 24)
        if len(data) < at + 4 or data[off + 4 : off + 6] != b"\x06\x04":
            return None
        return data[at : at + 4]
    if f[TTL] is None:  # not IP, or the fixed header is cut short
        return None
    if f[VERSION] == 4:
        at = off + 12 + 4 * which
        return data[at : at + 4]
    at = off + 8 + 16 * which
    return data[at : at + 16]


def address(data: bytes, f: Parsed, which: int) -> str | None:
    """:func:`packed_address` as a string (``inet_ntop``'s compressed form)."""
    packed = packed_address(data, f, which)
    if packed is None:
        return None
    return socket.inet_ntop(socket.AF_INET if len(packed) == 4 else socket.AF_INET6, packed)


def tcp_word(data: bytes, f: Parsed, at: int, size: int) -> int | None:
    """A number from the TCP header (``at`` bytes in), ``None`` for other packets."""
    if f[TCP_FLAGS] is None:
        return None
    l4 = f[L4]
    return int.from_bytes(data[l4 + at : l4 + at + size], "big")


def icmp_byte(data: bytes, f: Parsed, at: int) -> int | None:
    """The ICMP or ICMPv6 type (``at=0``) or code (1), ``None`` for other packets."""
    l4 = f[L4]
    if (
        (f[IP_PROTO] == IPPROTO_ICMP or f[IP_PROTO] == IPPROTO_ICMPV6)
        and 0 <= l4
        and l4 + 2 <= min(f[END], len(data))
    ):
        return data[l4 + at]
    return None


def flag_bits(letters: str) -> int:
    """TCP flag bits from scapy's letters (``flag_bits("SA") == 0x12``); ``ValueError``
    for a letter that is not a flag."""
    bits = 0
    for letter in letters:
        bit = TCP_FLAG_LETTERS.find(letter)
        if bit < 0:
            raise ValueError(
                f"TCP flags {letters!r}: {letter!r} is not one of scapy's letters "
                f"{TCP_FLAG_LETTERS} (e.g. 'SA')"
            )
        bits |= 1 << bit
    return bits


# -- TCP options ---------------------------------------------------------------------------------

#: The TCP option kinds by scapy's names, with the struct layout of the value (RFC 9293
#: 3.2, RFC 7323, RFC 2018; 14/15 RFC 1146, 19 RFC 2385, 28 RFC 5482, 29 RFC 5925, 34 RFC
#: 7413; 25 is scapy's own). A ``"!"`` layout is repeated 32-bit words (SACK blocks); ``None``
#: a value kept as bytes. The same table names options for :func:`tcp_options` and for the
#: builder, so a list scapy accepts builds the same bytes.
TCP_OPTION_NAMES: dict[int, tuple[str, str | None]] = {
    TCPOPT_EOL: ("EOL", None),
    TCPOPT_NOP: ("NOP", None),
    TCPOPT_MSS: ("MSS", "!H"),
    TCPOPT_WINDOW: ("WScale", "!B"),
    TCPOPT_SACK_PERM: ("SAckOK", None),
    TCPOPT_SACK: ("SAck", "!"),
    TCPOPT_TIMESTAMP: ("Timestamp", "!II"),
    14: ("AltChkSum", "!BH"),
    15: ("AltChkSumOpt", None),
    19: ("MD5", "16s"),
    25: ("Mood", "!p"),
    28: ("UTO", "!H"),
    29: ("AO", None),
    34: ("TFO", "!II"),
}


def tcp_options(data: bytes, f: Parsed) -> list[tuple[str | int, Any]] | None:
    """The TCP header's options in order, as scapy's ``TCP.options`` lists them:
    ``[("MSS", 1460), ("NOP", None), ("SAckOK", b""), ("Timestamp", (tsval, tsecr)),
    ("WScale", 7), ("SAck", (left, right, ...))]``; a kind scapy has no name for as
    ``(kind, value_bytes)``, a value of the wrong size as its bytes (scapy decodes TCP-AO,
    kind 29, into a layer of its own: here its bytes). An end-of-list option
    ends the list (``("EOL", None)``); an option whose length is impossible or runs past
    the header ends it too. ``None`` for a packet without a TCP header.
    """
    if f[TCP_FLAGS] is None or f[IP_PROTO] != IPPROTO_TCP:
        return None
    l4 = f[L4]
    stop = min(l4 + (data[l4 + 12] >> 4) * 4, f[END], len(data))
    out: list[tuple[str | int, Any]] = []
    i = l4 + 20
    while i < stop:
        kind = data[i]
        if kind == TCPOPT_EOL:
            out.append(("EOL", None))
            break
        if kind == TCPOPT_NOP:
            out.append(("NOP", None))
            i += 1
            continue
        if i + 1 >= stop or data[i + 1] < 2 or i + data[i + 1] > stop:
            break  # malformed: stop rather than guess
        body = data[i + 2 : i + data[i + 1]]
        i += data[i + 1]
        known = TCP_OPTION_NAMES.get(kind)
        if known is None:
            out.append((kind, body))
            continue
        name, layout = known
        value: Any = body
        if layout == "!" and len(body) % 4 == 0:
            layout = f"!{len(body) // 4}I"
        if layout is not None and struct.calcsize(layout) == len(body):
            words = struct.unpack(layout, body)
            value = words[0] if len(words) == 1 else words
        out.append((name, value))
    return out


# -- what scapy would decode -----------------------------------------------------------------------

#: scapy layers whose presence the parsed offsets tell (``TCP in packet`` without scapy).
LAYERS = frozenset(("Ether", "ARP", "IP", "IPv6", "TCP", "UDP", "ICMP"))
# What scapy may find a second IP/TCP/UDP stack inside: IP-in-IP (4), IPv6-in-IP (41), GRE
# (47), EtherIP (97), L2TPv3 (115), and UDP on the ports scapy binds tunnels to (VXLAN
# 4789/4790, Geneve 6081, GTP-U 2152 and GTP-C 2123, L2TP 1701).
_TUNNEL_PROTOS = frozenset((4, 41, 47, 97, 115))
_TUNNEL_PORTS = frozenset((4789, 4790, 6081, 2152, 2123, 1701))


def has_layer(name: str, mode: str, f: Parsed) -> bool:
    """Whether scapy's decode of the outer stack has layer ``name`` (one of :data:`LAYERS`)."""
    if name == "TCP":
        return f[IP_PROTO] == IPPROTO_TCP and f[TCP_FLAGS] is not None
    if name == "UDP":
        return f[IP_PROTO] == IPPROTO_UDP and f[PAYLOAD] >= 0
    if name == "IP":
        return f[VERSION] == 4
    if name == "IPv6":
        return f[VERSION] == 6
    if name == "ICMP":
        return f[IP_PROTO] == IPPROTO_ICMP and f[PAYLOAD] >= 0
    if name == "ARP":
        return f[ARP]
    return name == "Ether" and mode == "tap"


def may_tunnel(f: Parsed) -> bool:
    """The packet may carry another packet inside, which scapy decodes too."""
    if f[IP_PROTO] in _TUNNEL_PROTOS:
        return True
    return f[IP_PROTO] == IPPROTO_UDP and (f[SPORT] in _TUNNEL_PORTS or f[DPORT] in _TUNNEL_PORTS)
