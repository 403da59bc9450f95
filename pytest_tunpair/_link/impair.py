"""Deterministic, netem-like packet impairment for the relay thread.

This module is pure logic: no sockets, no threads, no clock.  The relay reads a packet from
one TUN device, hands it to :meth:`ImpairmentEngine.submit` together with the time it read it
(``time.monotonic()``), and gets back a list of :class:`Emit` records saying what to write to
the other device and when.  One engine models one direction of the link: its random
effects.  The bottleneck -- ``rate``, the bounded queue and its discipline, and the
propagation delay the engine draws here -- is the link's queue (``_queue.LinkQueue``),
which the relay runs after the engine.

Effects, applied to each packet in this order
---------------------------------------------
1. **loss** -- with probability ``loss`` the packet is dropped: exactly one
   ``Emit(due=None, data, "lost")`` and nothing else (a lost packet occupies no link time and
   does not overtake a held packet).  With ``ecn=True`` an ECN-capable packet (ECT(0) or
   ECT(1)) is marked CE instead (``_wire.ecn.set_ce``) and goes on, with action ``"marked"``.
2. **corrupt** -- with probability ``corrupt`` one bit, chosen uniformly over the whole packet,
   is flipped.  The length never changes.  An empty packet has no bit to flip and is passed on
   unchanged.
3. **delay + jitter** -- the packet's latency is ``max(0, delay + U(-jitter, +jitter))``
   and ``due = now + latency``.  The clamp means jitter never schedules a packet before it
   arrived.  As in netem, jitter alone may reorder packets whose arrival gaps are smaller
   than the jitter.  (With a queue on the link the relay hands the latency to the queue,
   which applies it after the packet has left the bottleneck.)
4. **duplicate** -- with probability ``duplicate`` an exact copy of the (possibly corrupted)
   bytes is emitted right after the original with action ``"duplicated"``, with the same
   ``due`` (behind a rate it is a second transmission: the queue serialises it).
5. **reorder** -- with probability ``reorder`` the packet (with its duplicate) is held back.
   It is released right after the next *surviving* packet's emissions, with a ``due`` no
   earlier than theirs, so that packet overtakes it.  At most one packet is held at a time:
   a packet that arrives while another is held always overtakes it and is never held itself,
   so ``reorder=1.0`` swaps packets pairwise (2, 1, 4, 3, ...).  A held packet is never held
   forever: :meth:`ImpairmentEngine.deadline` is ``arrival + max(delay, 0.005)`` and
   :meth:`ImpairmentEngine.expire` releases it then, with ``due = max(its own due, deadline)``
   -- independent of how late the relay calls ``expire``.  ``expire(math.inf)`` flushes.

Actions
-------
Every :class:`Emit` carries exactly one action, the most informative one that applies:

* ``"lost"`` -- ``due`` is ``None``, nothing is written;
* ``"duplicated"`` -- the extra copy made by *duplicate*;
* ``"corrupted"`` -- the original, with one bit flipped (even if it was also delayed or
  reordered: the changed bytes matter most when reading a failure report);
* ``"reordered"`` -- the original, released after having been held back;
* ``"marked"`` -- the original, CE-marked where loss would have dropped it (``ecn``);
* ``"delayed"`` -- the original, with a latency > 0 (delay, jitter);
* ``"forwarded"`` -- the original, written as soon as it arrived.

Whether a packet is "delayed" is decided from the latency the engine drew (> 0), not by
comparing floats ``due > now``: ``now + 1e-17 == now`` must not flip the label when ``now``
is large.

Determinism
-----------
Each engine owns one ``random.Random(seed)`` and draws exactly six ``random()`` values per
submitted packet, always in this order, whether or not they are used: loss, corrupt, bit
position, jitter, duplicate, reorder.  Hence:

* the same seed and the same sequence of packet bytes give the same decisions (lost,
  corrupted and which bit, jitter drawn, duplicated, picked for reorder), byte for byte,
  whatever the ``now`` values -- times only shift ``due``;
* packet *k*'s decisions never depend on what happened to earlier packets, nor on the other
  settings: turning on ``delay`` does not change which packets ``loss`` drops, and raising
  ``loss`` from 0.1 to 0.2 drops a superset of the packets.  The bit position is the only
  draw scaled by the packet (by its length).

``loss=GilbertElliott(...)`` (burst loss, see ``_gemodel``) is the one decision that
depends on earlier packets, by design: its chain remembers the link's state. It draws from
its own ``random.Random("gemodel:<seed>")``, exactly two values per packet, so the six draws
above are unchanged and its losses too depend only on the seed and the packet's position.

One thing legitimately depends on timing: whether a held packet is released by being
overtaken or by :meth:`~ImpairmentEngine.expire`, and therefore whether the *next* packet
finds the hold slot free.  If the relay only calls ``submit`` (or packets arrive faster than
the hold time), the sequence of ``(data, action)`` emissions is fully determined by seed and
input bytes.

An engine is not thread-safe; the relay thread owns it.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from .._errors import OptionError
from .._schema import (
    Bool,
    Choice,
    Duration,
    Int,
    Invalid,
    Kind,
    OneOf,
    Probability,
    Rate,
    changed,
    declared,
    option,
    validate,
)
from .._wire.ecn import set_ce
from .._wire.numbers import ECN_NAMES
from ..traces import Trace, TraceKind
from .gemodel import GilbertElliott, GilbertElliottChain, LossModel
from .profiles import ProfileKind, profile_values
from .queue import DEFAULT_LIMIT, DISCIPLINES, FQ_FLOWS, QueueSpec

__all__ = [
    "ACTIONS",
    "REORDER_MIN_HOLD",
    "RUN_KEEP",
    "RUN_LOST",
    "RUN_MARK",
    "Action",
    "Emit",
    "ImpairmentEngine",
    "ImpairmentSpec",
]

Action = Literal["forwarded", "lost", "duplicated", "corrupted", "delayed", "reordered", "marked"]
ACTIONS: tuple[Action, ...] = (
    "forwarded",
    "lost",
    "marked",
    "duplicated",
    "corrupted",
    "delayed",
    "reordered",
)

#: What :meth:`ImpairmentEngine.submit_run` decided for a run of segments.
RUN_KEEP, RUN_LOST, RUN_MARK = 0, 1, 2

# With no delay there is no natural reorder window; 5 ms is long enough for the next packet
# of a burst to overtake, and short enough that a lone packet is not noticeably late.
REORDER_MIN_HOLD = 0.005

_PROBABILITY = Probability()
_DURATION = Duration()
_RATE = Rate()


class _AqmDuration(Duration):
    """A duration > 0, or None for the queue discipline's own default (CoDel's, PIE's)."""

    allowed = (
        "a duration > 0: seconds as a number, or a string with unit s, ms or us"
        " (e.g. '5ms'); None for the discipline's default"
    )

    def check(self, value: object) -> float | None:  # type: ignore[override]
        if value is None:
            return None
        seconds = super().check(value)
        if seconds <= 0.0:
            raise self.refuse()
        return seconds

    def format(self, value: Any) -> str:
        return "None" if value is None else super().format(value)

    def from_text(self, text: str) -> Any:
        try:
            return super().from_text(text)
        except Invalid:
            raise Invalid("add a unit (5ms, 100ms)") from None


