"""Per-segment links on the wire: the segmenter against the kernel's own GSO, and what a
direction that decides per wire packet captures, drops, marks and paces."""

from __future__ import annotations

import os
import select
import time
from typing import Any

import pytest

from pytest_tunpair import TunPair
from pytest_tunpair._kernel.device import TunDevice
from pytest_tunpair._wire import gso

from .conftest import tcp_send

pytestmark = pytest.mark.tunpair

FWD_SRC = bytes([198, 18, 5, 2])  # not an address of the namespace: not a martian
FWD_DST = bytes([198, 18, 6, 2])  # routed out of the kernel-segmenting device
FWD6_SRC = bytes.fromhex("20010db8000500000000000000000002")  # 2001:db8:5::2
FWD6_DST = bytes.fromhex("20010db8000600000000000000000002")  # 2001:db8:6::2


def _forward_through_kernel(tun_pair: TunPair, frames: list[bytes], v6: bool) -> list[bytes]:
    """Write each super-packet into a TSO device of our own in the pair's namespace; the
    kernel forwards it out of a device without offload, segmenting it in software (the
    same tcp_gso_segment as for offload=False); return the TCP packets that device reads."""
    from pyroute2 import IPRoute

    assert os.stat("/proc/thread-self/ns/net").st_ino == os.stat(tun_pair.netns_path).st_ino
    tx = TunDevice("tgso0", vnet_hdr=True)
    rx = TunDevice("tgso1")
    try:
        tx.set_offload(True)
        with IPRoute() as ipr:
            for dev in (tx, rx):
                ipr.link("set", index=dev.index, state="up", mtu=1500)
            if v6:
                ipr.addr("add", index=rx.index, address="2001:db8:6::1", prefixlen=64)
            else:
                ipr.addr("add", index=rx.index, address="198.18.6.1", prefixlen=24)
        # This namespace's own sysctls, never the host's.
        if v6:
            with open("/proc/sys/net/ipv6/conf/all/forwarding", "w") as f:
                f.write("1")
        else:
            with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
                f.write("1")
            for name in ("all", tx.name):
                with open(f"/proc/sys/net/ipv4/conf/{name}/rp_filter", "w") as f:
                    f.write("0")
        out: list[bytes] = []
        assert tx.fd is not None and rx.fd is not None
        for frame in frames:  # one at a time: rx's queue (txqueuelen) must not overflow
            os.write(tx.fd, frame)
            want = len(out) + gso.wire_size(frame, gso.VIRTIO_NET_HDR_LEN)[1]
            deadline = time.monotonic() + 5
            while len(out) < want and time.monotonic() < deadline:
                if select.select([rx.fd], [], [], 0.2)[0]:
                    packet = os.read(rx.fd, 65536)
                    # IPv6 brings the device's own MLD reports along: only the TCP counts.
                    if packet[9 if packet[0] >> 4 == 4 else 6] == 6:
                        out.append(packet)
        return out
    finally:
        tx.close()
        rx.close()


