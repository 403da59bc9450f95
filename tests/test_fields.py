"""The header parser and the matcher on crafted bytes: no kernel, no namespace.

Every field is compared with scapy's decode of the same bytes, which is what the fields
promise to agree with; the real-traffic versions are in ``test_assertions.py``.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, UDPerror
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.ipsec import AH
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Packet as ScapyPacket
from scapy.packet import Raw

from pytest_tunpair import Capture, Packet, PacketTimeout, UnexpectedPacket
from pytest_tunpair._packets.packet import FIELDS

ECN = ("not-ect", "ect1", "ect0", "ce")
EXT6 = (IPv6ExtHdrHopByHop, IPv6ExtHdrDestOpt, IPv6ExtHdrRouting, IPv6ExtHdrFragment)


def expected_fields(sp: ScapyPacket) -> dict[str, Any]:
    """The fields as scapy's decode gives them (the reference the parser must equal)."""
    out: dict[str, Any] = dict.fromkeys(FIELDS)
    if ARP in sp:
        out.update(proto="arp", src=sp[ARP].psrc, dst=sp[ARP].pdst)
        return out
    if IP in sp:
        ip = sp[IP]
        out.update(ip_version=4, ttl=ip.ttl, ecn=ECN[ip.tos & 3], ip_proto=ip.proto)
        layer = ip.payload
    elif IPv6 in sp:
        ip = sp[IPv6]
        out.update(ip_version=6, ttl=ip.hlim, ecn=ECN[ip.tc & 3], ip_proto=ip.nh)
        layer = ip.payload
        while isinstance(layer, EXT6):
            out["ip_proto"] = layer.nh
            layer = layer.payload
    else:
        return out
    out.update(src=ip.src, dst=ip.dst)
    out["proto"] = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}.get(out["ip_proto"])
    if IP in sp:
        later_fragment = sp[IP].frag > 0
    else:
        later_fragment = any(
            isinstance(x, IPv6ExtHdrFragment) and x.offset > 0 for x in sp.iterpayloads()
        )
    if later_fragment:  # no transport header (scapy: Raw), so no transport fields at all
        return out
    if TCP in sp:
        t = sp[TCP]
        out.update(
            sport=t.sport,
            dport=t.dport,
            flags=str(t.flags),
            tcp_seq=t.seq,
            tcp_ack=t.ack,
            window=t.window,
            tcp_options=t.options,
            payload=bytes(t.payload),
        )
    elif UDP in sp:
        u = sp[UDP]
        out.update(sport=u.sport, dport=u.dport, payload=bytes(u.payload))
    elif ICMP in sp:
        out.update(icmp_type=sp[ICMP].type, icmp_code=sp[ICMP].code)
        out["payload"] = bytes(sp[ICMP].payload)
    elif out["ip_proto"] == 58:  # scapy has a class per ICMPv6 type: read its bytes
        raw = bytes(layer)
        out.update(icmp_type=raw[0], icmp_code=raw[1], payload=raw[8:])
    else:  # another protocol: what follows the IP headers
        out["payload"] = bytes(layer)
    return out


def fields_of(p: Packet) -> dict[str, Any]:
    return {name: getattr(p, name) for name in FIELDS}


def pkt(layers: ScapyPacket, *, mode: str = "tun", vnet: bytes = b"") -> Packet:
    return Packet(0.0, "a->b", "forwarded", vnet + bytes(layers), len(vnet), mode)


CRAFTED = [
    IP(src="10.1.2.3", dst="10.9.8.7", ttl=3, tos=0x02)
    / TCP(sport=40000, dport=443, flags="SA", seq=2**32 - 1, ack=7, window=1234)
    / (b"x" * 10),
    IP(tos=0x03, options=[b"\x01" * 4]) / UDP(sport=53, dport=5353) / b"dns",
    IP() / ICMP(type=3, code=4) / b"rest",
    IPv6(src="2001:db8::1", dst="fd00::abcd", hlim=9, tc=0x01) / TCP(flags="FPU") / b"six",
    IPv6() / IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting() / IPv6ExtHdrDestOpt() / UDP() / b"ext",
    IPv6() / IPv6ExtHdrFragment(offset=0, m=1) / TCP(dport=22) / b"first-fragment",
    IPv6() / AH(nh=6, payloadlen=4, icv=bytes(12)) / TCP(sport=1, dport=2),
    IPv6() / ICMPv6EchoRequest(data=b"ping6"),
    IP() / TCP(flags="SEC", options=[("MSS", 1460), ("SAckOK", b""), ("WScale", 7)]),
    IP() / TCP(flags=0x1FF),  # every flag, NS included
]


