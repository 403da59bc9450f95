"""The scripted peer as packetdrill writes a script: a paced handshake, relative sequence
numbers, and a strict "the next segment is this one".

Run: pytest --tunpair examples/
"""

import socket

from scapy.layers.inet import TCP


def sent_at(packet):
    """When the kernel sent ``packet``: its TCP timestamp, in seconds (Linux ticks in ms)."""
    return dict(packet[TCP].options)["Timestamp"][0] / 1000


# --8<-- [start:paced]
def test_rto_follows_a_paced_handshake(tun_pair):
    # RFC 6298 2.2 and 2.3: the first RTT sample R gives an RTO of R + 4 * R/2 = 3R.
    # The peer answers the kernel's SYN 100 ms later, so its first retransmission of
    # unanswered data comes 300 ms after the original, not Linux's 200 ms floor.
    with open("/proc/sys/net/ipv4/tcp_early_retrans", "w") as f:
        f.write("0")  # the pair's namespace: no tail loss probe before the RTO
    with tun_pair.script("b") as peer, socket.socket() as client:
        client.setblocking(False)
        client.connect_ex((tun_pair.b.ip, 8080))
        conn = peer.tcp_accept(8080, synack_delay=0.1)  # a 100 ms RTT
        conn.auto_ack = False  # lose everything the kernel sends from now on
        client.send(b"x" * 100)
        first = conn.expect_next(seq=1, len=100)  # relative: the first byte after the SYN
        again = conn.expect_next(seq=1, len=100, timeout=3)
        assert sent_at(again) - sent_at(first) >= 0.29


# --8<-- [end:paced]


# --8<-- [start:manual]
def test_a_manual_handshake(tun_pair):
    with tun_pair.script("b") as peer, socket.socket() as server:
        server.bind((tun_pair.a.ip, 8080))
        server.listen(1)
        conn = peer.tcp_connect(8080, complete=False)  # SYN sent, SYN-ACK in, no ACK yet
        assert [name for name, _ in conn.syn_ack.tcp_options] == [
            "MSS", "SAckOK", "Timestamp", "NOP", "WScale"  # Linux's order, values kept
        ]  # fmt: skip
        conn.window = 1280  # the third ACK's window
        conn.complete()
        accepted, _ = server.accept()
        with accepted:
            accepted.send(b"hello")
            conn.expect_next(seq=1, ack=1, payload=b"hello")


# --8<-- [end:manual]