class MatchKind(Kind):
    """``impair(match=...)``: which packets a class of the direction takes -- packet fields
    as ``packets.filter()`` takes them (checked here, so a typo fails at once), or a
    predicate. Normalised to a sorted tuple of ``(field, value)`` pairs (hashable, as the
    spec is), or the callable itself."""

    allowed = (
        "packet fields as packets.filter() takes them: a dict such as "
        "{'proto': 'udp', 'dport': 443} (or the text 'proto=udp,dport=443'), each value "
        "a value or a predicate; or a predicate Packet -> bool; None for every packet"
    )
    metavar = "FIELDS"

    def check(self, value: object) -> Any:
        if value is None:
            return None
        if isinstance(value, str):
            value = self._parse(value)
        if isinstance(value, Mapping):
            value = tuple(value.items())
        elif callable(value):
            return value
        if not isinstance(value, tuple) or not value:
            raise self.refuse()
        items = []
        for item in value:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
                raise self.refuse()
            items.append((item[0], _match_value(*item)))
        return tuple(sorted(items, key=lambda kv: kv[0]))

    def _parse(self, text: str) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, eq, raw = part.partition("=")
            name, raw = name.strip(), raw.strip()
            if not eq or not name or not raw:
                raise Invalid(f"write fields as name=value, comma-separated ({part!r})")
            fields[name] = int(raw) if name in _INT_FIELDS and raw.isdigit() else raw
        if not fields:
            raise self.refuse()
        return fields

    def format(self, value: Any) -> str:
        if value is None:
            return "None"
        if callable(value):
            return str(getattr(value, "__qualname__", None) or repr(value))
        return ",".join(
            f"{k}={getattr(v, '__qualname__', None) or v}" if callable(v) else f"{k}={v}"
            for k, v in value
        )


