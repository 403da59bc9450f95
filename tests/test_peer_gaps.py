"""The scripted peer's packetdrill-parity features, on real traffic: paced and
manual handshakes, relative sequence numbers, the handshake's packets and options,
handshake overrides, GSO super-packets, expect_next, the capture's clock; and the
regressions: after= from either capture, a SYN peer.expect() saw, wait_quiet() and a FIN
still in the device queue.

Time bounds come from the kernel's own constants and RFC 6298 (lower bounds) with generous
upper bounds; intervals are read on the kernel's TCP timestamp clock (1 ms ticks), which a
busy machine does not move.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator

import pytest
from scapy.layers.inet import TCP

from pytest_tunpair import Packet, ScriptedPeer, TunPair, UnexpectedPacket

TCP_INFO = 11
# struct tcp_info (include/uapi/linux/tcp.h): tcpi_rto, tcpi_ato, tcpi_snd_mss and
# tcpi_rcv_mss start at byte 8; tcpi_rtt is at byte 68 (microseconds).
_RTO_AT, _RCV_MSS_AT, _RTT_AT = 8, 20, 68


def tcp_info(sock: socket.socket) -> dict[str, int]:
    raw = sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, 104)
    rto, _ato, _snd_mss, rcv_mss = struct.unpack_from("=4I", raw, _RTO_AT)
    (rtt,) = struct.unpack_from("=I", raw, _RTT_AT)
    return {"rto": rto, "rcv_mss": rcv_mss, "rtt": rtt}


def sent_at(p: Packet) -> float:
    """When the kernel sent ``p``: its TCP timestamp in seconds (Linux ticks in ms)."""
    tsval: int = dict(p.scapy[TCP].options)["Timestamp"][0]
    return tsval / 1000


def netns_sysctl(name: str, value: str) -> None:
    # The test's thread is inside the pair's namespace: /proc/sys/net is the namespace's.
    with open(f"/proc/sys/{name.replace('.', '/')}", "w") as f:
        f.write(value)


@pytest.fixture
def peer(tun_pair: TunPair) -> Iterator[ScriptedPeer]:
    with tun_pair.script("b") as p:
        yield p


def client_to(pair: TunPair, port: int) -> socket.socket:
    """A kernel client whose SYN is on its way (the test thread plays the server)."""
    client = socket.socket()
    client.setblocking(False)
    client.connect_ex((pair.b.ip, port))
    client.setblocking(True)
    client.settimeout(10)
    return client


def server_on(pair: TunPair, port: int) -> socket.socket:
    server = socket.socket()
    server.bind((pair.a.ip, port))
    server.listen(4)
    server.settimeout(10)
    return server


# -- gap 1: a paced or manual handshake -----------------------------------------------------------
def test_a_paced_syn_ack_sets_the_kernels_rtt_and_rto(
    tun_pair: TunPair, peer: ScriptedPeer
) -> None:
    # RFC 6298 2.2: the first RTT sample R sets SRTT = R and RTTVAR = R/2, so the RTO is
    # R + 4 * R/2 = 3R: 0.3 s for a 100 ms handshake, where an instant SYN-ACK gives
    # Linux's floor of 0.2 s (TCP_RTO_MIN).
    netns_sysctl("net.ipv4.tcp_early_retrans", "0")  # only the RTO retransmits
    with client_to(tun_pair, 8080) as client:
        conn = peer.tcp_accept(8080, synack_delay=0.1)
        assert conn.syn is not None and conn.syn_ack is not None
        assert conn.syn_ack.time - conn.syn.time >= 0.1
        info = tcp_info(client)
        assert 100_000 <= info["rtt"] < 400_000, info
        assert 300_000 <= info["rto"], info
        conn.auto_ack = False
        client.send(b"x" * 100)
        first = conn.recv()
        again = conn.recv(timeout=3)
        assert again.tcp_seq == first.tcp_seq
        assert sent_at(again) - sent_at(first) >= 0.3 * 0.97  # the kernel's 1 ms ticks


def test_a_manual_handshake_completes_when_the_test_says(
    tun_pair: TunPair, peer: ScriptedPeer
) -> None:
    with server_on(tun_pair, 8080) as server:
        conn = peer.tcp_connect(8080, complete=False)
        assert not conn.established and conn.syn_ack is not None
        # Nothing acknowledged the SYN-ACK yet: the kernel has no connection to accept.
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()
        conn.window = 12800
        third = conn.complete()
        assert conn.established
        sent = [p for p in tun_pair.packets if p.action == "injected"][-1]
        # Gap 7: the third ACK's window is what the test set, scaled (12800 >> 7), not the
        # SYN's 65535.
        assert sent.flags == "A" and sent.window == 12800 >> 7
        server.setblocking(True)
        accepted, _ = server.accept()
        accepted.close()
        assert third is conn


def test_ack_delay_paces_the_third_ack(tun_pair: TunPair, peer: ScriptedPeer) -> None:
    with server_on(tun_pair, 8080) as server:
        conn = peer.tcp_connect(8080, ack_delay=0.1, ack_window=25600)
        accepted, _ = server.accept()
        with accepted:
            assert conn.syn_ack is not None
            ack = [p for p in tun_pair.packets if p.action == "injected"][1]
            assert ack.time - conn.syn_ack.time >= 0.1
            assert ack.window == 25600 >> 7
            # The server measured the SYN-ACK -> ACK time as its first RTT sample.
            assert tcp_info(accepted)["rtt"] >= 100_000


# -- gap 2 and 3: relative numbers, the handshake's packets and options ---------------------------
def test_relative_numbers_and_the_handshake_packets(tun_pair: TunPair, peer: ScriptedPeer) -> None:
    with client_to(tun_pair, 8080) as client:
        conn = peer.tcp_accept(8080)
        assert conn.syn is not None and conn.syn_ack is not None
        assert conn.irs == conn.syn.tcp_seq and conn.iss == conn.syn_ack.tcp_seq
        # Linux's order of SYN options (tcp_options_write): MSS, SACK-permitted with
        # timestamps, NOP, window scale -- each value kept.
        names = [name for name, _value in conn.syn.tcp_options or ()]
        assert names == ["MSS", "SAckOK", "Timestamp", "NOP", "WScale"]
        assert dict(conn.syn.tcp_options or ())["MSS"] == 1460
        client.send(b"hello")
        seg = conn.expect(seq=1, ack=1, len=5)  # relative: the first byte after each SYN
        assert seg.tcp_seq == conn.irs + 1
        conn.send(b"world", seq=1)
        assert client.recv(10) == b"world"
        conn.expect(flags="A", ack=6)
        # A retransmission of our first byte, at its relative number: the kernel ACKs again.
        conn.send(b"w", seq=1)
        dup = conn.expect_next(flags="A", ack=6)
        assert dup.tcp_ack == conn.iss + 6


# -- gap 4: the handshake's flags, options and window ---------------------------------------------
def test_handshake_flags_ask_for_ecn(tun_pair: TunPair, peer: ScriptedPeer) -> None:
    # RFC 3168 6.1.1: a SYN with ECE and CWR asks for ECN; a server that agrees (net.ipv4.
    # tcp_ecn=1 or 2) answers with ECE in its SYN-ACK.
    netns_sysctl("net.ipv4.tcp_ecn", "1")
    with server_on(tun_pair, 8080):
        conn = peer.tcp_connect(8080, syn_flags="SEC", syn_window=1000)
        assert conn.syn is not None and conn.syn.flags == "SEC" and conn.syn.window == 1000
        assert conn.syn_ack is not None and conn.syn_ack.flags == "SAE"


def test_handshake_options_request_a_fast_open_cookie(
    tun_pair: TunPair, peer: ScriptedPeer
) -> None:
    # RFC 7413 4.1.1: an empty Fast Open option (kind 34) asks the server for a cookie;
    # a listener with TCP_FASTOPEN answers with one in its SYN-ACK.
    netns_sysctl("net.ipv4.tcp_fastopen", "3")
    with server_on(tun_pair, 8080) as server:
        server.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, 5)
        options = [("MSS", 1460), ("SAckOK", b""), ("NOP", None), ("NOP", None), (34, b"")]
        options += [("NOP", None), ("NOP", None)]
        conn = peer.tcp_connect(8080, syn_options=options)
        assert conn.syn is not None and conn.syn.tcp_options is not None
        assert [n for n, _v in conn.syn.tcp_options][:4] == ["MSS", "SAckOK", "NOP", "NOP"]
        assert conn.syn.tcp_options[4][1] == b""  # the empty Fast Open option, in place
        assert conn.syn_ack is not None
        cookie = [v for n, v in conn.syn_ack.tcp_options or () if n in ("TFO", 34)]
        assert cookie and cookie[0] not in (b"", None), conn.syn_ack.tcp_options


def test_syn_data_without_a_cookie_is_sent_again(tun_pair: TunPair, peer: ScriptedPeer) -> None:
    # RFC 7413 4.2: without a valid cookie the server acknowledges only the SYN; the
    # client sends the data again after the handshake.
    with server_on(tun_pair, 8080) as server:
        conn = peer.tcp_connect(8080, syn_data=b"early")
        assert conn.syn is not None and conn.syn.payload == b"early"
        assert conn.syn_ack is not None and conn.syn_ack.tcp_ack == conn.iss + 1
        assert conn.snd_nxt == conn.iss + 1
        accepted, _ = server.accept()
        with accepted:
            conn.send(b"early")
            assert accepted.recv(10) == b"early"


# -- gap 5: GSO super-packets ----------------------------------------------------------------------
def test_a_gso_super_packet_arrives_whole(tun_pair: TunPair, peer: ScriptedPeer) -> None:
    # The virtio-net header's gso_size reaches the socket as the segment size it learns
    # (tcp_measure_rcv_mss uses skb_shinfo(skb)->gso_size): 1000, though the packet holds
    # 10000 bytes and the MSS is 1460.
    with server_on(tun_pair, 8080) as server:
        conn = peer.tcp_connect(8080)
        accepted, _ = server.accept()
        with accepted:
            sent = conn.send(b"g" * 10000, gso_size=1000)
            assert len(sent) > tun_pair.options.mtu
            assert sent.gso is not None and sent.gso.size == 1000
            got = b""
            while len(got) < 10000:
                got += accepted.recv(20000)
            assert got == b"g" * 10000
            assert tcp_info(accepted)["rcv_mss"] == 1000
            conn.expect(flags="A", ack=10001)
            with pytest.raises(ValueError, match="larger than the MTU"):
                conn.send(b"g" * 10000)


# -- gap 6: expect_next --------------------------------------------------------------------------
def test_expect_next_fails_on_an_unscripted_segment(tun_pair: TunPair, peer: ScriptedPeer) -> None:
    with client_to(tun_pair, 8080) as client:
        conn = peer.tcp_accept(8080)
        client.send(b"first")
        conn.expect_next(payload=b"first")
        client.send(b"second")
        with pytest.raises(UnexpectedPacket) as raised:
            conn.expect_next(flags="FA")
        text = str(raised.value)
        assert "expect_next" in text and "flags: expected 'FA', got 'PA'" in text
        # conn.expect() skips it, as before.
        client.shutdown(socket.SHUT_WR)
        conn.expect(flags="FA")


# -- gap 8: the capture's clock --------------------------------------------------------------------
def test_now_is_the_captures_clock(tun_pair: TunPair, peer: ScriptedPeer) -> None:
    before = tun_pair.now()
    with client_to(tun_pair, 8080):
        syn = peer.expect(TCP(dport=8080, flags="S"))
    after = tun_pair.now()
    assert before <= syn.time <= after and peer.now() >= after


# -- regressions ------------------------------------------------------------------------------------
def test_after_takes_a_packet_of_either_capture(tun_pair: TunPair, peer: ScriptedPeer) -> None:
    # peer.send() returns the pair's record (numbered in tun_pair.packets); after= took its
    # number for one of peer.packets' and skipped the answer (a false timeout).
    from scapy.layers.inet import IP

    for _ in range(3):  # the numbers of the two captures drift further apart each time
        probe = IP(src=peer.ip, dst=tun_pair.a.ip) / TCP(sport=4000, dport=9, flags="S")
        sent = peer.send(probe)
        reply = peer.expect(TCP(sport=9, dport=4000, flags="RA"), after=sent, timeout=2)
        assert reply.time >= sent.time
        # ... and a packet of peer.packets still works, as before.
        peer.expect_none(TCP(sport=9, dport=4000), after=reply, during=0.05)


def test_tcp_accept_answers_a_syn_that_expect_matched(
    tun_pair: TunPair, peer: ScriptedPeer
) -> None:
    with client_to(tun_pair, 8080) as client:
        syn = peer.expect(TCP(dport=8080, flags="S"))
        conn = peer.tcp_accept(8080, timeout=2)
        assert conn.syn is syn
        client.send(b"ok")
        assert conn.recv().payload == b"ok"


def test_wait_quiet_sees_the_fin_close_just_queued(tun_pair: TunPair, peer: ScriptedPeer) -> None:
    # close() puts the FIN into tun0's queue before it returns; the relay has not read it
    # yet. wait_quiet() counted only what the relay held, and returned at once when the
    # wire was idle before: 5-14 of 20 tries missed the FIN.
    missed = 0
    for port in range(8100, 8120):
        client = client_to(tun_pair, port)
        conn = peer.tcp_accept(port)
        tun_pair.packets.wait_quiet(idle=0.05)  # the handshake is over: idle since
        start = tun_pair.packets.last_seq
        client.close()
        tun_pair.packets.wait_quiet(idle=0.01)
        fins = [p for p in tun_pair.packets.since(start + 1) if p.flags and "F" in p.flags]
        missed += not fins
        conn.rst()
    assert missed == 0, f"wait_quiet() returned before the FIN in {missed} of 20 tries"


def test_blocking_client_in_a_thread_with_a_paced_server(
    tun_pair: TunPair, peer: ScriptedPeer
) -> None:
    # What packetdrill's blocking calls do, by hand: connect() blocks in a thread (which
    # inherits the namespace) while the peer answers 50 ms later.
    result: list[float] = []

    def connect() -> None:
        with socket.create_connection((tun_pair.b.ip, 8080), timeout=5) as s:
            result.append(tcp_info(s)["rtt"])

    thread = threading.Thread(target=connect)
    thread.start()
    peer.tcp_accept(8080, synack_delay=0.05)
    thread.join(5)
    assert result and result[0] >= 50_000
