"""Pure-logic tests of the impairment engine: no plugin, no devices, no clock."""

from __future__ import annotations

import itertools
import math
import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_tunpair import OptionError
from pytest_tunpair._link.impair import (
    ACTIONS,
    REORDER_MIN_HOLD,
    Emit,
    ImpairmentEngine,
    ImpairmentSpec,
)

# Real packets read from a TUN device are never empty (at least an IP header), and the
# "delayed" label of a zero-length packet under a rate depends on queueing, hence min_size=1
# wherever a test compares labels across different clocks.
packets_st = st.lists(st.binary(min_size=1, max_size=64), max_size=40)
seeds_st = st.integers(min_value=0, max_value=2**32)
probability_st = st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]) | st.floats(0.0, 1.0)
# Sub-microsecond delays are not a thing a user configures, and below ~1e-11 `now + delay`
# rounds back to `now` for large clocks.
duration_st = st.sampled_from([0.0, 0.001, 0.02]) | st.floats(1e-6, 0.5)
rate_st = st.none() | st.sampled_from([1e3, 1e6, 1e9]) | st.floats(1e3, 1e10)


@st.composite
def times_st(draw: st.DrawFn, count: int) -> list[float]:
    """Non-decreasing monotonic timestamps, as the relay would pass them."""
    start = draw(st.floats(0.0, 1e5))
    gaps = draw(st.lists(st.floats(0.0, 0.05), min_size=count, max_size=count))
    times = []
    now = start
    for gap in gaps:
        now += gap
        times.append(now)
    return times


@st.composite
def specs_st(draw: st.DrawFn) -> ImpairmentSpec:
    return ImpairmentSpec(
        loss=draw(probability_st),
        delay=draw(duration_st),
        jitter=draw(duration_st),
        duplicate=draw(probability_st),
        reorder=draw(probability_st),
        corrupt=draw(probability_st),
        rate=draw(rate_st),
    )


def run(
    engine: ImpairmentEngine,
    packets: Sequence[bytes],
    times: Sequence[float],
    *,
    drive_expire: bool = True,
) -> list[Emit]:
    """Feed packets like the relay does, then flush whatever is still held."""
    out: list[Emit] = []
    for data, now in zip(packets, times, strict=False):
        deadline = engine.deadline()
        if drive_expire and deadline is not None and deadline <= now:
            out += engine.expire(now)
        out += engine.submit(data, now)
    deadline = engine.deadline()
    while deadline is not None:
        out += engine.expire(deadline)
        deadline = engine.deadline()
    return out


def originals(emits: Sequence[Emit]) -> list[Emit]:
    return [emit for emit in emits if emit.action != "duplicated"]


def bit_difference(a: bytes, b: bytes) -> int:
    return sum(bin(x ^ y).count("1") for x, y in zip(a, b, strict=False))


def with_index(packets: Sequence[bytes]) -> list[bytes]:
    """Make every packet unique so emissions can be traced back to submissions."""
    return [i.to_bytes(4, "big") + data for i, data in enumerate(packets)]


# --- the invariants of the engine -----------------------------------------------------------


@given(specs_st(), packets_st, seeds_st, st.data())
def test_every_emit_is_well_formed(
    spec: ImpairmentSpec, packets: list[bytes], seed: int, data: st.DataObject
) -> None:
    times = data.draw(times_st(len(packets)))
    emits = run(ImpairmentEngine(spec, seed), packets, times)
    assert all(emit.action in ACTIONS for emit in emits)
    assert all((emit.due is None) == (emit.action == "lost") for emit in emits)
    # Each submitted packet is accounted for exactly once (lost or written), plus copies.
    assert len(originals(emits)) == len(packets)


@given(specs_st(), packets_st, seeds_st, st.data())
def test_reorder_delay_jitter_rate_never_lose_a_packet(
    spec: ImpairmentSpec, packets: list[bytes], seed: int, data: st.DataObject
) -> None:
    spec = ImpairmentSpec(
        delay=spec.delay, jitter=spec.jitter, reorder=spec.reorder, rate=spec.rate
    )
    packets = with_index(packets)
    times = data.draw(times_st(len(packets)))
    engine = ImpairmentEngine(spec, seed)
    emits = run(engine, packets, times, drive_expire=data.draw(st.booleans()))
    assert sorted(emit.data for emit in emits) == sorted(packets)
    assert all(emit.due is not None for emit in emits)
    assert engine.deadline() is None


