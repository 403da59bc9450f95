"""Scenario rules on a link: outages, fault rules for retry logic, a path MTU.

Each is a rule of the relay (``apply(pkt, now) -> Verdict | None``, see
``_link.Rule``), run in the relay thread after the hooks and before the impairment engine,
and at the same time the handle the test holds (``tun_pair.outage()``, ``tun_pair.fail()``,
``tun_pair.path_mtu()``). The relay thread only reads a rule's settings and bumps its
counters; the test thread ends a rule through its pair, which asks the relay to remove it.

A rule decides from the packet's bytes with the one header parser (``_wire.headers``),
never scapy: it runs on every packet of its direction (docs/internals.md, "scapy decode cost":
about 0.24 ms a packet, against a few microseconds for a header parse).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from .._errors import OptionError
from .._packets.packet import Packet, parsed
from .._schema import Bool, Choice, Duration, Int, Invalid, Kind
from .._wire import headers as _h
from .._wire import replies as _replies
from .._wire.numbers import IPV4_MIN_MTU
from .link import Verdict

__all__ = ["HOWS", "Fault", "Outage", "PathMtu", "field_predicate"]

#: What ``fail(how=...)`` does to a matching packet, and the action it is recorded with.
HOWS = {"drop": "dropped", "reset": "reset", "unreachable": "unreachable"}

_LOST = Verdict("lost")
_DROPPED = Verdict("dropped")


def field_predicate(fields: Mapping[str, Any], what: str) -> Callable[[Packet], bool] | None:
    """The keyword filters of ``packets.filter`` (``dport=443, flags="S"``: each a value or
    a predicate on the value) as one predicate; None when there are none. The fields are
    parsed from the packet's bytes without scapy (``Packet``'s fields), once per packet. Unknown
    names raise ``TypeError`` naming the known ones; a bad address or flags ``ValueError``."""
    if not fields:
        return None
    from .._packets.match import packet_filter

    return packet_filter(fields=dict(fields), what=what)


def _checked(kind: Kind, name: str, value: object, source: str) -> Any:
    try:
        return kind.check(value)
    except Invalid as exc:
        raise OptionError(name, value, source=source, reason=exc.reason) from None


def check_duration(name: str, value: object, source: str) -> float:
    """A duration argument (seconds, or ``"500ms"``), or :class:`OptionError`."""
    seconds: float = _checked(Duration(), name, value, source)
    return seconds


def check_fail(times: object, how: object) -> tuple[int | None, str]:
    """``fail()``'s ``times`` and ``how``, checked."""
    count = _checked(
        Int(1, optional=True, what="an int >= 1, or None for every matching packet"),
        "times",
        times,
        "fail()",
    )
    kind = _checked(Choice(tuple(HOWS)), "how", how, "fail()")
    return count, kind


def check_mtu(mtu: object, icmp: object) -> tuple[int, bool]:
    """``path_mtu()``'s ``mtu`` (68 to 65535, RFC 791's minimum) and ``icmp``, checked."""
    size = _checked(
        Int(IPV4_MIN_MTU, 65535, what="a whole number from 68 to 65535, or None to end it"),
        "mtu",
        mtu,
        "path_mtu()",
    )
    flag = _checked(Bool(), "icmp", icmp, "path_mtu()")
    return size, flag


def _fmt_time(seconds: float) -> str:
    return f"{seconds:.3f}s"


class Outage:
    """A link outage: every packet of its directions read in ``[start, end)`` is dropped
    and recorded ``"lost"``. Returned by ``tun_pair.outage()``; a context manager that
    ends the outage on exit; :meth:`end` ends it now.

    ``start`` and ``end`` are seconds since the pair came up (``end`` is ``math.inf``
    until the outage ends, when no duration was given).
    """

    def __init__(
        self,
        start: float,
        end: float,
        directions: tuple[str, ...],
        t0: float,
        on_end: Callable[[Outage], None],
    ) -> None:
        #: Seconds since the pair came up when the outage starts.
        self.start = start
        #: ... and when it ends (``math.inf``: until :meth:`end`).
        self.end_time = end
        #: The directions it drops.
        self.directions = directions
        #: Packets it dropped so far.
        self.dropped = 0
        self._t0 = t0
        self._mono_start = t0 + start
        self._mono_end = t0 + end
        self._on_end = on_end
        self._ended = False

    def apply(self, pkt: Packet, now: float) -> Verdict | None:
        """The relay thread's call for each packet read at ``now``: ``lost`` inside the
        window, else None (pass). Not for tests to call: it counts the packet."""
        if self._mono_start <= now < self._mono_end:
            self.dropped += 1
            return _LOST
        return None

    def in_force(self, now: float) -> bool:
        """True if the outage has not ended by ``now`` (``time.monotonic()``)."""
        return not self._ended and now < self._mono_end

    @property
    def active(self) -> bool:
        """True until the outage has ended (it may not have begun yet)."""
        return self.in_force(time.monotonic())

    def end(self) -> None:
        """End the outage now (no-op once ended): packets read from now on pass."""
        if self._ended:
            return
        now = time.monotonic()
        if now < self._mono_end:
            # Ended before it began: the window is empty (end before start).
            self._mono_end = now
            self.end_time = now - self._t0
        self._ended = True
        self._on_end(self)

    def __enter__(self) -> Outage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.end()

    def describe(self) -> str:
        """One line for the failure report: the window and how many packets it dropped."""
        until = "until ended" if math.isinf(self.end_time) else f"to {_fmt_time(self.end_time)}"
        return (
            f"outage {'/'.join(self.directions)}: from {_fmt_time(self.start)} {until} "
            f"({self.dropped} lost)"
        )

    def __repr__(self) -> str:
        return f"<Outage {self.describe()}>"


