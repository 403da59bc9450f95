"""Recorded links: mahimahi packet-delivery traces.

A trace is a text file with one integer per line, a time in milliseconds, non-decreasing.
Each line is one *delivery opportunity*: at that time the link may deliver up to
:data:`PACKET_SIZE` (1500) bytes. Several small packets may share one opportunity, a
packet larger than the rest of an opportunity continues in the next one, and an
opportunity that finds the queue empty is lost. When the trace ends it starts again, shifted
by its last timestamp (so a trace must last a nonzero time), or delivery stops for good
with ``repeat=False``. This is the model of mahimahi's ``mm-link``
(src/frontend/link_queue.cc), whose trace files this module reads unchanged; its repository
ships recorded cellular traces (``traces/*.up``, ``*.down``).

A file of the lines ``1`` ... ``1000`` is one opportunity per millisecond, 1500 bytes each:
12 Mbit/s. :func:`constant` makes such a sequence for any rate::

    from pytest_tunpair import traces

    @pytest.mark.impair(trace=traces.constant(12))  # 12 Mbit/s
    def test_upload(tun_pair): ...

``impair(trace=...)`` takes a path or a sequence of ints. :class:`TraceServer` is the pure
model the bottleneck queue uses to serve packets from a trace: a :class:`Server`, the two
calls that drain a queue, as :class:`RateServer` is for a constant rate.

mahimahi's ``PACKET_SIZE`` is 1504 because its TUN devices carry the 4-byte packet
information header (``IFF_TUN`` without ``IFF_NO_PI``, src/util/netdevice.cc): that is a
1500-byte IP packet, which is what this module counts.
"""

from __future__ import annotations

import bisect
import math
import numbers
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from ._errors import OptionError
from ._link.queue import RateServer, Server
from ._schema import Invalid, Kind

__all__ = [
    "PACKET_SIZE",
    "RateServer",
    "Server",
    "Trace",
    "TraceServer",
    "constant",
    "load",
    "save",
]

#: Bytes one delivery opportunity carries (mahimahi's ``PACKET_SIZE``: one MTU-sized packet).
PACKET_SIZE = 1500
#: Bits per second of one opportunity per millisecond.
_BITS_PER_OPPORTUNITY_PER_MS = PACKET_SIZE * 8 * 1000
# Float time in seconds against integer milliseconds: a packet due at an opportunity's
# exact time must still find it, whatever the rounding of (ready - start) * 1000.
_EPSILON_MS = 1e-6

# An opportunity index no trace reaches: what comes "at infinity".
_NEVER = 1 << 62

TraceLike = Union[str, "os.PathLike[str]", Sequence[int], "Trace"]


@dataclass(frozen=True)
class Trace:
    """A validated delivery schedule: ``times`` in ms, non-decreasing, the last one > 0."""

    times: tuple[int, ...]
    """The opportunities, in milliseconds from the start of the trace."""
    name: str = "<sequence>"
    """The file the trace came from, or ``"<sequence>"``."""

    @property
    def period_ms(self) -> int:
        """How long one pass of the trace lasts (its last timestamp): it repeats after that."""
        return self.times[-1]

    @property
    def rate(self) -> float:
        """The mean rate of one pass, bits per second, if every opportunity were used full."""
        return len(self.times) * PACKET_SIZE * 8 * 1000 / self.period_ms

    def __len__(self) -> int:
        return len(self.times)

    def describe(self) -> str:
        """``NAME (N opportunities over T ms, mean R)`` for failure reports."""
        from ._schema import Rate

        name = Path(self.name).name if self.name != "<sequence>" else "sequence"
        return (
            f"{name} ({len(self.times)} opportunities over {self.period_ms} ms, "
            f"mean {Rate().format(self.rate)})"
        )

    def opportunities(self, until_ms: float, *, repeat: bool = True) -> Iterator[int]:
        """Every opportunity's time (ms from the start) before ``until_ms``, repeating."""
        offset = 0
        while True:
            for t in self.times:
                if offset + t >= until_ms:
                    return
                yield offset + t
            if not repeat:
                return
            offset += self.period_ms


def _fail(value: object, reason: str, option: str, source: str) -> OptionError:
    return OptionError(option, value, source=source, reason=reason)


def _shown(trace: object) -> object:
    """The value an error shows: a path as given, a long sequence summarised."""
    if isinstance(trace, Sequence) and not isinstance(trace, str) and len(trace) > 8:
        return f"<sequence of {len(trace)} timestamps>"
    return trace


