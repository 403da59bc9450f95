"""Unit tests of mahimahi trace parsing and the trace server model (pure logic)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from pytest_tunpair import OptionError
from pytest_tunpair.traces import PACKET_SIZE, Trace, TraceServer, constant, load, save

MS = 1e-3


def depart(server: TraceServer, size: int, t: float) -> float | None:
    """When a ``size``-byte packet at the head of the queue from ``t`` on leaves (None:
    never): the bottleneck queue's two calls, ``finish(size, ready(t))``."""
    start = server.ready(t)
    due = math.inf if start == math.inf else server.finish(size, start)
    return None if due == math.inf else due


def test_constant_12_mbit_is_one_opportunity_per_ms() -> None:
    assert constant(12) == list(range(1, 1001))
    assert load(constant(12)).rate == 12e6


@pytest.mark.parametrize(("mbit", "ms"), [(1, 1000), (0.1, 60_000), (48, 10), (100, 1000)])
def test_constant_rates(mbit: float, ms: int) -> None:
    trace = load(constant(mbit, ms))
    assert trace.period_ms == ms
    assert trace.rate == pytest.approx(mbit * 1e6, rel=0.01)
    assert list(trace.times) == sorted(trace.times)


def test_constant_rejects_what_it_cannot_make() -> None:
    with pytest.raises(ValueError, match="longer ms"):
        constant(0.001, ms=10)
    with pytest.raises(ValueError, match="Mbit/s > 0"):
        constant(0)


