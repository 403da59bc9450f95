"""Unit tests of the reply builders (pure bytes), checked against scapy's decoding."""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, IPOption_Router_Alert, TCPerror
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    IPv6,
    IPv6ExtHdrHopByHop,
)
from scapy.layers.l2 import Ether

from pytest_tunpair._wire import replies as _replies

A4, B4 = "198.18.0.1", "198.18.0.2"
A6, B6 = "2001:2::1", "2001:2::2"


def assert_checksums_ok(raw: bytes, *, l4: bool = True) -> None:
    """scapy recomputing every checksum gives the same bytes (only the IP header's for a
    fragment, whose transport checksum covers the whole datagram)."""
    cls = IP if raw[0] >> 4 == 4 else IPv6
    p = cls(raw)
    q = cls(raw)
    if q.haslayer(IP) and cls is IP:
        del q[IP].chksum
    for layer, field in ((TCP, "chksum"), (UDP, "chksum"), (ICMP, "chksum")):
        if l4 and q.haslayer(layer) and not isinstance(q.getlayer(layer).underlayer, IPerror):
            delattr(q[layer], field)
    for layer in (ICMPv6DestUnreach, ICMPv6PacketTooBig):
        if q.haslayer(layer):
            del q[layer].cksum
    assert bytes(cls(bytes(q))) == bytes(p) == raw


@pytest.mark.parametrize(("src", "dst", "cls"), [(A4, B4, IP), (A6, B6, IPv6)])
def test_reset_to_syn_acknowledges_it(src: str, dst: str, cls: type) -> None:
    syn = bytes(cls(src=src, dst=dst) / TCP(sport=40000, dport=443, flags="S", seq=1000))
    rst = _replies.tcp_reset(syn)
    assert rst is not None
    assert_checksums_ok(rst)
    p = cls(rst)
    assert (p.src, p.dst) == (dst, src)
    assert (p[TCP].sport, p[TCP].dport) == (443, 40000)
    assert p[TCP].flags == "RA"
    assert (p[TCP].seq, p[TCP].ack) == (0, 1001)  # SYN counts one


def test_reset_to_data_without_ack_counts_payload_and_fin() -> None:
    seg = bytes(IP(src=A4, dst=B4) / TCP(flags="F", seq=2**32 - 2) / (b"x" * 10))
    p = IP(_replies.tcp_reset(seg))
    assert p[TCP].ack == (2**32 - 2 + 10 + 1) % 2**32  # wraps around
    assert p[TCP].seq == 0


def test_reset_to_segment_with_ack_takes_seq_from_it() -> None:
    seg = bytes(IPv6(src=A6, dst=B6) / TCP(flags="PA", seq=5, ack=777) / b"data")
    rst = _replies.tcp_reset(seg)
    assert rst is not None
    assert_checksums_ok(rst)
    p = IPv6(rst)
    assert p[TCP].flags == "R"
    assert p[TCP].seq == 777


def test_reset_is_never_answered_nor_non_tcp() -> None:
    assert _replies.tcp_reset(bytes(IP(src=A4, dst=B4) / TCP(flags="R"))) is None
    assert _replies.tcp_reset(bytes(IP(src=A4, dst=B4) / UDP())) is None


def test_reset_behind_ipv6_extension_header() -> None:
    seg = bytes(IPv6(src=A6, dst=B6) / IPv6ExtHdrHopByHop() / TCP(flags="S", seq=9))
    p = IPv6(_replies.tcp_reset(seg))
    assert p[TCP].ack == 10


def test_port_unreachable_for_udp_quotes_the_datagram() -> None:
    dgram = bytes(IP(src=A4, dst=B4, id=7) / UDP(sport=5000, dport=53) / (b"q" * 100))
    reply = _replies.unreachable(dgram)
    assert reply is not None
    assert_checksums_ok(reply)
    p = IP(reply)
    assert (p.src, p.dst) == (B4, A4)
    assert (p[ICMP].type, p[ICMP].code) == (3, 3)
    assert bytes(p[ICMP].payload) == dgram  # short enough to quote whole


def test_unreachable_quote_stays_within_576_bytes() -> None:
    dgram = bytes(IP(src=A4, dst=B4) / UDP() / (b"q" * 1400))
    reply = _replies.unreachable(dgram)
    assert reply is not None and len(reply) == 576
    assert IP(reply)[IPerror].src == A4


def test_unreachable_for_tcp_is_host_unreachable() -> None:
    p = IP(_replies.unreachable(bytes(IP(src=A4, dst=B4) / TCP(flags="S"))))
    assert (p[ICMP].type, p[ICMP].code) == (3, 1)
    assert p[TCPerror].flags == "S"


def test_icmpv6_port_unreachable_within_minimum_mtu() -> None:
    dgram = bytes(IPv6(src=A6, dst=B6) / UDP(dport=53) / (b"q" * 2000))
    reply = _replies.unreachable(dgram)
    assert reply is not None
    assert len(reply) == 1280
    assert_checksums_ok(reply)
    p = IPv6(reply)
    assert (p[ICMPv6DestUnreach].type, p[ICMPv6DestUnreach].code) == (1, 4)
    assert (p.src, p.dst) == (B6, A6)