def load(trace: TraceLike, *, option: str = "trace", source: str = "impair()") -> Trace:
    """Read and validate a trace: a path to a mahimahi trace file, a sequence of ints, or a
    :class:`Trace` (returned as is).

    A bad trace raises :class:`~pytest_tunpair.OptionError` naming ``option``, ``source``
    and, for a file, the file and line: a line that is not a non-negative integer, a
    timestamp smaller than the one before, no timestamps at all, or a trace whose last
    timestamp is 0 (it would repeat without time passing). Blank lines are skipped.
    """
    if isinstance(trace, Trace):
        return trace
    if isinstance(trace, (str, os.PathLike)):
        return _load_file(Path(trace), trace, option, source)
    if isinstance(trace, (bytes, bytearray)) or not isinstance(trace, Sequence):
        raise _fail(
            trace,
            "give the path of a mahimahi trace file or a sequence of int millisecond "
            "timestamps (e.g. pytest_tunpair.traces.constant(12))",
            option,
            source,
        )
    times: list[int] = []
    for index, value in enumerate(trace):
        where = f"item {index} of the sequence"
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise _fail(
                _shown(trace),
                f"{where} is {value!r}, not a non-negative int of milliseconds",
                option,
                source,
            )
        _append(times, int(value), where, _shown(trace), option, source)
    return _finish(times, "<sequence>", _shown(trace), option, source)


def _load_file(path: Path, given: object, option: str, source: str) -> Trace:
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except OSError as exc:
        raise _fail(
            given,
            f"cannot read the trace file {str(path)!r} ({exc.strerror or exc}): check the path",
            option,
            source,
        ) from exc
    times: list[int] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped:
            continue
        where = f"{path}, line {lineno}"
        if not stripped.isdigit():
            raise _fail(
                given,
                f"{where}: {stripped[:40]!r} is not a millisecond timestamp (a trace has one "
                "non-negative integer per line)",
                option,
                source,
            )
        _append(times, int(stripped), where, given, option, source)
    return _finish(times, str(path), given, option, source)


def _append(times: list[int], ms: int, where: str, given: object, option: str, source: str) -> None:
    if times and ms < times[-1]:
        raise _fail(
            given,
            f"{where}: {ms} is earlier than the timestamp before it ({times[-1]}); "
            "trace timestamps never decrease",
            option,
            source,
        )
    times.append(ms)


def _finish(times: list[int], name: str, given: object, option: str, source: str) -> Trace:
    what = "the sequence" if name == "<sequence>" else f"the trace file {name}"
    if not times:
        raise _fail(given, f"{what} has no timestamps (one integer ms per line)", option, source)
    if times[-1] == 0:
        raise _fail(
            given,
            f"{what} lasts no time (its last timestamp is 0), so repeating it never "
            "advances: end it at the trace's length in ms",
            option,
            source,
        )
    return Trace(tuple(times), name)