# The fields a match may name, and what each takes (besides a predicate).
_INT_FIELDS = frozenset(
    {"ip_version", "ip_proto", "sport", "dport", "tcp_seq", "tcp_ack", "window", "ttl",
     "icmp_type", "icmp_code"}
)  # fmt: skip
_PROTOS = ("tcp", "udp", "icmp", "icmpv6", "arp")


def _match_value(name: str, value: Any) -> Any:
    """``value`` for field ``name`` of a match, checked (``Invalid`` naming what to give)."""
    from .._packets.match import packet_filter
    from .._packets.packet import FIELDS

    if name not in FIELDS:
        raise Invalid(f"{name!r} is not a packet field; the fields are: {', '.join(FIELDS)}")
    if callable(value):
        return value
    if name in _INT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise Invalid(f"{name} is a whole number >= 0 (or a predicate), not {value!r}")
    elif name == "proto":
        if value not in _PROTOS:
            raise Invalid(f"proto is one of {', '.join(_PROTOS)} (or a predicate), not {value!r}")
    elif name == "ecn":
        if value not in ECN_NAMES:
            raise Invalid(f"ecn is one of {', '.join(ECN_NAMES)} (or a predicate), not {value!r}")
    elif name == "payload":
        if not isinstance(value, bytes):
            raise Invalid(f"payload is bytes (or a predicate), not {value!r}")
    elif name == "tcp_options":
        raise Invalid("tcp_options takes a predicate (lambda opts: ...)")
    else:  # src, dst, flags: the filter's own checks
        try:
            packet_filter(fields={name: value}, what="impair(match=...)")
        except (TypeError, ValueError) as exc:
            raise Invalid(str(exc)) from None
        if name in ("src", "dst"):
            import ipaddress

            value = ipaddress.ip_address(value).compressed
    return value


class _Name(Kind):
    allowed = "a name for the class (a non-empty string), or None for one made from match"
    metavar = "NAME"

    def check(self, value: object) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise self.refuse()
        return value.strip()

    def format(self, value: Any) -> str:
        return str(value)


