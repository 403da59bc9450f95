"""More than one pair in a test: tun_pair_factory, all in the test's namespace.

Run: pytest --tunpair examples/
"""

import socket

import pytest


# --8<-- [start:factory]
def test_two_links(tun_pair, tun_pair_factory):
    second = tun_pair_factory(mtu=9000)  # tun2/tun3, 198.18.0.3/198.18.0.4, 2001:2::3/4
    assert (second.a.name, second.b.ip, second.a.mtu) == ("tun2", "198.18.0.4", 9000)
    with socket.create_server((second.b.ip, 0)) as server:
        socket.create_connection(server.getsockname()).close()
    assert second.packets.filter("TCP")  # crossed the second pair's relay...
    assert not tun_pair.packets.filter("TCP")  # ...and not the first's


# --8<-- [end:factory]


# --8<-- [start:marker]
@pytest.mark.tunpair(mtu=9000, ipv6=None)
def test_a_jumbo_datagram_crosses_whole(tun_pair):
    assert (tun_pair.a.mtu, tun_pair.a.ip6) == (9000, None)
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx,
    ):
        rx.bind((tun_pair.b.ip, 0))
        rx.settimeout(5)
        tx.sendto(bytes(8000), rx.getsockname())
        assert len(rx.recv(9000)) == 8000
    (datagram,) = tun_pair.packets.filter("UDP")
    assert len(datagram) == 8028  # one IP packet: 20 + 8 + 8000 bytes, no fragments


# --8<-- [end:marker]
