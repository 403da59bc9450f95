"""``tun_pair.packets`` as an assertion surface, over real traffic through real devices."""

from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import pytest

import pytest_tunpair
from pytest_tunpair import Capture, Packet, PacketTimeout, TunPair
from pytest_tunpair._options import DEFAULT_CAPTURE_BYTES

from . import pcapng_read
from .conftest import need, run_standalone, tcpdump_read

# Generous: these bound how long a test may hang, they do not measure anything.
WAIT = 10.0
# wait_for must give up no later than its timeout plus this (scheduling on a busy machine).
TIMEOUT_MARGIN = 1.5


def _ping(pair_ip: str, count: int = 1, *extra: str) -> None:
    need("ping")
    subprocess.run(
        ["ping", "-c", str(count), "-i", "0.2", "-W", "2", *extra, pair_ip],
        check=True,
        capture_output=True,
    )


def _udp_send(src: str, dst: str, payloads: Sequence[bytes], port: int = 9) -> None:
    family = socket.AF_INET6 if ":" in src else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind((src, 0))
        for p in payloads:
            s.sendto(p, (dst, port))


@pytest.fixture
def udp_echo(tun_pair: TunPair) -> Iterator[tuple[str, int]]:
    """A UDP echo server on b (in the test's namespace, since it depends on tun_pair)."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind((tun_pair.b.ip, 0))
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, peer = srv.recvfrom(65535)
            except TimeoutError:
                continue
            srv.sendto(data, peer)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()
    stop.set()
    t.join(WAIT)
    srv.close()


def _tcp_transfer(pair: TunPair, nbytes: int) -> int:
    """Send ``nbytes`` from a to b over TCP; return what b received."""
    chunk = os.urandom(1 << 20)
    received = 0
    with socket.socket() as server:
        server.bind((pair.b.ip, 0))
        server.listen(1)

        def serve() -> None:
            nonlocal received
            conn, _ = server.accept()
            with conn:
                while data := conn.recv(1 << 20):
                    received += len(data)

        t = threading.Thread(target=serve)
        t.start()
        with socket.create_connection(server.getsockname(), timeout=30) as client:
            left = nbytes
            while left:
                n = min(left, len(chunk))
                client.sendall(chunk[:n])
                left -= n
        t.join(60)
        assert not t.is_alive()
    return received


def _eventually(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not check():
        assert time.monotonic() < deadline, f"not within {WAIT} s: {what}"
        time.sleep(0.01)


class _Flood:
    """UDP a->b from a background thread until stopped: traffic that never ends."""

    def __init__(self, pair: TunPair) -> None:
        self.pair = pair
        self.stop = threading.Event()
        self.sent = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((self.pair.a.ip, 0))
            while not self.stop.is_set():
                s.sendto(b"flood", (self.pair.b.ip, 9))
                self.sent += 1
                # Pace it a little so the ICMP errors do not hit the kernel's rate limit
                # and the relay is busy without starving the test thread.
                time.sleep(0.001)

    def __enter__(self) -> _Flood:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(WAIT)


# -- the sequence ----------------------------------------------------------------------------
def test_packets_is_a_live_sequence(tun_pair: TunPair) -> None:
    packets = tun_pair.packets
    assert isinstance(packets, Sequence) and isinstance(packets, Capture)
    assert len(packets) == 0 and not packets
    _ping(tun_pair.b.ip, 3)
    assert len(packets) == 6 and packets
    assert [p.direction for p in packets] == ["a->b", "b->a"] * 3
    assert all(isinstance(p, Packet) and p.action == "forwarded" for p in packets)
    first, last = packets[0], packets[-1]
    assert first.direction == "a->b" and last.direction == "b->a"
    middle = packets[1:3]
    assert isinstance(middle, list) and [p.seq for p in middle] == [1, 2]
    assert packets.index(last) == 5 and last in packets
    assert [p.seq for p in reversed(packets)] == [5, 4, 3, 2, 1, 0]
    times = [p.time for p in packets]
    assert times == sorted(times) and times[0] >= 0
    # The record keeps the bytes as the kernel sent them.
    from scapy.layers.inet import ICMP, IP

    assert first.scapy[IP].dst == tun_pair.b.ip and first.scapy[ICMP].type == 8
    assert len(first) == len(first.data) == 84


def test_a_reply_the_receiver_got_is_already_captured(tun_pair: TunPair, udp_echo) -> None:
    # The relay records a packet before handing it to the kernel: once the client has the
    # reply, the capture and the stats must hold it. Many round trips make a race show.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.bind((tun_pair.a.ip, 0))
        client.settimeout(WAIT)
        for i in range(200):
            client.sendto(b"%d" % i, udp_echo)
            assert client.recv(100) == b"%d" % i
            assert len(tun_pair.packets) == 2 * (i + 1)
            assert tun_pair.packets[-1].direction == "b->a"
            assert tun_pair.stats["b->a"]["packets"] == i + 1


def test_an_injected_packet_comes_before_its_answer(tun_pair: TunPair) -> None:
    from scapy.layers.inet import ICMP, IP

    # The kernel answers inside the inject's write(): the capture must still show the
    # question first.
    for i in range(50):
        tun_pair.packets.clear()
        sent = tun_pair.b.inject(IP(src=tun_pair.a.ip, dst=tun_pair.b.ip) / ICMP(seq=i))
        reply = tun_pair.packets.wait_for(lambda p: p.direction == "b->a", timeout=WAIT)
        assert list(tun_pair.packets) == [sent, reply]
        assert sent.action == "injected" and reply.scapy[ICMP].seq == i


def test_reading_while_the_relay_writes(tun_pair: TunPair) -> None:
    errors: list[BaseException] = []
    done = threading.Event()

    def reader() -> None:
        try:
            while not done.is_set():
                seqs = [p.seq for p in tun_pair.packets]
                # A consistent snapshot: consecutive, never a half-appended state.
                assert seqs == list(range(seqs[0], seqs[0] + len(seqs))) if seqs else True
                assert len(tun_pair.packets[-5:]) <= 5
                tun_pair.packets.filter(direction="a->b")
        except BaseException as exc:
            errors.append(exc)

    readers = [threading.Thread(target=reader) for _ in range(3)]
    for t in readers:
        t.start()
    with _Flood(tun_pair) as flood:
        # A thousand or so a second on a quiet machine; a busy one starves the flood thread.
        tun_pair.packets.wait_for(lambda p: p.seq >= 500, timeout=6 * WAIT)
    done.set()
    for t in readers:
        t.join(WAIT)
    assert not errors, errors
    assert flood.sent > 0
    seqs = [p.seq for p in tun_pair.packets]
    assert seqs == list(range(len(seqs)))


# -- wait_for ---------------------------------------------------------------------------------
def test_wait_for_finds_a_packet_captured_already(tun_pair: TunPair) -> None:
    _ping(tun_pair.b.ip)
    reply = tun_pair.packets.wait_for(lambda p: p.direction == "b->a", timeout=0)
    assert reply is tun_pair.packets[1]


def test_wait_for_wakes_on_a_late_packet(tun_pair: TunPair) -> None:
    from scapy.layers.inet import UDP

    _ping(tun_pair.b.ip)  # something that does not match, captured before the wait
    sender = threading.Timer(0.3, _udp_send, (tun_pair.a.ip, tun_pair.b.ip, [b"late"]))
    start = time.monotonic()
    sender.start()
    try:
        pkt = tun_pair.packets.wait_for(
            lambda p: UDP in p.scapy and bytes(p.scapy[UDP].payload) == b"late", timeout=60
        )
    finally:
        sender.join(WAIT)
    waited = time.monotonic() - start
    assert pkt.direction == "a->b" and pkt.seq == 2
    # Woken by the packet, not by running out its 60 s (a generous bound, no timing claim).
    assert waited < 30


def test_wait_for_accepts_a_scapy_layer(tun_pair: TunPair) -> None:
    from scapy.layers.inet import UDP

    _ping(tun_pair.b.ip)
    _udp_send(tun_pair.a.ip, tun_pair.b.ip, [b"x"])
    pkt = tun_pair.packets.wait_for(UDP, timeout=WAIT)
    assert pkt.scapy.haslayer(UDP) and pkt.seq == 2


def test_wait_for_times_out_within_its_timeout(tun_pair: TunPair) -> None:
    _ping(tun_pair.b.ip)
    start = time.monotonic()
    with pytest.raises(PacketTimeout) as info:
        tun_pair.packets.wait_for(lambda p: p.direction == "sideways", timeout=0.5)
    waited = time.monotonic() - start
    assert 0.5 <= waited < 0.5 + TIMEOUT_MARGIN
    assert isinstance(info.value, AssertionError)
    message = str(info.value)
    # It says what it waited for and lists what *was* captured.
    assert "no packet matched" in message and "within 0.5 s" in message
    assert "2 captured" in message
    assert "echo-request" in message and "echo-reply" in message
    assert info.value.packets == list(tun_pair.packets)  # for code that inspects it


def test_wait_for_times_out_under_steady_traffic(tun_pair: TunPair) -> None:
    # New packets keep arriving; the deadline must hold anyway.
    with _Flood(tun_pair):
        tun_pair.packets.wait_for(lambda p: p.direction == "a->b", timeout=WAIT)
        start = time.monotonic()
        with pytest.raises(PacketTimeout):
            tun_pair.packets.wait_for(lambda p: False, timeout=0.5)
        waited = time.monotonic() - start
    assert 0.5 <= waited < 0.5 + TIMEOUT_MARGIN


def test_wait_for_timeout_lists_a_capped_trace(tun_pair: TunPair) -> None:
    _udp_send(tun_pair.a.ip, tun_pair.b.ip, [b"%d" % i for i in range(100)])
    _eventually(lambda: len(tun_pair.packets) >= 100, "100 datagrams captured")
    with pytest.raises(PacketTimeout) as info:
        tun_pair.packets.wait_for(lambda p: False, timeout=0)
    lines = str(info.value).splitlines()
    assert any(re.fullmatch(r"… \d+ more", line) for line in lines)
    assert len(lines) <= 1 + 30 + 1


def test_wait_for_rejects_what_it_cannot_use(tun_pair: TunPair) -> None:
    with pytest.raises(TypeError, match="a predicate"):
        tun_pair.packets.wait_for("b->a")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout"):
        tun_pair.packets.wait_for(lambda p: True, timeout=-1)


def test_packet_timeout_is_exported() -> None:
    assert pytest_tunpair.PacketTimeout is PacketTimeout
    assert "PacketTimeout" in pytest_tunpair.__all__
    assert issubclass(PacketTimeout, AssertionError)
    assert issubclass(PacketTimeout, pytest_tunpair.TunPairError)


# -- filter, clear, summary ------------------------------------------------------------------
def test_filter_by_layers_and_direction(tun_pair: TunPair) -> None:
    from scapy.layers.inet import ICMP, TCP, UDP
    from scapy.layers.inet6 import IPv6

    _ping(tun_pair.b.ip)
    with socket.socket() as server:
        server.bind((tun_pair.b.ip, 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=WAIT):
            server.accept()[0].close()
    _ping(tun_pair.b.ip6)
    packets = tun_pair.packets
    _eventually(lambda: len(packets.filter(IPv6)) == 2, "the IPv6 ping captured")

    tcp = packets.filter(TCP)
    assert tcp and all(TCP in p.scapy for p in tcp)
    syn_ack = packets.filter(TCP, direction="b->a")[0]
    assert syn_ack.scapy[TCP].flags == "SA"
    assert all(p.direction == "a->b" for p in packets.filter(TCP, direction="a->b"))
    assert len(packets.filter(ICMP)) == 2  # IPv4 ping only: ICMPv6 is another layer
    assert [p.direction for p in packets.filter(IPv6)] == ["a->b", "b->a"]
    assert packets.filter(TCP, UDP) == []
    assert packets.filter("TCP") == tcp  # layer names work too
    assert packets.filter() == list(packets)
    with pytest.raises(ValueError, match="direction"):
        packets.filter(TCP, direction="a-b")


def test_clear_forgets_and_the_relay_keeps_recording(tun_pair: TunPair) -> None:
    _ping(tun_pair.b.ip, 2)
    assert len(tun_pair.packets) == 4
    stats = tun_pair.stats
    tun_pair.packets.clear()
    assert len(tun_pair.packets) == 0 and tun_pair.packets.nbytes == 0
    assert tun_pair.packets.summary() == "(no packets)"
    assert tun_pair.stats == stats  # the counters are not the capture
    _ping(tun_pair.b.ip)
    assert [p.direction for p in tun_pair.packets] == ["a->b", "b->a"]
    assert tun_pair.stats["a->b"]["packets"] == 3
    # wait_for sees only what is left and what comes.
    with pytest.raises(PacketTimeout, match="2 captured"):
        tun_pair.packets.wait_for(lambda p: p.seq < 4, timeout=0)


def test_summary_reads_like_tcpdump(tun_pair: TunPair) -> None:
    _ping(tun_pair.b.ip)
    _ping(tun_pair.b.ip6)
    lines = tun_pair.packets.summary().splitlines()
    assert len(lines) == 4
    line = re.compile(r" *(\d+\.\d{6}) (a->b|b->a) (forwarded) +(\S.*), length (\d+)")
    parsed = [line.fullmatch(text) for text in lines]
    assert all(parsed), lines
    assert [m.group(2) for m in parsed if m] == ["a->b", "b->a", "a->b", "b->a"]
    assert "198.18.0.1 > 198.18.0.2 echo-request" in lines[0]
    assert "Echo Reply" in lines[3]
    assert [int(m.group(5)) for m in parsed if m] == [84, 84, 104, 104]
    times = [float(m.group(1)) for m in parsed if m]
    assert times == sorted(times)
    assert tun_pair.packets.summary(limit=2).splitlines()[1] == "… 2 more"


# -- pcap ------------------------------------------------------------------------------------
def _tcpdump(path: object, *args: str) -> subprocess.CompletedProcess[str]:
    __tracebackhide__ = True
    out = tcpdump_read(path, *args)
    assert out.returncode == 0, out.stderr
    return out


def _pcap_records(path: object) -> tuple[tuple[int, ...], list[tuple[int, int, int, int]]]:
    with open(str(path), "rb") as f:
        data = f.read()
    header = struct.unpack_from("=IHHiIII", data)
    records, off = [], 24
    while off < len(data):
        sec, usec, incl, orig = struct.unpack_from("=IIII", data, off)
        records.append((sec, usec, incl, orig))
        off += 16 + incl
    return header, records


def test_to_pcap_mixes_ipv4_and_ipv6_and_tcpdump_reads_it(tun_pair: TunPair, tmp_path) -> None:
    before = time.time()
    _ping(tun_pair.b.ip)
    _ping(tun_pair.b.ip6)
    _udp_send(tun_pair.a.ip6, tun_pair.b.ip6, [b"six"])
    _eventually(lambda: len(tun_pair.packets) == 6, "pings and the datagram captured")
    after = time.time()
    path = tun_pair.packets.to_pcap(tmp_path / "mixed.pcap")
    assert path == str(tmp_path / "mixed.pcap")

    out = _tcpdump(path, "-tt")
    assert "link-type RAW" in out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 6
    assert "IP 198.18.0.1 > 198.18.0.2: ICMP echo request" in lines[0]
    assert "IP 198.18.0.2 > 198.18.0.1: ICMP echo reply" in lines[1]
    assert "IP6 2001:2::1 > 2001:2::2: ICMP6, echo request" in lines[2]
    assert "IP6 2001:2::2 > 2001:2::1: ICMP6, echo reply" in lines[3]
    assert "IP6 2001:2::1." in lines[4] and "UDP, length 3" in lines[4]
    # Wall-clock timestamps, in capture order, matching Packet.time.
    stamps = [float(line.split()[0]) for line in lines]
    assert stamps == sorted(stamps)
    assert before - 0.01 <= stamps[0] and stamps[-1] <= after + 0.01
    for stamp, pkt in zip(stamps, tun_pair.packets, strict=True):
        assert stamp - stamps[0] == pytest.approx(pkt.time - tun_pair.packets[0].time, abs=2e-6)


@pytest.mark.tunpair(mode="tap", ipv6=None)
def test_to_pcap_of_a_tap_pair_is_ethernet(tun_pair: TunPair, tmp_path) -> None:
    _ping(tun_pair.b.ip)
    path = tun_pair.packets.to_pcap(tmp_path / "tap.pcap", format="pcap")
    out = _tcpdump(path, "-e")
    assert "link-type EN10MB (Ethernet)" in out.stderr
    assert f"{tun_pair.a.mac} > ff:ff:ff:ff:ff:ff, ethertype ARP" in out.stdout
    assert f"{tun_pair.a.mac} > {tun_pair.b.mac}, ethertype IPv4" in out.stdout
    assert "ICMP echo reply" in out.stdout
    header, records = _pcap_records(path)
    assert header[6] == 1 and len(records) == len(out.stdout.splitlines())


def test_capture_is_readable_after_the_pair_closed(tmp_path) -> None:
    def ping_once() -> TunPair:
        with TunPair(ipv6=None) as pair:
            _ping(pair.b.ip)
        return pair

    pair = run_standalone(ping_once)
    assert len(pair.packets) == 2
    assert "echo-reply" in pair.packets.summary()
    _tcpdump(pair.packets.to_pcap(tmp_path / "closed.pcap"))
    assert pair.stats["b->a"]["packets"] == 1


# -- bounds ----------------------------------------------------------------------------------
@pytest.mark.tunpair(snaplen=64)
def test_snaplen_cuts_the_record_not_the_packet(tun_pair: TunPair, udp_echo, tmp_path) -> None:
    payload = os.urandom(1000)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.bind((tun_pair.a.ip, 0))
        client.settimeout(WAIT)
        client.sendto(payload, udp_echo)
        assert client.recv(2000) == payload  # the relay forwarded it whole, both ways
    assert len(tun_pair.packets) == 2
    for pkt in tun_pair.packets:
        assert len(pkt.data) == 64 and len(pkt) == 1028
        assert "length 1028 [64 kept]" in pkt.summary()
    assert tun_pair.stats["a->b"]["bytes"] == 1028
    path = tun_pair.packets.to_pcap(tmp_path / "snap.pcap", format="pcap")
    header, records = _pcap_records(path)
    assert header[5] == 64  # the file's snapshot length
    assert [(r[2], r[3]) for r in records] == [(64, 1028), (64, 1028)]
    assert "UDP, length 1000" in _tcpdump(path).stdout
    # pcapng: the same lengths, and the comment says what was kept.
    ng = pcapng_read.read(tun_pair.packets.to_pcap(tmp_path / "snap.pcapng"))
    assert [i.snaplen for i in ng.interfaces] == [64, 64]
    assert [(r.caplen, r.wire_len) for r in ng.packets] == [(64, 1028), (64, 1028)]
    assert all("64 of 1028 bytes kept (snaplen)" in r.comment for r in ng.packets)
    assert "UDP, length 1000" in _tcpdump(tmp_path / "snap.pcapng").stdout


@pytest.mark.tunpair(max_packets=50)
def test_max_packets_keeps_the_newest_under_a_multi_mb_transfer(tun_pair: TunPair) -> None:
    assert _tcp_transfer(tun_pair, 8 << 20) == 8 << 20
    packets = tun_pair.packets
    assert len(packets) == 50
    assert tun_pair.stats["a->b"]["bytes"] > 8 << 20  # stats count everything
    total = lambda: sum(s["packets"] + s["dropped"] for s in tun_pair.stats.values())  # noqa: E731
    _eventually(lambda: packets.evicted + len(packets) == total(), "every packet accounted for")
    assert packets.evicted > 0
    seqs = [p.seq for p in packets]
    assert seqs[0] > 0 and seqs == list(range(seqs[0], seqs[0] + 50))  # the newest, in order
    assert re.match(r"… \d+ older packets not kept \(capture bound\)\n", packets.summary())


@pytest.mark.tunpair(capture_bytes=256 * 1024)
def test_capture_bytes_bounds_the_record_under_a_multi_mb_transfer(tun_pair: TunPair) -> None:
    assert _tcp_transfer(tun_pair, 8 << 20) == 8 << 20
    packets = tun_pair.packets
    assert 0 < packets.nbytes <= 256 * 1024
    assert packets.evicted > 0
    assert tun_pair.stats["a->b"]["bytes"] > 8 << 20


def test_default_byte_budget_bounds_a_big_transfer(tun_pair: TunPair) -> None:
    assert tun_pair.packets.capture_bytes == DEFAULT_CAPTURE_BYTES == 64 * 1024 * 1024
    assert tun_pair.packets.max_packets is None and tun_pair.packets.snaplen is None
    assert _tcp_transfer(tun_pair, 80 << 20) == 80 << 20
    assert tun_pair.packets.nbytes <= DEFAULT_CAPTURE_BYTES
    assert tun_pair.packets.evicted > 0
    assert tun_pair.stats["a->b"]["bytes"] > 80 << 20
    assert tun_pair.packets[-1].seq > tun_pair.packets[0].seq