def _readdressed(frame: bytes, p: gso.GsoPlan, ttl_down: int = 0) -> bytes:
    """``frame`` from FWD_SRC to FWD_DST (or the IPv6 pair), its TTL or hop limit lowered
    by ``ttl_down`` (partial TCP checksum and IPv4 header checksum redone)."""
    from pytest_tunpair._wire import build

    out = bytearray(frame)
    l3, l4 = p.l3, p.l4
    if p.v4:
        addrs = FWD_SRC + FWD_DST
        out[l3 + 12 : l3 + 20] = addrs
        out[l3 + 8] -= ttl_down
        out[l3 + 10 : l3 + 12] = b"\0\0"
        out[l3 + 10 : l3 + 12] = build.checksum(bytes(out[l3:l4])).to_bytes(2, "big")
    else:
        addrs = FWD6_SRC + FWD6_DST
        out[l3 + 8 : l3 + 40] = addrs
        out[l3 + 7] -= ttl_down
    tcp_len = p.end - l4
    pseudo = gso._fold(gso._ones_sum(addrs) + 6 + tcp_len)
    out[l4 + 16 : l4 + 18] = pseudo.to_bytes(2, "big")
    return bytes(out)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_segmenter_matches_the_kernels_gso_byte_for_byte(tun_pair: TunPair, family: str) -> None:
    """Super-packets of a real transfer, cut by the kernel (forwarded out of a device
    without offload) and by the segmenter: the same bytes, headers and checksums."""
    if not tun_pair.options.offload:
        pytest.skip("needs offload")
    ip = tun_pair.b.ip if family == "ipv4" else tun_pair.b.ip6
    if not ip:
        pytest.skip(f"the pair has no {family} address")
    tcp_send(ip, os.urandom(2_000_000))
    supers = [
        p
        for p in tun_pair.packets
        if p.direction == "a->b" and p.gso is not None and p.gso.is_super_packet
    ][:20]
    assert supers, "no GSO super-packet crossed the plain pair"
    vlen = gso.VIRTIO_NET_HDR_LEN
    frames, expected = [], []
    for pkt in supers:
        p = gso.plan(pkt.frame, vlen)
        assert p is not None and p.v4 == (family == "ipv4")
        frames.append(_readdressed(pkt.frame, p))
        forwarded = _readdressed(pkt.frame, p, ttl_down=1)  # the kernel's forwarding hop
        q = gso.plan(forwarded, vlen)
        assert q is not None
        expected += [
            gso.segments(forwarded, q, i, 1, vnet=False, partial=False) for i in range(q.count)
        ]
    got = _forward_through_kernel(tun_pair, frames, v6=family == "ipv6")
    assert len(got) == len(expected)
    for i, (mine, kernel) in enumerate(zip(expected, got, strict=True)):
        assert mine == kernel, f"segment {i} differs: {mine[:60].hex()} != {kernel[:60].hex()}"


def _super(p: object) -> bool:
    gso_info = getattr(p, "gso", None)
    return bool(gso_info and gso_info.is_super_packet)


def test_pie_decides_per_segment_on_a_real_transfer(tun_pair: TunPair) -> None:
    """A TCP transfer through rate=20mbit queue=pie with offload on: the relay splits the
    kernel's super-packets, PIE counts, delays and drops wire packets, and the capture
    holds those, none longer than the MTU, with a median sojourn near PIE's target."""
    import statistics

    from .test_link import _bulk, _late_sojourns

    tun_pair.impair(direction="a->b", rate="20mbit", queue="pie")
    start = time.monotonic() - tun_pair.packets.t0
    _bulk(tun_pair, 3.0)
    data = [p for p in tun_pair.packets if p.direction == "a->b" and p.wire_len > 200]
    assert len(data) > 3000
    assert max(p.wire_len for p in data) <= tun_pair.options.mtu
    assert not any(_super(p) for p in tun_pair.packets if p.direction == "a->b")
    sojourns = _late_sojourns(tun_pair, start + 1.0)
    # PIE aims at 15 ms of queueing (plus 0.6 ms on the wire); a busy machine adds some.
    assert statistics.median(sojourns) < 0.060, statistics.median(sojourns)
    stats = tun_pair.stats["a->b"]
    assert stats["packets"] + stats["dropped"] >= len(data)


