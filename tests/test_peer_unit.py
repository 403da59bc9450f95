"""The scripted peer's pure parts, against scapy's own builders: no devices, no privileges."""

from __future__ import annotations

from typing import Any

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6ND_NS, ICMPv6NDOptSrcLLAddr, IPv6
from scapy.layers.l2 import ARP, Ether

from pytest_tunpair import Packet
from pytest_tunpair._wire.neigh import is_neighbour_query, mac_bytes, neighbour_answer
from pytest_tunpair._wire.tcp import TcpOptions, offered, seq_add, seq_geq, seq_gt, timestamp_option

MAC = "02:74:70:00:00:02"
OTHER = "02:74:70:00:00:01"
V4 = bytes([198, 18, 0, 2])


def packed6(addr: str) -> bytes:
    import ipaddress

    return ipaddress.IPv6Address(addr).packed


def packet(raw: bytes, mode: str = "tun") -> Packet:
    return Packet(0.0, "a->b", "scripted", raw, 0, mode)


@pytest.mark.parametrize("mode", ["tun", "tap"])
@pytest.mark.parametrize(
    "l3", [IP(src="198.18.0.1", dst="198.18.0.2"), IPv6(src="2001:2::1", dst="2001:2::2")]
)
def test_what_the_peer_reads_of_a_tcp_segment_matches_scapy(mode: str, l3: object) -> None:
    opts = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (123, 456)), ("NOP", None), ("WScale", 7)]
    pkt = (
        l3
        / TCP(sport=1234, dport=80, seq=2**32 - 5, ack=77, flags="SA", window=4321, options=opts)
        / b"data"
    )
    if mode == "tap":
        pkt = Ether(src=OTHER, dst=MAC) / pkt
    seg = packet(bytes(pkt), mode)
    assert (seg.sport, seg.dport, seg.tcp_seq, seg.tcp_ack, seg.window) == (
        1234,
        80,
        2**32 - 5,
        77,
        4321,
    )
    assert seg.flags == "SA"
    assert seg.payload == b"data"
    assert seg.tcp_options == opts
    assert offered(seg.tcp_options) == TcpOptions(mss=1460, wscale=7, sack=True, timestamps=True)
    assert timestamp_option(seg.tcp_options) == (123, 456)
    assert seg.src is not None and seg.src.endswith("1")
    assert seg.dst is not None and seg.dst.endswith("2")


def test_udp_behind_extension_headers_and_short_packets() -> None:
    from scapy.layers.inet6 import IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop

    pkt = (
        IPv6(src="2001:2::1", dst="2001:2::2")
        / IPv6ExtHdrHopByHop()
        / IPv6ExtHdrDestOpt()
        / UDP(sport=5, dport=53)
        / b"q"
    )
    seg = packet(bytes(pkt))
    assert (seg.ip_proto, seg.sport, seg.dport, seg.payload) == (17, 5, 53, b"q")
    for short in (b"", b"\x45" + bytes(5)):
        assert (packet(short).ip_proto, packet(short).sport, packet(short).flags) == (
            None,
            None,
            None,
        )


def test_options_a_syn_did_not_offer() -> None:
    assert offered([]) == TcpOptions()
    assert offered(None) == TcpOptions() and timestamp_option(None) is None
    # A value of the wrong size is no offer (the parser gives its bytes).
    assert offered([("MSS", b"\x05"), ("WScale", b"")]) == TcpOptions()


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


# -- the peer over a port of its own: no pair, no kernel ----------------------------------------


class FakeKernel:
    """A ``PeerPort`` whose "other side" answers in the writer's thread, as the kernel does
    (docs/internals.md, "Peer: a write into a TUN runs the kernel's answer in the writer's
    thread"): a SYN to port 80 gets a SYN-ACK, and every frame written is kept."""

    mode = "tun"
    t0 = 0.0
    wall_t0 = 0.0

    def __init__(self) -> None:
        self.take: Any = None
        self.written: list[bytes] = []
        self.closes = 0

    def divert(self, take: Any) -> None:
        self.take = take

    def write(self, frame: bytes) -> Packet:
        self.written.append(frame)
        sent = IP(frame)
        if TCP in sent and str(sent[TCP].flags) == "S":
            answer = IP(src=sent[IP].dst, dst=sent[IP].src) / TCP(
                sport=80,
                dport=sent[TCP].sport,
                flags="SA",
                seq=5000,
                ack=sent[TCP].seq + 1,
                window=29200,
                options=[("MSS", 1400), ("NOP", None), ("WScale", 3)],
            )
            assert self.take(packet(bytes(answer))) is True
        return packet(frame)

    def closed(self) -> None:
        self.closes += 1


class End:
    def __init__(self, name: str, ip: str, ip6: str) -> None:
        self.name, self.ip, self.ip6, self.mac = name, ip, ip6, None


def checksums_hold(raw: bytes) -> bool:
    """scapy recomputing the IP and TCP/UDP checksums gets the ones the bytes carry."""
    sent = IP(raw)
    again = sent.copy()
    del again[IP].chksum
    for layer in (TCP, UDP):
        if layer in again:
            del again[layer].chksum
    return bytes(IP(bytes(again))) == raw


def test_the_peer_builds_its_segments_without_scapy_over_any_port() -> None:
    from pytest_tunpair._peer.peer import ScriptedPeer

    port = FakeKernel()
    peer = ScriptedPeer(
        port, "b", End("tun1", "198.18.0.2", "2001:2::2"), End("tun0", "198.18.0.1", "2001:2::1")
    )
    assert port.take is not None
    conn = peer.tcp_connect(80, sport=40000, timeout=1)
    syn, ack = (IP(frame) for frame in port.written)
    # The SYN: Linux's option order (tcp_options_write), DF set, checksums right.
    assert (syn[IP].src, syn[IP].dst, syn[IP].flags, syn[IP].ttl) == (
        "198.18.0.2",
        "198.18.0.1",
        2,
        64,
    )
    assert (syn[TCP].sport, syn[TCP].dport, str(syn[TCP].flags)) == (40000, 80, "S")
    assert [name for name, _ in syn[TCP].options] == ["MSS", "SAckOK", "Timestamp", "NOP", "WScale"]
    assert all(checksums_hold(frame) for frame in port.written)
    # The handshake's ACK, and what the SYN-ACK offered.
    assert (str(ack[TCP].flags), ack[TCP].ack, ack[TCP].seq) == ("A", 5001, syn[TCP].seq + 1)
    assert conn.peer_options == TcpOptions(mss=1400, wscale=3)
    assert not conn.sack and not conn.timestamps
    # UDP from the peer, and a datagram to it.
    udp = peer.udp(53)
    udp.send(b"answer", 5353)
    datagram = IP(port.written[-1])
    assert (datagram[UDP].sport, datagram[UDP].dport, bytes(datagram[UDP].payload)) == (
        53,
        5353,
        b"answer",
    )
    assert checksums_hold(port.written[-1])
    question = IP(src="198.18.0.1", dst="198.18.0.2") / UDP(sport=5353, dport=53) / b"question"
    assert port.take(packet(bytes(question))) is True
    assert udp.recvfrom(timeout=1) == (b"question", ("198.18.0.1", 5353))
    # Not for this side: left to the relay.
    assert port.take(packet(bytes(IP(src="198.18.0.2", dst="198.18.0.9") / UDP()))) is False
    peer.close()
    assert port.take is None and port.closes == 1
