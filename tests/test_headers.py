"""THE header parser (``_wire.headers``) against scapy's decode, and every reader of packet
bytes on top of it, on generated packets: no kernel, no namespace.

Generated packets cover what the parser must know: TUN and TAP, a virtio-net header in
front, 802.1Q and 802.1ad (QinQ) tags, IPv4 options and fragments, IPv6 extension headers
and fragments, TCP options. Each field must equal scapy's decode of the same bytes; on
cut or flipped bytes nothing may raise.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import (
    ICMP,
    IP,
    TCP,
    UDP,
    IPOption_NOP,
    IPOption_Router_Alert,
    IPOption_RR,
)
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment
from scapy.layers.ipsec import AH
from scapy.layers.l2 import Dot1AD, Dot1Q, Ether
from scapy.packet import Packet as ScapyPacket
from scapy.packet import Raw

from pytest_tunpair import Packet
from pytest_tunpair._packets.packet import FIELDS
from pytest_tunpair._wire import build, ecn, gso, headers, neigh, replies, validate
from pytest_tunpair._wire.headers import parse

from .test_fields import EXT6, expected_fields, fields_of

VNET = bytes(gso.VIRTIO_NET_HDR_LEN)

# -- generated packets ------------------------------------------------------------------------

# Option values in the shapes scapy decodes them (and Packet.tcp_options gives them).
tcp_option = st.one_of(
    st.tuples(st.just("MSS"), st.integers(0, 65535)),
    st.tuples(st.just("WScale"), st.integers(0, 14)),
    st.just(("SAckOK", b"")),
    st.just(("NOP", None)),
    st.tuples(
        st.just("Timestamp"), st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
    ),
    st.tuples(
        st.just("SAck"),
        st.lists(st.integers(0, 2**32 - 1), min_size=2, max_size=6)
        .filter(lambda xs: len(xs) % 2 == 0)
        .map(tuple),
    ),
    # A kind scapy has no name for: (kind, bytes).
    st.tuples(st.sampled_from([30, 76, 200, 253]), st.binary(max_size=6)),
)
ip_option = st.sampled_from(
    [IPOption_NOP(), IPOption_Router_Alert(), IPOption_RR(routers=["10.0.0.1", "10.0.0.2"])]
)


def _tcp_options_fit(options: list[tuple[str | int, Any]]) -> bool:
    try:
        build.tcp_options(options)
    except ValueError:  # more than 40 bytes
        return False
    return True


@st.composite
def packets(draw: st.DrawFn) -> tuple[ScapyPacket, str, bytes]:
    """(layers, mode, vnet header) of a packet the relay could read."""
    kind = draw(st.sampled_from(["tcp", "udp", "icmp"]))
    body = draw(st.binary(max_size=48))
    v6 = draw(st.booleans())
    if kind == "tcp":
        options = draw(st.lists(tcp_option, max_size=6).filter(_tcp_options_fit))
        l4: ScapyPacket = TCP(
            sport=draw(st.integers(0, 65535)),
            dport=draw(st.integers(0, 65535)),
            seq=draw(st.integers(0, 2**32 - 1)),
            flags=draw(st.integers(0, 0x1FF)),
            options=options,
        )
    elif kind == "udp":
        l4 = UDP(sport=draw(st.integers(0, 65535)), dport=draw(st.integers(0, 65535)))
    else:
        l4 = ICMPv6EchoRequest() if v6 else ICMP(type=draw(st.sampled_from([0, 8])))
    tos = draw(st.integers(0, 255))
    if v6:
        l3: ScapyPacket = IPv6(tc=tos, hlim=draw(st.integers(0, 255)))
        for ext in draw(st.lists(st.sampled_from(EXT6), max_size=3)):
            if ext is IPv6ExtHdrFragment:
                l3 = l3 / ext(offset=draw(st.integers(0, 8191)), m=draw(st.booleans()))
            else:
                l3 = l3 / ext()
    else:
        l3 = IP(
            tos=tos,
            ttl=draw(st.integers(0, 255)),
            options=draw(st.lists(ip_option, max_size=3)),
            frag=draw(st.sampled_from([0, 0, 1, 185, 8191])),
            flags=draw(st.sampled_from([0, "MF", "DF"])),
        )
    mode = draw(st.sampled_from(["tun", "tap"]))
    layers = l3 / l4 / body
    if mode == "tap":
        frame: ScapyPacket = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
        for tag in draw(st.lists(st.sampled_from([Dot1Q, Dot1AD]), max_size=2)):
            frame = frame / tag(vlan=draw(st.integers(0, 4095)))
        layers = frame / layers
    vnet = draw(st.sampled_from([b"", VNET]))
    return layers, mode, vnet


def _packet(layers: ScapyPacket, mode: str, vnet: bytes) -> Packet:
    return Packet(0.0, "a->b", "forwarded", vnet + bytes(layers), len(vnet), mode)


def _expected_offsets(sp: ScapyPacket, mode: str, start: int) -> dict[str, Any]:
    """The parse tuple's L2/L3 facts, from scapy's layers."""
    l3 = start
    ethertype = 0x0800 if IP in sp else 0x86DD
    if mode == "tap":
        l3 += 14
        layer = sp.payload
        while isinstance(layer, Dot1Q | Dot1AD):
            l3 += 4
            layer = layer.payload
    if IP in sp:
        ip = sp[IP]
        later = ip.frag > 0
        frag = ip.frag * 8 if ip.frag or ip.flags.MF else -1
        return {
            "ethertype": ethertype,
            "l3": l3,
            "hdr_end": l3 + ip.ihl * 4,
            "frag": frag,
            "mf": bool(ip.flags.MF),
            "frag_hdr": -1,
            "later": later,
        }
    hdr_end = l3 + 40
    frag, mf, frag_hdr = -1, False, -1
    layer = sp[IPv6].payload
    while isinstance(layer, EXT6):
        size = len(bytes(layer)) - len(bytes(layer.payload))
        if isinstance(layer, IPv6ExtHdrFragment):
            frag, mf, frag_hdr = layer.offset * 8, bool(layer.m), hdr_end
            hdr_end += size
            if layer.offset:
                break
            layer = layer.payload
            continue
        hdr_end += size
        layer = layer.payload
    return {
        "ethertype": ethertype,
        "l3": l3,
        "hdr_end": hdr_end,
        "frag": frag,
        "mf": mf,
        "frag_hdr": frag_hdr,
        "later": frag > 0,
    }


@settings(max_examples=400, deadline=None)
@given(generated=packets())
def test_the_parser_agrees_with_scapy(generated: tuple[ScapyPacket, str, bytes]) -> None:
    layers, mode, vnet = generated
    p = _packet(layers, mode, vnet)
    sp = p.scapy
    assert fields_of(p) == expected_fields(sp)
    f = parse(p.frame, len(vnet), mode)
    want = _expected_offsets(sp, mode, len(vnet))
    assert (f[headers.ETHERTYPE], f[headers.L3], f[headers.HDR_END]) == (
        want["ethertype"],
        want["l3"],
        want["hdr_end"],
    )
    assert (f[headers.FRAG], f[headers.MF], f[headers.FRAG_HDR]) == (
        want["frag"],
        want["mf"],
        want["frag_hdr"],
    )
    if want["later"]:  # a fragment after the first: no transport header, anywhere
        assert f[headers.L4] == -1
        assert (p.sport, p.dport, p.flags, p.tcp_options, p.payload) == (None,) * 5
        for layer in (TCP, UDP, ICMP, "TCP", "UDP"):
            assert layer not in p and not sp.haslayer(layer)
    if TCP in sp:
        assert p.tcp_options == sp[TCP].options


def test_tcp_options_keep_order_nops_and_values() -> None:
    options = [
        ("NOP", None),
        ("MSS", 1460),
        ("NOP", None),
        ("WScale", 7),
        ("SAckOK", b""),
        ("Timestamp", (2**32 - 1, 7)),
        (200, b"\x01\x02"),
        ("NOP", None),
        ("NOP", None),
        ("SAck", (10, 20)),
    ]
    p = _packet(IP() / TCP(options=options), "tun", b"")
    # 37 bytes, padded to 40 with end-of-list bytes: read as one EOL, as scapy reads them.
    assert p.tcp_options == [*options, ("EOL", None)] == p.scapy[TCP].options
    p = _packet(IP() / TCP(options=options[1:6]), "tun", b"")  # 20 bytes: no padding
    assert p.tcp_options == options[1:6]
    # An end-of-list option ends the list; padding after it is not read as options.
    p = _packet(IP() / TCP(options=[("MSS", 536), ("EOL", None), ("NOP", None)]), "tun", b"")
    assert p.tcp_options == [("MSS", 536), ("EOL", None)]
    # A value of the wrong size is kept as bytes under its name, as scapy does.
    raw = bytes(IP() / TCP(options=[(2, b"\x05"), ("NOP", None)]))
    assert _packet(IP(raw), "tun", b"").tcp_options == [("MSS", b"\x05"), ("NOP", None)]
    assert IP(raw)[TCP].options == [("MSS", b"\x05"), ("NOP", None)]
    assert _packet(IP() / TCP(), "tun", b"").tcp_options == []
    assert _packet(IP() / UDP(), "tun", b"").tcp_options is None


def test_truncated_tcp_options_stop_where_the_bytes_do() -> None:
    raw = bytearray(bytes(IP() / TCP(options=[("Timestamp", (1, 2)), ("MSS", 1460)])))
    raw[20 + 20 + 1] = 30  # the timestamp option claims to run past the header
    assert _packet(IP(bytes(raw)), "tun", b"").tcp_options == []


@pytest.mark.parametrize("kind", [135, 139, 140])
def test_extension_headers_scapy_does_not_walk(kind: int) -> None:
    # Mobility (RFC 6275), HIP (RFC 7401), Shim6 (RFC 5533): the (length + 1) * 8 layout.
    ext = struct.pack("!BB6x", 6, 1) + bytes(8)  # next header TCP, 16 bytes long
    tcp = bytes(TCP(sport=1111, dport=22, flags="S"))
    raw = bytes(IPv6(nh=kind, plen=len(ext) + len(tcp))) + ext + tcp
    p = Packet(0.0, "a->b", "forwarded", raw)
    assert (p.ip_proto, p.sport, p.dport, p.flags) == (6, 1111, 22, "S")
    f = parse(raw, 0, "tun")
    assert (f[headers.HDR_END], f[headers.L4]) == (56, 56)


def test_no_next_header_and_ah_stop_the_walk() -> None:
    raw = bytes(IPv6() / IPv6ExtHdrDestOpt(nh=59) / Raw(bytes(TCP())))
    p = _packet(IPv6(raw), "tun", b"")
    assert (p.ip_proto, p.sport, p.payload) == (59, None, None)
    assert parse(raw, 0, "tun")[headers.HDR_END] == 48
    # scapy decodes no further than AH (or ESP), so neither does the parser.
    raw = bytes(IPv6() / AH(nh=6, payloadlen=4, icv=bytes(12)) / TCP(sport=1, dport=2))
    p = _packet(IPv6(raw), "tun", b"")
    assert (p.ip_proto, p.sport, TCP in p) == (51, None, False) and TCP not in p.scapy


def test_qinq_frame_of_another_ethertype_has_no_ip_fields() -> None:
    frame = bytes(Ether() / Dot1AD(vlan=1) / Dot1Q(vlan=2, type=0x88CC) / Raw(b"\x00" * 30))
    f = parse(frame, 0, "tap")
    assert (f[headers.ETHERTYPE], f[headers.L3], f[headers.VERSION]) == (0x88CC, 22, None)
    p = _packet(Ether(frame), "tap", b"")
    assert all(getattr(p, name) is None for name in FIELDS)


# -- the readers on top of the parser ----------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    generated=packets(),
    cut=st.integers(0, 200),
    flips=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=4),
)
def test_no_reader_raises_on_cut_or_flipped_bytes(
    generated: tuple[ScapyPacket, str, bytes], cut: int, flips: list[tuple[int, int]]
) -> None:
    layers, mode, vnet = generated
    raw = bytearray(vnet + bytes(layers))
    for at, value in flips:
        if at < len(raw):
            raw[at] = value
    data = bytes(raw[: max(len(vnet), len(raw) - cut)])
    p = Packet(0.0, "a->b", "forwarded", data, len(vnet), mode)
    for name in FIELDS:
        getattr(p, name)
    for layer in headers.LAYERS:
        layer in p  # noqa: B015
    frame = p.data
    for build_reply in (
        replies.tcp_reset,
        replies.unreachable,
        lambda ip: replies.frag_needed(ip, 1280),
    ):
        replies.reply_frame(frame, mode, build_reply)
    replies.reply_frame(frame, mode, lambda ip: replies.fragment_ipv4(ip, 576), back=False)
    ecn.ecn_codepoint(p.frame, len(vnet), tap=mode == "tap")
    ecn.set_ce(p.frame, len(vnet), tap=mode == "tap")
    gso.wire_size(p.frame, len(vnet), tap=mode == "tap")
    if mode == "tap":
        neigh.neighbour_answer(frame, mac=bytes(6), v4=bytes(4), v6=bytes(16))
    try:
        validate.validate_frame(frame, mode=mode, mtu=1500)
    except ValueError:
        pass


@settings(max_examples=100, deadline=None)
@given(
    tags=st.lists(st.sampled_from([Dot1Q, Dot1AD]), max_size=3),
    v6=st.booleans(),
    flags=st.sampled_from(["S", "A", "PA", "FA", "SA"]),
    body=st.binary(max_size=20),
)
def test_tap_replies_keep_the_vlan_tags(
    tags: list[type[ScapyPacket]], v6: bool, flags: str, body: bytes
) -> None:
    layers: ScapyPacket = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    for i, tag in enumerate(tags):
        layers = layers / tag(vlan=i + 1)
    ip = IPv6(src="2001:2::1", dst="2001:2::2") if v6 else IP(src="198.18.0.1", dst="198.18.0.2")
    frame = bytes(layers / ip / TCP(sport=1111, dport=22, flags=flags, seq=5, ack=9) / body)
    [reset] = replies.reply_frame(frame, "tap", replies.tcp_reset)
    l3 = parse(frame, 0, "tap")[headers.L3]
    assert l3 == 14 + 4 * len(tags)
    assert reset[:6] == frame[6:12] and reset[6:12] == frame[:6]
    assert reset[12:l3] == frame[12:l3]  # tags and Ethertype, as they came
    answer = Ether(reset)
    assert str(answer[TCP].flags) in ("R", "RA")
    assert (answer[TCP].sport, answer[TCP].dport) == (22, 1111)
