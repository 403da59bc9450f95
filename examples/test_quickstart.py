import socket


def test_echo_through_the_tunnel(tun_pair):  # the body runs inside a fresh namespace
    with socket.create_server((tun_pair.b.ip, 0)) as server:  # a server bound to b
        client = socket.create_connection(server.getsockname())  # leaves from a
        conn, (peer_ip, _port) = server.accept()
        client.sendall(b"ping")
        assert conn.recv(4) == b"ping"
        conn.close()
        client.close()
    assert peer_ip == tun_pair.a.ip  # the source address is a's
    assert any(p.direction == "a->b" for p in tun_pair.packets)  # the relay carried it
