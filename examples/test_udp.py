"""A UDP request/response exchange, IPv4 and IPv6, checked on the wire."""

import socket

import pytest
from scapy.layers.inet import UDP


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_udp_echo(tun_pair, family):
    a = tun_pair.a.ip if family == socket.AF_INET else tun_pair.a.ip6
    b = tun_pair.b.ip if family == socket.AF_INET else tun_pair.b.ip6
    with (
        socket.socket(family, socket.SOCK_DGRAM) as server,
        socket.socket(family, socket.SOCK_DGRAM) as client,
    ):
        server.bind((b, 0))
        server.settimeout(5)
        client.settimeout(5)
        client.sendto(b"question", server.getsockname()[:2])
        data, peer = server.recvfrom(1500)
        assert (data, peer[0]) == (b"question", a)
        server.sendto(b"answer", peer)
        assert client.recvfrom(1500)[0] == b"answer"

    request, response = tun_pair.packets.filter(UDP)
    assert request.direction == "a->b" and bytes(request.scapy[UDP].payload) == b"question"
    assert response.direction == "b->a" and bytes(response.scapy[UDP].payload) == b"answer"
