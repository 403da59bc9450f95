"""How long the link held each packet: `arrival`, `time` and `sojourn` of a delayed exchange."""

import socket

from scapy.layers.inet import UDP


def test_each_direction_keeps_its_delay(tun_pair):
    tun_pair.impair(delay="2ms", direction="a->b")
    tun_pair.impair(delay="500us", direction="b->a")
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client,
    ):
        server.bind((tun_pair.b.ip, 0))
        server.settimeout(5)
        client.settimeout(5)
        client.sendto(b"question", server.getsockname())
        question, peer = server.recvfrom(1500)
        assert question == b"question"
        server.sendto(b"answer", peer)
        assert client.recv(1500) == b"answer"

    request, response = tun_pair.packets.filter(UDP)
    # arrival: when the relay read the packet; time: when it wrote it.
    assert request.sojourn == request.time - request.arrival
    assert request.action == response.action == "delayed"
    assert request.sojourn >= 0.002 and response.sojourn >= 0.0005
    # Never early, and late only by how long the machine took to wake the relay.
    assert request.sojourn < 0.5 and response.sojourn < 0.5
    print(tun_pair.packets.summary())  # each line ends with "(sojourn 2.0xxms)"
