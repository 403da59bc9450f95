"""The scripted peer: the Linux TCP stack's documented behaviour, asserted packet by packet.

The client (or server) is a real kernel socket in the test thread, inside the pair's
namespace; the peer plays the other side. Timing tolerances hold on a busy 2-core machine:
lower bounds come from the kernel's own constants, upper bounds are generous.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

# Imported here, not at the first packet: the first scapy import takes a second or more,
# and a SYN-ACK that late would make the client's first RTT sample (and its RTO) huge.
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from pytest_tunpair import Packet, PacketTimeout, ScriptedPeer, TunPair, TunPairError

tap = pytest.mark.tunpair(mode="tap")
# Linux's TCP_RTO_MIN (include/net/tcp.h): 200 ms. Intervals are measured on the kernel's
# TCP timestamps (1 ms ticks): allow for the rounding.
RTO_MIN = 0.200
SLACK = 0.97


def sent_at(p: Packet) -> float:
    """When the kernel sent ``p``, in seconds of its TCP timestamp clock (Linux ticks in
    ms: TCP_TS_HZ). Unlike ``p.time`` (when the relay read it) it does not move when the
    relay thread is kept off the CPU for a while on a busy machine."""
    tsval: int = dict(p.scapy[TCP].options)["Timestamp"][0]
    return tsval / 1000


def _family(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def _addr(pair: TunPair, side: str, v6: bool) -> str:
    end = pair.a if side == "a" else pair.b
    ip = end.ip6 if v6 else end.ip
    assert ip is not None
    return ip


def netns_sysctl(pair: TunPair, name: str, value: int) -> None:
    """Set a per-namespace sysctl of the pair's namespace (never the host's: the write
    goes through /proc/sys, which resolves against the calling thread's namespace)."""
    assert os.stat("/proc/thread-self/ns/net").st_ino == os.stat(pair.netns_path).st_ino
    with open(f"/proc/sys/{name.replace('.', '/')}", "w") as f:
        f.write(str(value))


