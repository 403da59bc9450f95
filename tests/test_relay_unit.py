"""The relay's logic without root: socket pairs stand in for the two devices.

A ``SOCK_SEQPACKET`` socket pair keeps message boundaries, as a TUN fd does: the relay reads
and writes one end (its "device"); the test sends into and receives from the other end (the
kernel's side). Everything here runs in milliseconds, in any sandbox.
"""

from __future__ import annotations

import select
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pytest_tunpair._errors import HookError
from pytest_tunpair._kernel.timer import Timer
from pytest_tunpair._link import relay as _relay
from pytest_tunpair._link.control import Direction
from pytest_tunpair._link.counters import Stats
from pytest_tunpair._link.impair import ImpairmentEngine, ImpairmentSpec
from pytest_tunpair._link.link import Verdict
from pytest_tunpair._link.queue import LinkQueue, PacketQueue, QueueSpec, RateServer
from pytest_tunpair._link.relay import Hook, Relay
from pytest_tunpair._packets.capture import Capture
from pytest_tunpair._packets.packet import Packet

WAIT = 5.0


class FakeDevice:
    """What the relay needs of a device: ``fd``, ``name``, ``mode``, ``hdr_len``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.mode = "tun"
        self.hdr_len = 0
        self.relay_end, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.relay_end.setblocking(False)
        self.fd: int | None = self.relay_end.fileno()

    def send(self, data: bytes) -> None:
        """The kernel hands the device a packet: the relay reads it."""
        self.peer.send(data)

    def recv(self, timeout: float = WAIT) -> bytes:
        """What the relay wrote into the device (the kernel receives it)."""
        self.peer.settimeout(timeout)
        return self.peer.recv(1 << 17)

    def nothing_more(self, wait: float = 0.05) -> bool:
        self.peer.settimeout(wait)
        try:
            self.peer.recv(1 << 17)
        except TimeoutError:
            return True
        return False

    def close(self) -> None:
        self.fd = None
        self.relay_end.close()
        self.peer.close()


class Rig:
    def __init__(self) -> None:
        self.a = FakeDevice("fa")
        self.b = FakeDevice("fb")
        self.capture = Capture()
        self.stats = Stats(self.capture.lock)
        self.relay = Relay(self.a, self.b, self.capture, self.stats)

    def errors(self) -> list[BaseException]:
        return self.relay.take_errors()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    r.relay.start()
    try:
        yield r
    finally:
        r.relay.stop()
        errors = r.relay.take_errors()
        r.a.close()
        r.b.close()
    assert not errors, errors


def numbered(i: int, size: int = 100) -> bytes:
    return i.to_bytes(4, "big") + bytes(size - 4)


def number(data: bytes) -> int:
    return int.from_bytes(data[:4], "big")


def wait_until(cond: Callable[[], Any], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.001)


# -- fast path ---------------------------------------------------------------------------------


def test_a_backlog_is_forwarded_in_batches_in_order() -> None:
    r = Rig()
    n = _relay.BURST * 3 + 5  # several bursts of several batches
    for i in range(n):
        r.a.send(numbered(i))
    for i in range(7):
        r.b.send(numbered(1000 + i))
    r.relay.start()
    try:
        assert [number(r.b.recv()) for _ in range(n)] == list(range(n))
        assert [number(r.a.recv()) for _ in range(7)] == list(range(1000, 1007))
        wait_until(lambda: len(r.capture) == n + 7)
        packets = list(r.capture)
        assert [p.seq for p in packets] == list(range(n + 7))
        assert {p.action for p in packets} == {"forwarded"}
        ab = [number(p.data) for p in packets if p.direction == "a->b"]
        assert ab == list(range(n))
        assert all(p.arrival == p.time and p.sojourn == 0 for p in packets)
        assert r.stats.as_dict() == {
            "a->b": {"packets": n, "bytes": n * 100, "dropped": 0, "marked": 0, "queue_peak": 0},
            "b->a": {"packets": 7, "bytes": 700, "dropped": 0, "marked": 0, "queue_peak": 0},
        }
        assert r.relay.pending() == 0
    finally:
        r.relay.stop()
        r.a.close()
        r.b.close()
    assert not r.errors()


def test_a_reader_never_sees_an_action_change() -> None:
    r = Rig()
    # The relay's end of b takes one 7000-byte packet, then refuses more (EAGAIN) until the
    # receiver reads: the first write of a batch succeeds and wakes the receiver, the
    # second fails.
    r.b.relay_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4000)
    seen: list[tuple[int, str]] = []

    def receiver() -> None:
        # Woken by the first write, while the relay goes on with the batch; not reading,
        # so the buffer stays full and the second write fails.
        select.select([r.b.peer], [], [], WAIT)
        seen.extend((p.seq, p.action) for p in r.capture)

    t = threading.Thread(target=receiver)
    t.start()
    # Queued before the relay starts, so both are read into one batch.
    r.a.send(numbered(0, 7000))
    r.a.send(numbered(1, 7000))
    r.relay.start()
    try:
        t.join(WAIT)
        assert seen == [(0, "forwarded"), (1, "dropped")]  # final when first seen
        assert [(p.seq, p.action) for p in r.capture] == seen
        assert r.stats.as_dict()["a->b"] == {
            "packets": 1,
            "bytes": 7000,
            "dropped": 1,
            "marked": 0,
            "queue_peak": 0,
        }
    finally:
        r.relay.stop()
        r.a.close()
        r.b.close()
    assert not r.errors()


def test_write_records_before_the_write_and_final(rig: Rig) -> None:
    pkt = rig.relay.write("b", b"\x45hello")
    assert rig.b.recv() == b"\x45hello"
    assert (pkt.direction, pkt.action, pkt.seq) == ("a->b", "injected", 0)
    assert pkt.arrival == pkt.time and pkt.sojourn == 0
    rig.b.fd = None  # the device is closed: the write fails and says so
    with pytest.raises(OSError):
        rig.relay.write("b", b"\x45again")
    assert [p.action for p in rig.capture] == ["injected", "dropped"]


# -- hooks -------------------------------------------------------------------------------------


def test_removing_a_hook_never_lets_later_packets_overtake(rig: Rig) -> None:
    gate = threading.Event()
    hook = Hook(lambda p: gate.wait(WAIT) and None, "a->b")
    rig.relay.add_hook(hook)
    for i in range(10):
        rig.a.send(numbered(i))
    wait_until(lambda: rig.relay.pending() >= 9)  # the worker holds them (one in the hook)
    assert rig.relay.remove_hook(hook)
    assert not rig.relay.remove_hook(hook)
    assert rig.relay.hooks("a->b") == ()
    for i in range(10, 20):
        rig.a.send(numbered(i))
    assert rig.b.nothing_more()  # the later packets wait behind the earlier ones
    gate.set()
    assert [number(rig.b.recv()) for _ in range(20)] == list(range(20))
    assert rig.relay.wait_idle(WAIT)


def test_a_hook_error_names_the_number_the_packet_gets(rig: Rig) -> None:
    seen: list[Packet] = []

    def boom(pkt: Packet) -> None:
        seen.append(pkt)
        if number(pkt.data) == 1:
            raise RuntimeError("no")

    rig.relay.add_hook(Hook(boom, None))
    for i in range(3):
        rig.a.send(numbered(i))
    assert [number(rig.b.recv()) for _ in range(2)] == [0, 2]
    assert rig.relay.sync(WAIT)
    (err,) = rig.errors()
    assert isinstance(err, HookError)
    failed = seen[1]
    assert (failed.action, failed.seq) == ("dropped", 1)
    assert f"packet #{failed.seq} " in str(err)
    assert seen[0].seq == 0 and seen[0] is rig.capture[0]  # forwarded: the very object
    assert rig.stats.as_dict()["a->b"]["dropped"] == 1


def test_back_pressure_pauses_the_device_not_the_other_direction(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_relay, "MAX_BACKLOG", 8)
    gate = threading.Event()
    rig.relay.add_hook(Hook(lambda p: gate.wait(WAIT) and None, "a->b"))
    for i in range(30):
        rig.a.send(numbered(i))
    wait_until(lambda: rig.relay.pending() == 8)
    rig.b.send(numbered(500))  # the other direction still flows
    assert number(rig.a.recv()) == 500
    assert rig.relay.pending() == 8  # the relay stopped reading a: 22 wait in the device
    gate.set()
    assert [number(rig.b.recv()) for _ in range(30)] == list(range(30))
    assert rig.relay.wait_idle(WAIT)


# -- rules and divert --------------------------------------------------------------------------


class DropOdd:
    def __init__(self, reply: bytes | None = None) -> None:
        self.reply = reply
        self.seen = 0

    def apply(self, pkt: Packet, now: float) -> Verdict | None:
        self.seen += 1
        if number(pkt.data) % 2:
            return Verdict("blocked", (self.reply,) if self.reply else ())
        return None

    def in_force(self, now: float) -> bool:
        return True

    def describe(self) -> str:
        return "drop odd"


def test_a_rule_drops_packets(rig: Rig) -> None:
    rule = DropOdd()
    rig.relay.add_rule("a->b", rule)
    assert rig.relay.rules("a->b") == (rule,)
    assert rig.relay.link_needs_segments("a->b")
    for i in range(6):
        rig.a.send(numbered(i))
    assert [number(rig.b.recv()) for _ in range(3)] == [0, 2, 4]
    wait_until(lambda: len(rig.capture) == 6)
    actions = [(number(p.data), p.action) for p in rig.capture]
    assert actions == [(i, "blocked" if i % 2 else "forwarded") for i in range(6)]
    assert rig.stats.as_dict()["a->b"] == {
        "packets": 3,
        "bytes": 300,
        "dropped": 3,
        "marked": 0,
        "queue_peak": 0,
    }
    assert rig.relay.remove_rule("a->b", rule)
    assert not rig.relay.remove_rule("a->b", rule)
    rig.a.send(numbered(7))
    assert number(rig.b.recv()) == 7
    assert rule.seen == 6


def test_a_rule_replies_into_the_source(rig: Rig) -> None:
    rig.relay.add_rule("a->b", DropOdd(reply=b"\x45reset"))
    rig.a.send(numbered(1))
    assert rig.a.recv() == b"\x45reset"  # back to the sender's side
    wait_until(lambda: len(rig.capture) == 2)
    (dropped, reply) = rig.capture
    assert (dropped.direction, dropped.action) == ("a->b", "blocked")
    assert (reply.direction, reply.action, reply.data) == ("b->a", "injected", b"\x45reset")
    assert rig.b.nothing_more()


def test_a_divert_answer_is_recorded_after_its_request(rig: Rig) -> None:
    def answer(pkt: Packet) -> bool:
        rig.relay.write("a", b"\x45answer to " + pkt.data[:4])
        return True

    rig.relay.set_divert("a->b", answer)
    rig.a.send(numbered(5))
    assert rig.a.recv() == b"\x45answer to " + numbered(5)[:4]
    wait_until(lambda: len(rig.capture) == 2)
    assert [(p.direction, p.action) for p in rig.capture] == [
        ("a->b", "scripted"),
        ("b->a", "injected"),
    ]
    assert rig.stats.as_dict()["a->b"] == {
        "packets": 1,
        "bytes": 100,
        "dropped": 0,
        "marked": 0,
        "queue_peak": 0,
    }


def test_divert_takes_packets_before_the_hooks(rig: Rig) -> None:
    hooked: list[int] = []
    rig.relay.add_hook(Hook(lambda p: hooked.append(number(p.data)), "a->b"))
    taken: list[int] = []

    def divert(pkt: Packet) -> bool:
        if number(pkt.data) >= 100:
            taken.append(number(pkt.data))
            return True
        return False

    rig.relay.set_divert("a->b", divert)
    for i in (1, 100, 2, 101):
        rig.a.send(numbered(i))
    assert [number(rig.b.recv()) for _ in range(2)] == [1, 2]
    assert rig.relay.wait_idle(WAIT)
    assert taken == [100, 101] and hooked == [1, 2]
    scripted = [number(p.data) for p in rig.capture if p.action == "scripted"]
    assert scripted == [100, 101]
    assert rig.b.nothing_more()
    rig.relay.set_divert("a->b", None)
    rig.a.send(numbered(102))
    assert number(rig.b.recv()) == 102


# -- timers, pending, wait_idle --------------------------------------------------------------------


def engine(**spec: Any) -> ImpairmentEngine:
    return ImpairmentEngine(ImpairmentSpec(**spec), 1)


def test_delayed_packets_leave_on_time(rig: Rig) -> None:
    delay = 0.0002
    rig.relay.set_engine("a->b", engine(delay=delay))
    for i in range(40):
        rig.a.send(numbered(i))
        rig.b.recv()
        time.sleep(0.001)
    errors = [p.sojourn - delay for p in rig.capture]
    assert all(p.action == "delayed" for p in rig.capture)
    assert min(errors) >= -1e-6  # never early
    # Only gross errors here (a busy 2-core machine wakes the relay late); the precision
    # itself is measured in benchmarks/run.py, the timing rows.
    assert statistics.median(errors) < 0.005, errors


def test_rate_paces_departures(rig: Rig) -> None:
    # 1000 bytes: 1 ms on the wire
    rig.relay.set_queue("a->b", PacketQueue(LinkQueue(QueueSpec(), RateServer(8e6)), 0))
    for i in range(20):
        rig.a.send(numbered(i, 1000))
    assert [number(rig.b.recv()) for _ in range(20)] == list(range(20))
    packets = list(rig.capture)
    # Packet k's last bit leaves one packet time after it arrived or after packet k-1's
    # left, whichever is later: never earlier, and late only by the relay's wake-up (only
    # gross errors are checked here; benchmarks/run.py measures the precision).
    late, free = [], 0.0
    for p in packets:
        free = max(p.arrival, free) + 0.001
        late.append(p.time - free)
    assert min(late) > -1e-6, late
    assert statistics.median(late) < 0.005, late


def test_timer_wakes_poll_at_a_sub_millisecond_deadline() -> None:
    timer = Timer()
    try:
        poller = select.poll()
        poller.register(timer.fd, select.POLLIN)
        late = []
        for _ in range(20):
            due = time.monotonic() + 0.0003
            timer.arm(due)
            assert poller.poll(1000)
            late.append(time.monotonic() - due)
            timer.ack()
            assert poller.poll(0) == []
        assert min(late) >= 0
        assert statistics.median(late) < 0.005, late
        timer.arm(time.monotonic() - 1)  # the past expires at once
        assert poller.poll(1000)
    finally:
        timer.close()


def test_pending_and_wait_idle_follow_delayed_packets(rig: Rig) -> None:
    rig.relay.set_engine("a->b", engine(delay=0.05))
    for i in range(5):
        rig.a.send(numbered(i))
    wait_until(lambda: rig.relay.pending() == 5)
    assert len(rig.capture) == 0  # not written yet, so not recorded yet
    assert rig.relay.wait_idle(WAIT)
    assert rig.relay.pending() == 0
    assert [number(rig.b.recv()) for _ in range(5)] == list(range(5))
    assert all(0.05 <= p.sojourn < 1.0 for p in rig.capture)
    rig.relay.set_engine("a->b", engine(delay=30.0))
    rig.a.send(numbered(9))
    wait_until(lambda: rig.relay.pending() == 1)
    assert not rig.relay.wait_idle(0.05)


def test_switching_the_engine_off_releases_a_held_packet(rig: Rig) -> None:
    rig.relay.set_engine("a->b", engine(reorder=1.0, delay=0.2))
    rig.a.send(numbered(1))
    wait_until(lambda: rig.relay.pending() == 1)
    rig.relay.set_engine("a->b", None)
    # Released, not lost: written at its own due time (the delay), through the timers.
    assert number(rig.b.recv()) == 1
    (pkt,) = rig.capture
    assert pkt.action == "reordered" and pkt.sojourn >= 0.2


def test_in_flight_packets_at_stop_are_recorded_dropped() -> None:
    r = Rig()
    r.relay.start()
    r.relay.set_engine("a->b", engine(delay=30.0))
    r.a.send(numbered(3))
    wait_until(lambda: r.relay.pending() == 1)
    r.relay.stop()
    r.a.close()
    r.b.close()
    (pkt,) = r.capture
    assert (pkt.action, number(pkt.data)) == ("dropped", 3)
    assert r.stats.as_dict()["a->b"] == {
        "packets": 0,
        "bytes": 0,
        "dropped": 1,
        "marked": 0,
        "queue_peak": 0,
    }
    assert not r.errors()


# -- the control side: one Direction per direction ----------------------------------------------


def _direction(rig: Rig, name: str = "a->b") -> Direction:
    return Direction(name, rig.relay, tap=False, vnet_len=0, t0=rig.capture.t0)


def test_a_direction_owns_its_impairment_and_what_the_plot_draws(rig: Rig) -> None:
    d = _direction(rig)
    assert d.spec is None and d.configured is None and not d.needs_segments
    d.impair(ImpairmentSpec(loss=1.0, seed=7), random_seed=True, start=time.monotonic())
    # Decided per wire packet in the relay: offload stays on.
    assert not d.needs_segments
    wait_until(lambda: rig.relay.links["a->b"].split)
    assert d.stream == 14  # a->b draws from 2 * seed
    assert "impair a->b: loss=100% seed=7 (picked at random" in d.describe()[0]
    rig.a.send(numbered(1))
    wait_until(lambda: len(rig.capture) == 1)
    assert rig.capture[0].action == "lost" and rig.b.nothing_more()
    d.impair(ImpairmentSpec(rate=8_000_000, seed=7), random_seed=False, start=time.monotonic())
    assert d.configured == 8_000_000 and not d.needs_segments and d.engine is None
    d.impair(ImpairmentSpec(seed=7), random_seed=True, start=time.monotonic())  # inactive
    assert d.spec is None and d.configured is None and not d.random_seed
    rig.a.send(numbered(2))
    assert number(rig.b.recv()) == 2


def test_a_direction_restores_what_a_checkpoint_remembered(rig: Rig) -> None:
    d = _direction(rig, "b->a")
    d.impair(ImpairmentSpec(loss=1.0, seed=3), random_seed=False, start=time.monotonic())
    state = d.checkpoint()
    rule = DropOdd()
    d.add_rule(rule)
    d.impair(None, random_seed=False, start=time.monotonic())
    assert d.rules == (rule,) and d.spec is None
    d.restore(state)
    assert d.rules == () and d.spec is not None and d.spec.loss == 1.0
    rig.b.send(numbered(2))
    wait_until(lambda: len(rig.capture) == 1)
    assert rig.capture[0].action == "lost"  # the restored engine runs, not the removed rule
    assert d.spent_rules(time.monotonic()) == []
