"""Pure-logic tests of the bottleneck queue: bound, disciplines, AQM against the RFCs, ECN.

No devices, no clock: times are passed in, so every expectation is exact or bounded by one
packet's service time.
"""

from __future__ import annotations

import itertools
import math
import statistics
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_tunpair._link.queue import (
    CODEL_INTERVAL,
    CODEL_TARGET,
    PIE_MAX_BURST,
    PIE_TARGET,
    LinkQueue,
    Outcome,
    PacketQueue,
    QueueSpec,
    RateServer,
)
from pytest_tunpair._packets.packet import Packet
from pytest_tunpair._wire import gso as _gso
from pytest_tunpair._wire.ecn import ecn_codepoint, set_ce
from pytest_tunpair._wire.gso import wire_size
from pytest_tunpair._wire.numbers import ECN_CE, ECN_ECT0, ECN_ECT1, ECN_NOT_ECT

# 1500-byte packets at 12 Mbit/s: exactly 1 ms of service each.
RATE = 12e6
SERVICE = 0.001
SIZE = 1500


def _checksum(header: bytes) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4(size: int = SIZE, ecn: int = ECN_NOT_ECT, ident: int = 0, proto: int = 17) -> bytes:
    """An IPv4 packet of ``size`` bytes with a valid header checksum."""
    header = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s", 0x45, ecn, size, ident, 0, 64, proto, 0, b"\n\0\0\1", b"\n\0\0\2"
        )
    )
    header[10:12] = struct.pack("!H", _checksum(bytes(header)))
    return bytes(header) + bytes(size - 20)


def ipv6(size: int = SIZE, ecn: int = ECN_NOT_ECT) -> bytes:
    tclass = ecn  # DSCP 0
    first = (6 << 28) | (tclass << 20)
    return struct.pack("!IHBB16s16s", first, size - 40, 17, 64, bytes(16), bytes(16)) + bytes(
        size - 40
    )


def feed(
    q: LinkQueue, start: float, stop: float, gap: float, make=lambda i: ipv4()
) -> list[Outcome]:
    """Offer a packet every ``gap`` seconds in ``[start, stop)``; tags count from 0."""
    outs: list[Outcome] = []
    i = 0
    t = start
    while t < stop - 1e-12:
        outs += q.enqueue(make(i), t, tag=i)
        i += 1
        t = start + i * gap
    return outs


def by(outs: list[Outcome], action: str) -> list[Outcome]:
    return [o for o in outs if o.action == action]


# -- the server and the propagation line ------------------------------------------------------


def test_rate_server_departs_when_the_last_bit_has_left() -> None:
    q = LinkQueue(QueueSpec(), RateServer(RATE))
    outs = q.enqueue(ipv4(), 10.0, latency=0.020)
    assert outs == []  # on the wire, then propagating: drop-tail knows when it is due
    assert q.deadline() == pytest.approx(10.0 + SERVICE + 0.020)
    outs = q.advance(10.0 + SERVICE)
    assert outs == []  # left the wire, now propagating
    assert q.deadline() == pytest.approx(10.0 + SERVICE + 0.020)
    (out,) = q.advance(11.0)
    assert out.action == "sent"
    assert out.departed == pytest.approx(10.001)
    assert out.time == pytest.approx(10.021)  # due: departed + latency, not "when asked"
    assert out.sojourn == 0.0
    assert q.packets == 0 and q.deadline() is None


def test_back_to_back_packets_are_spaced_by_their_serialisation_time() -> None:
    q = LinkQueue(QueueSpec(), RateServer(RATE))
    for i, size in enumerate((1500, 750, 1500)):
        q.enqueue(ipv4(size), 0.0, tag=i)
    outs = q.advance(1.0)
    assert [o.tag for o in outs] == [0, 1, 2]
    assert [o.time for o in outs] == pytest.approx([0.001, 0.0015, 0.0025])
    assert [o.sojourn for o in outs] == pytest.approx([0.0, 0.001, 0.0015])