@given(packets_st, seeds_st, probability_st, st.data())
def test_duplicate_only_adds_exact_copies_right_after_the_original(
    packets: list[bytes], seed: int, duplicate: float, data: st.DataObject
) -> None:
    times = data.draw(times_st(len(packets)))
    emits = run(ImpairmentEngine(ImpairmentSpec(duplicate=duplicate), seed), packets, times)
    assert [emit.data for emit in originals(emits)] == packets
    for previous, emit in itertools.pairwise(emits):
        if emit.action == "duplicated":
            assert previous.action != "duplicated"
            assert (emit.data, emit.due) == (previous.data, previous.due)
    if duplicate == 1.0:
        assert len(emits) == 2 * len(packets)
    if duplicate == 0.0:
        assert len(emits) == len(packets)


@given(packets_st, seeds_st, probability_st, st.data())
def test_corrupt_flips_exactly_one_bit_and_keeps_the_length(
    packets: list[bytes], seed: int, corrupt: float, data: st.DataObject
) -> None:
    times = data.draw(times_st(len(packets)))
    emits = run(ImpairmentEngine(ImpairmentSpec(corrupt=corrupt), seed), packets, times)
    assert len(emits) == len(packets)
    for sent, emit in zip(packets, emits, strict=False):
        assert len(emit.data) == len(sent)
        expected = 1 if emit.action == "corrupted" else 0
        assert bit_difference(sent, emit.data) == expected
    if corrupt == 1.0:
        assert all(emit.action == "corrupted" for emit in emits)


@given(st.lists(st.binary(max_size=3), max_size=20), seeds_st)
def test_empty_packets_cannot_be_corrupted(packets: list[bytes], seed: int) -> None:
    engine = ImpairmentEngine(ImpairmentSpec(corrupt=1.0), seed)
    for data in packets:
        (emit,) = engine.submit(data, 0.0)
        assert emit.action == ("corrupted" if data else "forwarded")


@given(specs_st(), packets_st, seeds_st, st.data())
def test_loss_zero_loses_nothing_and_loss_one_loses_everything(
    spec: ImpairmentSpec, packets: list[bytes], seed: int, data: st.DataObject
) -> None:
    times = data.draw(times_st(len(packets)))
    kept = run(ImpairmentEngine(replace(spec, loss=0.0), seed), packets, times)
    assert not [emit for emit in kept if emit.action == "lost"]
    dropped = run(ImpairmentEngine(replace(spec, loss=1.0), seed), packets, times)
    assert dropped == [Emit(None, data, "lost") for data in packets]


@given(specs_st(), packets_st, seeds_st, st.data())
def test_same_seed_same_emissions_whatever_the_clock(
    spec: ImpairmentSpec, packets: list[bytes], seed: int, data: st.DataObject
) -> None:
    first = run(
        ImpairmentEngine(spec, seed),
        packets,
        data.draw(times_st(len(packets))),
        drive_expire=False,
    )
    second = run(
        ImpairmentEngine(spec, seed),
        packets,
        data.draw(times_st(len(packets))),
        drive_expire=False,
    )
    assert [(e.data, e.action) for e in first] == [(e.data, e.action) for e in second]


@given(specs_st(), packets_st, seeds_st, st.floats(-1e4, 1e4))
def test_shifting_the_clock_only_shifts_the_dues(
    spec: ImpairmentSpec, packets: list[bytes], seed: int, shift: float
) -> None:
    times = [i * 0.001 for i in range(len(packets))]
    # No expire() interleaving: shifted float times may round a deadline tie either way.
    first = run(ImpairmentEngine(spec, seed), packets, times, drive_expire=False)
    shifted = [t + shift for t in times]
    second = run(ImpairmentEngine(spec, seed), packets, shifted, drive_expire=False)
    assert [(e.data, e.action) for e in first] == [(e.data, e.action) for e in second]
    for a, b in zip(first, second, strict=False):
        if a.due is None or b.due is None:
            assert a.due is b.due is None
        else:
            assert math.isclose(b.due - shift, a.due, rel_tol=1e-9, abs_tol=1e-6)