@pytest.mark.parametrize("layers", CRAFTED, ids=[s.summary() for s in CRAFTED])
@pytest.mark.parametrize("mode", ["tun", "tap"])
def test_fields_equal_scapys_decode(layers: ScapyPacket, mode: str) -> None:
    if mode == "tap":
        layers = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / layers
    p = pkt(layers, mode=mode, vnet=bytes(10))
    assert fields_of(p) == expected_fields(p.scapy)


def test_vlan_tagged_frame_and_arp() -> None:
    tagged = pkt(Ether() / Dot1Q(vlan=5) / IP(dst="10.0.0.9") / UDP(dport=7), mode="tap")
    assert (tagged.dst, tagged.dport, tagged.proto) == ("10.0.0.9", 7, "udp")
    arp = pkt(Ether() / ARP(psrc="10.0.0.1", pdst="10.0.0.2"), mode="tap")
    assert fields_of(arp) == expected_fields(arp.scapy)
    assert arp.proto == "arp" and ARP in arp and IP not in arp


def test_fragments_after_the_first_have_no_ports() -> None:
    v4 = pkt(IP(frag=100, proto=6) / Raw(b"\x00" * 40))
    v6 = pkt(IPv6() / IPv6ExtHdrFragment(offset=10, nh=17) / Raw(b"\x00" * 16))
    for p in (v4, v6):
        assert (p.sport, p.dport, p.flags) == (None, None, None)
        assert p.proto in ("tcp", "udp")
        assert TCP not in p and UDP not in p
        assert (TCP in p.scapy, UDP in p.scapy) == (False, False)


def test_short_and_junk_packets_give_none_not_errors() -> None:
    for data in (b"", b"\x45", b"\x60" + bytes(10), b"\x45" + bytes(22), b"\xff" * 64):
        p = Packet(0.0, "a->b", "forwarded", data)
        for name in FIELDS:
            getattr(p, name)
        assert p.sport is None
    assert Packet(0.0, "a->b", "forwarded", b"\x45" + bytes(22)).ip_version == 4


def test_snaplen_cut_keeps_headers_and_cuts_the_payload() -> None:
    capture = Capture(snaplen=60)
    p = pkt(IP() / TCP(dport=80) / (b"y" * 1000), vnet=bytes(10))
    capture.record(p)
    assert p.dport == 80 and p.payload == b"y" * 20


@settings(max_examples=200, deadline=None)
@given(
    v6=st.booleans(),
    udp=st.booleans(),
    sport=st.integers(0, 65535),
    dport=st.integers(0, 65535),
    flags=st.integers(0, 0x1FF),
    seq=st.integers(0, 2**32 - 1),
    tos=st.integers(0, 255),
    ttl=st.integers(0, 255),
    exts=st.lists(st.sampled_from(EXT6[:3]), max_size=3),
    body=st.binary(max_size=64),
)
def test_fields_equal_scapy_for_generated_packets(
    v6: bool,
    udp: bool,
    sport: int,
    dport: int,
    flags: int,
    seq: int,
    tos: int,
    ttl: int,
    exts: list[type],
    body: bytes,
) -> None:
    l4 = (
        UDP(sport=sport, dport=dport)
        if udp
        else TCP(sport=sport, dport=dport, flags=flags, seq=seq)
    )
    if v6:
        l3: ScapyPacket = IPv6(tc=tos, hlim=ttl)
        for ext in exts:
            l3 = l3 / ext()
    else:
        l3 = IP(tos=tos, ttl=ttl)
    p = pkt(l3 / l4 / body)
    assert fields_of(p) == expected_fields(p.scapy)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=120), mode=st.sampled_from(["tun", "tap"]))