def test_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "link.up"
    save([0, 0, 3, 7, 7, 10], path)
    assert path.read_text() == "0\n0\n3\n7\n7\n10\n"
    trace = load(path)
    assert trace.times == (0, 0, 3, 7, 7, 10)
    assert trace.name == str(path)
    assert trace.describe().startswith("link.up (6 opportunities over 10 ms, mean ")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("1\n2\nabc\n", r"link\.trace, line 3: 'abc' is not a millisecond timestamp"),
        ("1\n-2\n", r"line 2: '-2' is not"),
        ("5\n7\n6\n", r"line 3: 6 is earlier than the timestamp before it \(7\)"),
        ("", "has no timestamps"),
        ("\n\n", "has no timestamps"),
        ("0\n0\n", "lasts no time"),
    ],
)
def test_bad_file_names_file_and_line(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "link.trace"
    path.write_text(text)
    with pytest.raises(OptionError, match=match) as info:
        load(path, source="marker")
    assert info.value.option == "trace"
    assert info.value.source == "marker"
    assert str(info.value).startswith("marker: bad value for trace=")


def test_missing_file_and_bad_sequences(tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="cannot read the trace file"):
        load(tmp_path / "nope")
    with pytest.raises(OptionError, match=r"item 1 of the sequence is 1\.5"):
        load([1, 1.5])  # type: ignore[list-item]
    with pytest.raises(OptionError, match="item 2 of the sequence: 1 is earlier"):
        load([1, 2, 1])
    with pytest.raises(OptionError, match="give the path of a mahimahi trace file"):
        load(42)  # type: ignore[arg-type]
    with pytest.raises(OptionError, match="item 0 of the sequence is True"):
        load([True])


def test_blank_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "t"
    path.write_text("1\n\n  2 \n3")
    assert load(path).times == (1, 2, 3)


def test_full_packets_leave_one_per_opportunity() -> None:
    server = TraceServer(load(constant(12)), start=100.0)
    departures = [depart(server, PACKET_SIZE, 100.0) for _ in range(3)]
    assert departures == pytest.approx([100.001, 100.002, 100.003])


def test_small_packets_share_an_opportunity_and_bytes_carry_over() -> None:
    server = TraceServer(load(constant(12)), start=0.0)
    assert [depart(server, 500, 0.0) for _ in range(3)] == pytest.approx([MS] * 3)
    assert depart(server, 1000, 0.0) == pytest.approx(2 * MS)
    # 500 bytes left at 2 ms, then 500 of the opportunity at 3 ms.
    assert depart(server, 1000, 2 * MS) == pytest.approx(3 * MS)
    # A GSO-sized packet spans opportunities: 1000 left at 3 ms, then 43 more.
    assert depart(server, 65_000, 3 * MS) == pytest.approx((3 + 43) * MS)


def test_unused_opportunities_are_lost() -> None:
    server = TraceServer(load(constant(12)), start=0.0)
    assert depart(server, 100, 0.0) == pytest.approx(MS)
    # 1400 bytes of the 1 ms opportunity are unused; a packet arriving later cannot have them.
    assert depart(server, 1500, 10.5 * MS) == pytest.approx(11 * MS)
    assert server.ready(11.2 * MS) == pytest.approx(12 * MS)
    assert server.ready(0.0) == pytest.approx(12 * MS)  # only what is still to come


def test_ready_is_pure_and_finish_shares_the_opportunity() -> None:
    server = TraceServer(load([10, 20]), start=0.0)
    assert server.ready(0.0) == server.ready(0.0) == pytest.approx(0.010)
    assert server.finish(600, server.ready(0.0)) == pytest.approx(0.010)
    assert server.ready(0.0) == pytest.approx(0.010)  # 900 bytes left there
    assert server.finish(900, 0.010) == pytest.approx(0.010)
    assert server.ready(0.0) == pytest.approx(0.020)
    once = TraceServer(load([10]), start=0.0, repeat=False)
    assert once.finish(2000, 0.0) == math.inf  # needs a second opportunity that never comes
    assert once.ready(0.0) == pytest.approx(0.010)  # and consumed nothing


def test_packet_ready_exactly_at_an_opportunity_uses_it() -> None:
    start = 12345.678  # a large clock value, where (t - start) * 1000 rounds
    server = TraceServer(load(constant(12)), start=start)
    first = depart(server, 700, start)
    assert first is not None
    assert depart(server, 700, first) == first


def test_trace_repeats_shifted_by_its_last_timestamp() -> None:
    server = TraceServer(load([5, 10]), start=0.0)
    times = [depart(server, PACKET_SIZE, 0.0) for _ in range(5)]
    assert times == pytest.approx([0.005, 0.010, 0.015, 0.020, 0.025])
    # The last line of pass 99 is at 99 * 10 + 10 ms: exactly 1 s.
    assert depart(server, PACKET_SIZE, 1.0) == pytest.approx(1.0)
    assert depart(server, PACKET_SIZE, 1.0) == pytest.approx(1.005)


def test_no_repeat_stops_delivery() -> None:
    server = TraceServer(load([5, 10]), start=0.0, repeat=False)
    assert depart(server, PACKET_SIZE, 0.0) == pytest.approx(0.005)
    assert depart(server, PACKET_SIZE, 0.0) == pytest.approx(0.010)
    assert depart(server, PACKET_SIZE, 0.0) is None
    assert depart(server, 10, 0.0) is None
    assert server.ready(0.0) == math.inf


def test_gap_delivers_nothing() -> None:
    # 12 Mbit/s for 1 s, nothing for 500 ms, then 12 Mbit/s again for 500 ms.
    times = list(range(1, 1001)) + list(range(1501, 2001))
    server = TraceServer(load(times), start=0.0)
    departures = [depart(server, PACKET_SIZE, 0.9) for _ in range(300)]
    assert all(d is not None and not 1.0 < d < 1.5 for d in departures)
    assert departures[100] == pytest.approx(1.0)
    assert departures[101] == pytest.approx(1.501)


def test_long_run_rate_matches_the_trace() -> None:
    server = TraceServer(Trace(tuple(constant(24))), start=0.0)
    last = 0.0
    sent = 0
    while last < 5.0:
        # Offered faster than the link: 1200-byte packets every 0.1 ms.
        d = depart(server, 1200, sent * 1e-4)
        assert d is not None
        last = d
        sent += 1
    assert sent * 1200 * 8 / last == pytest.approx(24e6, rel=0.01)


def test_capacity_counts_opportunities_in_a_window() -> None:
    server = TraceServer(load(constant(12)), start=0.0)
    assert server.capacity(0.0, 1.0) == 999 * PACKET_SIZE  # [0, 1 s): 1 ms ... 999 ms
    assert server.capacity(0.0005, 2.5005) == 2500 * PACKET_SIZE
    once = TraceServer(load(constant(12)), start=0.0, repeat=False)
    assert once.capacity(0.5, 3.0) == 501 * PACKET_SIZE
    assert list(load([5, 10]).opportunities(31)) == [5, 10, 15, 20, 25, 30]


def test_at_infinity_nothing_starts() -> None:
    # The queue asks for ready(inf) when it is flushed at close.
    assert TraceServer(load([5, 10]), start=0.0).ready(math.inf) == math.inf
    assert TraceServer(load([5, 10]), start=0.0, repeat=False).ready(math.inf) == math.inf