@given(packets_st, seeds_st, st.floats(0.0, 10.0), st.data())
def test_delay_alone_delays_every_packet_by_exactly_the_delay(
    packets: list[bytes], seed: int, delay: float, data: st.DataObject
) -> None:
    engine = ImpairmentEngine(ImpairmentSpec(delay=delay), seed)
    for packet, now in zip(packets, data.draw(times_st(len(packets))), strict=False):
        (emit,) = engine.submit(packet, now)
        assert emit == Emit(now + delay, packet, "delayed" if delay > 0 else "forwarded")
    assert engine.deadline() is None


@given(packets_st, seeds_st, duration_st, duration_st, st.data())
def test_jitter_never_schedules_before_arrival(
    packets: list[bytes], seed: int, delay: float, jitter: float, data: st.DataObject
) -> None:
    engine = ImpairmentEngine(ImpairmentSpec(delay=delay, jitter=jitter), seed)
    for packet, now in zip(packets, data.draw(times_st(len(packets))), strict=False):
        (emit,) = engine.submit(packet, now)
        assert emit.due is not None
        assert now <= emit.due <= now + delay + jitter + 1e-9
        assert emit.action == ("delayed" if emit.due > now else "forwarded")


def test_jitter_spreads_around_the_delay() -> None:
    engine = ImpairmentEngine(ImpairmentSpec(delay=0.1, jitter=0.02), seed=3)
    latencies = []
    for _ in range(5000):
        (emit,) = engine.submit(b"x", 0.0)
        assert emit.due is not None
        latencies.append(emit.due)
    assert 0.08 <= min(latencies) < 0.081
    assert 0.119 < max(latencies) <= 0.12
    assert abs(sum(latencies) / len(latencies) - 0.1) < 0.001


def test_rate_is_left_to_the_link_queue() -> None:
    # The serialiser lives in _queue (it needs the queue's bound and discipline): the engine
    # only draws delay and jitter, so with a rate alone a packet is due when it came.
    engine = ImpairmentEngine(ImpairmentSpec(rate=1e6, delay="2ms"), seed=0)
    dues = [engine.submit(bytes(1500), 100.0)[0].due for _ in range(3)]
    assert dues == pytest.approx([100.002] * 3)


def _ipv4(tos: int) -> bytes:
    header = bytearray(
        struct.pack("!BBHHHBBH4s4s", 0x45, tos, 28, 0, 0, 64, 17, 0, b"\n\0\0\1", b"\n\0\0\2")
    )
    words = struct.unpack("!10H", header)
    total = sum(words)
    total = (total & 0xFFFF) + (total >> 16)
    header[10:12] = struct.pack("!H", ~total & 0xFFFF)
    return bytes(header) + bytes(8)


def test_loss_with_ecn_marks_ect_packets_and_drops_the_others() -> None:
    spec = ImpairmentSpec(loss=1.0, ecn=True)
    (ect,) = ImpairmentEngine(spec, seed=0).submit(_ipv4(0x02), 0.0)
    assert ect.action == "marked" and ect.due == 0.0 and ect.data[1] & 3 == 3
    (plain,) = ImpairmentEngine(spec, seed=0).submit(_ipv4(0x00), 0.0)
    assert plain.action == "lost" and plain.due is None
    (without,) = ImpairmentEngine(ImpairmentSpec(loss=1.0), seed=0).submit(_ipv4(0x02), 0.0)
    assert without.action == "lost"


# --- reordering -------------------------------------------------------------------------------


def test_reorder_one_swaps_packets_pairwise() -> None:
    engine = ImpairmentEngine(ImpairmentSpec(reorder=1.0), seed=0)
    packets = [bytes([i]) for i in range(5)]
    emits = run(engine, packets, [0.0] * 5)
    assert [(e.data[0], e.action) for e in emits] == [
        (1, "forwarded"),
        (0, "reordered"),
        (3, "forwarded"),
        (2, "reordered"),
        (4, "reordered"),  # nothing came to overtake it: released by expire()
    ]


def test_held_packet_follows_the_packet_that_overtook_it() -> None:
    engine = ImpairmentEngine(ImpairmentSpec(reorder=1.0, delay=0.05, jitter=0.04), seed=9)
    assert engine.submit(b"first", 10.0) == []
    overtaker, released = engine.submit(b"second", 10.001)
    assert (overtaker.data, released.data) == (b"second", b"first")
    assert released.action == "reordered"
    assert overtaker.due is not None and released.due is not None
    assert released.due >= overtaker.due