def test_the_parser_never_raises(data: bytes, mode: str) -> None:
    p = Packet(0.0, "a->b", "forwarded", data, 0, mode)
    for name in FIELDS:
        getattr(p, name)
    "TCP" in p  # noqa: B015


def test_fast_layer_answers_equal_scapy() -> None:
    for layers in [*CRAFTED, IP() / ICMP() / IP() / TCP()]:
        p = pkt(layers)
        for layer in (IP, IPv6, TCP, UDP, ICMP, "TCP", "IP"):
            assert (layer in p) == bool(p.scapy.haslayer(layer)), (layers.summary(), layer)
    tunnel = pkt(IP() / IP() / TCP())  # IP-in-IP: scapy finds the inner TCP
    assert TCP in tunnel and TCP in tunnel.scapy
    assert tunnel[TCP].dport == 80


# -- filters -----------------------------------------------------------------------------------


def _capture(*layers: ScapyPacket, directions: str = "") -> Capture:
    capture = Capture()
    for i, layer in enumerate(layers):
        d = "b->a" if directions[i : i + 1] == "b" else "a->b"
        capture.record(Packet(float(i), d, "forwarded", bytes(layer)))
    return capture


def test_filter_by_fields_values_and_predicates() -> None:
    c = _capture(
        IP(dst="10.0.0.2") / UDP(sport=5000, dport=53),
        IP(dst="10.0.0.2") / TCP(sport=999, dport=80, flags="S"),
        IPv6(dst="2001:db8::2") / TCP(sport=2000, dport=80, flags="SA"),
        directions="aab",
    )
    assert [p.seq for p in c.filter(dport=53)] == [0]
    assert [p.seq for p in c.filter(TCP, dport=80, flags="S")] == [1]
    assert [p.seq for p in c.filter(flags="AS")] == [2]  # any order, as scapy's flags
    assert [p.seq for p in c.filter(flags=lambda f: "S" in f)] == [1, 2]
    with pytest.raises(ValueError, match="FSRPAUECN"):
        c.filter(flags="SYN")
    assert [p.seq for p in c.filter(sport=lambda p: p > 1024)] == [0, 2]
    assert [p.seq for p in c.filter(dst="2001:DB8:0::2")] == [2]  # normalised
    assert [p.seq for p in c.filter(proto="tcp", direction="b->a")] == [2]
    assert [p.seq for p in c.filter(action="forwarded", ip_version=4)] == [0, 1]
    assert c.filter(action=lambda a: a != "forwarded") == []


def test_filter_unknown_keyword_lists_the_valid_ones() -> None:
    c = _capture(IP() / UDP())
    with pytest.raises(TypeError, match=r"'port'.*valid: direction, action, ip_version, src"):
        c.filter(port=53)
    with pytest.raises(TypeError, match="'port'"):
        c.wait_for(port=53, timeout=0)
    with pytest.raises(ValueError, match="not an IP address"):
        c.filter(dst="tun1")


def test_wait_for_by_fields_wakes_on_a_later_packet() -> None:
    c = _capture(IP() / UDP(dport=1))
    timer = threading.Timer(0.1, lambda: c.record(pkt(IP() / UDP(dport=2))))
    timer.start()
    try:
        assert c.wait_for(dport=2, timeout=5).seq == 1
    finally:
        timer.join()
    with pytest.raises(PacketTimeout, match="dport=3"):
        c.wait_for(dport=3, timeout=0.05)


# -- matcher -------------------------------------------------------------------------------------


def test_template_compares_only_the_fields_it_sets() -> None:
    c = _capture(
        IP(dst="10.0.0.1") / TCP(flags="S", sport=1234, dport=80, window=1),
        IP(dst="10.0.0.2") / TCP(flags="SA", sport=80, dport=1234),
    )
    assert c.expect(IP(dst="10.0.0.2") / TCP(flags="SA"), timeout=0).seq == 1
    assert c.expect(TCP(sport=80), timeout=0).seq == 1  # a layer anywhere in the packet
    assert c.expect(IP(dst="10.0.0.0/24") / TCP(flags="SA"), timeout=0).seq == 1  # a Net
    assert c.expect(IP(ttl=1) / TCP(flags="S"), timeout=0, ignore=["IP.ttl"]).seq == 0
    assert c.expect(IP(ttl=1) / TCP(flags="S"), timeout=0, ignore="IP.ttl").seq == 0