@given(
    st.lists(st.integers(20, 9000), min_size=1, max_size=40),
    st.lists(st.floats(0, 0.01), min_size=40, max_size=40),
    st.sampled_from([1e3, 1e6, 1e9]) | st.floats(1e3, 1e10),
    st.floats(0, 1),
)
def test_rate_keeps_fifo_order_and_serialisation_spacing(
    sizes: list[int], gaps: list[float], rate: float, delay: float
) -> None:
    q = LinkQueue(QueueSpec(limit=10_000), RateServer(rate), delay=delay)
    outs: list[Outcome] = []
    t = 0.0
    arrivals = []
    for i, size in enumerate(sizes):
        t += gaps[i]
        arrivals.append(t)
        outs += q.enqueue(bytes(size), t, tag=i)
    outs += q.advance(math.inf)
    assert [o.tag for o in outs] == list(range(len(sizes)))
    previous = -math.inf
    for o, size, arrival in zip(outs, sizes, arrivals, strict=True):
        transmit = size * 8 / rate
        assert o.departed >= arrival + transmit - 1e-9
        assert o.departed - previous >= transmit * (1 - 1e-9) - 1e-9
        assert o.time == pytest.approx(o.departed + delay)
        previous = o.departed


def test_a_late_caller_does_not_shift_the_schedule() -> None:
    def run(step: float) -> list[float]:
        q = LinkQueue(QueueSpec(), RateServer(RATE))
        times: list[float] = []
        t = 0.0
        for i in range(50):
            times += [o.time for o in q.enqueue(ipv4(), i * 0.0005, latency=0.003)]
            while t + step < i * 0.0005:
                t += step
                times += [o.time for o in q.advance(t)]
        return times + [o.time for o in q.advance(math.inf)]

    assert run(0.0001) == pytest.approx(run(0.01))


def test_without_a_server_packets_only_propagate() -> None:
    q = LinkQueue(QueueSpec())
    outs = q.enqueue(ipv4(), 1.0, tag="a", latency=0.0002)
    outs += q.enqueue(ipv4(), 1.0001, tag="b", latency=0.0)
    outs += q.advance(2.0)
    assert [o.tag for o in outs] == ["b", "a"]  # different latencies may reorder (jitter)
    assert [o.time for o in outs] == pytest.approx([1.0001, 1.0002])


def test_zero_latency_without_server_is_sent_at_once() -> None:
    q = LinkQueue(QueueSpec())
    (out,) = q.enqueue(ipv4(), 5.0)
    assert out.action == "sent" and out.time == 5.0 and q.packets == 0


def test_trace_server_protocol() -> None:
    """A mahimahi-style server: opportunities every ms, 1504 bytes each, not banked."""

    class Opportunities:
        def __init__(self, period: float, per_opportunity: int) -> None:
            self.period = period
            self.bytes = per_opportunity
            self.left: dict[int, int] = {}

        def _slot(self, t: float) -> int:
            return math.ceil(round(t / self.period, 9))

        def ready(self, t: float) -> float:
            slot = self._slot(t)
            while self.left.get(slot, self.bytes) == 0:
                slot += 1
            return slot * self.period

        def finish(self, size: int, start: float) -> float:
            slot = self._slot(start)
            while True:
                avail = self.left.get(slot, self.bytes)
                if size <= avail:
                    self.left[slot] = avail - size
                    return slot * self.period
                size -= avail
                self.left[slot] = 0
                slot += 1

    q = LinkQueue(QueueSpec(), Opportunities(0.001, 1504))
    outs = q.enqueue(ipv4(1000), 0.0002, tag=0)
    outs += q.enqueue(ipv4(400), 0.0003, tag=1)  # fits in the rest of the same opportunity
    outs += q.enqueue(ipv4(1500), 0.0003, tag=2)  # 104 bytes left there: the next one too
    outs += q.enqueue(ipv4(100), 0.0107, tag=3)  # idle opportunities were not banked
    outs += q.advance(1.0)
    assert [(o.tag, round(o.time, 6)) for o in outs] == [
        (0, 0.001),
        (1, 0.001),
        (2, 0.002),
        (3, 0.011),
    ]