@dataclass(frozen=True)
class ImpairmentSpec:
    """What to do to the packets of one link direction; the neutral default does nothing.

    Each parameter is one field below, declared with its kind, default and help
    (``_schema.option``): validation here, ``TunPair.impair()``'s keyword arguments, the
    ``tunpair run`` flags and the table in ``docs/options.md`` come from these declarations,
    so a new parameter is one new field (and its effect in the engine).

    Construction validates and normalises every field (``ImpairmentSpec(loss=1.5)`` raises),
    so an engine never sees a nonsensical spec.  Accepted values:

    * ``loss``, ``duplicate``, ``reorder``, ``corrupt``: probability, a real number in
      ``[0, 1]`` or a percentage string such as ``"10%"`` or ``"0.5 %"``; ``loss`` may
      also be a burst-loss model, :class:`~pytest_tunpair.GilbertElliott`;
    * ``delay``, ``jitter``: seconds, a real number ``>= 0`` or a string with unit ``s``,
      ``ms`` or ``us`` (``"20ms"``, ``"1.5s"``, ``"200us"``);
    * ``rate``: ``None`` (unlimited) or bits per second ``> 0``, as a real number or a tc(8)
      style string: ``bit``/``kbit``/``mbit``/``gbit``/``tbit`` are bits/s (powers of 1000),
      ``kibit``/``mibit``/``gibit``/``tibit`` powers of 1024, and ``bps``/``kbps``/``mbps``/...
      are **bytes** per second (so ``"1mbps"`` is 8 000 000 bits/s), case-insensitive;
    * ``seed``: ``None`` or an int.

    ``bool`` is rejected everywhere a number is expected.  Bad values, including values of the
    wrong type, raise :class:`~pytest_tunpair.OptionError` (a ``ValueError``) naming the
    argument and what is allowed, so a caller reporting user configuration errors has one
    exception to catch; ``TypeError`` is kept for unknown argument names, as Python itself
    does.
    """

    # First: the parameters below it start from the profile's, and each given one wins.
    profile: str | None = option(
        None,
        ProfileKind(),
        "a named access link (3g, lte, 5g, satellite, dsl, cable, wifi, wifi-congested, "
        "intercontinental): its rate, delay, jitter, loss and queue for this direction "
        "(a->b uplink, b->a downlink); parameters given with it override its values; "
        "see docs/profiles.md",
        reason_names_option=True,
        group="impair",
        inert=True,  # a label: what it sets is in the other fields
    )
    # option() returns a dataclasses.Field (as for the float fields, which ruff lets pass).
    loss: float | GilbertElliott = option(  # noqa: RUF009
        0.0,
        OneOf((_PROBABILITY, LossModel())),
        "drop probability, or a burst-loss model: GilbertElliott(p, r)",
        reason_names_option=True,
        group="impair",
    )
    delay: float = option(
        0.0, _DURATION, "added one-way latency", reason_names_option=True, group="impair"
    )
    jitter: float = option(
        0.0,
        _DURATION,
        "uniform +/- variation of the delay",
        reason_names_option=True,
        group="impair",
    )
    duplicate: float = option(
        0.0,
        _PROBABILITY,
        "probability a packet is sent twice",
        reason_names_option=True,
        group="impair",
    )
    reorder: float = option(
        0.0,
        _PROBABILITY,
        "probability a packet is overtaken by the next",
        reason_names_option=True,
        group="impair",
    )
    corrupt: float = option(
        0.0,
        _PROBABILITY,
        "probability of one flipped bit",
        reason_names_option=True,
        group="impair",
    )
    rate: float | None = option(
        None,
        _RATE,
        "link rate: packets leave spaced by their serialisation time",
        reason_names_option=True,
        group="impair",
    )
    # A Trace is a frozen dataclass (hashable), as immutable as the floats around it.
    trace: Trace | None = option(  # noqa: RUF009
        None,
        TraceKind(),
        "the link delivers at the opportunities of a mahimahi trace (1500 bytes each) "
        "instead of a constant rate; see docs/scenarios.md",
        group="impair",
    )
    trace_repeat: bool = option(
        True,
        Bool(),
        "start the trace again when it ends (False: delivery stops there)",
        group="impair",
        inert=True,  # alone it changes nothing
    )
    limit: int = option(
        DEFAULT_LIMIT,
        Int(1, what="a whole number of packets >= 1"),
        "packets a direction may hold (waiting, on the wire, delayed), as netem's limit; "
        "beyond it the queue discipline drops",
        reason_names_option=True,
        group="impair",
    )
    limit_bytes: int | None = option(
        None,
        Int(1, optional=True, what="None or a whole number of bytes >= 1"),
        "bytes a direction may hold, on top of limit (None: no bound in bytes)",
        reason_names_option=True,
        group="impair",
    )
    queue: str = option(
        "droptail",
        Choice(DISCIPLINES),
        "queue discipline: droptail drops the arrival, drophead the oldest waiting packet; "
        "codel (RFC 8289) and pie (RFC 8033) drop early to keep the queueing delay near "
        "target; fq_codel (RFC 8290) gives each flow its own CoDel queue, served in turn",
        reason_names_option=True,
        group="impair",
    )
    target: float | None = option(
        None,
        _AqmDuration(),
        "queueing delay CoDel, PIE or fq_codel aims at",
        reason_names_option=True,
        group="impair",
        default_doc="5ms (codel), 15ms (pie)",
    )
    interval: float | None = option(
        None,
        _AqmDuration(),
        "CoDel's interval: how long the delay may stay above target before it drops",
        reason_names_option=True,
        group="impair",
        default_doc="100ms",
    )
    flows: int = option(
        FQ_FLOWS,
        Int(1, 65536, what="a whole number of flow queues from 1 to 65536"),
        "fq_codel's flow queues: packets are hashed into them by their 5-tuple",
        reason_names_option=True,
        group="impair",
    )
    quantum: int | None = option(
        None,
        Int(64, optional=True, what="None or a whole number of bytes >= 64"),
        "bytes fq_codel serves a flow per turn",
        reason_names_option=True,
        group="impair",
        default_doc="MTU + 14 (1514)",
    )
    ecn: bool = option(
        False,
        Bool(),
        "mark ECN-capable packets CE where CoDel, PIE, fq_codel or loss would drop them",
        reason_names_option=True,
        group="impair",
    )
    match: Any = option(  # noqa: RUF009
        None,
        MatchKind(),
        "impair only the packets that match, as a class of the direction with its own "
        "link (queue, random stream, stats); the rest keep the direction's settings",
        reason_names_option=True,
        group="impair",
        inert=True,
        cli=False,  # the command line's --class
    )
    name: str | None = option(
        None,
        _Name(),
        "the class's name (stats, reports); default: made from match",
        group="impair",
        inert=True,
        cli=False,
    )
    seed: int | None = option(
        None,
        Int(None, optional=True, what="an int, or None to use the session seed"),
        "seed of the random decisions (None: the pair's seed); same seed, same decisions",
        reason_names_option=True,
        group="impair",
        inert=True,
        cli=False,  # the command line's --seed is the pair's
    )

    def __post_init__(self) -> None:
        # Normalising here rather than only in from_kwargs means direct construction is just
        # as safe, and that "10ms" and 0.01 give equal (and equally hashed) specs.
        validate(self, source="impair()")
        if self.name is not None and self.match is None:
            raise OptionError(
                "name",
                self.name,
                source="impair()",
                reason="name= names a class of packets: give match= too",
            )
        if self.trace is not None and self.rate is not None:
            raise OptionError(
                "trace",
                self.trace.name,
                source="impair()",
                reason="give rate or trace, not both: a trace is the link's rate",
            )
        self._check_queue_parameters()

    def _check_queue_parameters(self) -> None:
        """A queue parameter the queue does not use is an error, not a silent no-op."""
        lossy = isinstance(self.loss, GilbertElliott) or self.loss > 0.0
        # (parameter, its value, given?, the queues that use it, what to add instead)
        checks = (
            ("flows", self.flows, self.flows != FQ_FLOWS, ("fq_codel",)),
            ("quantum", self.quantum, self.quantum is not None, ("fq_codel",)),
            ("target", self.target, self.target is not None, ("codel", "pie", "fq_codel")),
            ("interval", self.interval, self.interval is not None, ("codel", "fq_codel")),
            ("ecn", self.ecn, self.ecn and not lossy, ("codel", "pie", "fq_codel")),
        )
        for name, value, given, queues in checks:
            if given and self.queue not in queues:
                users = ", ".join(queues[:-1]) + " or " * (len(queues) > 1) + queues[-1]
                also = " (or give loss: ecn marks what loss would take)" * (name == "ecn")
                raise OptionError(
                    name,
                    value,
                    source="impair()",
                    reason=f"{name} does nothing on a {self.queue} queue: set the queue "
                    f"to {users} too{also}",
                )

    @classmethod
    def names(cls) -> list[str]:
        """The parameter names, in declaration order (what ``impair()`` accepts)."""
        return [f.name for f, _ in declared(cls)]

    @classmethod
    def from_kwargs(cls, *, towards: str = "a->b", **kwargs: Any) -> ImpairmentSpec:
        """Build the spec of direction ``towards`` from user keyword arguments, e.g.
        ``impair()``'s: a ``profile``'s values for that direction, then every parameter
        given beside it (``profile="lte", loss=0``: LTE without its loss).

        Raises ``TypeError`` for an unknown name (listing the allowed ones) and
        :class:`~pytest_tunpair.OptionError` for a bad value.
        """
        allowed = cls.names()
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            names = ", ".join(repr(name) for name in unknown)
            raise TypeError(
                f"impair() got unexpected keyword argument(s) {names}; "
                f"allowed: {', '.join(allowed)}"
            )
        profile = kwargs.get("profile")
        if profile is not None:
            try:
                name = ProfileKind().check(profile)
            except Invalid as exc:
                raise OptionError(
                    "profile", profile, source="impair()", reason=exc.reason
                ) from None
            assert name is not None
            kwargs = {**profile_values(name, towards), **kwargs, "profile": name}
        return cls(**kwargs)

    @property
    def class_name(self) -> str | None:
        """The name of the class this spec is for (``name``, else made from ``match``);
        ``None`` for the direction's own settings."""
        if self.match is None:
            return self.name
        return self.name or MatchKind().format(self.match)

    def describe_match(self) -> str:
        """``match`` as the report shows it (``proto=udp,dport=443``, a predicate's name)."""
        return MatchKind().format(self.match)

    def predicate(self) -> Any:
        """``match`` as a predicate on a ``Packet`` (``None`` without one)."""
        from .._packets.match import packet_filter

        match = self.match
        if match is None or callable(match):
            return match
        return packet_filter(fields=dict(match), what="impair(match=...)")

    def queue_spec(self) -> QueueSpec:
        """The bottleneck queue these parameters describe (``limit`` ... ``ecn``)."""
        return QueueSpec(
            limit=self.limit,
            limit_bytes=self.limit_bytes,
            discipline=self.queue,  # type: ignore[arg-type]  # checked by its Choice
            target=self.target,
            interval=self.interval,
            ecn=self.ecn,
            flows=self.flows,
            quantum=self.quantum,
        )

    @property
    def per_segment(self) -> bool:
        """Every decision is taken per wire packet: anything but ``delay`` and ``jitter`` is
        set (a rate, a trace, the queue, loss, ECN, corruption, duplication, reordering).
        The relay then splits GSO super-packets into their segments before the engine and
        the queue; with ``delay``/``jitter`` alone they pass whole."""
        return any(name not in _WHOLE_OK for name, decl, _v in changed(self) if not decl.inert)

    @property
    def needs_engine(self) -> bool:
        """A random effect is on: loss, corruption, duplication, reordering or jitter."""
        lossy = isinstance(self.loss, GilbertElliott) or self.loss > 0.0
        return (
            lossy
            or self.corrupt > 0.0
            or self.duplicate > 0.0
            or self.reorder > 0.0
            or self.jitter > 0.0
        )

    @property
    def needs_queue(self) -> bool:
        """Packets are held (rate, delay, jitter) or the queue is configured: the direction
        gets a bottleneck queue, which bounds them."""
        return (
            self.rate is not None
            or self.trace is not None
            or self.delay > 0.0
            or self.jitter > 0.0
            or any(name in _QUEUE_FIELDS for name, _decl, _v in changed(self))
        )

    @property
    def active(self) -> bool:
        """True if any impairment differs from the neutral default (the seed alone is not one)."""
        return any(not decl.inert for _, decl, _ in changed(self))

    def describe(self) -> str:
        """One short line for failure reports, e.g. ``loss=10% delay=20ms jitter=5ms seed=42``.

        The output uses the same units :meth:`from_kwargs` accepts.
        """
        parts = [f"profile={self.profile}"] if self.profile is not None else []
        parts += [
            f"{name}={decl.kind.format(v)}" for name, decl, v in changed(self) if not decl.inert
        ]
        if not parts:
            parts.append("no impairment")
        parts += [
            f"{name}={decl.kind.format(v)}"
            for name, decl, v in changed(self)
            if decl.inert and name not in ("match", "name", "profile")
        ]
        return " ".join(parts)