def test_template_failure_names_the_fields_that_differed() -> None:
    c = _capture(IP(dst="10.0.0.2") / TCP(flags="SA"), IP(dst="10.0.0.2") / UDP())
    with pytest.raises(PacketTimeout) as info:
        c.expect(IP(dst="10.0.0.2") / TCP(flags="R"), timeout=0.05)
    text = str(info.value)
    assert "TCP.flags: expected 'R', got 'SA'" in text
    assert "TCP: no such layer" in text  # the UDP packet, further away
    assert text.index("got 'SA'") < text.index("no such layer") < text.index("trace (2 examined)")
    assert isinstance(info.value, AssertionError)


def test_ignore_names_must_exist() -> None:
    c = _capture(IP() / TCP())
    with pytest.raises(ValueError, match="TCP has no field 'ttl'"):
        c.expect(IP() / TCP(), ignore=("TCP.ttl",), timeout=0)
    with pytest.raises(ValueError, match=r"'UDP\.sport'"):
        c.expect(IP() / TCP(), ignore=("UDP.sport",), timeout=0)


def test_dropped_packets_do_not_count_unless_asked() -> None:
    c = Capture()
    c.record(Packet(0.0, "a->b", "dropped", bytes(IP() / UDP(dport=9))))
    with pytest.raises(PacketTimeout, match="action: expected a delivered packet, got 'dropped'"):
        c.expect(UDP(dport=9), timeout=0)
    assert c.expect(UDP(dport=9), timeout=0, action="dropped").seq == 0
    c.expect_none(UDP(dport=9), after=0.0, during=0)


def test_expect_none_names_the_packet() -> None:
    c = _capture(IP() / UDP(dport=9))
    c.expect_none(UDP(dport=9), during=0.05)  # only packets from now on count
    with pytest.raises(UnexpectedPacket, match=r"packet #0 matched UDP\(dport=9\)") as info:
        c.expect_none(UDP(dport=9), after=0.0, during=0)
    assert info.value.packet.seq == 0


def test_expect_none_fails_at_once_when_a_packet_comes() -> None:
    c = Capture()
    timer = threading.Timer(0.05, lambda: c.record(pkt(IP() / UDP(dport=9))))
    start = time.monotonic()
    timer.start()
    try:
        with pytest.raises(UnexpectedPacket):
            c.expect_none(lambda p: p.dport == 9, during=30)
    finally:
        timer.join()
    assert time.monotonic() - start < 20


def test_expect_sequence_in_order_only() -> None:
    c = _capture(IP() / TCP(flags="S"), IP() / TCP(flags="SA"), IP() / TCP(flags="A"))
    got = c.expect_sequence([TCP(flags="S"), TCP(flags="SA"), TCP(flags="A")], timeout=0)
    assert [p.seq for p in got] == [0, 1, 2]
    with pytest.raises(PacketTimeout, match=r"step 2 of 2, TCP\(flags='S'\).*steps matched: #1"):
        c.expect_sequence([TCP(flags="SA"), TCP(flags="S")], timeout=0)


def test_after_a_packet_or_a_time() -> None:
    c = _capture(IP() / UDP(dport=1), IP() / UDP(dport=1))
    first = c[0]
    assert c.expect(UDP(dport=1), after=first, timeout=0).seq == 1
    assert c.expect(UDP(dport=1), after=0.5, timeout=0).seq == 1
    with pytest.raises(TypeError, match="after="):
        c.expect(UDP(), after="now", timeout=0)


class _Inbox:
    """A packet source that is not a Capture: what a scripted peer could hand over."""

    def __init__(self, packets: list[Packet]) -> None:
        for i, p in enumerate(packets):
            p.seq = i
        self.packets = packets

    def wait_new(self, after_seq: int, timeout: float) -> list[Packet]:
        return self.packets[after_seq + 1 :]

    @property
    def last_seq(self) -> int:
        return len(self.packets) - 1


