"""The segmenter (``_wire/gso.py``) on built super-packets, checked with scapy.

The real-traffic comparison with the kernel's own GSO is in ``tests/test_segments.py``.
"""

from __future__ import annotations

import os

import pytest

from pytest_tunpair._wire import build, gso
from pytest_tunpair._wire import headers as _h
from pytest_tunpair._wire.numbers import IPPROTO_TCP, TCP_ACK, TCP_CWR, TCP_FIN, TCP_PSH

SRC4, DST4 = bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2])
SRC6, DST6 = bytes.fromhex("fd00" + "00" * 13 + "01"), bytes.fromhex("fd00" + "00" * 13 + "02")
OPTIONS = [("NOP", None), ("NOP", None), ("Timestamp", (123456, 654321))]


def super_packet(
    payload: bytes,
    mss: int,
    *,
    v6: bool = False,
    flags: int = TCP_ACK | TCP_PSH | TCP_FIN | TCP_CWR,
    tap: bool = False,
    ecn_bit: bool = True,
) -> bytes:
    """A super-packet as the kernel hands one to a TSO device: partial TCP checksum."""
    src, dst = (SRC6, DST6) if v6 else (SRC4, DST4)
    seg = bytearray(
        build.tcp(
            src, dst, 40000, 5201, seq=0xFFFFF000, ack=77, flags=flags, window=500,
            options=OPTIONS, payload=payload,
        )
    )  # fmt: skip
    pseudo = gso._fold(gso._ones_sum(src + dst) + IPPROTO_TCP + len(seg))
    seg[16:18] = pseudo.to_bytes(2, "big")
    ip = build.ip_packet(src, dst, IPPROTO_TCP, bytes(seg), ident=0xFFFE, flags=0x4000, tos=2)
    l2 = (b"\x02" * 6 + b"\x04" * 6 + (b"\x86\xdd" if v6 else b"\x08\x00")) if tap else b""
    gtype = gso.VIRTIO_NET_HDR_GSO_TCPV6 if v6 else gso.VIRTIO_NET_HDR_GSO_TCPV4
    if ecn_bit:
        gtype |= gso.VIRTIO_NET_HDR_GSO_ECN
    hdr_len = len(l2) + (40 if v6 else 20) + 32
    l4 = len(l2) + (40 if v6 else 20)
    vnet = gso.VIRTIO_NET_HDR.pack(gso.VIRTIO_NET_HDR_F_NEEDS_CSUM, gtype, hdr_len, mss, l4, 16)
    return vnet + l2 + ip


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("tap", [False, True])
@pytest.mark.parametrize("size", [3 * 1448, 3 * 1448 + 1, 10000])
def test_segments_as_scapy_reads_them(v6: bool, tap: bool, size: int) -> None:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether

    payload = os.urandom(size)
    frame = super_packet(payload, 1448, v6=v6, tap=tap)
    vlen = gso.VIRTIO_NET_HDR_LEN
    p = gso.plan(frame, vlen, "tap" if tap else "tun")
    assert p is not None and p.count == -(-size // 1448)
    got = b""
    for i in range(p.count):
        raw = gso.segments(frame, p, i, 1, vnet=False, partial=False)
        pkt = (Ether if tap else IPv6 if v6 else IP)(raw)
        ip = pkt[IPv6] if v6 else pkt[IP]
        tcp = pkt[TCP]
        data = bytes(tcp.payload)
        assert len(data) == min(1448, size - i * 1448)
        got += data
        assert len(raw) - (14 if tap else 0) == p.wire_len(i, 1) - (14 if tap else 0)
        assert tcp.seq == (0xFFFFF000 + i * 1448) & 0xFFFFFFFF
        flags = int(tcp.flags)
        assert bool(flags & TCP_CWR) == (i == 0)
        assert bool(flags & (TCP_FIN | TCP_PSH)) == (i == p.count - 1)
        assert tcp.options == [("NOP", None), ("NOP", None), ("Timestamp", (123456, 654321))]
        # Checksums as scapy computes them (set to None and rebuilt).
        want = tcp.chksum
        tcp.chksum = None
        if not v6:
            assert ip.id == (0xFFFE + i) & 0xFFFF and ip.len == len(bytes(ip))
            ip_sum = ip.chksum
            ip.chksum = None
            assert (IP(bytes(ip))).chksum == ip_sum
        else:
            assert ip.plen == len(bytes(ip)) - 40
        rebuilt = (IPv6 if v6 else IP)(bytes(ip))
        assert rebuilt[TCP].chksum == want
    assert got == payload


def test_a_run_of_segments_is_a_smaller_super_packet() -> None:
    payload = os.urandom(10 * 1448)
    frame = super_packet(payload, 1448)
    vlen = gso.VIRTIO_NET_HDR_LEN
    p = gso.plan(frame, vlen)
    assert p is not None
    run = gso.segments(frame, p, 3, 4)
    flags, gtype, hdr_len, mss, cstart, coff = gso.VIRTIO_NET_HDR.unpack_from(run)
    assert (flags, gtype, hdr_len, mss, cstart, coff) == (
        gso.VIRTIO_NET_HDR_F_NEEDS_CSUM, gso.VIRTIO_NET_HDR_GSO_TCPV4, 52, 1448, 20, 16
    )  # fmt: skip
    # Its own segments are the originals' 3..6.
    q = gso.plan(run, vlen)
    assert q is not None and q.count == 4
    for i in range(4):
        mine = gso.segments(run, q, i, 1, vnet=False, partial=False)
        theirs = gso.segments(frame, p, 3 + i, 1, vnet=False, partial=False)
        assert mine[:4] + mine[6:] == theirs[:4] + theirs[6:]  # IP IDs restart in a run
    f = _h.parse(run, vlen, "tun")
    assert f[_h.TCP_FLAGS] == TCP_ACK  # neither CWR (not first) nor FIN/PSH (not last)
    assert p.wire_len(3, 4) == 4 * (52 + 1448)
    assert p.wire_len(0, 10) == gso.wire_size(frame, vlen)[0]


def test_ce_marks_the_segments() -> None:
    frame = super_packet(bytes(5000), 1448, v6=False)
    p = gso.plan(frame, gso.VIRTIO_NET_HDR_LEN)
    assert p is not None
    raw = gso.segments(frame, p, 1, 1, vnet=False, partial=False, ce=True)
    assert raw[1] & 3 == 3 and build.checksum(raw[:20]) == 0


def test_not_a_super_packet() -> None:
    vlen = gso.VIRTIO_NET_HDR_LEN
    frame = super_packet(bytes(1000), 1448)
    assert gso.plan(frame, vlen) is None  # one segment's worth
    assert gso.plan(bytes(vlen) + frame[vlen:], vlen) is None  # no GSO in the header
    assert gso.plan(frame[vlen:], 0) is None  # no virtio-net header at all
