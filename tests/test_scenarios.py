"""Network scenarios on real traffic: fault rules, outages, path MTU, burst loss, traces, plots.

Every test runs real sockets through a real pair in the test's own namespace; the relay's
capture says what happened to each packet.
"""

from __future__ import annotations

import errno
import itertools
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, TCP

from pytest_tunpair import GilbertElliott, OptionError, Packet, TunPair, traces

from .conftest import tcp_send


def tcp_flags(p: Packet) -> str:
    return str(p.scapy[TCP].flags)


def is_tcp(p: Packet) -> bool:
    return bool(p.scapy.haslayer(TCP))


@pytest.fixture
def udp_sink(tun_pair: TunPair) -> Iterator[socket.socket]:
    """A UDP socket bound on b, to send datagrams to across the relay (a->b)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind((tun_pair.b.ip, 0))
        sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        yield sink


def numbered(n: int, size: int = 100) -> list[bytes]:
    return [struct.pack("!I", i) + b"x" * (size - 4) for i in range(n)]


def index_of(p: Packet) -> int:
    return int(struct.unpack_from("!I", p.data, 28)[0])  # IPv4 (20) + UDP (8) headers


# include/uapi/linux/in.h; the socket module does not export them.
IP_MTU_DISCOVER = 10
IP_PMTUDISC_DONT = 0


# -- fault rules ------------------------------------------------------------------------


def test_reset_twice_then_connect(tun_pair: TunPair) -> None:
    server = socket.create_server((tun_pair.b.ip, 0))
    port = server.getsockname()[1]
    fault = tun_pair.fail(times=2, how="reset", flags="S")
    assert "fail a->b: reset flags='S' (0/2 hits)" in tun_pair.describe()
    errors: list[type[BaseException]] = []
    with server:
        for _ in range(5):
            try:
                conn = socket.create_connection((tun_pair.b.ip, port), timeout=5)
            except OSError as exc:
                errors.append(type(exc))
                continue
            conn.close()
            break
    assert errors == [ConnectionRefusedError, ConnectionRefusedError]
    assert fault.hits == 2
    assert not fault.active
    resets = [p for p in tun_pair.packets if p.action == "reset"]
    assert [tcp_flags(p) for p in resets] == ["S", "S"]
    rsts = [p for p in tun_pair.packets if p.action == "injected"]
    assert [(p.direction, tcp_flags(p)) for p in rsts] == [("b->a", "RA")] * 2
    assert "fail" not in tun_pair.describe()  # spent: no longer an active rule


def test_reset_of_an_established_connection(tun_pair: TunPair) -> None:
    with socket.create_server((tun_pair.b.ip, 0)) as server:
        client = socket.create_connection(server.getsockname()[:2], timeout=5)
        conn, _ = server.accept()
        with client, conn:
            tun_pair.fail(how="reset", flags=lambda f: "P" in f)
            client.sendall(b"data")
            with pytest.raises(ConnectionResetError):
                for _ in range(50):
                    client.sendall(b"more")
                    time.sleep(0.01)
                client.recv(10)


def test_udp_gets_port_unreachable(tun_pair: TunPair, udp_sink: socket.socket) -> None:
    fault = tun_pair.fail(how="unreachable", proto="udp")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.connect(udp_sink.getsockname())
        client.send(b"hello")
        client.settimeout(2)
        with pytest.raises(ConnectionRefusedError):
            client.recv(100)
    assert fault.hits == 1
    [icmp] = [p for p in tun_pair.packets if p.action == "injected"]
    assert (icmp.scapy[ICMP].type, icmp.scapy[ICMP].code) == (3, 3)


def test_udp6_gets_port_unreachable(tun_pair: TunPair) -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sink:
        sink.bind((tun_pair.b.ip6, 0))
        tun_pair.fail(how="unreachable")
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as client:
            client.connect(sink.getsockname()[:2])
            client.send(b"hello")
            client.settimeout(2)
            with pytest.raises(ConnectionRefusedError):
                client.recv(100)


def test_tcp_connect_gets_host_unreachable(tun_pair: TunPair) -> None:
    with socket.create_server((tun_pair.b.ip, 0)) as server:
        tun_pair.fail(how="unreachable", dport=server.getsockname()[1])
        with pytest.raises(OSError) as info:
            socket.create_connection(server.getsockname()[:2], timeout=5)
    assert info.value.errno == errno.EHOSTUNREACH


def test_drop_only_matching_and_remove(tun_pair: TunPair, udp_sink: socket.socket) -> None:
    fault = tun_pair.fail(
        lambda p: p.wire_len > 500, times=None, how="drop", dport=udp_sink.getsockname()[1]
    )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        for size in (100, 1000, 100, 1000):
            client.sendto(b"x" * size, udp_sink.getsockname())
        udp_sink.settimeout(2)
        assert [len(udp_sink.recv(2000)) for _ in range(2)] == [100, 100]
        # The second small datagram can arrive while the second large one is still in the
        # relay: remove the rule only once the relay has recorded both large ones dropped.
        big = [lambda p: p.wire_len > 500] * 2
        tun_pair.packets.expect_sequence(big, action="dropped", direction="a->b", timeout=5)
        fault.remove()
        client.sendto(b"x" * 1000, udp_sink.getsockname())
        assert len(udp_sink.recv(2000)) == 1000
    assert fault.hits == 2
    assert "fail" not in tun_pair.describe()


def test_fail_rejects_bad_arguments(tun_pair: TunPair) -> None:
    with pytest.raises(OptionError, match="how"):
        tun_pair.fail(how="explode")
    with pytest.raises(OptionError, match="times"):
        tun_pair.fail(times=0)
    with pytest.raises(TypeError, match="dportt"):
        tun_pair.fail(dportt=80)
    with pytest.raises(OptionError, match="direction"):
        tun_pair.fail(direction="up")


# -- outages ----------------------------------------------------------------------------


def test_outage_drops_exactly_the_packets_in_its_window(
    tun_pair: TunPair, udp_sink: socket.socket
) -> None:
    # Datagrams every millisecond or so, from before the outage until the relay has read
    # some after its window: how many fall before, in and after it depends on how busy the
    # machine is (the first one after the call may be read only after the window began),
    # not the verdict on each, which is what the test checks.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.sendto(numbered(1)[0], udp_sink.getsockname())
        tun_pair.packets.wait_for(direction="a->b", timeout=10)
        # Long enough that a sender held off a CPU for a while still sends into it.
        outage = tun_pair.outage(0.4, after=0.15, direction="a->b")
        for payload in numbered(100_000):
            client.sendto(payload, udp_sink.getsockname())
            time.sleep(0.001)
            last = tun_pair.packets[-1] if tun_pair.packets else None
            if last is not None and last.arrival > outage.end_time + 0.05:
                break
    assert outage.end_time - outage.start == pytest.approx(0.4)
    sent = [p for p in tun_pair.packets if p.direction == "a->b"]
    lost = [p for p in sent if p.action == "lost"]
    assert sent[0].action == "forwarded" and lost and sent[-1].arrival >= outage.end_time
    for p in sent:
        inside = outage.start <= p.arrival < outage.end_time
        assert (p.action == "lost") == inside, p
    assert outage.dropped == len(lost)


def test_outage_context_manager_and_end(tun_pair: TunPair, udp_sink: socket.socket) -> None:
    address = udp_sink.getsockname()

    def lost(payload: bytes) -> None:
        # The outage must have met the datagram before it ends: wait for the relay's record
        # of it, not for a receive timeout (a busy relay may not have read it yet).
        tun_pair.packets.wait_for(lambda p: p.payload == payload, action="lost", timeout=10)
        udp_sink.settimeout(0.1)
        with pytest.raises(TimeoutError):
            udp_sink.recv(10)
        udp_sink.settimeout(10)

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        with tun_pair.outage() as outage:
            assert "outage a->b/b->a" in tun_pair.describe()
            client.sendto(b"lost", address)
            lost(b"lost")
        client.sendto(b"passes", address)
        assert udp_sink.recv(10) == b"passes"
        forever = tun_pair.outage(direction="a->b")
        client.sendto(b"lost too", address)
        lost(b"lost too")
        forever.end()
        client.sendto(b"again", address)
        assert udp_sink.recv(10) == b"again"
    assert outage.dropped == 1
    assert [p.action for p in tun_pair.packets] == ["lost", "forwarded", "lost", "forwarded"]
    assert "outage" not in tun_pair.describe()


# -- Gilbert-Elliott --------------------------------------------------------------------


def send_numbered(tun_pair: TunPair, sink: socket.socket, n: int) -> list[bool]:
    """Send n numbered datagrams a->b; return, per index, whether the relay lost it."""
    tun_pair.packets.clear()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        for i, payload in enumerate(numbered(n)):
            client.sendto(payload, sink.getsockname())
            if i % 50 == 49:
                time.sleep(0.001)  # keep the device queue and the capture unhurried
    deadline = time.monotonic() + 10
    while len([p for p in tun_pair.packets if p.direction == "a->b"]) < n:
        assert time.monotonic() < deadline, "the relay did not see every datagram"
        time.sleep(0.01)
    lost = [False] * n
    for p in tun_pair.packets:
        if p.direction == "a->b":
            lost[index_of(p)] = p.action == "lost"
    return lost


def test_gilbert_elliott_rate_burst_and_seed(tun_pair: TunPair, udp_sink: socket.socket) -> None:
    model = GilbertElliott(p=0.05, r=0.25)
    n = 4000
    tun_pair.impair(loss=model, seed=11, direction="a->b")
    first = send_numbered(tun_pair, udp_sink, n)
    bursts, run = [], 0
    for lost in [*first, False]:
        if lost:
            run += 1
        elif run:
            bursts.append(run)
            run = 0
    # Tolerances for 4000 correlated draws (about 140 bursts): several standard deviations.
    assert sum(first) / n == pytest.approx(model.loss_rate, abs=0.05)
    assert sum(bursts) / len(bursts) == pytest.approx(model.mean_burst, rel=0.3)
    assert "loss=GilbertElliott(p=0.05, r=0.25) seed=11" in tun_pair.describe()
    tun_pair.impair(loss=model, seed=11, direction="a->b")  # a fresh chain, same seed
    assert send_numbered(tun_pair, udp_sink, n) == first
    tun_pair.impair(loss=model, seed=12, direction="a->b")
    assert send_numbered(tun_pair, udp_sink, n) != first


# -- path MTU ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_tcp_through_a_smaller_path_mtu(tun_pair: TunPair, family: str) -> None:
    pmtu = tun_pair.path_mtu(1280)
    server_ip = tun_pair.b.ip if family == "ipv4" else tun_pair.b.ip6
    assert server_ip is not None
    payload = bytes(range(256)) * 2000
    assert tcp_send(server_ip, payload, timeout=20) == payload
    sent = [p for p in tun_pair.packets if p.direction == "a->b" and is_tcp(p)]
    too_big = [p for p in sent if p.action == "too-big"]
    assert too_big, "a full-sized segment should have met the path MTU"
    icmp = [p for p in tun_pair.packets if p.action == "injected"]
    assert icmp and icmp[0].direction == "b->a"
    after = [p for p in sent if p.seq > icmp[0].seq and p.action != "too-big"]
    assert after and max(p.wire_len for p in after) <= 1280
    assert sum(p.wire_len > 1280 for p in sent if p.seq > icmp[-1].seq) == 0
    assert pmtu is not None and pmtu.too_big == len(too_big)
    assert "path_mtu a->b/b->a: 1280" in tun_pair.describe()
    tun_pair.path_mtu(None)
    assert "path_mtu" not in tun_pair.describe()


def test_pmtu_black_hole_stalls(tun_pair: TunPair) -> None:
    tun_pair.path_mtu(1280, icmp=False)
    received = bytearray()

    def send(sock: socket.socket) -> None:
        try:
            sock.sendall(b"x" * 100_000)
        except OSError:
            pass  # closed under it once the test has seen the stall

    with socket.create_server((tun_pair.b.ip, 0)) as server:
        client = socket.create_connection(server.getsockname()[:2], timeout=5)
        conn, _ = server.accept()
        sender = threading.Thread(target=send, args=(client,))
        with conn:
            sender.start()
            conn.settimeout(2.5)
            try:
                while chunk := conn.recv(65536):
                    received.extend(chunk)
            except TimeoutError:
                pass
            client.shutdown(socket.SHUT_RDWR)
            sender.join(10)
            client.close()
    # Nothing of a full-sized segment arrives, and TCP does not find out by itself.
    assert len(received) == 0
    assert not [p for p in tun_pair.packets if p.action == "injected"]
    too_big = [p for p in tun_pair.packets if p.action == "too-big"]
    assert len(too_big) >= 2  # the first segment and its retransmissions


def test_ipv4_without_df_is_fragmented(tun_pair: TunPair, udp_sink: socket.socket) -> None:
    tun_pair.path_mtu(576, direction="a->b")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
        client.sendto(b"y" * 1400, udp_sink.getsockname())
        udp_sink.settimeout(2)
        assert udp_sink.recv(2000) == b"y" * 1400  # the kernel reassembled the fragments
    [original] = [p for p in tun_pair.packets if p.action == "fragmented"]
    assert original.wire_len == 1428
    fragments = [p for p in tun_pair.packets if p.action == "forwarded" and p.direction == "a->b"]
    assert len(fragments) == 3 and all(p.wire_len <= 576 for p in fragments)


def test_path_mtu_rejects_bad_values(tun_pair: TunPair) -> None:
    with pytest.raises(OptionError, match="mtu"):
        tun_pair.path_mtu(20)
    with pytest.raises(OptionError, match="mtu"):
        tun_pair.path_mtu(True)  # type: ignore[arg-type]


# -- traces -----------------------------------------------------------------------------


def blast_udp(target: tuple[str, int], mbit: float, seconds: float, size: int = 1200) -> None:
    """Send size-byte datagrams at about `mbit` Mbit/s for `seconds`."""
    gap = size * 8 / (mbit * 1e6)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        start = time.monotonic()
        sent = 0
        while (now := time.monotonic()) - start < seconds:
            due = start + sent * gap
            if now < due:
                time.sleep(min(due - now, 0.002))
                continue
            client.sendto(b"z" * size, target)
            sent += 1


def receive_for(sink: socket.socket, seconds: float) -> list[tuple[float, int]]:
    out = []
    sink.settimeout(0.2)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            data = sink.recv(4096)
        except TimeoutError:
            continue
        out.append((time.monotonic(), len(data)))
    return out


def test_constant_trace_gives_its_rate(tun_pair: TunPair, udp_sink: socket.socket) -> None:
    tun_pair.impair(trace=traces.constant(12), direction="a->b")
    got: list[tuple[float, int]] = []
    receiver = threading.Thread(target=lambda: got.extend(receive_for(udp_sink, 3.2)))
    receiver.start()
    blast_udp(udp_sink.getsockname(), 16, 3.0)
    receiver.join()
    steady = [(t, n) for t, n in got if got[0][0] + 0.5 <= t <= got[0][0] + 2.5]
    goodput = sum(n for _, n in steady[1:]) * 8 / (steady[-1][0] - steady[0][0])
    # 1228 bytes on the wire per 1200 of payload.
    assert goodput == pytest.approx(12e6 * 1200 / 1228, rel=0.10)


def test_trace_gap_delivers_nothing(tun_pair: TunPair, udp_sink: socket.socket) -> None:
    # 12 Mbit/s for 300 ms, nothing for 500 ms, 12 Mbit/s for 200 ms; once.
    trace = [*range(1, 301), *range(801, 1001)]
    # Before the call: the trace's millisecond 0 is a moment inside it, no earlier than t0.
    t0 = time.monotonic() - tun_pair.packets.t0
    tun_pair.impair(trace=trace, trace_repeat=False, direction="a->b")
    blast_udp(udp_sink.getsockname(), 8, 1.0)
    delivered = [
        p.time - t0
        for p in tun_pair.packets
        if p.direction == "a->b" and p.action not in ("lost", "dropped")
    ]
    assert any(t < 0.3 for t in delivered) and any(t > 0.8 for t in delivered)
    # A packet is never written before its opportunity, but may be after it: the relay
    # thread waits for a CPU on a busy machine (tens of milliseconds on two cores at
    # HZ=250), and impair() itself may take a while after it started the trace. So the
    # gap's end is exact and its start has a margin.
    assert not [t for t in delivered if 0.4 < t < 0.79]


def test_bad_trace_names_file_and_line(tun_pair: TunPair, tmp_path: Path) -> None:
    bad = tmp_path / "bad.trace"
    bad.write_text("1\n2\nthree\n")
    with pytest.raises(OptionError, match=r"bad\.trace, line 3"):
        tun_pair.impair(trace=bad)


# -- plots ------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_plot_of_a_real_run(tun_pair: TunPair, tmp_path: Path, suffix: str) -> None:
    pytest.importorskip("matplotlib")
    tun_pair.impair(rate="20mbit", delay="5ms", direction="a->b")
    payload = b"p" * 300_000
    assert tcp_send(tun_pair.b.ip, payload) == payload
    out = tun_pair.packets.plot(tmp_path / f"run{suffix}")
    assert out == str(tmp_path / f"run{suffix}")
    data = Path(out).read_bytes()
    if suffix == ".png":
        assert data.startswith(b"\x89PNG") and len(data) > 20_000
    else:
        assert b"<svg" in data[:500]
    log = tun_pair.packets.to_mahimahi_log(tmp_path / "up.log")
    lines = Path(log).read_text().splitlines()
    assert lines[4] == "# base timestamp: 0"
    assert sum(" - " in line for line in lines) == sum(
        p.action == "delayed" for p in tun_pair.packets if p.direction == "a->b"
    )


def test_offload_is_off_while_a_rule_is_set(tun_pair: TunPair) -> None:
    assert tun_pair.b.ip is not None
    fault = tun_pair.fail(dport=1)  # never matches: only its presence counts
    payload = b"o" * 2_000_000
    assert tcp_send(tun_pair.b.ip, payload) == payload
    assert max(p.wire_len for p in tun_pair.packets) <= 1500  # no GSO super-packets
    fault.remove()
    tun_pair.packets.clear()
    assert tcp_send(tun_pair.b.ip, payload) == payload
    assert max(p.wire_len for p in tun_pair.packets) > 1500  # offload back on


def test_mahimahi_log_of_a_trace_run(
    tun_pair: TunPair, udp_sink: socket.socket, tmp_path: Path
) -> None:
    tun_pair.impair(trace=[10, 20], direction="a->b")  # one opportunity every 10 ms
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        for _ in range(5):
            client.sendto(b"m" * 1000, udp_sink.getsockname())
        udp_sink.settimeout(2)
        for _ in range(5):
            udp_sink.recv(2000)
    lines = Path(tun_pair.packets.to_mahimahi_log(tmp_path / "up.log")).read_text().splitlines()
    events = [line.split() for line in lines if not line.startswith("#")]
    assert sum(e[1] == "+" for e in events) == 5
    departures = [int(e[0]) for e in events if e[1] == "-"]
    opportunities = [int(e[0]) for e in events if e[1] == "#"]
    assert len(departures) == 5 and len(opportunities) >= 4
    assert min(departures) >= opportunities[0]  # nothing leaves before the first one
    assert all(b - a in (9, 10, 11) for a, b in itertools.pairwise(opportunities))