# -- the bound ---------------------------------------------------------------------------------


def test_droptail_drops_the_arrival() -> None:
    q = LinkQueue(QueueSpec(limit=3), RateServer(RATE))
    outs = [o for i in range(5) for o in q.enqueue(ipv4(), 0.0, tag=i)]
    assert [(o.tag, o.reason) for o in by(outs, "dropped")] == [(3, "limit"), (4, "limit")]
    assert q.packets == 3 and q.peak == 3 and q.dropped == 2
    assert [o.tag for o in q.advance(1.0)] == [0, 1, 2]


def test_drophead_drops_the_oldest_waiting_packet() -> None:
    q = LinkQueue(QueueSpec(limit=3, discipline="drophead"), RateServer(RATE))
    outs = [o for i in range(5) for o in q.enqueue(ipv4(), 0.0, tag=i)]
    # Packet 0 is on the wire already: it has left the buffer and is not taken back.
    assert [o.tag for o in by(outs, "dropped")] == [1, 2]
    assert [o.tag for o in q.advance(1.0)] == [0, 3, 4]


def test_drophead_drops_the_arrival_when_only_sent_packets_hold_the_room() -> None:
    q = LinkQueue(QueueSpec(limit=2, discipline="drophead"))
    q.enqueue(ipv4(), 0.0, tag=0, latency=1.0)
    q.enqueue(ipv4(), 0.0, tag=1, latency=1.0)
    (drop,) = q.enqueue(ipv4(), 0.0, tag=2, latency=1.0)
    assert drop.tag == 2 and drop.action == "dropped"


def test_byte_limit() -> None:
    q = LinkQueue(QueueSpec(limit=None, limit_bytes=3000), RateServer(RATE))
    outs = [o for i in range(4) for o in q.enqueue(ipv4(1000), 0.0, tag=i)]
    assert [o.tag for o in by(outs, "dropped")] == [3]
    assert q.bytes == 3000
    # A small packet that still fits is taken: the bound is in bytes, not packets.
    q2 = LinkQueue(QueueSpec(limit=None, limit_bytes=3000), RateServer(RATE))
    outs = [
        o for i, n in enumerate((1400, 1400, 300, 100)) for o in q2.enqueue(ipv4(n), 0.0, tag=i)
    ]
    assert [o.tag for o in by(outs, "dropped")] == [2]


def test_packet_and_byte_limits_together() -> None:
    q = LinkQueue(QueueSpec(limit=10, limit_bytes=2000), RateServer(RATE))
    outs = [o for i in range(20) for o in q.enqueue(ipv4(100), 0.0, tag=i)]
    assert len(by(outs, "dropped")) == 10  # packets bind first
    q = LinkQueue(QueueSpec(limit=10, limit_bytes=2000), RateServer(RATE))
    outs = [o for i in range(20) for o in q.enqueue(ipv4(500), 0.0, tag=i)]
    assert len(by(outs, "dropped")) == 16  # bytes bind first


def test_an_empty_direction_takes_a_packet_larger_than_the_bound() -> None:
    q = LinkQueue(QueueSpec(limit=4, limit_bytes=1000), RateServer(RATE))
    assert q.enqueue(ipv4(1500), 0.0, count=10) == []
    (drop,) = q.enqueue(ipv4(100), 0.0)
    assert drop.action == "dropped"


def test_the_bound_covers_propagating_packets_as_netem() -> None:
    q = LinkQueue(QueueSpec(limit=2))  # delay only
    q.enqueue(ipv4(), 0.0, latency=0.1)
    q.enqueue(ipv4(), 0.0, latency=0.1)
    assert by(q.enqueue(ipv4(), 0.05, latency=0.1), "dropped")
    assert q.enqueue(ipv4(), 0.1, latency=0.1) != []  # the first two arrived: room again
    assert q.packets == 1


def test_super_packets_count_as_their_segments() -> None:
    q = LinkQueue(QueueSpec(limit=100), RateServer(RATE))
    q.enqueue(ipv4(), 0.0, count=60)
    (drop,) = q.enqueue(ipv4(), 0.0, count=41)
    assert drop.action == "dropped" and q.packets == 60
    assert q.enqueue(ipv4(), 0.0, count=40) == []
    assert q.packets == q.peak == 100


