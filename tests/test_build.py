"""The one set of builders (``_wire.build``) against scapy's: the same bytes, checksums that
scapy recomputes to the same value, options encoded as scapy encodes them."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6DestUnreach, IPv6
from scapy.layers.l2 import Dot1Q, Ether

from pytest_tunpair._wire import build
from pytest_tunpair._wire.headers import flag_bits

A4, B4 = "198.18.0.1", "198.18.0.2"
A6, B6 = "2001:2::1", "2001:2::2"


def packed(addr: str) -> bytes:
    return ipaddress.ip_address(addr).packed


def test_checksum_matches_rfc1071_example() -> None:
    # RFC 1071 section 3's worked example sums to 0xddf2; the checksum is its complement.
    data = bytes([0x00, 0x01, 0xF2, 0x03, 0xF4, 0xF5, 0xF6, 0xF7])
    assert build.checksum(data) == ~0xDDF2 & 0xFFFF


# Option lists in the shapes Packet.tcp_options gives, as scapy's TCP(options=...) takes them.
OPTION_LISTS: list[list[tuple[Any, Any]]] = [
    [],
    [("MSS", 1460)],
    [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (123, 456)), ("NOP", None), ("WScale", 7)],
    [("NOP", None), ("NOP", None), ("Timestamp", (2**32 - 1, 0))],
    [("NOP", None), ("NOP", None), ("SAck", (1, 2, 3, 4, 5, 6))],
    [("WScale", 14), ("EOL", None)],
    [(30, b"\x01\x02\x03"), ("UTO", 300)],
    [("MD5", b"k" * 16)],
]


@pytest.mark.parametrize("options", OPTION_LISTS, ids=str)
def test_tcp_options_encode_as_scapy_does(options: list[tuple[Any, Any]]) -> None:
    ours = build.tcp_options(options)
    theirs = bytes(TCP(options=options))[20:]
    assert ours == theirs
    assert len(ours) % 4 == 0


def test_tcp_options_refuse_unknown_names_and_overflow() -> None:
    with pytest.raises(ValueError, match="'Nonsense' is unknown"):
        build.tcp_options([("Nonsense", 1)])
    with pytest.raises(ValueError, match="do not fit"):
        build.tcp_options([("SAck", tuple(range(10)))])


@pytest.mark.parametrize(("src", "dst"), [(A4, B4), (A6, B6)])
@pytest.mark.parametrize("options", OPTION_LISTS[:5], ids=str)
def test_tcp_segment_equals_scapys(src: str, dst: str, options: list[tuple[Any, Any]]) -> None:
    l3 = IP(src=src, dst=dst, id=0, flags="DF") if ":" not in src else IPv6(src=src, dst=dst)
    segment = build.tcp(
        packed(src),
        packed(dst),
        40000,
        443,
        seq=2**32 - 5,
        ack=77,
        flags=flag_bits("PA"),
        window=4321,
        options=options,
        payload=b"data",
    )
    ours = build.ip_packet(
        packed(src), packed(dst), 6, segment, flags=0x4000 if ":" not in src else 0
    )
    theirs = (
        l3
        / TCP(
            sport=40000, dport=443, seq=2**32 - 5, ack=77, flags="PA", window=4321, options=options
        )
        / b"data"
    )
    assert ours == bytes(theirs)


@settings(max_examples=100, deadline=None)
@given(
    v6=st.booleans(),
    sport=st.integers(0, 65535),
    dport=st.integers(0, 65535),
    payload=st.binary(max_size=40),
)
def test_udp_datagram_equals_scapys(v6: bool, sport: int, dport: int, payload: bytes) -> None:
    src, dst = (A6, B6) if v6 else (A4, B4)
    datagram = build.udp(packed(src), packed(dst), sport, dport, payload)
    l3 = IPv6(src=src, dst=dst) if v6 else IP(src=src, dst=dst, id=0)
    # scapy sends a computed checksum of 0 as 0xffff too (RFC 768).
    assert build.ip_packet(packed(src), packed(dst), 17, datagram) == bytes(
        l3 / UDP(sport=sport, dport=dport) / payload
    )


def test_icmp_messages_equal_scapys() -> None:
    quote = bytes(IP(src=B4, dst=A4) / UDP())
    ours = build.icmp(packed(A4), packed(B4), 3, 3, 0, quote)
    assert ours == bytes(ICMP(type=3, code=3) / quote)
    quote6 = bytes(IPv6(src=B6, dst=A6) / UDP())
    ours6 = build.ip_packet(
        packed(A6), packed(B6), 58, build.icmp(packed(A6), packed(B6), 1, 4, 0, quote6)
    )
    assert ours6 == bytes(IPv6(src=A6, dst=B6) / ICMPv6DestUnreach(code=4) / quote6)


def test_ip_headers_equal_scapys() -> None:
    v4 = build.ip_header(packed(A4), packed(B4), 17, 8, ident=7, flags=0x4000, ttl=9, tos=3)
    assert v4 == bytes(IP(src=A4, dst=B4, proto=17, id=7, flags="DF", ttl=9, tos=3, len=28))[:20]
    v6 = build.ip_header(packed(A6), packed(B6), 58, 16, ttl=255, tos=0xB8)
    assert v6 == bytes(IPv6(src=A6, dst=B6, nh=58, hlim=255, tc=0xB8, plen=16))


def test_ethernet_header_keeps_tags() -> None:
    tagged = (
        Ether(dst="02:74:70:00:00:02", src="02:74:70:00:00:01")
        / Dot1Q(vlan=7)
        / Dot1Q(vlan=9, type=0x0800)
    )
    tags = bytes(tagged)[12:20]  # each tag's TPID and TCI
    mac_a, mac_b = bytes.fromhex("027470000001"), bytes.fromhex("027470000002")
    assert build.ethernet(mac_b, mac_a, 0x0800, tags) == bytes(tagged)
    assert build.ethernet(mac_b, mac_a, 0x86DD) == bytes(
        Ether(dst="02:74:70:00:00:02", src="02:74:70:00:00:01", type=0x86DD)
    )
