"""The relay's C core (``_link/_core.c``) over real traffic: what a test sees is what the
Python loop gives -- every packet captured before anyone can see it arrive, the counters,
delays, the queue's bound -- and the core hands over to the Python loop, losing nothing,
whenever something it does not carry is configured."""

from __future__ import annotations

import importlib.util
import os
import socket
import threading
import time
from collections.abc import Callable

import pytest

from pytest_tunpair import TunPair, TunPairFactory
from pytest_tunpair._link import core as _core
from pytest_tunpair._plugin import keys

# Built, whatever TUNPAIR_RELAY says (each test sets it).
BUILT = importlib.util.find_spec("pytest_tunpair._link._core") is not None


@pytest.fixture(params=["core", "python"])
def loop(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test twice: the relay's C core, then its Python loop (``TUNPAIR_RELAY``)."""
    if request.param == "core" and not BUILT:
        if os.environ.get("TUNPAIR_CI_TOOLS") == "1":
            pytest.fail(f"CI builds the C core, but {_core.describe()}", pytrace=False)
        pytest.skip(_core.describe())
    if request.param == "python":
        monkeypatch.setenv(_core.CORE_ENV, "python")
    else:
        monkeypatch.delenv(_core.CORE_ENV, raising=False)
    return str(request.param)


@pytest.fixture
def pair(loop: str, tun_pair_factory: TunPairFactory) -> TunPair:
    """A pair made after ``loop`` chose the relay's loop (the relay reads it at start)."""
    p = tun_pair_factory(ipv6=None)
    relay = p._relay
    assert relay is not None
    assert (relay._core is not None) == (loop == "core")
    return p


def _sockets(pair: TunPair) -> tuple[socket.socket, socket.socket]:
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    a.bind((pair.a.ip or "", 0))
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b.bind((pair.b.ip or "", 0))
    b.settimeout(10)
    a.settimeout(10)
    return a, b


def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def _payloads(pair: TunPair, direction: str) -> list[bytes]:
    return [bytes(p.payload) for p in pair.packets if p.direction == direction and p.proto == "udp"]


def test_a_plain_pair_records_every_packet_before_it_arrives(pair: TunPair) -> None:
    """200 echoes: each reply is already in the capture when the test reads it from its
    socket; the counters agree with the capture; nothing is reordered."""
    a, b = _sockets(pair)
    with a, b:
        for i in range(200):
            a.sendto(b"ping %d" % i, b.getsockname())
            _data, peer = b.recvfrom(100)
            b.sendto(b"pong %d" % i, peer)
            assert a.recv(100) == b"pong %d" % i
            # Received, hence recorded: the reply is the last packet of the capture.
            assert bytes(pair.packets[-1].payload) == b"pong %d" % i
    assert _payloads(pair, "a->b") == [b"ping %d" % i for i in range(200)]
    assert _payloads(pair, "b->a") == [b"pong %d" % i for i in range(200)]
    seqs = [p.seq for p in pair.packets]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert {p.action for p in pair.packets} == {"forwarded"}
    stats = pair.stats
    for direction in ("a->b", "b->a"):
        mine = [p for p in pair.packets if p.direction == direction]
        assert stats[direction]["packets"] == len(mine)
        assert stats[direction]["bytes"] == sum(p.wire_len for p in mine)


def test_a_wait_wakes_while_the_core_relays(pair: TunPair, loop: str) -> None:
    """``wait_for`` sleeps on the capture; a packet the core records wakes it (the core
    is told that someone waits)."""
    a, b = _sockets(pair)
    relay = pair._relay
    assert relay is not None
    seen_running: list[bool] = []

    def later() -> None:
        time.sleep(0.3)
        if relay._core is not None:
            seen_running.append(bool(relay._core.running))
        a.sendto(b"wake up", b.getsockname())

    with a, b:
        sender = threading.Thread(target=later)
        sender.start()
        pkt = pair.packets.wait_for(lambda p: p.proto == "udp", timeout=10)
        sender.join()
        assert bytes(pkt.payload) == b"wake up"
    if loop == "core":
        assert seen_running == [True]


def test_a_delay_holds_each_packet_for_it_in_order(pair: TunPair) -> None:
    pair.impair(delay="30ms")
    a, b = _sockets(pair)
    with a, b:
        for i in range(20):
            a.sendto(b"%d" % i, b.getsockname())
            time.sleep(0.005)
        got = [b.recv(100) for _ in range(20)]
    assert got == [b"%d" % i for i in range(20)]
    sent = [p for p in pair.packets if p.direction == "a->b" and p.proto == "udp"]
    assert [p.action for p in sent] == ["delayed"] * 20
    # Never early; late only by what a busy 2-core machine adds.
    assert all(0.030 <= p.sojourn < 0.030 + 0.5 for p in sent), [p.sojourn for p in sent]
    assert pair.stats["a->b"]["packets"] == len([p for p in pair.packets if p.direction == "a->b"])


def test_a_delay_counts_from_the_moment_the_packet_entered_the_device(
    pair: TunPair, loop: str, pytestconfig: pytest.Config
) -> None:
    """In the core, a delayed packet's ``arrival`` is the kernel's stamp of its entering the
    source device -- inside the sender's ``sendto()`` -- not the relay's later read: it
    falls between the moments just before and just after the call, and the delay is
    counted from it. The Python loop stamps the read, after the call began."""
    # The next test's spare, built meanwhile, opens fds of its own: counted once it is built.
    pool = pytestconfig.stash.get(keys.SPARES, None)
    assert pool is None or pool.wait_idle(30.0)
    fds = set(os.listdir("/proc/self/fd"))
    relay = pair._relay
    assert relay is not None
    pair.impair(delay="20ms")
    if loop == "core":
        # Set up on a thread of the relay's (~15 ms): until then, the read times.
        _until(lambda: bool(relay._core.stamps[0][0]))
    a, b = _sockets(pair)
    t0 = pair.packets.t0
    spans: list[tuple[float, float]] = []
    with a, b:
        for i in range(30):
            before = time.monotonic() - t0
            a.sendto(b"%d" % i, b.getsockname())
            spans.append((before, time.monotonic() - t0))
            assert b.recv(100) == b"%d" % i
            time.sleep(0.002)  # the relay thread goes back to sleep in between
    sent = [p for p in pair.packets if p.direction == "a->b" and p.proto == "udp"]
    assert len(sent) == 30
    for p, (before, after) in zip(sent, spans, strict=True):
        assert p.action == "delayed"
        assert p.sojourn >= 0.020
        assert p.arrival >= before
        if loop == "core":
            assert p.arrival <= after, (p.arrival - before, after - before)
    if loop == "core":
        (on, stamped, _missed), _b_to_a = relay._core.stamps
        assert on and stamped >= 30
    # The stamp sockets are closed with the pair; their rings go on a thread of their own.
    pair.close()
    assert set(os.listdir("/proc/self/fd")) <= fds
    assert _core.join_releases()
    if loop == "core":
        assert relay._core.stamps[0][0] == 0


def test_the_bound_of_a_delayed_direction_drops_what_arrives_over_it(pair: TunPair) -> None:
    """Drop-tail: with ``limit=5`` packets held, a burst of 20 keeps its first 5."""
    pair.impair(delay="300ms", limit=5, direction="a->b")
    a, b = _sockets(pair)
    with a, b:
        for i in range(20):
            a.sendto(b"%d" % i, b.getsockname())
        got = [b.recv(100) for _ in range(5)]
        b.settimeout(0.5)
        with pytest.raises(TimeoutError):
            b.recv(100)
    assert got == [b"%d" % i for i in range(5)]
    sent = [p for p in pair.packets if p.direction == "a->b" and p.proto == "udp"]
    assert [p.action for p in sent].count("dropped") == 15
    assert pair.stats["a->b"]["dropped"] == 15
    assert pair.stats["a->b"]["queue_peak"] == 5


def test_a_hook_added_while_packets_are_held_loses_none(pair: TunPair) -> None:
    """The core hands what it holds to the Python loop when a hook arrives: those packets
    leave on time, unhooked; every packet read after ``add_hook`` goes through the hook."""
    pair.impair(delay="300ms", direction="a->b")
    a, b = _sockets(pair)
    hooked: list[bytes] = []
    with a, b:
        for i in range(5):
            a.sendto(b"%d" % i, b.getsockname())
        _until(lambda: pair.pending == 5)  # read, and held
        pair.add_hook(
            lambda p: hooked.append(p.payload or b"") if p.proto == "udp" else None, "a->b"
        )
        for i in range(5, 10):
            a.sendto(b"%d" % i, b.getsockname())
        got = [b.recv(100) for _ in range(10)]
    assert got == [b"%d" % i for i in range(10)]
    assert hooked == [b"%d" % i for i in range(5, 10)]
    sent = [p for p in pair.packets if p.direction == "a->b" and p.proto == "udp"]
    assert all(p.sojourn >= 0.3 for p in sent), [p.sojourn for p in sent]
    assert pair.stats["a->b"]["dropped"] == 0


def test_closing_with_packets_held_records_them_dropped(pair: TunPair) -> None:
    pair.impair(delay="5s", direction="a->b")
    a, b = _sockets(pair)
    with a, b:
        for i in range(3):
            a.sendto(b"%d" % i, b.getsockname())
        _until(lambda: pair.pending == 3)
        pair.close(drain=False)
    sent = [p for p in pair.packets if p.direction == "a->b" and p.proto == "udp"]
    assert [(bytes(p.payload or b""), p.action) for p in sent] == [
        (b"%d" % i, "dropped") for i in range(3)
    ]
    assert pair.stats["a->b"]["dropped"] == 3


def test_tcp_through_a_delay_with_offload_counts_super_packets_whole(pair: TunPair) -> None:
    """With offload on, GSO super-packets cross a delayed direction whole (the bound counts
    their segments); the bytes arrive intact and the capture holds them all."""
    pair.impair(delay="2ms")
    payload = os.urandom(4 << 20)
    with socket.create_server((pair.b.ip or "", 0)) as server:
        client = socket.create_connection(server.getsockname(), timeout=30)
        conn, _ = server.accept()
        conn.settimeout(30)
        with client, conn:
            sender = threading.Thread(target=client.sendall, args=(payload,))
            sender.start()
            got = bytearray()
            while len(got) < len(payload):
                chunk = conn.recv(1 << 20)
                assert chunk
                got += chunk
            sender.join()
    assert bytes(got) == payload
    pair.packets.wait_quiet(idle=0.3)  # the closing FINs and ACKs, counted and captured
    carried = sum(p.wire_len for p in pair.packets if p.direction == "a->b")
    assert pair.stats["a->b"]["bytes"] == carried > len(payload)
