"""Fields, filters, expectations, flows and socket state over real traffic.

Real kernel devices, real sockets, real clients (ping, curl, ``http.server`` in a child
process); every field is checked against scapy's decode of the same captured bytes.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP, UDP

from pytest_tunpair import PacketTimeout, TunPair, TunPairFactory, UnexpectedPacket

from .conftest import need, tcp_send
from .test_fields import expected_fields, fields_of

WAIT = 10.0


def _ping(*args: str) -> None:
    need("ping")
    subprocess.run(["ping", "-c", "1", "-W", "2", *args], check=True, capture_output=True)


def _udp(dst: str, port: int, payload: bytes = b"datagram") -> None:
    with socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(payload, (dst, port))


@contextlib.contextmanager
def _connection(server_ip: str) -> Iterator[tuple[socket.socket, socket.socket]]:
    """A TCP connection to a server bound to ``server_ip``: (client, accepted)."""
    family = socket.AF_INET6 if ":" in server_ip else socket.AF_INET
    with socket.socket(family) as server:
        server.bind((server_ip, 0))
        server.listen(1)
        with socket.create_connection(server.getsockname()[:2], timeout=WAIT) as client:
            conn, _ = server.accept()
            with conn:
                yield client, conn


# -- fields against scapy --------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["tun", "tap"])
def test_every_field_equals_scapys_decode_of_real_traffic(
    tun_pair_factory: TunPairFactory, mode: str
) -> None:
    pair = tun_pair_factory(mode=mode)
    assert pair.b.ip and pair.b.ip6
    for dst in (pair.b.ip, pair.b.ip6):
        assert tcp_send(dst, os.urandom(300_000)) and True  # offload on: GSO super-packets
        _udp(dst, 9)
        _ping("-6" if ":" in dst else "-4", dst)
    pair.packets.wait_for(lambda p: p.proto == "icmpv6" and p.icmp_type == 129, timeout=WAIT)
    seen = set()
    for p in pair.packets:
        assert fields_of(p) == expected_fields(p.scapy), p.summary()
        seen.add((p.ip_version, p.proto))
    assert {(v, proto) for v in (4, 6) for proto in ("tcp", "udp")} <= seen
    assert {(4, "icmp"), (6, "icmpv6")} <= seen
    if mode == "tap":
        assert (None, "arp") in seen
    supers = [p for p in pair.packets if p.gso and p.gso.is_super_packet]
    assert supers, "offload is on: the bulk transfer should have crossed as super-packets"
    assert any(len(p.payload or b"") > pair.b.mtu for p in supers)


def test_filters_and_flows_never_decode_with_scapy(tun_pair: TunPair) -> None:
    # Not a benchmark (benchmarks/run.py has the figures): filtering by port and grouping
    # into flows read the header bytes, so a capture of a download costs no scapy decode.
    assert tun_pair.b.ip
    sent = os.urandom(2_000_000)
    tcp_send(tun_pair.b.ip, sent)
    data = tun_pair.packets.filter(TCP, direction="a->b", payload=lambda b: len(b) > 0)
    assert data and all(p.dport == data[0].dport for p in data)
    (flow,) = tun_pair.packets.flows()
    assert flow.stream("a->b") == sent and flow.handshake
    assert all(p._scapy is None for p in tun_pair.packets), "a field filter decoded with scapy"


# -- filters -------------------------------------------------------------------------------------


def test_filter_and_wait_for_by_fields(tun_pair: TunPair) -> None:
    assert tun_pair.b.ip and tun_pair.b.ip6
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as srv:
        srv.bind((tun_pair.b.ip, 0))
        port = srv.getsockname()[1]
        for _ in range(3):
            _udp(tun_pair.b.ip, port)
        _udp(tun_pair.b.ip6, port)
        got = tun_pair.packets.wait_for(dport=port, ip_version=6, timeout=WAIT)
    assert got.dst == tun_pair.b.ip6 and got.payload == b"datagram"
    v4 = tun_pair.packets.filter(UDP, dport=port, dst=tun_pair.b.ip, direction="a->b")
    assert len(v4) == 3
    assert tun_pair.packets.filter(proto="udp", dport=port, sport=lambda p: p > 1023) == [
        *v4,
        got,
    ]
    assert tun_pair.packets.filter(dport=port, action="dropped") == []
    with pytest.raises(TypeError, match="valid: direction, action, ip_version"):
        tun_pair.packets.filter(port=port)


# -- expectations ------------------------------------------------------------------------------


def test_expect_matches_a_synack_whatever_its_other_fields(tun_pair: TunPair) -> None:
    assert tun_pair.a.ip and tun_pair.b.ip
    with _connection(tun_pair.a.ip) as (client, _):  # client on b: the SYN-ACK goes to b
        synack = tun_pair.packets.expect(IP(dst=tun_pair.b.ip) / TCP(flags="SA"))
        assert synack.direction == "a->b" and synack.flags == "SA"
        assert synack.dport == client.getsockname()[1]
        with pytest.raises(PacketTimeout) as info:
            tun_pair.packets.expect(IP(dst=tun_pair.b.ip) / TCP(flags="R"), timeout=0.3)
    text = str(info.value)
    assert "expect: no packet matched IP(dst='198.18.0.2')/TCP(flags='R')" in text
    assert "TCP.flags: expected 'R', got 'SA'" in text
    # The closest candidates come before the trace, which lists the examined packets.
    assert text.index("TCP.flags") < text.index("trace (")
    assert re.search(r"a->b forwarded\s+IP / TCP .* SA", text)


def test_expect_ignore_leaves_set_fields_out(tun_pair: TunPair) -> None:
    assert tun_pair.b.ip
    with _connection(tun_pair.b.ip):
        template = IP(dst=tun_pair.b.ip, ttl=1) / TCP(flags="S")
        with pytest.raises(PacketTimeout, match=r"IP\.ttl: expected 1, got 64"):
            tun_pair.packets.expect(template, timeout=0.2)
        syn = tun_pair.packets.expect(template, ignore=("IP.ttl",))
    assert syn.flags == "S"


def test_expect_none_passes_when_a_hook_drops_the_packet(tun_pair: TunPair) -> None:
    assert tun_pair.b.ip
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as srv:
        srv.bind((tun_pair.b.ip, 0))
        port = srv.getsockname()[1]
        hook = tun_pair.add_hook(lambda p: [] if p.dport == port else None, direction="a->b")
        template = IP(dst=tun_pair.b.ip) / UDP(dport=port)
        start = time.monotonic() - tun_pair.packets.t0
        _udp(tun_pair.b.ip, port)
        tun_pair.packets.expect_none(template, during=0.5, after=start)
        dropped = tun_pair.packets.wait_for(dport=port, action="dropped", timeout=WAIT)
        assert dropped.direction == "a->b"  # it was sent, and it is the hook that dropped it
        srv.settimeout(0.1)
        with pytest.raises(TimeoutError):
            srv.recv(100)

        tun_pair.remove_hook(hook)
        _udp(tun_pair.b.ip, port, b"this one arrives")
        with pytest.raises(UnexpectedPacket) as info:
            tun_pair.packets.expect_none(template, during=WAIT, after=start)
        srv.settimeout(WAIT)
        assert srv.recv(100) == b"this one arrives"
    caught = info.value
    assert caught.packet.action == "forwarded" and caught.packet.payload == b"this one arrives"
    assert f"packet #{caught.packet.seq} matched IP(dst='198.18.0.2')/UDP(dport={port})" in str(
        caught
    )


def test_expect_sequence_of_a_handshake(tun_pair: TunPair) -> None:
    a, b = tun_pair.a.ip, tun_pair.b.ip
    assert a and b
    with _connection(b):
        syn, synack, ack = tun_pair.packets.expect_sequence(
            [IP(dst=b) / TCP(flags="S"), IP(dst=a) / TCP(flags="SA"), IP(dst=b) / TCP(flags="A")]
        )
    assert syn.seq < synack.seq < ack.seq
    assert synack.tcp_ack == (syn.tcp_seq or 0) + 1 and ack.tcp_ack == (synack.tcp_seq or 0) + 1
    with pytest.raises(PacketTimeout, match=r"step 2 of 2, TCP\(flags='S'\)"):
        tun_pair.packets.expect_sequence([TCP(flags="SA"), TCP(flags="S")], timeout=0.2)


# -- quiet wire --------------------------------------------------------------------------------


def test_wait_quiet_waits_out_steady_traffic_then_fails(tun_pair: TunPair) -> None:
    assert tun_pair.b.ip
    need("ping")
    ping = subprocess.Popen(
        ["ping", "-i", "0.05", "-c", "40", tun_pair.b.ip], stdout=subprocess.DEVNULL
    )
    try:
        tun_pair.packets.wait_for(proto="icmp", timeout=WAIT)
        with pytest.raises(PacketTimeout, match=r"wait_quiet: the wire was not quiet for 0\.3 s"):
            tun_pair.packets.wait_quiet(0.3, timeout=0.6)
    finally:
        ping.wait(WAIT)
    tun_pair.packets.wait_quiet(0.3, timeout=WAIT)
    last = tun_pair.packets[-1]
    assert time.monotonic() - tun_pair.packets.t0 - last.time >= 0.3


# -- flows under loss, and the kernel's view ------------------------------------------------------


def _retrans_segs() -> int:
    # /proc/thread-self/net follows this thread's namespace; /proc/self/net follows the
    # process's main thread, which is elsewhere when tests run on a disposable thread
    # (docs/internals.md, "The namespace of /proc/self/net is the main thread's").
    lines = [line.split() for line in Path("/proc/thread-self/net/snmp").read_text().splitlines()]
    tcp = [line for line in lines if line[0] == "Tcp:"]
    return int(dict(zip(tcp[0][1:], tcp[1][1:], strict=True))["RetransSegs"])


@pytest.fixture
def http_server(
    tun_pair: TunPair, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[str, int, bytes, int]]:
    """``python -m http.server`` in a child process, in the pair's namespace, bound to b,
    serving a file (3 MB, or the size given by indirect parametrization): (url, port, the
    file's bytes, the server's pid)."""
    assert tun_pair.b.ip
    body = os.urandom(getattr(request, "param", 3_000_000))
    (tmp_path / "file.bin").write_bytes(body)
    server = subprocess.Popen(
        [sys.executable, "-u", "-m", "http.server", "0", "--bind", tun_pair.b.ip],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        match = re.search(r"port (\d+)", line)
        assert match, f"http.server said {line!r}"
        port = int(match.group(1))
        yield f"http://{tun_pair.b.ip}:{port}/file.bin", port, body, server.pid
    finally:
        server.kill()
        server.wait(WAIT)
        if server.stdout:
            server.stdout.close()


def test_flows_of_a_download_under_loss(tun_pair: TunPair, http_server, tmp_path: Path) -> None:
    url, port, body, _pid = http_server
    curl = shutil.which("curl") or pytest.skip("curl is not installed")
    tun_pair.impair(loss=0.02)  # both directions; offload turns off
    before = _retrans_segs()
    out = tmp_path / "got.bin"
    subprocess.run(
        [curl, "-sS", "--max-time", "60", "-o", str(out), url], check=True, capture_output=True
    )
    assert out.read_bytes() == body
    tun_pair.packets.wait_quiet(0.3, timeout=WAIT)  # FINs and last ACKs
    kernel = _retrans_segs() - before

    flows = tun_pair.packets.flows()
    http = [f for f in flows if f.proto == "tcp" and (tun_pair.b.ip, port) in f.endpoints]
    assert len(http) == 1, flows
    flow = http[0]
    assert flow.handshake and flow.fins and not flow.resets
    assert flow.stats["a->b"]["dropped"] + flow.stats["b->a"]["dropped"] > 0
    ours = sum(f.retransmitted_segments for f in flows if f.proto == "tcp")
    assert kernel > 0, "2% loss over 2000+ segments: the kernel should have retransmitted"
    assert ours == kernel, (ours, kernel, flow.retransmissions[:5])
    response = flow.stream("b->a")
    head, _, content = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and content == body
    assert flow.stream("a->b").startswith(b"GET /file.bin HTTP/1.1\r\n")


# Larger than the socket buffers can hold: the server is still sending when the test looks.
@pytest.mark.parametrize("http_server", [24_000_000], indirect=True)
def test_sockets_show_a_daemons_connection_with_its_tcp_info(
    tun_pair: TunPair, http_server
) -> None:
    import http.client

    _url, port, body, pid = http_server
    assert tun_pair.b.ip
    tun_pair.impair(loss=0.02)
    conn = http.client.HTTPConnection(tun_pair.b.ip, port, timeout=30)
    try:
        conn.request("GET", "/file.bin")
        assert conn.sock is not None
        client = conn.sock.getsockname()
        response = conn.getresponse()
        assert response.read(2_000_000) == body[:2_000_000]  # the rest waits in buffers
        sockets = tun_pair.sockets()
        listening = [s for s in sockets if s.state == "LISTEN" and s.local == (tun_pair.b.ip, port)]
        served = [s for s in sockets if s.local == (tun_pair.b.ip, port) and s.remote == client]
        assert len(listening) == 1 and len(served) == 1, sockets
        daemon = served[0]
        assert daemon.state == "ESTABLISHED" and daemon.proto == "tcp"
        assert pid in daemon.pids() and os.getpid() not in daemon.pids()
        info = daemon.tcp_info
        assert info["rtt"] > 0 and info["snd_cwnd"] > 0 and info["pmtu"] == tun_pair.b.mtu
        assert info["total_retrans"] > 0, info
        # Sent, at least what the client read (the ACKs for the last of it may be on their
        # way, or lost: bytes_acked can lag).
        assert info["bytes_sent"] >= 2_000_000
        # The same socket from another thread (outside the namespace) reads the same.
        other: list[object] = []
        t = threading.Thread(target=lambda: other.append(tun_pair.sockets()))
        t.start()
        t.join(WAIT)
        assert any(getattr(s, "inode", None) == daemon.inode for s in other[0])  # type: ignore[attr-defined]
    finally:
        conn.close()


def test_sockets_lists_udp_too(tun_pair: TunPair) -> None:
    assert tun_pair.b.ip
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((tun_pair.b.ip, 0))
        (found,) = [x for x in tun_pair.sockets("udp") if x.local == s.getsockname()]
    assert found.state == "CLOSE" and found.tcp_info == {}
    assert not [x for x in tun_pair.sockets("tcp") if x.local == s.getsockname()]
    with pytest.raises(ValueError, match="use one of tcp, udp"):
        tun_pair.sockets("sctp")


def test_sockets_tcp_info_is_the_kernels_struct(tun_pair: TunPair) -> None:
    from pytest_tunpair._kernel.sockets import decode_tcp_info

    assert tun_pair.b.ip
    with _connection(tun_pair.b.ip) as (client, _):
        client.sendall(b"x" * 100_000)
        own = client.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 512)
        (mine,) = [s for s in tun_pair.sockets() if s.local == client.getsockname()]
        assert mine.inode == os.fstat(client.fileno()).st_ino
        assert mine.remote == (tun_pair.b.ip, client.getpeername()[1])
    direct = decode_tcp_info(own)
    assert set(direct) == set(mine.tcp_info)
    for name in ("state", "snd_mss", "rcv_mss", "advmss", "pmtu", "snd_wscale", "rcv_wscale"):
        assert mine.tcp_info[name] == direct[name], name
    info = mine.tcp_info
    assert info["bytes_sent"] + info["notsent_bytes"] >= 100_000  # sent, or still queued
    assert info["pmtu"] == tun_pair.b.mtu and info["rtt"] > 0


def test_wait_quiet_waits_for_packets_held_in_the_relay(tun_pair: TunPair) -> None:
    assert tun_pair.b.ip
    tun_pair.impair(delay="400ms", direction="a->b")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as srv:
        srv.bind((tun_pair.b.ip, 0))
        port = srv.getsockname()[1]
        _udp(tun_pair.b.ip, port)
        # Nothing is recorded while the datagram is delayed; the relay still holds it.
        tun_pair.packets.wait_quiet(0.1, timeout=WAIT)
        (got,) = tun_pair.packets.filter(dport=port)
        assert got.action == "delayed" and got.sojourn >= 0.35


def test_wait_quiet_waits_for_a_slow_hook(tun_pair: TunPair) -> None:
    assert tun_pair.b.ip
    release = threading.Event()

    def slow(p: object) -> None:
        release.wait(WAIT)

    tun_pair.add_hook(slow, direction="a->b")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as srv:
        srv.bind((tun_pair.b.ip, 0))
        port = srv.getsockname()[1]
        _udp(tun_pair.b.ip, port)
        with pytest.raises(PacketTimeout, match="1 held in the relay"):
            tun_pair.packets.wait_quiet(0.1, timeout=0.5)
        release.set()
        tun_pair.packets.wait_quiet(0.1, timeout=WAIT)
        assert [p.action for p in tun_pair.packets.filter(dport=port)] == ["forwarded"]


def test_a_failed_expectation_reads_well_in_the_pytest_report(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import socket
        from scapy.layers.inet import IP, TCP

        def test_wants_a_reset(tun_pair):
            with socket.create_server((tun_pair.a.ip, 0)) as server:
                client = socket.create_connection(server.getsockname())
                conn, _ = server.accept()
                tun_pair.packets.expect(IP(dst=tun_pair.b.ip) / TCP(flags="R"), timeout=0.3)
        """
    )
    result = pytester.runpytest_subprocess("--tunpair", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "E*.PacketTimeout: expect: no packet matched IP(dst='198.18.0.2')/TCP(flags='R')*",
            "E * closest:",
            "E * #1 * a->b forwarded  IP / TCP 198.18.0.1:* > 198.18.0.2:* SA, length 60",
            "E * TCP.flags: expected 'R', got 'SA'",
            "E * trace (3 examined):",
            "*Captured packets call*",
        ]
    )
    # The helpers hide their frames: the traceback ends at the test's own line.
    assert "_match.py" not in result.stdout.str()
