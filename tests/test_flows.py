"""``flows()`` on crafted captures: no kernel, so each TCP corner case is set up exactly.

The real-traffic check (an HTTP download under loss against the kernel's RetransSegs) is in
``test_assertions.py``.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP

from pytest_tunpair import Capture, Flow, Packet
from pytest_tunpair._wire.gso import VIRTIO_NET_HDR, VIRTIO_NET_HDR_GSO_TCPV4

A, B = "198.18.0.1", "198.18.0.2"
ISN_A, ISN_B = 1000, 5000


class Conv:
    """Builds one TCP conversation a (port 40000) <-> b (port 80) into a Capture."""

    def __init__(self, isn_a: int = ISN_A, isn_b: int = ISN_B, sport: int = 40000) -> None:
        self.capture = Capture()
        self.isn = {"a->b": isn_a, "b->a": isn_b}
        self.sport = sport
        self.t = 0.0

    def seg(
        self,
        direction: str,
        offset: int,
        flags: str = "A",
        data: bytes = b"",
        action: str = "forwarded",
        vnet: bytes = b"",
    ) -> Packet:
        """A segment ``offset`` bytes after the direction's ISN (the SYN is at offset 0)."""
        src, dst, sport, dport = (
            (A, B, self.sport, 80) if direction == "a->b" else (B, A, 80, self.sport)
        )
        seq = (self.isn[direction] + offset) % 2**32
        other = "b->a" if direction == "a->b" else "a->b"
        ack = (self.isn[other] + 1) % 2**32
        layers = IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack)
        self.t += 0.001
        p = Packet(self.t, direction, action, vnet + bytes(layers / data), len(vnet))
        self.capture.record(p)
        return p

    def handshake(self) -> None:
        self.seg("a->b", 0, "S")
        self.seg("b->a", 0, "SA")
        self.seg("a->b", 1, "A")

    def flow(self) -> Flow:
        (flow,) = self.capture.flows()
        return flow


def test_a_lost_segment_resent_is_one_retransmission_and_the_stream_is_whole() -> None:
    c = Conv()
    c.handshake()
    c.seg("a->b", 1, "PA", b"x" * 100)
    c.seg("a->b", 101, "PA", b"y" * 100, action="lost")
    c.seg("a->b", 201, "PA", b"z" * 100)
    resent = c.seg("a->b", 101, "PA", b"y" * 100)
    dup = c.seg("a->b", 201, "PA", b"z" * 100, action="duplicated")  # the relay's copy
    c.seg("a->b", 301, "FA")
    c.seg("b->a", 1, "FA")
    flow = c.flow()
    assert flow.proto == "tcp" and flow.endpoints == ((A, 40000), (B, 80))
    assert flow.handshake
    assert flow.retransmissions == [resent] and dup not in flow.retransmissions
    assert flow.retransmitted_segments == 1
    assert flow.stream("a->b") == b"x" * 100 + b"y" * 100 + b"z" * 100
    assert flow.stream("b->a") == b""
    assert len(flow.fins) == 2 and flow.resets == []
    assert flow.stats["a->b"] == {
        "packets": 7,
        "bytes": sum(p.wire_len for p in flow.in_direction("a->b")) - 140,
        "dropped": 1,
    }


def test_gso_super_packet_and_a_wire_sized_resend_of_part_of_it() -> None:
    c = Conv()
    c.handshake()
    vnet = VIRTIO_NET_HDR.pack(0, VIRTIO_NET_HDR_GSO_TCPV4, 40, 1000, 0, 0)
    big = c.seg("a->b", 1, "PA", bytes(range(250)) * 12, vnet=vnet)  # 3000 bytes, 3 segments
    part = c.seg("a->b", 1001, "A", (bytes(range(250)) * 12)[1000:2000])
    again = c.seg("a->b", 1, "PA", bytes(range(250)) * 12, vnet=vnet)
    flow = c.flow()
    assert big.gso is not None and big.gso.is_super_packet
    assert flow.retransmissions == [part, again]
    assert flow.retransmitted_segments == 1 + 3  # as the kernel counts: per segment
    assert flow.stream("a->b") == bytes(range(250)) * 12