# -- CoDel (RFC 8289) ----------------------------------------------------------------------------


def codel(**kw: object) -> LinkQueue:
    return LinkQueue(QueueSpec(limit=100_000, discipline="codel", **kw), RateServer(RATE))  # type: ignore[arg-type]


def test_codel_never_drops_a_standing_queue_below_target() -> None:
    q = codel()
    # Four packets at once, then arrivals exactly at the service rate: a standing queue of
    # ~3-4 ms, forever, just under the 5 ms target.
    outs = [o for i in range(4) for o in q.enqueue(ipv4(), 0.0, tag=-i)]
    outs += feed(q, 0.0, 3.0, SERVICE)
    outs += q.advance(math.inf)
    assert by(outs, "dropped") == []
    assert max(o.sojourn for o in outs) < CODEL_TARGET


def test_codel_first_drop_comes_one_interval_after_sojourn_went_above_target() -> None:
    q = codel()
    outs = feed(q, 0.0, 2.0, SERVICE / 2)  # 2x overload: the sojourn grows by 0.5 ms per ms
    drops = by(outs, "dropped")
    sent = by(outs + q.advance(math.inf), "sent")
    # The first head whose sojourn reached the target was dequeued at this time:
    above = min(o.arrival + o.sojourn for o in sent if o.sojourn >= CODEL_TARGET)
    assert drops[0].reason == "codel"
    assert above + CODEL_INTERVAL <= drops[0].time <= above + CODEL_INTERVAL + 2 * SERVICE


def test_codel_drop_rate_grows_with_sqrt_count() -> None:
    q = codel()
    outs = feed(q, 0.0, 3.0, SERVICE / 2)
    times = [o.time for o in by(outs, "dropped")]
    assert len(times) > 20
    # In the dropping state drop k+1 follows drop k by interval / sqrt(k) (the control
    # law), to within one dequeue (drops happen at service starts, 1 ms apart).
    for k in range(1, 20):
        gap = times[k] - times[k - 1]
        assert gap == pytest.approx(CODEL_INTERVAL / math.sqrt(k), abs=SERVICE + 1e-9), k


def test_codel_leaves_the_dropping_state_once_sojourn_is_below_target() -> None:
    q = codel()
    outs = feed(q, 0.0, 1.0, SERVICE / 2)
    assert by(outs, "dropped")
    assert q._aqm.dropping  # type: ignore[union-attr]
    # The overload ends (about half a second of backlog is left); a light load follows.
    later = q.advance(1.0 + 0.05)
    later += feed(q, 1.05, 3.0, 4 * SERVICE)
    later += q.advance(math.inf)
    sent_after = [o for o in by(later, "sent") if o.arrival >= 1.05]
    # Drops continue only while heads still see a sojourn at or above the target.
    last_drop = max((o.time for o in by(later, "dropped")), default=1.0)
    low = min(o.arrival + o.sojourn for o in by(later, "sent") if o.sojourn < CODEL_TARGET)
    assert last_drop <= low
    assert not q._aqm.dropping  # type: ignore[union-attr]
    assert all(o.sojourn < CODEL_TARGET for o in sent_after[-100:])


def test_codel_resumes_its_drop_rate_when_it_re_enters_soon() -> None:
    q = codel()
    feed(q, 0.0, 2.0, SERVICE / 2)
    aqm = q._aqm
    # Relief: the backlog drains and CoDel leaves the dropping state.
    t = 2.0
    while aqm.dropping:  # type: ignore[union-attr]
        t += SERVICE
        q.advance(t)
    count, lastcount = aqm.count, aqm.lastcount  # type: ignore[union-attr]
    assert count - lastcount > 10
    # Congestion comes back within 16 intervals of the last drop: CoDel resumes at the
    # drop rate that controlled the last episode, count - lastcount, not at 1.
    feed(q, t, t + 0.5, SERVICE / 2)
    assert aqm.dropping  # type: ignore[union-attr]
    assert aqm.lastcount == count - lastcount  # type: ignore[union-attr]


