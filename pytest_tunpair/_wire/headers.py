"""Header fields of a captured packet, parsed from its bytes without scapy.

scapy decodes a packet in about 0.24 ms; a test that filters a capture of a download by
port pays that for every packet. :func:`parse` reads the few offsets and numbers the
fields need in a couple of microseconds, once per packet (``Packet`` caches the tuple), and
the fields slice the bytes on access. Layouts: RFC 791 (IPv4), RFC 8200 (IPv6 and its
extension headers), RFC 9293 (TCP), RFC 768 (UDP), RFC 826 (ARP), IEEE 802.1Q (VLAN tags).
"""

from __future__ import annotations

import socket
import struct
from typing import Final

__all__ = [
    "ECN_NAMES",
    "FIELDS",
    "FLAG_LETTERS",
    "FLAG_STRINGS",
    "LAYERS",
    "PROTO_NAMES",
    "Parsed",
    "has_layer",
    "may_tunnel",
    "parse",
]

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
    "payload",
    "ttl",
    "ecn",
    "icmp_type",
    "icmp_code",
)

PROTO_NAMES: dict[int | None, str] = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}
#: The two ECN bits of the TOS / traffic class byte (RFC 3168, section 5).
ECN_NAMES = ("not-ect", "ect1", "ect0", "ce")
# TCP flag letters in bit order, as scapy writes them (str(TCP(flags="SA").flags) == "SA"):
# FIN SYN RST PSH ACK URG ECE CWR, then NS (RFC 3540), the low bit of byte 12.
FLAG_LETTERS = "FSRPAUECN"
FLAG_STRINGS = tuple(
    "".join(letter for bit, letter in enumerate(FLAG_LETTERS) if n >> bit & 1) for n in range(512)
)

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
_VLAN_TPIDS = (0x8100, 0x88A8)  # 802.1Q, 802.1ad: a 4-byte tag before the real ethertype
# IPv6 extension headers with the (length + 1) * 8 layout (RFC 8200 section 4; 135
# Mobility RFC 6275, 139 HIP RFC 7401, 140 Shim6 RFC 5533); 44 (fragment, fixed 8 bytes)
# is handled apart. Parsing stops at AH (51) and ESP (50), as scapy's decode does, so that
# ``TCP in packet`` gives scapy's answer.
_V6_EXT = frozenset((0, 43, 60, 135, 139, 140))
_PORTS = frozenset((6, 17, 132, 136))  # TCP, UDP, SCTP, UDP-Lite: ports first, same place

# Indexes into the tuple parse() returns.
VERSION: Final = 0
IP_PROTO: Final = 1
L3: Final = 2  # offset of the IP (or ARP) header, -1 when there is none
L4: Final = 3  # offset of the transport header, -1 when absent (non-first fragment, truncated)
END: Final = 4  # end of the IP packet (its length field; trailing bytes are not payload)
SPORT: Final = 5
DPORT: Final = 6
TTL: Final = 7
TCLASS: Final = 8  # IPv4 TOS or IPv6 traffic class byte
TCP_FLAGS: Final = 9
PAYLOAD: Final = 10  # offset of the L4 payload, -1 when there is none
ARP: Final = 11  # True for ARP

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
]

# Version/IHL, TOS, total length, (id skipped), flags/fragment offset, TTL, protocol.
_V4 = struct.Struct("!BBH2xHBB")
# Version/traffic class/flow label word, payload length, next header, hop limit.
_V6 = struct.Struct("!IHBB")
# Ports, (sequence and acknowledgment numbers skipped), data offset/NS byte, flags byte.
_TCP = struct.Struct("!HH8xBB")
_PORT_PAIR = struct.Struct("!HH")

_NOTHING: Parsed = (None, None, -1, -1, 0, None, None, None, None, None, -1, False)


