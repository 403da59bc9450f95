"""A bounded bottleneck: a burst into a slow link fills its buffer, and the rest is dropped."""

import socket

import pytest


@pytest.mark.tunpair(ipv6=None)
def test_a_burst_overflows_a_small_buffer(tun_pair):
    # 1 Mbit/s with room for 20 packets, as a slow uplink with a small buffer.
    tun_pair.impair(rate="1mbit", limit=20, direction="a->b")
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client,
    ):
        server.bind((tun_pair.b.ip, 0))
        client.bind((tun_pair.a.ip, 0))
        for i in range(100):  # 100 x 1228 bytes at once: 1 s of work for this link
            client.sendto(i.to_bytes(2, "big") + bytes(1198), server.getsockname())
        server.settimeout(2)
        received = []
        try:
            while True:
                received.append(int.from_bytes(server.recv(2000)[:2], "big"))
        except TimeoutError:
            pass

    stats = tun_pair.stats["a->b"]
    assert stats["queue_peak"] == 20  # the buffer filled up...
    assert stats["dropped"] == 100 - len(received)  # ...and drop-tail took the rest
    assert received == sorted(received)  # a FIFO: what got through is in order
    dropped = [p for p in tun_pair.packets if p.action == "dropped"]
    assert len(dropped) == stats["dropped"]  # each drop is in the capture