def test_codel_starts_afresh_after_a_long_quiet_period() -> None:
    q = codel()
    feed(q, 0.0, 2.0, SERVICE / 2)
    q.advance(60.0)  # far more than 16 intervals
    feed(q, 60.0, 61.0, SERVICE / 2)
    assert q._aqm.lastcount == 1  # type: ignore[union-attr]


def test_codel_does_not_drop_the_last_packet_of_a_short_queue() -> None:
    # One packet's worth waiting (RFC 8289 MAXPACKET): a slow link holding one old packet
    # has no standing queue to fight.
    q = LinkQueue(QueueSpec(discipline="codel"), RateServer(1500 * 8 / 0.3))  # 300 ms each
    outs = feed(q, 0.0, 3.0, 0.3)  # arrivals at the service rate: one waits, one on the wire
    outs += q.advance(math.inf)
    assert by(outs, "dropped") == []


def test_codel_ecn_marks_ect_packets_instead_of_dropping() -> None:
    drops = by(feed(codel(), 0.0, 2.0, SERVICE / 2), "dropped")
    q = codel(ecn=True)
    outs = feed(q, 0.0, 2.0, SERVICE / 2, make=lambda i: ipv4(ecn=ECN_ECT0))
    outs += q.advance(math.inf)
    assert by(outs, "dropped") == []
    marked = by(outs, "marked")
    assert len(marked) >= len(drops) > 10 and q.marked == len(marked)
    for o in marked:
        assert ecn_codepoint(o.data) == ECN_CE
        assert _checksum(o.data[:20]) == 0  # header checksum still valid
    # Marking does not relieve an unresponsive source: CoDel keeps signalling.
    assert marked[-1].arrival > 1.5


def test_codel_ecn_still_drops_not_ect_packets() -> None:
    plain = by(feed(codel(), 0.0, 2.0, SERVICE / 2), "dropped")
    outs = feed(codel(ecn=True), 0.0, 2.0, SERVICE / 2)
    assert [o.tag for o in by(outs, "dropped")] == [o.tag for o in plain]
    assert by(outs, "marked") == []


# -- PIE (RFC 8033) ------------------------------------------------------------------------------


def pie(seed: int = 1, **kw: object) -> LinkQueue:
    spec = QueueSpec(limit=100_000, discipline="pie", **kw)  # type: ignore[arg-type]
    return LinkQueue(spec, RateServer(RATE), seed=seed)


def test_pie_probability_rises_under_a_standing_queue_and_falls_back() -> None:
    q = pie()
    aqm = q._aqm
    probs = []
    outs: list[Outcome] = []
    for step in range(60):  # 3 s of 1.5x overload, in 50 ms steps
        outs += feed(q, step * 0.05, (step + 1) * 0.05, SERVICE / 1.5)
        probs.append(aqm.drop_prob)  # type: ignore[union-attr]
    drops = by(outs, "dropped")
    # No early drop during the burst allowance (150 ms), then drops at a rising probability.
    assert drops and drops[0].time >= PIE_MAX_BURST and drops[0].reason == "pie"
    assert 0 < probs[2] < probs[5] < probs[10] and max(probs) > 0.3
    # It brings the delay back under the target, where droptail would be at 1 s by now;
    # the source is unresponsive, so a third of it must go.
    late = [o for o in outs + q.advance(3.0) if o.arrival > 2.0]
    assert statistics.median(o.sojourn for o in by(late, "sent")) < PIE_TARGET
    assert len(by(late, "dropped")) / len(late) == pytest.approx(1 / 3, abs=0.05)
    # The load goes away: the probability decays to zero and the burst allowance returns.
    feed(q, 3.0, 8.0, 10 * SERVICE)
    assert aqm.drop_prob == 0.0  # type: ignore[union-attr]
    assert aqm.burst_allowance == PIE_MAX_BURST  # type: ignore[union-attr]


