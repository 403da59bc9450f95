"""Per-flow impairment: lose the UDP datagrams to one port, leave everything else alone."""

import socket

import pytest


@pytest.mark.tunpair(ipv6=None)
def test_only_the_matching_flow_is_impaired(tun_pair):
    tun_pair.impair(direction="a->b", loss=1.0, match={"proto": "udp", "dport": 4433}, name="quic")
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as quic,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as dns,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client,
    ):
        quic.bind((tun_pair.b.ip, 4433))
        dns.bind((tun_pair.b.ip, 5353))
        for _ in range(5):
            client.sendto(b"hello", (tun_pair.b.ip, 4433))
            client.sendto(b"query", (tun_pair.b.ip, 5353))
        dns.settimeout(2)
        assert [dns.recv(100) for _ in range(5)] == [b"query"] * 5  # untouched
    tun_pair.packets.wait_for(action="lost", dport=4433)
    quic_stats = tun_pair.stats["a->b"]["classes"]["quic"]
    assert quic_stats["dropped"] == 5 and quic_stats["packets"] == 0  # the class lost all