def test_held_packet_is_released_by_expire_after_the_hold_time() -> None:
    engine = ImpairmentEngine(ImpairmentSpec(reorder=1.0), seed=0)
    assert engine.deadline() is None
    assert engine.submit(b"alone", 50.0) == []
    assert engine.deadline() == 50.0 + REORDER_MIN_HOLD
    assert engine.expire(50.004) == []
    # However late the relay gets round to it, the due is the end of the hold.
    assert engine.expire(51.0) == [Emit(50.0 + REORDER_MIN_HOLD, b"alone", "reordered")]
    assert engine.deadline() is None
    assert engine.expire(math.inf) == []


def test_hold_time_is_the_delay_when_longer_than_the_minimum() -> None:
    engine = ImpairmentEngine(ImpairmentSpec(reorder=1.0, delay=0.2), seed=0)
    assert engine.submit(b"p", 1.0) == []
    assert engine.deadline() == pytest.approx(1.2)
    assert engine.expire(math.inf) == [Emit(1.2, b"p", "reordered")]


def test_a_lost_packet_does_not_overtake_a_held_one() -> None:
    # Find a seed that holds packet 0, loses packet 1 and keeps packet 2: decisions are fixed
    # per packet index, so such a seed exists and the search is deterministic.
    spec = ImpairmentSpec(reorder=0.5, loss=0.5)
    for seed in range(1000):
        engine = ImpairmentEngine(spec, seed)
        if engine.submit(b"a", 0.0) != [] or engine.submit(b"b", 0.0)[0].action != "lost":
            continue
        assert engine.deadline() is not None  # "b" never reached the wire: "a" is still held
        third = engine.submit(b"c", 0.0)
        if third[0].action == "lost":
            continue
        assert [(e.data, e.action) for e in third] == [(b"c", "forwarded"), (b"a", "reordered")]
        break
    else:
        pytest.fail("no seed held packet 0, lost packet 1 and kept packet 2")


def test_held_duplicate_is_released_with_its_original() -> None:
    engine = ImpairmentEngine(ImpairmentSpec(reorder=1.0, duplicate=1.0), seed=0)
    assert engine.submit(b"a", 0.0) == []
    emits = engine.submit(b"b", 0.0)
    assert [(e.data, e.action) for e in emits] == [
        (b"b", "forwarded"),
        (b"b", "duplicated"),
        (b"a", "reordered"),
        (b"a", "duplicated"),
    ]


@given(specs_st(), packets_st, seeds_st, st.data())
def test_nothing_is_held_forever(
    spec: ImpairmentSpec, packets: list[bytes], seed: int, data: st.DataObject
) -> None:
    engine = ImpairmentEngine(spec, seed)
    times = data.draw(times_st(len(packets)))
    for packet, now in zip(packets, times, strict=False):
        engine.submit(packet, now)
        deadline = engine.deadline()
        if deadline is not None:
            assert deadline <= now + max(spec.delay, REORDER_MIN_HOLD)
    engine.expire(math.inf)
    assert engine.deadline() is None


# --- determinism and statistics ---------------------------------------------------------------


def survivors(engine: ImpairmentEngine, count: int) -> set[int]:
    kept = set()
    for i in range(count):
        for emit in engine.submit(i.to_bytes(4, "big"), i * 1e-4):
            if emit.action != "lost":
                kept.add(int.from_bytes(emit.data[:4], "big"))
    for emit in engine.expire(math.inf):
        kept.add(int.from_bytes(emit.data[:4], "big"))
    return kept


@pytest.mark.parametrize("seed", [0, 1, 42, 2**31])
def test_loss_ten_percent_keeps_about_ninety_percent(seed: int) -> None:
    kept = survivors(ImpairmentEngine(ImpairmentSpec(loss=0.1), seed), 10_000)
    # Binomial sd is 30 packets; +-300 is ten of them.
    assert 8_700 <= len(kept) <= 9_300


def test_two_engines_with_the_same_seed_keep_the_same_packets() -> None:
    spec = ImpairmentSpec(loss=0.1)
    assert survivors(ImpairmentEngine(spec, 7), 10_000) == survivors(
        ImpairmentEngine(spec, 7), 10_000
    )
    assert survivors(ImpairmentEngine(spec, 7), 10_000) != survivors(
        ImpairmentEngine(spec, 8), 10_000
    )