def _early_drops(derandomize: bool, prob: float, n: int = 20_000) -> list[int]:
    """Arrivals at which PIE's drop_early() fires, its state pinned to ``prob``."""
    q = pie(derandomize=derandomize)
    for _ in range(5):  # more than two MTUs waiting, during the burst allowance
        assert q.enqueue(ipv4(), 0.0) == []
    aqm = q._aqm
    aqm.burst_allowance = 0.0  # type: ignore[union-attr]
    aqm.qdelay_old = aqm.target  # type: ignore[union-attr]
    hits = []
    for i in range(n):
        aqm.drop_prob = prob  # type: ignore[union-attr]
        if aqm._drop_early():  # type: ignore[union-attr]
            aqm.accu_prob = 0.0  # type: ignore[union-attr]  # as on_enqueue does
            hits.append(i)
    return hits


def test_pie_derandomized_drops_are_neither_bunched_nor_far_apart() -> None:
    hits = _early_drops(True, 0.1)
    gaps = [b - a for a, b in itertools.pairwise(hits)]
    # RFC 8033 section 5.4: no drop before 0.85 has accumulated (9 arrivals at 10%), a
    # certain one at 8.5 (85 arrivals).
    assert min(gaps) >= 9 and max(gaps) <= 85
    plain = _early_drops(False, 0.1)
    assert min(b - a for a, b in itertools.pairwise(plain)) < 9  # a plain draw bunches
    assert len(plain) / 20_000 == pytest.approx(0.1, rel=0.1)


def test_pie_leaves_a_light_load_alone() -> None:
    outs = feed(pie(), 0.0, 3.0, SERVICE / 0.9)
    assert by(outs, "dropped") == []


def test_pie_drops_replay_with_the_seed() -> None:
    def drops(seed: int, derandomize: bool = True) -> list[object]:
        q = pie(seed, derandomize=derandomize)
        return [o.tag for o in by(feed(q, 0.0, 2.0, SERVICE / 1.5), "dropped")]

    assert drops(7) == drops(7)
    assert drops(7) != drops(8)
    assert drops(7, False) == drops(7, False) != drops(7)


def test_pie_ecn_marks_while_the_probability_is_low() -> None:
    q = pie(ecn=True)
    outs = feed(q, 0.0, 4.0, SERVICE / 1.5, make=lambda i: ipv4(ecn=ECN_ECT1))
    marked = by(outs, "marked") + by(q.advance(math.inf), "marked")
    assert marked and all(ecn_codepoint(o.data) == ECN_CE for o in marked)
    # An unresponsive ECT source drives the probability past 10%: then it drops (RFC 8033
    # section 5.1), so the queue stays bounded all the same.
    assert by(outs, "dropped")
    assert q.peak < 2000


def test_pie_ecn_drops_not_ect_packets() -> None:
    plain = [o.tag for o in by(feed(pie(), 0.0, 2.0, SERVICE / 1.5), "dropped")]
    outs = feed(pie(ecn=True), 0.0, 2.0, SERVICE / 1.5)
    assert [o.tag for o in by(outs, "dropped")] == plain and by(outs, "marked") == []


def test_droptail_standing_queue_grows_to_the_limit() -> None:
    q = LinkQueue(QueueSpec(limit=1000), RateServer(RATE))
    outs = feed(q, 0.0, 3.0, SERVICE / 1.5)
    outs += q.advance(math.inf)
    assert q.peak == 1000
    worst = max(o.sojourn for o in by(outs, "sent"))
    assert worst == pytest.approx(999 * SERVICE, abs=2 * SERVICE)  # limit x packet time


# -- ECN marking and wire sizes -----------------------------------------------------------------


@pytest.mark.parametrize("ecn", [ECN_ECT0, ECN_ECT1, ECN_CE])
def test_set_ce_ipv4_keeps_the_header_checksum_valid(ecn: int) -> None:
    for ident in (0, 1, 0xFFFF, 0x1234):
        pkt = ipv4(60, ecn=ecn | 0xB8, ident=ident)  # with a DSCP, which must survive
        out = set_ce(pkt)
        assert out is not None
        assert out[1] == 0xBB and _checksum(out[:20]) == 0
        assert out[:1] + out[2:10] + out[12:] == pkt[:1] + pkt[2:10] + pkt[12:]