def test_the_matcher_works_on_any_packet_source() -> None:
    from pytest_tunpair import expect, expect_none, expect_sequence

    inbox = _Inbox([pkt(IP() / TCP(flags="S")), pkt(IP() / TCP(flags="A"))])
    assert expect(inbox, TCP(flags="A"), timeout=0).seq == 1
    assert len(expect_sequence(inbox, [TCP(flags="S"), TCP(flags="A")], timeout=0)) == 2
    with pytest.raises(UnexpectedPacket):
        expect_none(inbox, TCP(flags="S"), after=0.0, during=0)


TEMPLATE_FIELDS = {
    "IP": {"src": "10.0.0.1", "dst": "10.0.0.2", "ttl": 17, "tos": 4, "id": 99},
    "TCP": {"sport": 1234, "dport": 80, "flags": "PA", "seq": 7, "ack": 9, "window": 512},
}
OTHER_VALUES = {
    "src": "10.0.0.9",
    "dst": "10.0.0.8",
    "ttl": 18,
    "tos": 8,
    "id": 100,
    "sport": 1235,
    "dport": 81,
    "flags": "S",
    "seq": 8,
    "ack": 10,
    "window": 513,
}


@settings(max_examples=100, deadline=None)
@given(
    ip_keys=st.sets(st.sampled_from(sorted(TEMPLATE_FIELDS["IP"]))),
    tcp_keys=st.sets(st.sampled_from(sorted(TEMPLATE_FIELDS["TCP"]))),
    wrong=st.sampled_from(sorted(OTHER_VALUES)),
)
def test_a_template_of_a_packets_own_fields_matches_and_one_changed_field_is_named(
    ip_keys: set[str], tcp_keys: set[str], wrong: str
) -> None:
    ip_all, tcp_all = TEMPLATE_FIELDS["IP"], TEMPLATE_FIELDS["TCP"]
    c = _capture(IP(**ip_all) / TCP(**tcp_all) / b"data")
    ip_t = {k: ip_all[k] for k in ip_keys}
    tcp_t = {k: tcp_all[k] for k in tcp_keys}
    assert c.expect(IP(**ip_t) / TCP(**tcp_t), timeout=0).seq == 0
    layer = "IP" if wrong in ip_all else "TCP"
    (ip_t if layer == "IP" else tcp_t)[wrong] = OTHER_VALUES[wrong]
    with pytest.raises(PacketTimeout) as info:
        c.expect(IP(**ip_t) / TCP(**tcp_t), timeout=0)
    diffs = [line.strip() for line in str(info.value).splitlines() if ": expected " in line]
    assert len(diffs) == 1 and diffs[0].startswith(f"{layer}.{wrong}: expected "), diffs
    # ... and ignoring it makes the template match again.
    assert c.expect(IP(**ip_t) / TCP(**tcp_t), ignore=[f"{layer}.{wrong}"], timeout=0).seq == 0


def test_templates_over_a_tunnel_and_an_icmp_error() -> None:
    c = _capture(
        IP(src="10.0.0.1", dst="10.0.0.2") / IP(src="192.0.2.1", dst="192.0.2.2") / TCP(dport=22),
        IP(dst="10.0.0.2") / ICMP(type=3, code=3) / IP(dst="10.0.0.9") / UDP(dport=53),
    )
    inner = IP(dst="10.0.0.2") / IP(dst="192.0.2.2") / TCP(dport=22)
    assert c.expect(inner, timeout=0).seq == 0
    # scapy decodes the header an ICMP error quotes as IPerror / UDPerror.
    error = IP(dst="10.0.0.2") / ICMP(type=3) / IPerror(dst="10.0.0.9") / UDPerror(dport=53)
    assert c.expect(error, timeout=0).seq == 1
    with pytest.raises(PacketTimeout, match=r"IP: no such layer .*IP / ICMP / IPerror"):
        c.expect(IP(dst="10.0.0.2") / ICMP(type=3) / IP(dst="10.0.0.9"), timeout=0)
    assert c.filter(UDP) == [] and UDP not in c[1].scapy  # the quoted header is UDPerror