@given(specs_st(), seeds_st)
@settings(max_examples=30)
def test_loss_decisions_ignore_every_other_setting(spec: ImpairmentSpec, seed: int) -> None:
    plain = survivors(ImpairmentEngine(ImpairmentSpec(loss=spec.loss), seed), 300)
    # Corruption may flip a bit in the 4-byte index; keep it out of this comparison.
    busy = survivors(ImpairmentEngine(replace(spec, corrupt=0.0), seed), 300)
    assert plain == busy


@given(seeds_st, st.floats(0.0, 1.0), st.floats(0.0, 1.0))
@settings(max_examples=30)
def test_more_loss_drops_a_superset(seed: int, p: float, q: float) -> None:
    low, high = sorted((p, q))
    kept_low = survivors(ImpairmentEngine(ImpairmentSpec(loss=low), seed), 300)
    kept_high = survivors(ImpairmentEngine(ImpairmentSpec(loss=high), seed), 300)
    assert kept_high <= kept_low


def test_rates_of_other_effects_are_roughly_right() -> None:
    spec = ImpairmentSpec(duplicate=0.2, corrupt=0.3)
    engine = ImpairmentEngine(spec, seed=5)
    actions = Counter(e.action for i in range(10_000) for e in engine.submit(b"abcd", i * 1e-3))
    assert 1_850 <= actions["duplicated"] <= 2_150
    assert 2_850 <= actions["corrupted"] <= 3_150


def test_corrupted_bit_positions_cover_the_whole_packet() -> None:
    engine = ImpairmentEngine(ImpairmentSpec(corrupt=1.0), seed=11)
    positions = set()
    for _ in range(2_000):
        (emit,) = engine.submit(bytes(4), 0.0)
        positions.add(int.from_bytes(emit.data, "big").bit_length())
    assert positions == set(range(1, 33))


# --- ImpairmentSpec ---------------------------------------------------------------------------