def test_set_ce_refuses_not_ect_and_non_ip() -> None:
    assert set_ce(ipv4(ecn=ECN_NOT_ECT)) is None
    assert set_ce(ipv6(ecn=ECN_NOT_ECT)) is None
    assert set_ce(b"\x00" * 40) is None
    assert set_ce(b"") is None


def test_set_ce_ipv6_traffic_class() -> None:
    pkt = ipv6(ecn=ECN_ECT0)
    out = set_ce(pkt)
    assert out is not None and ecn_codepoint(out) == ECN_CE
    assert out[0] == pkt[0] and out[1] & 0xCF == pkt[1] & 0xCF and out[2:] == pkt[2:]


def test_set_ce_skips_vnet_and_ethernet_headers() -> None:
    vnet = bytes(_gso.VIRTIO_NET_HDR_LEN)
    eth = b"\x02" * 12 + b"\x08\x00"
    frame = vnet + eth + ipv4(ecn=ECN_ECT0)
    out = set_ce(frame, len(vnet), tap=True)
    assert out is not None and ecn_codepoint(out, len(vnet), tap=True) == ECN_CE
    assert out[: len(vnet) + 14] == frame[: len(vnet) + 14]
    vlan = b"\x02" * 12 + b"\x81\x00\x00\x05\x86\xdd"
    out = set_ce(vlan + ipv6(ecn=ECN_ECT1), tap=True)
    assert out is not None and ecn_codepoint(out, tap=True) == ECN_CE
    assert set_ce(b"\x02" * 12 + b"\x08\x06" + bytes(28), tap=True) is None  # ARP


def _tso_frame(payload: int, gso_size: int, v6: bool = False) -> bytes:
    gso = _gso.VIRTIO_NET_HDR_GSO_TCPV6 if v6 else _gso.VIRTIO_NET_HDR_GSO_TCPV4
    vnet = _gso.VIRTIO_NET_HDR.pack(1, gso, 66, gso_size, 0, 0)
    tcp = bytes(12) + bytes([8 << 4]) + bytes(19)  # 32-byte TCP header (timestamps)
    ip = ipv6(40 + 32 + payload)[:40] if v6 else ipv4(20 + 32 + payload, proto=6)[:20]
    if v6:
        ip = ip[:6] + b"\x06" + ip[7:]
    return vnet + ip + tcp + bytes(payload)


def test_wire_size_of_a_gso_super_packet() -> None:
    frame = _tso_frame(14480, 1448)
    assert wire_size(frame, _gso.VIRTIO_NET_HDR_LEN) == (20 + 32 + 14480 + 9 * 52, 10)
    frame = _tso_frame(14481, 1448, v6=True)
    assert wire_size(frame, _gso.VIRTIO_NET_HDR_LEN) == (40 + 32 + 14481 + 10 * 72, 11)


def test_wire_size_of_a_plain_packet() -> None:
    pkt = ipv4(1200)
    assert wire_size(pkt) == (1200, 1)
    assert wire_size(bytes(_gso.VIRTIO_NET_HDR_LEN) + pkt, _gso.VIRTIO_NET_HDR_LEN) == (1200, 1)


# -- the spec ----------------------------------------------------------------------------------


def test_spec_defaults() -> None:
    assert QueueSpec().limit == 1000
    assert QueueSpec(discipline="codel").effective_target == CODEL_TARGET
    assert QueueSpec(discipline="pie").effective_target == 0.015
    assert QueueSpec(discipline="codel").effective_interval == CODEL_INTERVAL


# -- the relay's adapter ----------------------------------------------------------------------


def _pkt(data: bytes, t: float, action: str = "forwarded") -> Packet:
    return Packet(t, "a->b", action, data, 0, "tun", t)


