"""A client that retries, tested under seeded packet loss.

`request()` is the code under test: a UDP request/response client that resends on timeout.
`tun_pair.impair(loss=..., seed=...)` drops packets in the relay; with a fixed seed the same
packets are lost on every run, so a failure replays exactly.

Run: pytest --tunpair examples/
"""

import socket
import threading
from collections import Counter

import pytest
from scapy.layers.inet import UDP


def request(sock, server, body, *, timeout=0.2, attempts=20):
    """Send `body` to `server` until its answer comes back; return the attempts it took."""
    sock.settimeout(timeout)
    for attempt in range(1, attempts + 1):
        sock.sendto(body, server)
        try:
            while True:
                reply, _ = sock.recvfrom(2048)
                if reply == b"ack " + body:
                    return attempt
                # A late answer to an earlier request: keep waiting for ours.
        except TimeoutError:
            continue
    raise TimeoutError(f"no answer to {body!r} after {attempts} attempts")


@pytest.fixture
def ack_server(tun_pair):
    """A UDP server on b answering every datagram with b"ack " + datagram."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((tun_pair.b.ip, 0))
    sock.settimeout(0.05)  # so the loop sees `stop` (a stop datagram could be lost)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(2048)
            except TimeoutError:
                continue
            sock.sendto(b"ack " + data, peer)

    thread = threading.Thread(target=serve)
    thread.start()
    yield sock.getsockname()
    stop.set()
    thread.join()
    sock.close()


def payload(packet):
    return bytes(packet.scapy[UDP].payload)


def test_client_retries_through_loss(tun_pair, ack_server):
    tun_pair.impair(loss=0.3, seed=4)  # both directions: requests and answers get lost
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        attempts = [request(client, ack_server, b"request %d" % i) for i in range(20)]

    assert max(attempts) > 1, "with 30% loss some request should have needed a retry"

    requests = [p for p in tun_pair.packets if p.direction == "a->b"]
    lost = [p for p in requests if p.action == "lost"]
    sent = Counter(payload(p) for p in requests)
    assert lost, "the relay should have lost some requests"
    for p in lost:
        # The client sent it again, and a later copy got through.
        assert sent[payload(p)] > 1
        assert any(
            q.action == "forwarded" and payload(q) == payload(p) and q.seq > p.seq for q in requests
        )
    # Answers were lost too, and the client recovered from that the same way.
    assert any(p.action == "lost" for p in tun_pair.packets if p.direction == "b->a")
