"""More than one pair in a test: tun_pair_factory, all in the test's namespace.

Run: pytest --tunpair examples/
"""

import socket


# --8<-- [start:factory]
def test_two_links(tun_pair, tun_pair_factory):
    second = tun_pair_factory(mtu=9000)  # tun2/tun3, 198.18.0.3/198.18.0.4, 2001:2::3/4
    assert (second.a.name, second.b.ip, second.a.mtu) == ("tun2", "198.18.0.4", 9000)
    with socket.create_server((second.b.ip, 0)) as server:
        socket.create_connection(server.getsockname()).close()
    assert second.packets.filter("TCP")  # crossed the second pair's relay...
    assert not tun_pair.packets.filter("TCP")  # ...and not the first's


# --8<-- [end:factory]