def test_loss_takes_segments_and_the_rest_goes_out_in_runs(tun_pair: TunPair) -> None:
    """loss=2% with offload on: the losses are wire packets (a super-packet is not lost
    whole), the transfer completes, and the counters count segments."""
    tun_pair.impair(direction="a->b", loss=0.02, seed=5)
    payload = os.urandom(3_000_000)
    assert tcp_send(tun_pair.b.ip or "", payload) == payload
    tun_pair.packets.wait_quiet()  # the last ACKs and FINs recorded and counted
    a_b = [p for p in tun_pair.packets if p.direction == "a->b"]
    lost = [p for p in a_b if p.action == "lost"]
    assert lost and all(p.wire_len <= tun_pair.options.mtu for p in lost)
    data = [p for p in a_b if p.wire_len > 200]
    assert 0.005 < len(lost) / len(data) < 0.05
    assert not any(_super(p) for p in a_b)
    # Captured segments are what a wire carries: their checksums done.
    from pytest_tunpair._wire import build

    p = data[len(data) // 2]
    assert build.checksum(p.data[:20]) == 0
    stats = tun_pair.stats["a->b"]
    assert stats["dropped"] == len(lost) and stats["packets"] == len(a_b) - len(lost)


@pytest.mark.parametrize(
    ("mode", "family", "impairment"),
    [
        ("tun", "ipv6", {"rate": "200mbit", "loss": 0.01}),
        ("tap", "ipv4", {"rate": "200mbit", "loss": 0.01}),
        ("tap", "ipv6", {"rate": "50mbit", "queue": "codel"}),
        ("tun", "ipv4", {"trace": [1] * 4 + [2] * 4}),  # 4 opportunities a ms: 48 Mbit/s
    ],
    ids=["tun-ipv6-runs", "tap-ipv4-runs", "tap-ipv6-codel", "tun-ipv4-trace"],
)
def test_tap_and_ipv6_super_packets_are_split_and_arrive_intact(
    tun_pair_factory: Any, mode: str, family: str, impairment: dict[str, Any]
) -> None:
    """The segmenter behind Ethernet headers (TAP) and IPv6, on both paths: runs of
    segments written whole (loss, drop-tail, a trace's opportunities) and each segment a
    packet of its own (CoDel).
    The bytes arrive intact and what crossed a->b is wire packets, none over the MTU."""
    pair: TunPair = tun_pair_factory(mode=mode)
    if not pair.options.offload:
        pytest.skip("needs offload")
    ip = pair.b.ip if family == "ipv4" else pair.b.ip6
    assert ip
    assert tcp_send(ip, bytes(300_000)) == bytes(300_000)
    pair.packets.wait_quiet()
    plain = [p for p in pair.packets if p.direction == "a->b"]
    assert any(_super(p) for p in plain), "the kernel sent no super-packet to split"
    pair.impair(direction="a->b", seed=3, **impairment)
    payload = os.urandom(2_000_000)
    assert tcp_send(ip, payload) == payload
    pair.packets.wait_quiet()
    a_b = [p for p in pair.packets if p.direction == "a->b" and p.seq > plain[-1].seq]
    ethernet = 14 if mode == "tap" else 0
    data = [p for p in a_b if p.wire_len > 200]
    assert len(data) > len(payload) // pair.options.mtu
    assert max(p.wire_len for p in a_b) <= pair.options.mtu + ethernet
    assert not any(_super(p) for p in a_b)
    assert {p.ip_version for p in data} == {4 if family == "ipv4" else 6}
    stats = pair.stats["a->b"]
    assert stats["packets"] + stats["dropped"] == len(a_b) + len(plain)


@pytest.mark.tunpair(ipv6=None)
def test_loss_with_ecn_marks_segments_of_a_super_packet(tun_pair: TunPair) -> None:
    """loss=5% with ecn=True, offload on: where a segment would be lost, the ECN-capable
    TCP segment is marked CE instead and written with its run's neighbours (one write);
    each marked record is one wire packet with CE on it, the receiver echoes ECE, and the
    bytes arrive intact."""
    assert os.stat("/proc/thread-self/ns/net").st_ino == os.stat(tun_pair.netns_path).st_ino
    with open("/proc/sys/net/ipv4/tcp_ecn", "w") as f:
        f.write("1")  # ECN on outgoing connections, in the pair's namespace only
    tun_pair.impair(direction="a->b", loss=0.05, ecn=True, seed=11)
    payload = os.urandom(2_000_000)
    assert tcp_send(tun_pair.b.ip or "", payload) == payload
    tun_pair.packets.wait_quiet()
    a_b = [p for p in tun_pair.packets if p.direction == "a->b"]
    marked = [p for p in a_b if p.action == "marked"]
    data = [p for p in a_b if p.wire_len > 200]
    assert 0.02 < len(marked) / len(data) < 0.1
    assert all(p.ecn == "ce" and p.wire_len <= tun_pair.options.mtu for p in marked)
    assert not any(_super(p) for p in a_b)
    # Lost are only packets that are not ECN-capable (the SYN, pure ACKs), never data.
    assert all(p.wire_len < 200 for p in a_b if p.action == "lost")
    stats = tun_pair.stats["a->b"]
    assert stats["marked"] == len(marked)
    echoed = [p for p in tun_pair.packets if p.direction == "b->a" and p.flags and "E" in p.flags]
    assert any("S" not in (p.flags or "") for p in echoed)