def constant(mbit: float, ms: int = 1000) -> list[int]:
    """A trace for a constant ``mbit`` Mbit/s: ``round(mbit * ms / 12)`` opportunities
    spread evenly over ``ms`` milliseconds, the last at ``ms``.

    ``constant(12)`` is ``[1, 2, ..., 1000]``. The rate is rounded to whole opportunities
    per ``ms``: for rates below 12 Mbit/s per millisecond-resolution step, a longer ``ms``
    gives a closer rate (``constant(0.1, ms=60_000)`` is exactly 100 kbit/s).
    """
    if isinstance(mbit, bool) or not isinstance(mbit, numbers.Real) or not mbit > 0:
        raise ValueError(f"constant(mbit={mbit!r}): the rate is a number of Mbit/s > 0")
    if isinstance(ms, bool) or not isinstance(ms, numbers.Integral) or ms < 1:
        raise ValueError(f"constant(ms={ms!r}): the trace length is an int of ms >= 1")
    count = round(float(mbit) * 1e6 * ms / _BITS_PER_OPPORTUNITY_PER_MS)
    if count < 1:
        raise ValueError(
            f"constant({mbit}, ms={ms}): less than one 1500-byte opportunity in {ms} ms; "
            f"give a longer ms (at least {math.ceil(_BITS_PER_OPPORTUNITY_PER_MS / (mbit * 1e6))})"
        )
    # The i-th opportunity at ceil(i * ms / count): evenly spread, the last one exactly at ms.
    return [-(-i * ms // count) for i in range(1, count + 1)]


def save(times: Sequence[int] | Trace, path: str | os.PathLike[str]) -> None:
    """Write a trace file mahimahi's ``mm-link`` reads: one timestamp per line."""
    values = times.times if isinstance(times, Trace) else load(times).times
    Path(path).write_text("".join(f"{t}\n" for t in values), encoding="ascii")


class TraceServer:
    """Serves a FIFO queue's packets from a trace: when each packet's last byte leaves.

    Pure and clock-free: the queue passes times in (``time.monotonic()`` seconds). It is
    a server of the bottleneck queue: for its head packet the queue asks :meth:`ready`
    when it can start, then calls :meth:`finish` once per packet, in order. ``start``
    is the time the trace's millisecond 0 maps to. Not thread-safe; the relay thread owns
    it.
    """

    __slots__ = ("_k", "_k_time", "_left", "_n", "_period", "_repeat", "_start", "_times", "trace")

    def __init__(self, trace: Trace, start: float, *, repeat: bool = True) -> None:
        self.trace = trace
        self._times = trace.times
        self._n = len(trace.times)
        self._period = trace.period_ms
        self._start = start
        self._repeat = repeat
        # The opportunity that carries the next byte (a global index: pass k // n, line
        # k % n) and how many bytes it has left.
        self._k = 0
        self._left = PACKET_SIZE
        # The time of opportunity _k: a packet that starts by then (one right behind
        # another, on a per-segment link nearly every one) needs no search.
        self._k_time = self._time(0) if self._n else math.inf

    def _time(self, k: int) -> float:
        rounds, line = divmod(k, self._n)
        return self._start + (rounds * self._period + self._times[line]) / 1000.0

    def _first_at_or_after(self, t: float) -> int:
        if t == math.inf:
            # Past every opportunity: the index after the last, or "never" when repeating.
            return self._n if not self._repeat else _NEVER
        rel = (t - self._start) * 1000.0 - _EPSILON_MS
        if rel <= self._times[0]:
            return 0
        rounds = max(0, math.floor(rel / self._period))
        line = bisect.bisect_left(self._times, rel - rounds * self._period)
        if line == self._n:
            rounds += 1
            line = bisect.bisect_left(self._times, rel - rounds * self._period)
        return rounds * self._n + line

    def _ended(self, k: int) -> bool:
        return k >= _NEVER or (not self._repeat and k >= self._n)

    def ready(self, t: float) -> float:
        """The earliest time ``>= t`` at which a packet can start: the next opportunity
        with bytes left, ``math.inf`` once the trace has ended (``repeat=False``). Pure:
        it consumes nothing."""
        if t <= self._k_time:
            return self._k_time if not self._ended(self._k) else math.inf
        k = max(self._k, self._first_at_or_after(t))
        return math.inf if self._ended(k) else self._time(k)

    def finish(self, size: int, start: float) -> float:
        """Deliver a ``size``-byte packet that starts at ``start`` (a time :meth:`ready`
        returned); return when its last byte leaves, the time of the opportunity that
        carries it, and consume the bytes it used.

        The packet uses what is left of the opportunity at ``start`` (so packets queued
        behind one another share opportunities) and as many further ones as it needs;
        opportunities that passed before ``start`` are lost. ``math.inf`` (and nothing
        consumed) if the trace ends first: the packet never leaves.
        """
        k0 = self._k if start <= self._k_time else self._first_at_or_after(start)
        k, left = (k0, PACKET_SIZE) if k0 > self._k else (self._k, self._left)
        remaining = max(size, 1)  # an empty packet still takes its turn
        while True:
            if self._ended(k):
                return math.inf
            take = min(left, remaining)
            remaining -= take
            left -= take
            if remaining == 0:
                break
            k, left = k + 1, PACKET_SIZE
        due = self._time(k)
        if left == 0:
            k, left = k + 1, PACKET_SIZE
        if k != self._k:
            self._k_time = self._time(k) if not self._ended(k) else math.inf
        self._k, self._left = k, left
        return due

    def opportunity_times(self, until: float) -> Iterator[float]:
        """The time of every opportunity from the start to ``until`` (for mahimahi's log)."""
        k = 0
        while not self._ended(k) and (t := self._time(k)) < until:
            yield t
            k += 1

    def capacity(self, t0: float, t1: float) -> int:
        """Bytes the trace could deliver in ``[t0, t1)``, for plotting the configured link."""
        if t1 <= t0:
            return 0
        end = self._first_at_or_after(t1)
        begin = self._first_at_or_after(t0)
        if not self._repeat:
            end, begin = min(end, self._n), min(begin, self._n)
        return (end - begin) * PACKET_SIZE


class TraceKind(Kind):
    """The option schema's kind for ``impair(trace=...)``: checked by :func:`load`."""

    allowed = (
        "a mahimahi trace: the path of a trace file, or a sequence of int millisecond "
        "timestamps (traces.constant(12)); None for none"
    )
    metavar = "FILE"

    def check(self, value: object) -> Trace | None:
        if value is None:
            return None
        try:
            return load(value)  # type: ignore[arg-type]
        except OptionError as exc:
            raise Invalid(exc.reason) from None

    def format(self, value: object) -> str:
        return value.describe() if isinstance(value, Trace) else repr(value)