def test_no_error_about_an_error_or_a_later_fragment() -> None:
    error = _replies.unreachable(bytes(IP(src=A4, dst=B4) / UDP()))
    assert error is not None
    assert _replies.unreachable(error) is None
    assert _replies.unreachable(bytes(IP(src=A4, dst=B4, frag=10) / (b"x" * 8))) is None
    assert _replies.unreachable(bytes(IP(src=A4, dst="224.0.0.1") / UDP())) is None
    # An echo request is not an error: it may be answered.
    ping6 = bytes(IPv6(src=A6, dst=B6) / ICMPv6EchoRequest())
    assert _replies.unreachable(ping6) is not None


def test_frag_needed_carries_next_hop_mtu() -> None:
    big = bytes(IP(src=A4, dst=B4, flags="DF") / TCP(flags="A") / (b"x" * 1400))
    assert _replies.is_too_big(big, 1280)
    reply = _replies.frag_needed(big, 1280)
    assert reply is not None
    assert_checksums_ok(reply)
    p = IP(reply)
    assert (p[ICMP].type, p[ICMP].code, p[ICMP].nexthopmtu) == (3, 4, 1280)
    assert p[ICMP].reserved == 0 and p[ICMP].length == 0


def test_packet_too_big_carries_mtu() -> None:
    big = bytes(IPv6(src=A6, dst=B6) / TCP(flags="A") / (b"x" * 1400))
    assert _replies.is_too_big(big, 1280)
    reply = _replies.frag_needed(big, 1280)
    assert reply is not None
    assert_checksums_ok(reply)
    p = IPv6(reply)
    assert p[ICMPv6PacketTooBig].mtu == 1280
    assert len(reply) == 1280


def test_too_big_only_when_it_may_not_be_fragmented() -> None:
    assert not _replies.is_too_big(bytes(IP(src=A4, dst=B4) / (b"x" * 1400)), 1280)
    assert not _replies.is_too_big(bytes(IPv6(src=A6, dst=B6) / (b"x" * 1200)), 1280)


@pytest.mark.parametrize("mtu", [68, 576, 1280, 1499])
def test_fragments_reassemble_to_the_original(mtu: int) -> None:
    original = IP(src=A4, dst=B4, id=4242) / UDP(sport=1, dport=2) / (bytes(range(256)) * 6)
    raw = bytes(original)
    frags = _replies.fragment_ipv4(raw, mtu)
    assert len(frags) > 1
    payload = b""
    for i, frag in enumerate(frags):
        assert len(frag) <= mtu
        assert_checksums_ok(frag, l4=False)
        p = IP(frag)
        assert p.id == 4242
        assert p.frag * 8 == len(payload)
        assert bool(p.flags.MF) == (i < len(frags) - 1)
        if i < len(frags) - 1:
            assert len(bytes(p.payload)) % 8 == 0
        payload += bytes(IP(frag).payload) if i else frag[20:]
    assert payload == raw[20:]


def test_fragment_of_fragment_keeps_offset_and_mf() -> None:
    raw = bytes(IP(src=A4, dst=B4, frag=100, flags="MF", proto=17) / (b"y" * 1000))
    frags = [IP(f) for f in _replies.fragment_ipv4(raw, 500)]
    assert [f.frag for f in frags] == [100, 100 + 480 // 8, 100 + 960 // 8]
    assert all(f.flags.MF for f in frags)


def test_only_copied_options_in_later_fragments() -> None:
    # Router Alert has the copied bit set (RFC 2113); a timestamp option (68) does not.
    opts = [IPOption_Router_Alert()]
    raw = bytes(IP(src=A4, dst=B4, options=opts) / UDP() / (b"z" * 600))
    raw_ts = bytes(IP(src=A4, dst=B4, options=b"\x44\x04\x05\x00") / UDP() / (b"z" * 600))
    later = IP(_replies.fragment_ipv4(raw, 300)[1])
    assert later.ihl == 6
    assert_checksums_ok(bytes(later), l4=False)
    later_ts = IP(_replies.fragment_ipv4(raw_ts, 300)[1])
    assert later_ts.ihl == 5


def test_fragment_refuses_df_and_tiny_mtu() -> None:
    with pytest.raises(_replies.ReplyError, match="DF"):
        _replies.fragment_ipv4(bytes(IP(flags="DF") / (b"x" * 2000)), 1500)
    with pytest.raises(_replies.ReplyError, match="68"):
        _replies.fragment_ipv4(bytes(IP() / (b"x" * 2000)), 60)


def test_fits_unchanged() -> None:
    raw = bytes(IP(src=A4, dst=B4) / UDP())
    assert _replies.fragment_ipv4(raw, 1500) == [raw]


def test_tap_reply_swaps_macs_and_fragments_keep_them() -> None:
    eth = Ether(src="02:00:00:00:00:0a", dst="02:00:00:00:00:0b")
    frame = bytes(eth / IP(src=A4, dst=B4) / TCP(flags="S"))
    [reply] = _replies.reply_frame(frame, "tap", _replies.tcp_reset)
    e = Ether(reply)
    assert (e.src, e.dst) == ("02:00:00:00:00:0b", "02:00:00:00:00:0a")
    assert e[TCP].flags == "RA"
    big = bytes(eth / IP(src=A4, dst=B4) / (b"x" * 2000))
    frags = _replies.reply_frame(
        big, "tap", lambda ip: _replies.fragment_ipv4(ip, 1500), back=False
    )
    assert len(frags) == 2
    assert all(Ether(f).src == "02:00:00:00:00:0a" for f in frags)
    assert _replies.reply_frame(b"\0" * 60, "tap", _replies.tcp_reset) == []
    assert _replies.reply_frame(b"\x45", "tun", _replies.tcp_reset) == []
