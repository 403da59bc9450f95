"""The scripted peer in a few lines: the test plays the server, a kernel socket the client.

Run: pytest --tunpair examples/
"""

import socket


def test_echo(tun_pair):
    with tun_pair.script("b") as peer:  # the test plays b
        client = socket.socket()  # a real kernel socket, on a
        client.setblocking(False)
        client.connect_ex((tun_pair.b.ip, 8080))  # the SYN goes out...
        client.setblocking(True)
        client.settimeout(5)
        conn = peer.tcp_accept(8080)  # ...the peer answers SYN-ACK
        client.sendall(b"hello")
        segment = conn.recv()  # the data segment (ACKed for us)
        assert segment.payload == conn.received == b"hello"
        conn.send(b"HELLO")
        assert client.recv(10) == b"HELLO"
        client.close()
