"""Classic TCP stack checks written as packetdrill would: the test plays the remote host.

Each test scripts one side of a conversation with the Linux stack in the pair's namespace
and asserts what the kernel answers, and when. The comment on each says which documented
behaviour (RFC section or kernel sysctl) it checks.

Run: pytest --tunpair examples/
"""

import socket

import pytest
from scapy.layers.inet import IP, TCP


def sent_at(packet):
    """When the kernel sent ``packet``: its TCP timestamp, in seconds (Linux ticks in ms).
    Steadier than ``packet.time`` (when the relay read it) on a busy machine."""
    return dict(packet[TCP].options)["Timestamp"][0] / 1000


@pytest.fixture
def peer(tun_pair):
    with tun_pair.script("b") as peer:
        yield peer


def test_unanswered_syn_is_retransmitted(tun_pair, peer):
    # RFC 6298 2.1 and 5.5: the first SYN's timer is 1 s (Linux TCP_TIMEOUT_INIT) and
    # doubles on each expiry -- except that Linux 6.x first retries
    # net.ipv4.tcp_syn_linear_timeouts times (default 4) at a constant 1 s.
    try:
        with open("/proc/sys/net/ipv4/tcp_syn_linear_timeouts") as f:
            linear = int(f.read())
    except FileNotFoundError:  # before Linux 6.x: exponential from the start
        linear = 0
    client = socket.socket()
    client.setblocking(False)
    client.connect_ex((tun_pair.b.ip, 8080))
    syns = peer.expect_sequence([TCP(dport=8080, flags="S")] * 3, timeout=5)
    client.close()
    first, second = sent_at(syns[1]) - sent_at(syns[0]), sent_at(syns[2]) - sent_at(syns[1])
    assert 0.99 <= first <= 1.5, f"second SYN after {first:.3f} s"
    expected = 1.0 if linear >= 2 else 2.0
    assert 0.8 * expected <= second / first <= 1.25 * expected, f"then {second:.3f} s"
    # Every copy is the same SYN: same port, same initial sequence number.
    assert len({(p.sport, p.tcp_seq) for p in syns}) == 1


def test_segment_to_a_closed_port_draws_a_reset(tun_pair, peer):
    # RFC 9293 3.10.7.1 (state CLOSED): an incoming ACK segment gets a RST with
    # seq = SEG.ACK; a non-ACK one a RST|ACK with ack = SEG.SEQ + SEG.LEN.
    peer.send(
        IP(src=peer.ip, dst=tun_pair.a.ip) / TCP(sport=4000, dport=9, flags="A", seq=7, ack=1234)
    )
    peer.expect(TCP(sport=9, dport=4000, flags="R", seq=1234))

    peer.send(
        IP(src=peer.ip, dst=tun_pair.a.ip) / TCP(sport=4001, dport=9, flags="P", seq=7) / b"abc"
    )
    peer.expect(TCP(sport=9, dport=4001, flags="RA", ack=7 + 3))


def test_kernel_echoes_our_timestamps(tun_pair, peer):
    # RFC 7323 4.3: the receiver echoes in TSecr the TSval of the segment that advanced
    # its window most recently (net.ipv4.tcp_timestamps=1, the default, offers them).
    with socket.socket() as server:
        server.bind((tun_pair.a.ip, 0))
        server.listen(1)
        conn = peer.tcp_connect(server.getsockname()[1])
        assert conn.timestamps, "the kernel's SYN-ACK carries a timestamp option"
        sent = conn.send(b"hello")
        ours = dict(sent[TCP].options)["Timestamp"][0]
        ack = conn.expect(TCP(flags="A", ack=conn.snd_nxt))
        assert dict(ack[TCP].options)["Timestamp"][1] == ours