def test_keepalives_do_not_count_and_sequence_numbers_wrap() -> None:
    c = Conv(isn_a=2**32 - 50)
    c.handshake()
    c.seg("a->b", 1, "PA", b"a" * 100)  # crosses 2**32
    c.seg("a->b", 100, "A", b"\0")  # keep-alive: one byte just below what was sent
    c.seg("a->b", 100, "A")  # and the empty kind
    flow = c.flow()
    assert flow.retransmissions == []
    assert flow.stream("a->b") == b"a" * 100


def test_the_stream_stops_at_a_hole_and_skips_corrupted_copies() -> None:
    c = Conv()
    c.handshake()
    c.seg("a->b", 1, "PA", b"1" * 10)
    c.seg("a->b", 11, "PA", b"?" * 10, action="corrupted")
    c.seg("a->b", 11, "PA", b"2" * 10)
    c.seg("a->b", 31, "PA", b"4" * 10)  # bytes 21-30 never delivered
    assert c.flow().stream("a->b") == b"1" * 10 + b"2" * 10


def test_a_syn_on_a_finished_four_tuple_starts_a_new_flow() -> None:
    c = Conv()
    c.handshake()
    c.seg("a->b", 1, "FA")
    c.seg("b->a", 1, "FA")
    c.seg("a->b", 2, "A")
    c.isn = {"a->b": 90000, "b->a": 70000}
    c.handshake()
    first, second = c.capture.flows()
    assert first.handshake and second.handshake
    assert len(first.packets) == 6 and len(second.packets) == 3


def test_a_resent_syn_stays_in_its_flow_and_counts() -> None:
    c = Conv()
    c.seg("a->b", 0, "S", action="lost")
    syn = c.seg("a->b", 0, "S")
    c.seg("b->a", 0, "SA")
    c.seg("a->b", 1, "A")
    (flow,) = c.capture.flows()
    assert flow.retransmissions == [syn] and flow.handshake


def test_udp_and_icmp_flows() -> None:
    capture = Capture()
    for i, (d, layers) in enumerate(
        [
            ("a->b", IP(src=A, dst=B) / UDP(sport=5000, dport=53) / b"q"),
            ("b->a", IP(src=B, dst=A) / UDP(sport=53, dport=5000) / b"answer"),
            ("a->b", IP(src=A, dst=B) / ICMP()),
            ("a->b", IP(src=A, dst=B) / UDP(sport=5001, dport=53) / b"q"),
        ]
    ):
        capture.record(Packet(float(i), d, "forwarded", bytes(layers)))
    dns, ping, dns2 = capture.flows()
    assert (dns.proto, dns.endpoints) == ("udp", ((A, 5000), (B, 53)))
    assert dns.stats["b->a"]["packets"] == 1 and (dns.start, dns.end) == (0.0, 1.0)
    assert (ping.proto, ping.endpoints) == ("icmp", ((A, None), (B, None)))
    assert dns2.endpoints[0] == (A, 5001)
    assert not dns.handshake and dns.retransmissions == []
    with pytest.raises(ValueError, match="for TCP flows"):
        dns.stream("a->b")
    with pytest.raises(ValueError, match="direction"):
        dns.in_direction("up")


def test_a_segment_the_relay_reordered_is_not_a_retransmission() -> None:
    capture = Capture()

    def seg(seq: int, data: bytes, arrival: float, time: float, action: str) -> Packet:
        layers = IP(src=A, dst=B) / TCP(sport=1, dport=2, flags="PA", seq=seq) / data
        p = Packet(time, "a->b", action, bytes(layers), 0, "tun", arrival)
        capture.record(p)
        return p

    seg(100, b"b" * 10, arrival=0.002, time=0.002, action="forwarded")
    # Read first, held back and written after the one above: recorded second.
    seg(90, b"a" * 10, arrival=0.001, time=0.003, action="reordered")
    (flow,) = capture.flows()
    assert flow.retransmissions == []
    assert flow.stream("a->b") == b"a" * 10 + b"b" * 10
