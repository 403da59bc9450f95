"""Named link profiles: a whole access link in one word, any parameter overridden.

Run: pytest --tunpair examples/
"""

import socket

import pytest


# --8<-- [start:marker]
@pytest.mark.impair(profile="dsl")  # 1.5 Mbit/s down, 384 kbit/s up, 50 ms RTT
def test_upload_on_dsl(tun_pair):
    server = socket.create_server((tun_pair.b.ip, 0))  # b: the Internet side
    client = socket.create_connection(server.getsockname())  # a: the user's side
    conn, _ = server.accept()
    client.sendall(b"x" * 48_000)  # 48 kB up at 384 kbit/s: about a second
    received = 0
    while received < 48_000:
        received += len(conn.recv(65536))
    for s in (client, conn, server):
        s.close()
    up = [p for p in tun_pair.packets.filter(direction="a->b") if p.payload]
    assert up[-1].time - up[0].time > 0.8  # paced by the uplink's rate
    # --8<-- [end:marker]


def test_profile_with_an_override(tun_pair):
    # --8<-- [start:override]
    tun_pair.impair(profile="wifi-congested", loss=0)  # congested Wi-Fi, minus its losses
    print(tun_pair.describe())
    # impair a->b: profile=wifi-congested delay=20ms jitter=15ms rate=15.7286mbit limit=...
    # --8<-- [end:override]
    assert "impair b->a: profile=wifi-congested delay=20ms jitter=15ms" in tun_pair.describe()