def test_packet_queue_labels_what_it_held_and_returns_drops() -> None:
    pq = PacketQueue(LinkQueue(QueueSpec(limit=2), RateServer(RATE), delay=0.01), 0)
    pkts = [_pkt(ipv4(ident=i), 0.0) for i in range(3)]
    dropped = [d for p in pkts for d in pq.enqueue(p, 0.0)]
    assert dropped == [pkts[2]] and pkts[2].action == "dropped"
    assert len(pq) == 2 and pq.peak == 2
    assert pq.deadline() == pytest.approx(SERVICE + 0.01)
    out = pq.dequeue_ready(1.0)
    assert [p for p, _due in out] == pkts[:2]
    assert [due for _p, due in out] == pytest.approx([0.011, 0.012])
    assert all(p.action == "delayed" for p, _due in out)
    assert len(pq) == 0 and pq.deadline() is None


def test_packet_queue_returns_codel_drops_and_ce_marked_copies() -> None:
    def run(ecn: bool) -> list[tuple[Packet, float | None]]:
        spec = QueueSpec(limit=100_000, discipline="codel", ecn=ecn)
        pq = PacketQueue(LinkQueue(spec, RateServer(RATE)), 0)
        out: list[tuple[Packet, float | None]] = []
        for i in range(2000):  # 2x overload for 1 s
            t = i * SERVICE / 2
            # Drops at dequeue (CoDel's) that happened by now come back from enqueue too.
            out += [(p, None) for p in pq.enqueue(_pkt(ipv4(ecn=ECN_ECT0, ident=i), t), t)]
            out += pq.dequeue_ready(t)
        return out + pq.dequeue_ready(math.inf)

    plain = run(False)
    drops = [p for p, due in plain if due is None]
    assert drops and all(p.action == "dropped" for p in drops)
    marked = [p for p, due in run(True) if p.action == "marked"]
    assert len(marked) >= len(drops)  # a mark does not shorten the queue as a drop does
    assert all(ecn_codepoint(p.data) == ECN_CE and p.arrival < p.time + 1 for p in marked)


# -- runs of segments (a per-segment link, drop-tail) -----------------------------------------


@pytest.mark.parametrize("limit", [10_000, 60])
@pytest.mark.parametrize("server", ["rate", "instant", "trace"])
def test_a_run_of_segments_is_decided_as_its_segments_one_by_one(limit: int, server: str) -> None:
    """``enqueue_run`` (a super-packet's segments at once) gives every segment the fate and
    the due time that enqueueing the segments one by one gives."""
    from pytest_tunpair import traces
    from pytest_tunpair.traces import TraceServer

    from .test_gso_unit import super_packet

    frame = super_packet(bytes(20 * 1448 + 700), 1448)
    plan = _gso.plan(frame, _gso.VIRTIO_NET_HDR_LEN)
    assert plan is not None and plan.count == 21

    def make() -> LinkQueue:
        srv = {
            "rate": lambda: RateServer(RATE),
            "instant": lambda: None,
            "trace": lambda: TraceServer(traces.load(traces.constant(24)), 0.0),
        }[server]()
        return LinkQueue(QueueSpec(limit=limit), srv, delay=0.003)

    runs, singles = make(), make()
    got: list[Outcome] = []
    want: list[Outcome] = []
    for k, t in enumerate((0.0, 0.00101, 0.00153, 0.02031)):  # off the due times: floats
        got += runs.enqueue_run(k, plan, 0, plan.count, t)
        for i in range(plan.count):
            want += singles.enqueue(b"", t, tag=(k, i), size=plan.wire_len(i, 1))
    got += runs.advance(10.0)
    want += singles.advance(10.0)
    # Each run outcome stands for its segments: expand them and compare.
    expanded = sorted(
        (o.tag, o.first + j, o.action) for o in got for j in range(o.count)
    )  # fmt: skip
    assert expanded == sorted((o.tag[0], o.tag[1], o.action) for o in want)  # type: ignore[index]
    last_due = {(o.tag, o.first + o.count - 1): o.time for o in got if o.action == "sent"}
    for o in want:
        if o.action == "sent" and o.tag in last_due:
            assert last_due[o.tag] == pytest.approx(o.time)  # type: ignore[index]
    assert runs.peak == singles.peak and runs.dropped == singles.dropped