class Background:
    """Run ``fn`` in a thread (it inherits the namespace); ``result()`` re-raises."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.value: Any = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.value = fn()
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def result(self, timeout: float = 10.0) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the background client did not finish"
        if self.error is not None:
            raise self.error
        return self.value


@pytest.fixture
def peer(tun_pair: TunPair) -> Iterator[ScriptedPeer]:
    with tun_pair.script("b") as p:
        yield p


def connect_nonblocking(ip: str, port: int) -> socket.socket:
    """A client socket whose SYN is on its way (so the test thread can play the server)."""
    client = socket.socket(_family(ip), socket.SOCK_STREAM)
    client.setblocking(False)
    err = client.connect_ex((ip, port))
    assert err in (0, 115), os.strerror(err)  # EINPROGRESS
    client.setblocking(True)
    client.settimeout(10)
    return client


# -- the basics, over IPv4 and IPv6, TUN and TAP ------------------------------------------------
FAMILIES = [pytest.param(False, id="ipv4"), pytest.param(True, id="ipv6")]
# (mode, v6) for the stack checks: each over IPv4 and IPv6, TUN and TAP.
PATHS = [
    pytest.param("tun", False, id="tun-ipv4"),
    pytest.param("tun", True, id="tun-ipv6"),
    pytest.param("tap", False, id="tap-ipv4", marks=tap),
    pytest.param("tap", True, id="tap-ipv6", marks=tap),
]


def _round_trip(pair: TunPair, peer: ScriptedPeer, v6: bool) -> None:
    client = connect_nonblocking(_addr(pair, "b", v6), 8080)
    with client:
        conn = peer.tcp_accept(8080)
        assert conn.family == (6 if v6 else 4)
        # What the kernel offered in its SYN (net.ipv4.tcp_sack, tcp_timestamps and
        # tcp_window_scaling default to 1; MSS = MTU 1500 - 40 or 60 bytes of headers).
        assert conn.peer_options.sack and conn.peer_options.timestamps
        assert conn.peer_options.wscale is not None
        assert conn.peer_options.mss == (1440 if v6 else 1460)
        client.sendall(b"hello, peer")
        seg = conn.recv()
        assert seg.payload == b"hello, peer"
        assert conn.received == b"hello, peer"
        conn.send(b"echo: " + conn.received)
        assert client.recv(100) == b"echo: hello, peer"
        # The kernel acknowledged our data, and echoed our timestamp (RFC 7323 4.3).
        ack = conn.expect(flags="A", tcp_ack=conn.snd_nxt)
        assert ack.window is not None and ack.window > 0
        client.shutdown(socket.SHUT_WR)
        conn.expect(flags="FA")
        assert conn.fin_received
        conn.fin()
        assert client.recv(100) == b""  # our FIN reached the socket: end of stream


@pytest.mark.parametrize("v6", FAMILIES)
def test_client_data_round_trips_through_tcp_accept(
    tun_pair: TunPair, peer: ScriptedPeer, v6: bool
) -> None:
    _round_trip(tun_pair, peer, v6)

    def scripted_all(_: object) -> bool:
        # The relay records a batch once it has been through the divert: a moment after
        # the peer got the packets.
        return sum(p.action == "scripted" for p in tun_pair.packets) >= len(peer.packets)

    tun_pair.packets.wait_for(scripted_all)
    scripted = [p for p in tun_pair.packets if p.action == "scripted"]
    assert scripted and all(p.direction == "a->b" for p in scripted)
    assert len(scripted) == len(peer.packets)
    assert not any(p.payload for p in peer.unexpected())


@tap
@pytest.mark.parametrize("v6", FAMILIES)
def test_tap_round_trip_answers_neighbours(tun_pair: TunPair, peer: ScriptedPeer, v6: bool) -> None:
    _round_trip(tun_pair, peer, v6)
    from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6ND_NS
    from scapy.layers.l2 import ARP

    asked = ARP if not v6 else ICMPv6ND_NS
    answer = ARP if not v6 else ICMPv6ND_NA
    queries = [p for p in peer.packets if p.scapy.haslayer(asked)]
    assert queries, "the kernel resolved b's address through the peer"
    answers = [p for p in tun_pair.packets if p.action == "injected" and p.scapy.haslayer(answer)]
    assert answers and all(p.scapy.src == tun_pair.b.mac for p in answers)


@tap
def test_tap_neighbours_unanswered_when_turned_off(tun_pair: TunPair, peer: ScriptedPeer) -> None:
    from scapy.layers.l2 import ARP

    peer.answer_neighbours = False
    with socket.socket() as client:
        client.setblocking(False)
        client.connect_ex((tun_pair.b.ip, 8080))
        request = peer.wait_for(ARP)
        assert request.scapy[ARP].pdst == tun_pair.b.ip
        # Unanswered, the kernel's SYN never leaves: it waits for the neighbour.
        with pytest.raises(PacketTimeout, match="a SYN to port 8080"):
            peer.tcp_accept(8080, timeout=0.5)
    assert not any(p.action == "injected" for p in tun_pair.packets)


@pytest.mark.parametrize("v6", FAMILIES)
@pytest.mark.parametrize("mode", ["tun", pytest.param("tap", marks=tap)])
def test_tcp_connect_to_a_kernel_server(
    tun_pair: TunPair, peer: ScriptedPeer, v6: bool, mode: str
) -> None:
    a_ip = _addr(tun_pair, "a", v6)
    with socket.socket(_family(a_ip)) as server:
        server.bind((a_ip, 0))
        server.listen(1)
        server.settimeout(5)
        port = server.getsockname()[1]
        conn = peer.tcp_connect(port, family=6 if v6 else 4)
        assert conn.peer_options.mss is not None and conn.timestamps
        accepted, who = server.accept()
        with accepted:
            assert who[:2] == (_addr(tun_pair, "b", v6), conn.local[1])
            conn.send(b"ping")
            assert accepted.recv(10) == b"ping"
            accepted.sendall(b"pong")
            conn.recv()
            assert conn.received == b"pong"


@pytest.mark.parametrize("v6", FAMILIES)
def test_tcp_connect_refused_by_the_kernel(tun_pair: TunPair, peer: ScriptedPeer, v6: bool) -> None:
    with pytest.raises(ConnectionRefusedError, match="RST"):
        peer.tcp_connect(9, family=6 if v6 else 4)


@pytest.mark.parametrize("v6", FAMILIES)
@pytest.mark.parametrize("mode", ["tun", pytest.param("tap", marks=tap)])
def test_syn_answered_by_rst_refuses_the_client(
    tun_pair: TunPair, peer: ScriptedPeer, v6: bool, mode: str
) -> None:
    b_ip = _addr(tun_pair, "b", v6)

    def connect() -> None:
        with socket.socket(_family(b_ip)) as c:
            c.settimeout(5)
            c.connect((b_ip, 8080))

    client = Background(connect)
    syn = peer.expect(TCP(dport=8080, flags="S"))
    assert syn.sport is not None and syn.tcp_seq is not None
    l3 = (IPv6 if v6 else IP)(src=b_ip, dst=_addr(tun_pair, "a", v6))
    peer.send(l3 / TCP(sport=8080, dport=syn.sport, flags="RA", seq=0, ack=syn.tcp_seq + 1))
    # The kernel gives up: no SYN is sent again.
    peer.expect_none(TCP(dport=8080, flags="S"), during=0.3, after=syn)
    # RFC 9293 3.10.7.3: a RST acknowledging the SYN in SYN-SENT -> "connection refused".
    with pytest.raises(ConnectionRefusedError):
        client.result()


# -- retransmission ----------------------------------------------------------------------------
def _transfer(
    pair: TunPair, peer: ScriptedPeer, data: bytes, v6: bool, **accept: Any
) -> tuple[Any, Background]:
    client = connect_nonblocking(_addr(pair, "b", v6), 8080)
    conn = peer.tcp_accept(8080, **accept)

    def send() -> None:
        with client:
            client.sendall(data)

    return conn, Background(send)


@pytest.mark.parametrize(("mode", "v6"), PATHS)
def test_rto_at_least_200ms_and_doubling(
    tun_pair: TunPair, peer: ScriptedPeer, mode: str, v6: bool
) -> None:
    # Tail loss probes (net.ipv4.tcp_early_retrans, default 3) would retransmit the
    # segment about when the RTO would: off, as packetdrill's RTO scripts have it
    # (docs/internals.md, "Peer: tail loss probes and SYN retries").
    netns_sysctl(tun_pair, "net.ipv4.tcp_early_retrans", 0)
    conn, sender = _transfer(tun_pair, peer, b"x" * 100, v6)
    conn.auto_ack = False  # never acknowledge: every copy after the first is an RTO
    first = conn.recv()
    again = conn.recv(timeout=5)
    third = conn.recv(timeout=5)
    for p in (again, third):
        assert p.tcp_seq == first.tcp_seq
        assert p.payload == b"x" * 100
    rto1 = sent_at(again) - sent_at(first)
    rto2 = sent_at(third) - sent_at(again)
    # RFC 6298 2.4 (at least 1 s; Linux's TCP_RTO_MIN lowers it to 200 ms) and 5.5 (back
    # off: double the RTO on each expiry).
    assert rto1 >= RTO_MIN * SLACK, f"first retransmission after {rto1:.3f} s"
    assert 1.5 <= rto2 / rto1 <= 3.0, f"RTOs {rto1:.3f} s then {rto2:.3f} s: not doubled"
    conn.ack()
    sender.result()


@pytest.mark.parametrize(("mode", "v6"), PATHS)
def test_three_dup_acks_trigger_fast_retransmit(
    tun_pair: TunPair, peer: ScriptedPeer, mode: str, v6: bool
) -> None:
    netns_sysctl(tun_pair, "net.ipv4.tcp_early_retrans", 0)  # no tail loss probe in between
    # Without SACK the kernel counts duplicate ACKs as RFC 5681 3.2 does (Reno). With SACK
    # negotiated, bare duplicates never trigger a fast retransmit (docs/internals.md,
    # "Peer: with SACK negotiated, duplicate ACKs need SACK blocks"): see the next test.
    conn, sender = _transfer(tun_pair, peer, b"y" * 20000, v6, sack=False)
    conn.auto_ack = False
    # The SYN-ACK's window is never scaled (RFC 7323 2.2), so the first ACK after it
    # changes the window -- and an ACK that does is no duplicate (RFC 5681 2, item e;
    # docs/internals.md, "Peer: the first ACK after the handshake is a window update, not
    # a duplicate").
    conn.ack()
    s1 = conn.recv()
    lost = s1.tcp_seq  # pretend the first segment never arrived
    dups = []
    for _ in range(3):
        conn.recv()  # a later segment arrived: answer with a duplicate ACK
        dups.append(conn.ack(lost))
    retx = conn.expect(tcp_seq=lost, payload=s1.payload, timeout=3)
    assert retx.time > dups[2].time, "retransmitted before the third duplicate ACK"
    # "Well before the RTO": the kernel retransmits as it processes the third duplicate,
    # in the writer's context; an RTO could fire 200 ms after the first send at the soonest.
    assert sent_at(retx) - sent_at(s1) < RTO_MIN * SLACK
    conn.auto_ack = True
    conn.ack()  # everything up to rcv_nxt arrived after all
    while len(conn.received) < 20000:
        conn.recv(timeout=3)
    sender.result()
    assert conn.received == b"y" * 20000


@pytest.mark.parametrize(("mode", "v6"), PATHS)
def test_a_sack_block_draws_a_retransmission_of_the_hole(
    tun_pair: TunPair, peer: ScriptedPeer, mode: str, v6: bool
) -> None:
    netns_sysctl(tun_pair, "net.ipv4.tcp_early_retrans", 0)  # no tail loss probe in between
    # RFC 8985 (RACK, Linux's default loss detection: net.ipv4.tcp_recovery=1): a segment
    # is lost once one sent after it is SACKed and a reordering window (a quarter of the
    # minimum RTT) has passed -- no count of duplicate ACKs, and long before the RTO.
    conn, sender = _transfer(tun_pair, peer, b"s" * 20000, v6)
    assert conn.sack
    conn.auto_ack = False
    conn.ack()  # the window update (see the previous test)
    p1 = conn.recv()
    s1_sent = sent_at(p1)
    s1 = p1.scapy[TCP]
    s2 = conn.recv().scapy[TCP]
    hole = s1.seq
    block = (s2.seq, (s2.seq + len(s2.payload)) % 2**32)
    sacked = conn.ack(hole, sack=[block])
    assert sacked.scapy[TCP].options[-1] == ("SAck", block)
    retx = conn.expect(tcp_seq=hole, len=len(s1.payload), timeout=3)
    assert retx.time > sacked.time
    assert sent_at(retx) - s1_sent < RTO_MIN * SLACK, "not before the RTO could fire"
    # Only the hole: the SACKed segment is not sent again before it.
    resent = [p for p in peer.packets if sacked.time < p.time < retx.time]
    assert not any(p.tcp_seq == s2.seq for p in resent)
    conn.auto_ack = True
    conn.ack()
    while len(conn.received) < 20000:
        conn.recv(timeout=3)
    sender.result()
    assert conn.received == b"s" * 20000


@pytest.mark.parametrize(("mode", "v6"), PATHS)
def test_zero_window_draws_probes_and_reopening_resumes(
    tun_pair: TunPair, peer: ScriptedPeer, mode: str, v6: bool
) -> None:
    data = os.urandom(30000)
    # A zero window from the SYN-ACK on: the kernel may send nothing (RFC 9293 3.8.6.1).
    conn, sender = _transfer(tun_pair, peer, data, v6, window=0)
    # Linux probes a zero window with a segment at snd_una - 1 and no data, which the peer
    # ACKs, still advertising zero (docs/internals.md, "Peer: zero-window probes").
    probe = {"len": 0, "tcp_seq": (conn.rcv_nxt - 1) % 2**32, "flags": "A"}
    p1 = conn.expect(**probe, timeout=5)
    p2 = conn.expect(**probe, timeout=5)
    # The persist timer starts from the RTO and backs off.
    assert sent_at(p2) - sent_at(p1) >= RTO_MIN * SLACK
    assert conn.received == b"", "data sent into a zero window"
    conn.window = 65535
    conn.ack()
    while len(conn.received) < len(data):
        conn.recv(timeout=3)
    sender.result()
    assert conn.received == data
    # Offload is off while a peer is active: wire-sized segments, no GSO super-packets.
    ethernet = 14 if mode == "tap" else 0
    assert max(p.wire_len for p in peer.packets) <= tun_pair.a.mtu + ethernet


# -- the peer's own contract ------------------------------------------------------------------
def test_udp_endpoint(tun_pair: TunPair, peer: ScriptedPeer) -> None:
    ep = peer.udp(5353)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((tun_pair.a.ip, 0))
        s.settimeout(5)
        s.sendto(b"question", (tun_pair.b.ip, 5353))
        data, (addr, port) = ep.recvfrom()
        assert (data, addr, port) == (b"question", tun_pair.a.ip, s.getsockname()[1])
        ep.send(b"answer", port)
        assert s.recvfrom(100) == (b"answer", (tun_pair.b.ip, 5353))


def test_a_later_ipv6_fragment_is_no_segment_to_the_peer_or_the_capture(
    tun_pair: TunPair, peer: ScriptedPeer
) -> None:
    # The peer of 0.2 read a later fragment's data as a TCP header (a SYN from 1111).
    from scapy.layers.inet6 import IPv6ExtHdrFragment

    # A TCP segment bigger than the MTU, sent raw: the kernel fragments it (RFC 8200 4.5),
    # the first fragment carrying 1448 bytes of it at MTU 1500. What the second carries
    # first is made to look like a SYN from port 1111 to port 4444.
    first = (tun_pair.a.mtu - 40 - 8) // 8 * 8
    head = bytes(TCP(sport=2222, dport=9, flags="A"))
    decoy = bytes(TCP(sport=1111, dport=4444, flags="S", seq=1))
    with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_TCP) as raw:
        raw.sendto(head + bytes(first - len(head)) + decoy + bytes(200), (tun_pair.b.ip6, 0))

    def later(p: Packet) -> bool:
        return p.haslayer(IPv6ExtHdrFragment) and p.scapy[IPv6ExtHdrFragment].offset > 0

    # The pair records what the peer took after the peer did: once the pair's capture has
    # the fragment, so has the peer (and nothing of the peer's looked at it yet).
    recorded = tun_pair.packets.wait_for(later)
    assert recorded.action == "scripted"
    with pytest.raises(PacketTimeout, match="a SYN to port 4444"):
        peer.tcp_accept(4444, timeout=0.5)
    assert not [p for p in tun_pair.packets if p.direction == "b->a"]  # no SYN-ACK went out
    [fragment] = [p for p in peer.packets if later(p)]
    assert bytes(fragment.scapy[IPv6ExtHdrFragment].payload)[:20] == decoy
    for p in (fragment, recorded):
        assert (p.ip_proto, p.proto) == (6, "tcp")
        assert (p.sport, p.dport, p.flags, p.tcp_seq, p.tcp_options, p.payload) == (None,) * 6
        assert TCP not in p
    # The first fragment is the segment's start: its header is read, and it is no SYN.
    assert [(p.sport, p.dport, p.flags) for p in peer.packets if not later(p)] == [(2222, 9, "A")]


def test_close_restores_forwarding(tun_pair: TunPair) -> None:
    with tun_pair.script("b") as peer:
        with pytest.raises(TunPairError, match="scripted already"):
            tun_pair.script("b")
        with socket.socket() as c:
            c.setblocking(False)
            c.connect_ex((tun_pair.b.ip, 8080))
            peer.expect(TCP(flags="S"))  # never answered: the client is left waiting
    assert not peer.active
    with pytest.raises(TunPairError, match="closed"):
        peer.send(IP(dst=tun_pair.a.ip) / TCP())
    # The relay carries b's traffic to b's device again: a kernel server there answers.
    with socket.socket() as server:
        server.bind((tun_pair.b.ip, 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=5):
            pass
    assert tun_pair.packets[-1].action == "forwarded"
    tun_pair.check()


def test_bad_packets_are_refused_and_nothing_is_written(
    tun_pair: TunPair, peer: ScriptedPeer
) -> None:
    before = len(tun_pair.packets)
    with pytest.raises(TypeError, match="bytes or a scapy packet"):
        peer.send("not a packet")
    with pytest.raises(ValueError, match="MTU"):
        peer.send(IP(src=tun_pair.b.ip, dst=tun_pair.a.ip) / TCP() / (b"z" * 2000))
    with pytest.raises(ValueError, match="port"):
        peer.tcp_accept(0)
    with pytest.raises(ValueError, match="wscale"):
        peer.tcp_accept(80, wscale=15)
    assert len(tun_pair.packets) == before


def test_unexpected_packets_are_in_the_report(tun_pair: TunPair, peer: ScriptedPeer) -> None:
    ep = peer.udp(9999)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"looked at", (tun_pair.b.ip, 9999))
        assert ep.recv() == b"looked at"
        s.sendto(b"never looked at", (tun_pair.b.ip, 9998))
    peer.packets.wait_for(lambda p: len(peer.packets) == 2)
    (left,) = peer.unexpected()
    assert left.seq == 1
    report = tun_pair.describe()
    assert "2 packets handed to it, 1 the script never looked at" in report
    assert ":9998" in report and ":9999" not in report


def test_timeout_names_what_the_peer_got(tun_pair: TunPair, peer: ScriptedPeer) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"x", (tun_pair.b.ip, 9999))
    # The peer has the datagram before the short wait starts (without looking at it).
    peer.packets.wait_for(proto="udp", timeout=10)
    with pytest.raises(PacketTimeout) as info:
        peer.tcp_accept(8080, timeout=0.3)
    text = str(info.value)
    assert "a SYN to port 8080" in text and "UDP" in text


def test_a_silent_peer_does_not_hold_up_the_relay(tun_pair: TunPair, peer: ScriptedPeer) -> None:
    with socket.socket() as client:
        client.setblocking(False)
        client.connect_ex((tun_pair.b.ip, 8080))
        peer.expect(TCP(flags="S"))  # the SYN is the peer's, and it never answers
        # The other direction still flows: b's kernel to a, through the relay.
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx,
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx,
        ):
            rx.bind((tun_pair.a.ip, 0))
            rx.settimeout(5)
            tx.bind((tun_pair.b.ip, 0))
            tx.sendto(b"still flowing", rx.getsockname())
            assert rx.recv(100) == b"still flowing"
    assert any(p.direction == "b->a" and p.action == "forwarded" for p in tun_pair.packets)
    tun_pair.check()


def test_failure_report_lists_what_the_script_never_looked_at(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_inner="""
        import socket

        def test_script(tun_pair):
            peer = tun_pair.script("b")
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(b"x", (tun_pair.b.ip, 4242))
            peer.packets.wait_for(lambda p: True)
            assert False, "the script gave up"
        """
    )
    result = pytester.runpytest_subprocess("--tunpair", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*Captured packets call*",
            "scripted peer on tun1 (active): 1 packet handed to it, 1 the script never looked at:",
            "*UDP 198.18.0.1:* > 198.18.0.2:4242*",
        ]
    )


@tap
def test_an_error_in_the_relay_thread_part_surfaces_in_the_test(
    tun_pair: TunPair, peer: ScriptedPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pytest_tunpair._wire import neigh as _neigh

    real = _neigh.neighbour_answer
    calls = []

    def broken_once(*args: Any, **kwargs: Any) -> bytes | None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the neighbour answer broke")
        return real(*args, **kwargs)

    monkeypatch.setattr(_neigh, "neighbour_answer", broken_once)
    client = connect_nonblocking(tun_pair.b.ip, 8080)
    with client:
        # The kernel asks again (ARP retries every second), and then the peer answers.
        peer.tcp_accept(8080, timeout=5)
    with pytest.raises(RuntimeError, match="the neighbour answer broke") as info:
        tun_pair.check()
    assert any("scripted peer on tap1" in note for note in info.value.__notes__)
    tun_pair.check()  # raised once, then gone


def test_one_matcher_two_uses(tun_pair: TunPair, peer: ScriptedPeer) -> None:
    client = connect_nonblocking(tun_pair.b.ip, 8080)
    with client:
        conn = peer.tcp_accept(8080)
        # The handshake as the peer saw it: the kernel's SYN and its ACK, in order.
        syn, ack = peer.expect_sequence(
            [TCP(dport=8080, flags="S"), TCP(dport=8080, flags="A", ack=conn.snd_nxt)]
        )
        assert syn.seq < ack.seq and syn.flags == "S"
        # The SYN-ACK the peer sent is in the pair's capture, but was not handed to the
        # peer: its expectations do not see it.
        tun_pair.packets.expect(IP(src=tun_pair.b.ip) / TCP(flags="SA"), action="injected")
        with pytest.raises(PacketTimeout) as info:
            peer.expect(TCP(flags="SA"), timeout=0.2)
        assert "TCP.flags: expected 'SA', got 'S'" in str(info.value)
        client.sendall(b"data")
        conn.recv()
        # conn.expect takes a template too, and shows the fields that differed.
        with pytest.raises(PacketTimeout) as info:
            conn.expect(TCP(flags="R"), timeout=0.2)
        assert "TCP.flags: expected 'R', got" in str(info.value)
        client.close()
        fin = conn.expect(TCP(flags="FA"))
        assert fin.tcp_seq == (conn.rcv_nxt - 1) % 2**32 and conn.fin_received
        with pytest.raises(TypeError, match="one of the two"):
            conn.expect(TCP(), flags="A")


def test_scripting_side_a(tun_pair: TunPair) -> None:
    with tun_pair.script("a") as peer:
        assert (peer.ip, peer.direction) == (tun_pair.a.ip, "b->a")
        client = connect_nonblocking(tun_pair.a.ip, 8080)  # leaves through b's device
        with client:
            conn = peer.tcp_accept(8080)
            assert conn.remote[0] == tun_pair.b.ip
            client.sendall(b"to a")
            conn.recv()
            assert conn.received == b"to a"
    assert {p.direction for p in tun_pair.packets if p.action == "scripted"} == {"b->a"}
    assert {p.direction for p in tun_pair.packets if p.action == "injected"} == {"a->b"}