# What a link may do to GSO super-packets whole (delay is the same for every segment).
_WHOLE_OK = frozenset({"delay", "jitter"})
# The parameters that configure the queue (and nothing else).
_QUEUE_FIELDS = frozenset(
    {"limit", "limit_bytes", "queue", "target", "interval", "flows", "quantum"}
)


@dataclass(frozen=True)
class Emit:
    """One consequence of a submitted packet: write ``data`` at ``due``, or record a loss."""

    due: float | None
    """Absolute ``time.monotonic()`` time to write ``data``; ``None`` when the packet is lost."""
    data: bytes
    action: Action


@dataclass(frozen=True)
class _Held:
    emits: tuple[Emit, ...]
    release_at: float


class ImpairmentEngine:
    """Applies one :class:`ImpairmentSpec` to one direction's packet stream.

    ``seed`` is the already-resolved seed (the spec's, or one the caller derived); it is the
    only source of randomness. ``tap``: packets are Ethernet frames (where to find the IP
    header to ECN-mark).
    """

    def __init__(self, spec: ImpairmentSpec, seed: int, *, tap: bool = False) -> None:
        self._spec = spec
        self._seed = seed
        self._rng = random.Random(seed)
        self._tap = tap
        self._held: _Held | None = None
        # A burst-loss model keeps its state in a chain with a stream of its own, so the
        # engine's six draws per packet (and every other decision) stay what they are.
        self._chain: GilbertElliottChain | None = None
        self._loss = 0.0
        if isinstance(spec.loss, GilbertElliott):
            self._chain = spec.loss.chain(f"gemodel:{seed}")
        else:
            self._loss = spec.loss

    @property
    def spec(self) -> ImpairmentSpec:
        return self._spec

    @property
    def seed(self) -> int:
        return self._seed

    def submit(self, data: bytes, now: float) -> list[Emit]:
        """Impair one packet read at ``now``; return everything to record or schedule.

        The list is in write order: the packet (or its loss), its duplicate, then a held
        packet this one overtook.  It is empty when the packet itself is held back.
        """
        data = bytes(data)
        spec = self._spec
        rng = self._rng
        # Always six draws, in this order, so packet k's fate depends only on the seed and k.
        u_loss = rng.random()
        u_corrupt = rng.random()
        u_bit = rng.random()
        u_jitter = rng.random()
        u_duplicate = rng.random()
        u_reorder = rng.random()

        # random() is in [0, 1): "u < p" never fires for p == 0 and always for p == 1.
        marked = False
        chain = self._chain
        if chain.lost() if chain is not None else u_loss < self._loss:
            ce = set_ce(data, tap=self._tap) if spec.ecn else None
            if ce is None:
                return [Emit(None, data, "lost")]
            data, marked = ce, True

        corrupted = u_corrupt < spec.corrupt and len(data) > 0
        if corrupted:
            data = _flip_bit(data, u_bit)

        latency = spec.delay
        if spec.jitter > 0.0:
            latency = max(0.0, spec.delay + (2.0 * u_jitter - 1.0) * spec.jitter)
        due = now + latency

        if corrupted:
            action: Action = "corrupted"
        elif marked:
            action = "marked"
        elif latency > 0.0:
            action = "delayed"
        else:
            action = "forwarded"
        emits = [Emit(due, data, action)]

        if u_duplicate < spec.duplicate:
            emits.append(Emit(due, data, "duplicated"))

        held = self._held
        if held is None:
            if u_reorder < spec.reorder:
                release_at = now + max(spec.delay, REORDER_MIN_HOLD)
                self._held = _Held(tuple(emits), release_at)
                return []
            return emits

        # This packet overtakes the held one, which follows it onto the wire.
        self._held = None
        last_due = max(emit.due for emit in emits if emit.due is not None)
        emits.extend(_release(held, last_due))
        return emits

    @property
    def runs(self) -> bool:
        """It can decide a run of segments at once (:meth:`submit_run`): its only random
        effect is loss (with or without ECN marking) and nothing is held back."""
        spec = self._spec
        return (
            spec.corrupt == 0.0
            and spec.duplicate == 0.0
            and spec.reorder == 0.0
            and spec.jitter == 0.0
            and self._held is None
        )

    def submit_run(
        self, count: int, now: float, *, ect: bool = False
    ) -> tuple[float, list[tuple[int, int, int]]]:
        """Decide ``count`` segments read at ``now`` (:attr:`runs` must be true), exactly as
        ``count`` calls of :meth:`submit` would -- the same six draws each, so the same seed
        loses the same segments whether they came as one super-packet or one by one -- but
        without their bytes. ``ect``: the segments are ECN-capable (``ecn`` marks them
        instead of dropping). Returns the latency of every segment and the runs of
        segments that share a fate: ``(first, count, RUN_KEEP | RUN_LOST | RUN_MARK)``."""
        rng = self._rng.random
        chain = self._chain
        loss = self._loss
        lost_kind = RUN_MARK if self._spec.ecn and ect else RUN_LOST
        runs: list[tuple[int, int, int]] = []
        kind = -1
        start = 0
        for i in range(count):
            u = rng()
            rng(), rng(), rng(), rng(), rng()
            k = lost_kind if (chain.lost() if chain is not None else u < loss) else RUN_KEEP
            if k != kind:
                if kind >= 0:
                    runs.append((start, i - start, kind))
                kind, start = k, i
        runs.append((start, count - start, kind))
        return self._spec.delay, runs

    def expire(self, now: float) -> list[Emit]:
        """Release the held packet if its hold time has run out by ``now``.

        ``expire(math.inf)`` releases whatever is held, e.g. at teardown; the released dues
        do not depend on ``now``.
        """
        held = self._held
        if held is None or now < held.release_at:
            return []
        self._held = None
        return _release(held, held.release_at)

    def deadline(self) -> float | None:
        """When :meth:`expire` next has something to do, or ``None`` if nothing is held."""
        return None if self._held is None else self._held.release_at


def _flip_bit(data: bytes, u: float) -> bytes:
    bits = len(data) * 8
    # min() guards the float product rounding up to exactly `bits` for u just below 1.
    bit = min(int(u * bits), bits - 1)
    flipped = bytearray(data)
    flipped[bit >> 3] ^= 0x80 >> (bit & 7)  # bit 0 is the most significant bit of byte 0
    return bytes(flipped)


def _release(held: _Held, not_before: float) -> list[Emit]:
    released: list[Emit] = []
    floor = not_before
    for emit in held.emits:
        assert emit.due is not None  # lost packets are never held
        due = max(emit.due, floor)
        floor = due
        # A corrupted packet keeps that label (the changed bytes matter most); copies stay
        # "duplicated" so counting originals by action still works.
        keep = ("corrupted", "duplicated", "marked")
        action: Action = emit.action if emit.action in keep else "reordered"
        released.append(replace(emit, due=due, action=action))
    return released