class Fault:
    """A fault rule: the first ``times`` packets that match get ``how``. Returned by
    ``tun_pair.fail()``; :attr:`hits` counts the packets it acted on, :meth:`remove` stops
    it early."""

    def __init__(
        self,
        match: Callable[[Packet], Any] | None,
        fields: Callable[[Packet], bool] | None,
        *,
        times: int | None,
        how: str,
        direction: str,
        what: str,
        on_remove: Callable[[Fault], None],
    ) -> None:
        self._match = match
        self._fields = fields
        #: How many packets it acts on (None: every matching packet).
        self.times = times
        #: ``"drop"``, ``"reset"`` or ``"unreachable"``.
        self.how = how
        #: The direction it watches.
        self.direction = direction
        #: Packets it acted on so far.
        self.hits = 0
        self._what = what
        self._on_remove = on_remove
        self._removed = False
        self._lock = threading.Lock()

    @property
    def spent(self) -> bool:
        """True once it acted on ``times`` packets (it lets everything pass from then on)."""
        return self.times is not None and self.hits >= self.times

    @property
    def active(self) -> bool:
        """Neither spent nor removed."""
        return not self._removed and not self.spent

    def in_force(self, now: float) -> bool:
        """:attr:`active` (the time does not matter to a fault)."""
        return self.active

    def apply(self, pkt: Packet, now: float) -> Verdict | None:
        """The relay thread's call for each packet of its direction: ``how`` for a matching
        one while not spent, else None (pass). Not for tests to call: it counts the hit."""
        if self.spent:
            return None
        if self._fields is not None and not self._fields(pkt):
            return None
        if self._match is not None and not self._match(pkt):
            return None
        self.hits += 1
        if self.how == "drop":
            return _DROPPED
        build = _replies.tcp_reset if self.how == "reset" else _replies.unreachable
        replies = _replies.reply_frame(pkt.data, pkt.mode, build)
        # A packet no reply may answer (a reset for UDP, an ICMP error about an ICMP error)
        # is dropped all the same; its action says no reply went back.
        if not replies:
            return _DROPPED
        return Verdict(HOWS[self.how], tuple(replies))

    def remove(self) -> None:
        """Stop the rule now (no-op once removed). ``hits`` keeps its count."""
        with self._lock:
            if self._removed:
                return
            self._removed = True
        self._on_remove(self)

    def describe(self) -> str:
        """One line for the failure report: what it matches, what it does, its hits."""
        hits = f"{self.hits} hits" if self.times is None else f"{self.hits}/{self.times} hits"
        return f"fail {self.direction}: {self.how} {self._what} ({hits})"

    def __repr__(self) -> str:
        return f"<Fault {self.describe()}>"


class PathMtu:
    """A path MTU smaller than the pair's: see ``TunPair.path_mtu``."""

    def __init__(self, mtu: int, *, icmp: bool, directions: tuple[str, ...]) -> None:
        #: The largest IP packet that passes.
        self.mtu = mtu
        #: Whether too-big packets are answered with ICMP (False: a PMTU black hole).
        self.icmp = icmp
        #: The directions it applies to.
        self.directions = directions
        #: Packets dropped as too big so far.
        self.too_big = 0
        #: IPv4 packets cut into fragments so far.
        self.fragmented = 0

    def apply(self, pkt: Packet, now: float) -> Verdict | None:
        """The relay thread's call for each packet of its directions: too big (with or
        without ICMP back) or cut into IPv4 fragments, else None (pass). Not for tests to
        call: it counts the packet."""
        data = pkt.data
        if len(data) <= self.mtu:  # the IP packet inside is no longer: no parse needed
            return None
        # The IP packet starts behind the Ethernet header and any VLAN tags (the parsed
        # offsets count from the frame, virtio-net header included).
        l3 = max(parsed(pkt)[_h.L3] - (len(pkt.frame) - len(data)), 0)
        if len(data) - l3 <= self.mtu:
            return None
        mtu = self.mtu
        if _replies.is_too_big(data[l3:], mtu):
            self.too_big += 1
            if not self.icmp:
                return Verdict("too-big")
            replies = _replies.reply_frame(data, pkt.mode, lambda p: _replies.frag_needed(p, mtu))
            return Verdict("too-big", tuple(replies))
        fragments = _replies.reply_frame(
            data, pkt.mode, lambda p: _replies.fragment_ipv4(p, mtu), back=False
        )
        if not fragments:
            return None  # not IPv4 we can cut (malformed): let the kernel judge it
        self.fragmented += 1
        return Verdict("fragmented", forward=tuple(fragments))

    def in_force(self, now: float) -> bool:
        """Always: a path MTU lasts until ``path_mtu(None)`` or another ``path_mtu()``."""
        return True

    def describe(self) -> str:
        """One line for the failure report: the MTU, ICMP or not, and the counts."""
        how = "ICMP back to the sender" if self.icmp else "no ICMP: black hole"
        return (
            f"path_mtu {'/'.join(self.directions)}: {self.mtu} ({how}; {self.too_big} too big, "
            f"{self.fragmented} fragmented)"
        )

    def __repr__(self) -> str:
        return f"<PathMtu {self.describe()}>"
