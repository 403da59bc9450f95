"""The relay's fast path over real traffic: GSO super-packets, batching, the capture budget.

No timing here (that is benchmarks/run.py): these check that the optimised path still
carries, counts and captures every byte correctly.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from pytest_tunpair import Packet, TunPair
from pytest_tunpair._packets.capture import PACKET_OVERHEAD, SLACK_SHIFT

from .conftest import tcp_send


def _tcp_send(pair: TunPair, payload: bytes) -> bytes:
    """Send ``payload`` from a to b over TCP; return what b received."""
    return tcp_send(pair.b.ip, payload)


def _tcp_payload_len(p: Packet) -> int:
    from scapy.layers.inet import IP, TCP

    ip = p.scapy[IP]
    return int(ip.len) - int(ip.ihl) * 4 - int(ip[TCP].dataofs) * 4


@pytest.mark.tunpair(ipv6=None)
def test_bulk_tcp_arrives_intact_and_every_byte_is_captured_once(
    tun_pair: TunPair, tmp_path: Path
) -> None:
    payload = os.urandom(8 << 20)
    assert _tcp_send(tun_pair, payload) == payload

    from scapy.layers.inet import IP, TCP

    data = [p for p in tun_pair.packets if p.direction == "a->b" and p.scapy.haslayer(TCP)]
    # 8 MiB stays far below the capture bound: every segment is in the capture, so the
    # sequence ranges captured cover exactly the payload (SYN/FIN carry none). Ranges, not a
    # sum: on a busy machine the sender's device queue may overflow before the relay reads
    # it (a kernel drop the capture never sees), and TCP then sends a range again.
    assert tun_pair.packets.evicted == 0
    isn = next(int(p.scapy[TCP].seq) for p in data if "S" in str(p.scapy[TCP].flags))
    rel = [((int(p.scapy[TCP].seq) - isn - 1) % 2**32, _tcp_payload_len(p)) for p in data]
    ranges = sorted((lo, lo + n) for lo, n in rel if n > 0)
    covered, end = 0, None
    for lo, hi in ranges:
        if end is None or lo > end:
            covered += hi - lo
            end = hi
        elif hi > end:
            covered += hi - end
            end = hi
    assert covered == len(payload)
    assert sum(hi - lo for lo, hi in ranges) >= len(payload)
    stats = tun_pair.stats["a->b"]
    assert stats["packets"] == sum(1 for p in tun_pair.packets if p.direction == "a->b")
    assert stats["bytes"] == sum(len(p) for p in tun_pair.packets if p.direction == "a->b")
    assert stats["dropped"] == 0

    # With offload on, bulk data crosses as GSO super-packets: one valid IPv4 packet each,
    # longer than the MTU, its IP total length the whole packet, segments of at most an MSS.
    supers = [p for p in data if p.gso is not None and p.gso.is_super_packet]
    assert supers, "no GSO super-packet: offload did not take effect"
    for p in supers:
        gso = p.gso
        assert gso is not None
        assert gso.type == "tcpv4" and 0 < gso.size <= tun_pair.a.mtu - 40
        assert len(p) > tun_pair.a.mtu
        assert p.scapy[IP].len == len(p.data) == len(p)
        assert gso.needs_csum  # checksum left to the "hardware": partial, as documented

    # The pcap holds the same bytes, super-packets included.
    from scapy.utils import rdpcap

    path = tun_pair.packets.to_pcap(tmp_path / "bulk.pcap")
    frames = rdpcap(str(path))
    assert [bytes(f) for f in frames] == [p.data for p in tun_pair.packets]


@pytest.mark.tunpair(ipv6=None)
def test_a_packet_is_captured_and_counted_before_the_receiver_wakes(tun_pair: TunPair) -> None:
    # The write into the TUN delivers the datagram in the relay thread; the fast path records
    # the packet before that write, so the test sees it the moment recvfrom() returns.
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client,
    ):
        server.bind((tun_pair.b.ip, 0))
        server.settimeout(5)
        for i in range(300):
            msg = f"datagram {i}".encode()
            client.sendto(msg, server.getsockname())
            assert server.recvfrom(100)[0] == msg
            last = tun_pair.packets[-1]
            assert last.direction == "a->b" and last.data.endswith(msg), (i, last)
            assert tun_pair.stats["a->b"]["packets"] == i + 1


@pytest.mark.tunpair(ipv6=None)
def test_hooks_see_wire_sized_packets_and_offload_comes_back(tun_pair: TunPair) -> None:
    seen: list[bytes] = []
    hook = tun_pair.add_hook(lambda p: seen.append(p.data), direction="a->b")
    payload = os.urandom(1 << 20)
    assert _tcp_send(tun_pair, payload) == payload
    assert seen and max(len(d) for d in seen) <= tun_pair.a.mtu

    # ... and with complete checksums: the kernel did in software what offload defers.
    from scapy.layers.inet import IP, TCP

    for data in seen[:: max(1, len(seen) // 50)]:
        pkt = IP(data)
        fresh = pkt.copy()
        del fresh[IP].chksum, fresh[TCP].chksum
        fresh = IP(bytes(fresh))
        assert (pkt[IP].chksum, pkt[TCP].chksum) == (fresh[IP].chksum, fresh[TCP].chksum)

    tun_pair.remove_hook(hook)
    tun_pair.packets.clear()
    assert _tcp_send(tun_pair, payload) == payload
    assert any(len(p) > tun_pair.a.mtu for p in tun_pair.packets if p.direction == "a->b")


@pytest.mark.tunpair(ipv6=None, capture_bytes=512 * 1024)
def test_capture_budget_charges_bookkeeping_and_stats_count_everything(
    tun_pair: TunPair,
) -> None:
    payload = os.urandom(8 << 20)
    assert _tcp_send(tun_pair, payload) == payload
    packets = tun_pair.packets
    packets.wait_quiet(idle=0.2)  # the connection's last FIN/ACKs may still be crossing
    charged = packets.nbytes + (packets.nbytes >> SLACK_SHIFT) + len(packets) * PACKET_OVERHEAD
    assert 0 < charged <= 512 * 1024
    assert packets.evicted > 0
    total = sum(d["packets"] for d in tun_pair.stats.values())
    assert total == len(packets) + packets.evicted
    assert tun_pair.stats["a->b"]["bytes"] > len(payload)