def parse(data: bytes, start: int, mode: str) -> Parsed:
    """Offsets (into ``data``) and small numbers of one packet: see the index constants.

    The packet starts ``start`` bytes into ``data`` (after the virtio-net header: parsing
    the buffer as read saves copying it). It is an IP packet (``mode="tun"``) or an
    Ethernet frame (``"tap"``). Short or malformed packets give ``None`` for what their
    bytes do not reach, never an exception: a capture cut by ``snaplen`` keeps its headers.
    """
    n = len(data)
    off = start
    if mode == "tap":
        if n < off + 14:
            return _NOTHING
        etype = data[off + 12] << 8 | data[off + 13]
        off += 14
        while etype in _VLAN_TPIDS and n >= off + 4:
            etype = data[off + 2] << 8 | data[off + 3]
            off += 4
        if etype == ETH_P_ARP:
            return (None, None, off, -1, n, None, None, None, None, None, -1, True)
        if etype != ETH_P_IP and etype != ETH_P_IPV6:
            return _NOTHING
    if n <= off:
        return _NOTHING
    version = data[off] >> 4
    if version == 4:
        if n < off + 20:
            return (4, None, off, -1, n, None, None, None, None, None, -1, False)
        vihl, tclass, total, frag, ttl, ip_proto = _V4.unpack_from(data, off)
        # A GSO super-packet above 64 KiB (BIG TCP) carries total length 0
        # (docs/internals.md, "Header fields: offsets, not scapy").
        end = off + total if total else n
        # Only the first fragment (offset 0) carries the transport header.
        l4 = -1 if frag & 0x1FFF else off + (vihl & 0x0F) * 4
    elif version == 6:
        if n < off + 40:
            return (6, None, off, -1, n, None, None, None, None, None, -1, False)
        word, plen, ip_proto, ttl = _V6.unpack_from(data, off)
        tclass = word >> 20 & 0xFF
        l4 = off + 40
        end = l4 + plen if plen else n  # 0: jumbogram (RFC 2675) or BIG TCP
        while l4 >= 0:
            if ip_proto in _V6_EXT:
                if n < l4 + 2:
                    l4 = -1
                    break
                ip_proto = data[l4]
                l4 += (data[l4 + 1] + 1) * 8
            elif ip_proto == 44:  # fragment header
                if n < l4 + 8:
                    l4 = -1
                    break
                first = not ((data[l4 + 2] << 8 | data[l4 + 3]) & 0xFFF8)
                ip_proto = data[l4]
                l4 = l4 + 8 if first else -1
            else:
                break
        if ip_proto == 59:  # no next header
            l4 = -1
    else:
        return _NOTHING
    sport = dport = flags = None
    poff = -1
    # END stays the length field's end, past the bytes kept when snaplen cut the packet
    # (the retransmission count needs the real length); reads stop at what is there.
    lim = min(end, n)
    if 0 <= l4 < lim:
        if ip_proto == 6:
            if lim >= l4 + 20:
                sport, dport, doff, flags = _TCP.unpack_from(data, l4)
                flags |= (doff & 1) << 8
                poff = l4 + (doff >> 4) * 4
            elif lim >= l4 + 4:
                sport, dport = _PORT_PAIR.unpack_from(data, l4)
        else:
            if ip_proto in _PORTS and lim >= l4 + 4:
                sport, dport = _PORT_PAIR.unpack_from(data, l4)
            # UDP's header, and ICMP's type, code, checksum and 4 bytes of rest-of-header.
            poff = l4 + 8 if ip_proto == 17 or ip_proto == 1 or ip_proto == 58 else l4
        if poff > lim:
            poff = -1
    return (version, ip_proto, off, l4, end, sport, dport, ttl, tclass, flags, poff, False)


def address(data: bytes, f: Parsed, which: int) -> str | None:
    """Source (``which=0``) or destination (1) address as a string; for ARP the protocol
    (IPv4) addresses, ``psrc`` / ``pdst`` in scapy's terms."""
    off = f[L3]
    if f[ARP]:
        # RFC 826 for Ethernet/IPv4: hardware sender at 8, protocol sender at 14, target
        # protocol address at 24.
        at = off + (14 if which == 0 else 24)
        if len(data) < at + 4 or data[off + 4 : off + 6] != b"\x06\x04":
            return None
        return socket.inet_ntop(socket.AF_INET, data[at : at + 4])
    version = f[VERSION]
    if version == 4 and f[TTL] is not None:
        at = off + 12 + 4 * which
        return socket.inet_ntop(socket.AF_INET, data[at : at + 4])
    if version == 6 and f[TTL] is not None:
        at = off + 8 + 16 * which
        return socket.inet_ntop(socket.AF_INET6, data[at : at + 16])
    return None


def tcp_word(data: bytes, f: Parsed, at: int, size: int) -> int | None:
    """A number from the TCP header (``at`` bytes in), ``None`` for other packets."""
    if f[TCP_FLAGS] is None:
        return None
    l4 = f[L4]
    return int.from_bytes(data[l4 + at : l4 + at + size], "big")


def icmp_byte(data: bytes, f: Parsed, at: int) -> int | None:
    if (
        (f[IP_PROTO] == 1 or f[IP_PROTO] == 58)
        and 0 <= f[L4]
        and f[L4] + 2 <= min(f[END], len(data))
    ):
        return data[f[L4] + at]
    return None


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
        return f[IP_PROTO] == 6 and f[TCP_FLAGS] is not None
    if name == "UDP":
        return f[IP_PROTO] == 17 and f[PAYLOAD] >= 0
    if name == "IP":
        return f[VERSION] == 4
    if name == "IPv6":
        return f[VERSION] == 6
    if name == "ICMP":
        return f[IP_PROTO] == 1 and f[PAYLOAD] >= 0
    if name == "ARP":
        return f[ARP]
    return name == "Ether" and mode == "tap"


def may_tunnel(f: Parsed) -> bool:
    """The packet may carry another packet inside, which scapy decodes too."""
    if f[IP_PROTO] in _TUNNEL_PROTOS:
        return True
    return f[IP_PROTO] == 17 and (f[SPORT] in _TUNNEL_PORTS or f[DPORT] in _TUNNEL_PORTS)
