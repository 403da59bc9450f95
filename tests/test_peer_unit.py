"""The scripted peer's pure parts, against scapy's own builders: no devices, no privileges."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6ND_NS, ICMPv6NDOptSrcLLAddr, IPv6
from scapy.layers.l2 import ARP, Ether

from pytest_tunpair._wire.neigh import is_neighbour_query, mac_bytes, neighbour_answer
from pytest_tunpair._wire.tcp import TcpOptions, parse, seq_add, seq_geq, seq_gt

MAC = "02:74:70:00:00:02"
OTHER = "02:74:70:00:00:01"
V4 = bytes([198, 18, 0, 2])


def packed6(addr: str) -> bytes:
    import ipaddress

    return ipaddress.IPv6Address(addr).packed


@pytest.mark.parametrize("mode", ["tun", "tap"])
@pytest.mark.parametrize(
    "l3", [IP(src="198.18.0.1", dst="198.18.0.2"), IPv6(src="2001:2::1", dst="2001:2::2")]
)
def test_parse_tcp_matches_scapy(mode: str, l3: object) -> None:
    opts = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (123, 456)), ("NOP", None), ("WScale", 7)]
    pkt = (
        l3
        / TCP(sport=1234, dport=80, seq=2**32 - 5, ack=77, flags="SA", window=4321, options=opts)
        / b"data"
    )
    if mode == "tap":
        pkt = Ether(src=OTHER, dst=MAC) / pkt
    seg = parse(bytes(pkt), mode)
    assert seg is not None
    assert (seg.sport, seg.dport, seg.seq, seg.ack, seg.window) == (1234, 80, 2**32 - 5, 77, 4321)
    assert seg.flags == "SA" and seg.has("AS") and not seg.has("F")
    assert seg.payload == b"data" and seg.seg_len == 5
    assert seg.options == TcpOptions(mss=1460, wscale=7, sack=True, timestamps=True)
    assert (seg.tsval, seg.tsecr) == (123, 456)
    assert seg.src.endswith("1") and seg.dst.endswith("2")


def test_parse_udp_and_extension_headers() -> None:
    from scapy.layers.inet6 import IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop

    pkt = (
        IPv6(src="2001:2::1", dst="2001:2::2")
        / IPv6ExtHdrHopByHop()
        / IPv6ExtHdrDestOpt()
        / UDP(sport=5, dport=53)
        / b"q"
    )
    seg = parse(bytes(pkt), "tun")
    assert seg is not None and (seg.proto, seg.sport, seg.dport, seg.payload) == (17, 5, 53, b"q")
    assert parse(b"", "tun") is None and parse(b"\x45" + bytes(5), "tun") is None


def test_sequence_arithmetic_wraps() -> None:
    assert seq_add(2**32 - 1, 2) == 1
    assert seq_gt(1, 2**32 - 1) and not seq_gt(2**32 - 1, 1)
    assert seq_geq(5, 5) and not seq_gt(5, 5)


def test_arp_reply() -> None:
    request = Ether(src=OTHER, dst="ff:ff:ff:ff:ff:ff") / ARP(
        op=1, hwsrc=OTHER, psrc="198.18.0.1", pdst="198.18.0.2"
    )
    answer = neighbour_answer(bytes(request), mac=mac_bytes(MAC), v4=V4, v6=None)
    assert answer is not None
    reply = Ether(answer)
    assert reply.dst == OTHER and reply.src == MAC
    assert (reply[ARP].op, reply[ARP].hwsrc, reply[ARP].psrc) == (2, MAC, "198.18.0.2")
    assert (reply[ARP].hwdst, reply[ARP].pdst) == (OTHER, "198.18.0.1")
    other = Ether(src=OTHER) / ARP(op=1, hwsrc=OTHER, psrc="198.18.0.1", pdst="198.18.0.9")
    assert not is_neighbour_query(bytes(other), v4=V4, v6=None)


@pytest.mark.parametrize("src", ["2001:2::1", "::"])
def test_neighbour_advertisement(src: str) -> None:
    ns = (
        Ether(src=OTHER, dst="33:33:ff:00:00:02")
        / IPv6(src=src, dst="ff02::1:ff00:2", hlim=255)
        / ICMPv6ND_NS(tgt="2001:2::2")
        / ICMPv6NDOptSrcLLAddr(lladdr=OTHER)
    )
    answer = neighbour_answer(bytes(ns), mac=mac_bytes(MAC), v4=None, v6=packed6("2001:2::2"))
    assert answer is not None
    na = Ether(answer)
    assert na.src == MAC and na[IPv6].hlim == 255 and na[IPv6].src == "2001:2::2"
    assert na[ICMPv6ND_NA].tgt == "2001:2::2" and na[ICMPv6ND_NA].O == 1
    assert na[ICMPv6ND_NA].S == (src != "::")
    assert na[IPv6].dst == ("ff02::1" if src == "::" else src)
    # The checksum is right: scapy recomputes it from scratch and gets the same.
    rebuilt = na.copy()
    del rebuilt[ICMPv6ND_NA].cksum
    assert Ether(bytes(rebuilt))[ICMPv6ND_NA].cksum == na[ICMPv6ND_NA].cksum
    assert not is_neighbour_query(bytes(ns), v4=None, v6=packed6("2001:2::9"))