def test_default_spec_is_neutral() -> None:
    spec = ImpairmentSpec()
    assert not spec.active
    assert not ImpairmentSpec(seed=3).active
    assert spec.describe() == "no impairment"
    engine = ImpairmentEngine(spec, seed=1)
    assert engine.submit(b"abc", 5.0) == [Emit(5.0, b"abc", "forwarded")]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"loss": 0.01},
        {"delay": 0.001},
        {"jitter": "1us"},
        {"duplicate": "1%"},
        {"reorder": 1},
        {"corrupt": 0.5},
        {"rate": "1kbit"},
    ],
)
def test_any_impairment_makes_the_spec_active(kwargs: dict[str, object]) -> None:
    assert ImpairmentSpec.from_kwargs(**kwargs).active


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"loss": "10%"}, {"loss": 0.1}),
        ({"loss": "0.5 %", "corrupt": 1}, {"loss": 0.005, "corrupt": 1.0}),
        ({"duplicate": 0}, {"duplicate": 0.0}),
        ({"delay": "10ms"}, {"delay": 0.01}),
        ({"delay": "1.5s"}, {"delay": 1.5}),
        ({"delay": "200us"}, {"delay": 0.0002}),
        ({"jitter": " 5 ms "}, {"jitter": 0.005}),
        ({"delay": 2}, {"delay": 2.0}),
        ({"rate": "10mbit"}, {"rate": 10e6}),
        ({"rate": "1gbit"}, {"rate": 1e9}),
        ({"rate": "500kbit"}, {"rate": 500e3}),
        ({"rate": "100kbps"}, {"rate": 800e3}),
        ({"rate": "1Mbps"}, {"rate": 8e6}),
        ({"rate": "2kibit"}, {"rate": 2048.0}),
        ({"rate": "64bit"}, {"rate": 64.0}),
        ({"rate": 1_000_000}, {"rate": 1e6}),
        ({"rate": None}, {"rate": None}),
        ({"seed": 42}, {"seed": 42}),
        ({"seed": -1}, {"seed": -1}),
    ],
)
def test_from_kwargs_accepts_and_normalises(
    kwargs: dict[str, object], expected: dict[str, object]
) -> None:
    spec = ImpairmentSpec.from_kwargs(**kwargs)
    for name, value in expected.items():
        assert getattr(spec, name) == pytest.approx(value)
        assert type(getattr(spec, name)) is type(value)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (
            {"loss": 1.5},
            "impair(): bad value for loss=1.5: loss is a probability, between 0.0 and 1.0",
        ),
        ({"loss": -0.1}, "impair(): bad value for loss=-0.1: loss is a probability"),
        ({"loss": True}, "impair(): bad value for loss=True: loss is a probability"),
        ({"duplicate": "101%"}, "duplicate is a probability"),
        ({"reorder": "half"}, "bad value for reorder='half':"),
        ({"corrupt": float("nan")}, "corrupt is a probability"),
        ({"corrupt": None}, "corrupt is a probability"),
        ({"delay": -1}, "impair(): bad value for delay=-1: delay is a duration >= 0"),
        ({"delay": "10"}, "unit s, ms or us"),
        ({"delay": "10 min"}, "bad value for delay='10 min':"),
        ({"jitter": float("inf")}, "jitter is a duration"),
        ({"jitter": False}, "jitter is a duration"),
        ({"rate": 0}, "impair(): bad value for rate=0: rate is in bits per second, > 0"),
        ({"rate": -5.0}, "rate is in bits per second"),
        ({"rate": float("inf")}, "None for unlimited"),
        ({"rate": "fast"}, "'100kbps' (bytes/s"),
        ({"rate": "10mb"}, "bad value for rate='10mb':"),
        ({"rate": True}, "rate is in bits per second"),
        ({"seed": 1.0}, "impair(): bad value for seed=1.0: seed is an int"),
        ({"seed": True}, "seed is an int"),
        ({"seed": "42"}, "seed is an int"),
    ],
)
def test_from_kwargs_rejects_bad_values(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(OptionError) as excinfo:
        ImpairmentSpec.from_kwargs(**kwargs)
    assert fragment in str(excinfo.value)
    [(name, value)] = kwargs.items()
    error = excinfo.value
    assert (error.option, error.source) == (name, "impair()")
    assert error.value == value or value != value  # nan != nan
    assert error.reason.startswith(f"{name} is ")


def test_from_kwargs_rejects_unknown_names_and_lists_the_allowed_ones() -> None:
    with pytest.raises(TypeError) as excinfo:
        ImpairmentSpec.from_kwargs(loss=0.1, latency="10ms")
    message = str(excinfo.value)
    assert "'latency'" in message
    for name in ("loss", "delay", "jitter", "duplicate", "reorder", "corrupt", "rate", "seed"):
        assert name in message


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(ValueError, match="loss is a probability"):
        ImpairmentSpec(loss=2.0)
    assert ImpairmentSpec(delay=1) == ImpairmentSpec.from_kwargs(delay="1000ms")


@pytest.mark.parametrize(
    ("kwargs", "line"),
    [
        (
            {"loss": 0.1, "delay": 0.02, "jitter": 0.005, "seed": 42},
            "loss=10% delay=20ms jitter=5ms seed=42",
        ),
        ({"duplicate": 0.005, "reorder": 0.25}, "duplicate=0.5% reorder=25%"),
        ({"corrupt": 1.0, "rate": "10mbit"}, "corrupt=100% rate=10mbit"),
        ({"delay": 1.5, "rate": 1.5e9}, "delay=1.5s rate=1.5gbit"),
        ({"jitter": "200us", "rate": 64}, "jitter=200us rate=64bit"),
        ({"rate": "100kbps"}, "rate=800kbit"),
        ({"seed": 7}, "no impairment seed=7"),
    ],
)
def test_describe(kwargs: dict[str, object], line: str) -> None:
    assert ImpairmentSpec.from_kwargs(**kwargs).describe() == line


@given(specs_st())
def test_describe_reads_back_as_the_same_spec(spec: ImpairmentSpec) -> None:
    words = spec.describe().split()
    if words[:2] == ["no", "impairment"]:
        words = words[2:]
    parsed = ImpairmentSpec.from_kwargs(**dict(word.split("=", 1) for word in words))
    # describe() rounds to six significant digits, enough for a failure report.
    for name in ("loss", "delay", "jitter", "duplicate", "reorder", "corrupt"):
        assert getattr(parsed, name) == pytest.approx(getattr(spec, name), rel=1e-5, abs=1e-12)
    if spec.rate is None:
        assert parsed.rate is None
    else:
        assert parsed.rate == pytest.approx(spec.rate, rel=1e-5)
