"""Matching packets: field filters, scapy templates with masks, and expectations.

One matcher, two uses: :func:`expect`, :func:`expect_none` and :func:`expect_sequence`
work on any :class:`PacketSource` -- the pair's :class:`~pytest_tunpair.Capture` (what
``tun_pair.packets.expect`` calls), or any other object that hands out packets in order,
such as the packets a scripted peer received.

A template is a scapy packet (``IP(dst=b.ip)/TCP(flags="SA")``). A packet matches when its
decoded layers contain the template's classes in the same order and every field the
template *sets explicitly* is equal (PTF's masked ``verify_packet``): scapy keeps those in
``layer.fields``, apart from the defaults in ``default_fields``.
"""

from __future__ import annotations

import ipaddress
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from .._errors import PacketTimeout, UnexpectedPacket
from .._wire import headers as _h
from .._wire.numbers import TCP_FLAG_LETTERS
from .packet import DELIVERED, DIRECTIONS, FIELDS, Packet, parsed, trace

__all__ = [
    "Matcher",
    "PacketSource",
    "compile_match",
    "expect",
    "expect_none",
    "expect_sequence",
    "packet_filter",
    "wait_match",
]

#: ``action=ANY_ACTION``: every packet counts, whatever the relay did with it.
ANY_ACTION: Any = type("AnyAction", (), {"__repr__": lambda self: "ANY_ACTION"})()
# How many packets a failure message lists as the closest candidates, and how many of the
# most recent examined packets it scores (each costs a scapy decode).
CLOSEST = 3
SCORED = 500
TRACE_LINES = 30
# Examined packets kept for the failure message (the newest; the count says how many more).
KEPT = 10_000


class PacketSource(Protocol):
    """Anything expectations can watch: packets numbered by ``seq`` in recording order.

    :class:`~pytest_tunpair.Capture` is one; a scripted peer's inbox can be another.
    """

    def wait_new(self, after_seq: int, timeout: float) -> list[Packet]:
        """Packets recorded after ``after_seq`` (``-1``: all kept), waiting up to
        ``timeout`` s for the first; ``[]`` if none came."""
        ...

    @property
    def last_seq(self) -> int:
        """``seq`` of the newest packet recorded so far, ``-1`` before the first."""
        ...


# -- field filters ------------------------------------------------------------------------------


def _address(value: str, name: str, what: str) -> str:
    # Users write "fd00::0001" or "FD00::1"; the parser gives inet_ntop's compressed form.
    try:
        return ipaddress.ip_address(value).compressed
    except ValueError:
        raise ValueError(
            f"{what}({name}={value!r}): not an IP address; give one like '10.0.0.2' or "
            "'fd00::2', or a predicate (lambda a: a.startswith('10.'))"
        ) from None


def _flags(value: str, what: str) -> str:
    # In the packet's order whatever the order given, as scapy's TCP(flags="AS") is "SA".
    unknown = set(value) - set(TCP_FLAG_LETTERS)
    if unknown or len(set(value)) != len(value):
        raise ValueError(
            f"{what}(flags={value!r}): give each TCP flag once, in scapy's letters "
            f"{TCP_FLAG_LETTERS} (e.g. 'SA'), or a predicate (lambda f: 'R' in f)"
        )
    return "".join(letter for letter in TCP_FLAG_LETTERS if letter in value)


def _check_direction(direction: str | None, what: str) -> None:
    if direction is not None and direction not in DIRECTIONS:
        raise ValueError(f"{what}(direction={direction!r}): use 'a->b', 'b->a' or None (both)")


def packet_filter(
    layers: Sequence[Any] = (),
    *,
    direction: str | None = None,
    action: Any = None,
    fields: dict[str, Any] | None = None,
    what: str = "filter",
) -> Callable[[Packet], bool]:
    """A predicate for ``filter()`` and ``wait_for()``.

    ``fields`` maps names from :data:`.packet.FIELDS` to a value (equal)
    or a predicate on the value (``sport=lambda p: p > 1024``). ``action`` is a value or a
    predicate too. An unknown name is a ``TypeError`` naming the valid ones.
    """
    _check_direction(direction, what)
    tests: list[tuple[str, Any, bool]] = []
    for name, value in (fields or {}).items():
        if name not in FIELDS and name != "link_class":
            valid = ", ".join(("direction", "action", *FIELDS, "link_class"))
            raise TypeError(f"{what}() got an unexpected keyword argument {name!r}; valid: {valid}")
        if (name == "src" or name == "dst") and isinstance(value, str):
            value = _address(value, name, what)
        if name == "flags" and isinstance(value, str):
            value = _flags(value, what)
        if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
            value = value.compressed
        tests.append((name, value, callable(value)))
    for layer in layers:
        if not isinstance(layer, str) and not hasattr(layer, "fields_desc"):
            raise TypeError(
                f"{what}() takes scapy layer classes or their names as positional arguments, "
                f"not {layer!r}; packet fields go as keywords (dport=53)"
            )

    def predicate(p: Packet) -> bool:
        if direction is not None and p.direction != direction:
            return False
        if action is not None and not (
            action(p.action) if callable(action) else p.action == action
        ):
            return False
        for name, value, call in tests:
            got = getattr(p, name)
            if call:
                if got is None or not value(got):
                    return False
            elif got != value:
                return False
        return all(layer in p for layer in layers)

    return predicate


# -- templates -----------------------------------------------------------------------------------

_IMPLICIT: dict[type, dict[str, Any]] = {}


def _explicit_fields(layer: Any) -> dict[str, Any]:
    """The fields a template layer was given: ``layer.fields`` without what the layer's own
    constructor puts there (``IP()`` sets ``options=[]`` itself)."""
    cls = type(layer)
    implicit = _IMPLICIT.get(cls)
    if implicit is None:
        implicit = _IMPLICIT[cls] = dict(cls().fields)
    return {k: v for k, v in layer.fields.items() if k not in implicit or not _same(v, implicit[k])}


def _same(expected: Any, got: Any) -> bool:
    from scapy.base_classes import Net

    if isinstance(expected, Net):
        return got is not None and got in expected
    if hasattr(expected, "value") and type(expected).__name__ == "FlagValue":
        expected = int(expected)
        got = None if got is None else int(got)
    try:
        return bool(expected == got)
    except Exception:  # scapy values compare oddly across types; unequal is the answer
        return False


def _show(value: Any) -> str:
    if type(value).__name__ == "FlagValue":
        return repr(str(value))
    return repr(value)


def _layers(pkt: Any) -> list[Any]:
    return [layer for layer in pkt.iterpayloads() if type(layer).__name__ != "NoPayload"]


# (layer, field) of a template -> the Packet attribute with the same value for the outer
# stack, used to turn most packets down before scapy decodes them.
_FAST_FIELDS: dict[tuple[str, str], str] = {
    ("IP", "src"): "src",
    ("IP", "dst"): "dst",
    ("IP", "ttl"): "ttl",
    ("IP", "proto"): "ip_proto",
    ("IPv6", "src"): "src",
    ("IPv6", "dst"): "dst",
    ("IPv6", "hlim"): "ttl",
    ("TCP", "sport"): "sport",
    ("TCP", "dport"): "dport",
    ("TCP", "seq"): "tcp_seq",
    ("TCP", "ack"): "tcp_ack",
    ("TCP", "window"): "window",
    ("TCP", "flags"): "_tcp_flags",
    ("UDP", "sport"): "sport",
    ("UDP", "dport"): "dport",
}


class Matcher:
    """What an expectation looks for: a template, a predicate, or a layer class, plus the
    direction and actions a packet must have. ``diff`` says why a packet is not it."""

    def __init__(
        self,
        match: Any,
        *,
        direction: str | None = None,
        action: Any = None,
        ignore: Iterable[str] = (),
        after: float | None = None,
        what: str = "expect",
    ) -> None:
        _check_direction(direction, what)
        self.direction = direction
        self.action = action
        self.after = after
        self.template: Any = None
        self.predicate: Callable[[Packet], Any] | None = None
        self.layer: Any = None
        ignore = (ignore,) if isinstance(ignore, str) else tuple(ignore)
        if _is_template(match):
            self.template = match
            self._tlayers = [(layer, _explicit_fields(layer)) for layer in _layers(match)]
            self._ignore = _check_ignore(ignore, self._tlayers, what)
            self._fast = self._fast_checks()
            self.description = "/".join(
                f"{type(layer).__name__}("
                + ", ".join(f"{k}={_show(v)}" for k, v in f.items())
                + ")"
                for layer, f in self._tlayers
            )
        elif ignore:
            raise TypeError(f"{what}(ignore=...) applies to a scapy template, not to {match!r}")
        elif isinstance(match, type) and hasattr(match, "fields_desc"):
            # A scapy layer class is callable too (it builds a packet, always truthy).
            self.layer = match
            self.description = f"layer {match.__name__}"
        elif callable(match):
            self.predicate = match
            self.description = getattr(match, "__qualname__", None) or repr(match)
        else:
            raise TypeError(
                f"{what}() takes a scapy packet template (IP(dst=...)/TCP(flags='SA')), a "
                f"predicate (packet -> bool) or a scapy layer class, not {type(match).__name__}"
            )
        extra = []
        if direction:
            extra.append(direction)
        if action is not None and action is not ANY_ACTION:
            extra.append(f"action={getattr(action, '__qualname__', None) or action!r}")
        if extra:
            self.description += f" [{', '.join(extra)}]"

    def _fast_checks(self) -> list[tuple[str, Any]]:
        checks: list[tuple[str, Any]] = []
        seen: set[str] = set()
        for layer, fields in self._tlayers:
            name = type(layer).__name__
            if not type(layer).__module__.startswith("scapy.") or name in seen:
                # Someone else's class, or a second IP (a tunnel's inner one): the parsed
                # fields describe the outer stack only, scapy compares the rest.
                continue
            seen.add(name)
            if name in _h.LAYERS:
                checks.append(("layer", name))
            for k, v in fields.items():
                attr = _FAST_FIELDS.get((name, k))
                if attr is None or f"{name}.{k}" in self._ignore:
                    continue
                if attr in ("src", "dst"):
                    if not isinstance(v, str):
                        continue
                    try:
                        v = ipaddress.ip_address(v).compressed
                    except ValueError:
                        continue  # a host name or a Net: scapy compares it
                elif type(v).__name__ == "FlagValue":
                    v = int(v)
                elif not isinstance(v, int):
                    continue
                checks.append((attr, v))
            # Only the first TCP/UDP/IP layers line up with the parsed outer stack.
            if name in ("TCP", "UDP", "ICMP"):
                break
        return checks

    def _envelope(self, p: Packet) -> list[str]:
        out = []
        if self.direction is not None and p.direction != self.direction:
            out.append(f"direction: expected {self.direction!r}, got {p.direction!r}")
        if self.action is ANY_ACTION:
            pass
        elif self.action is None:
            if p.action not in DELIVERED:
                out.append(f"action: expected a delivered packet, got {p.action!r}")
        elif not (self.action(p.action) if callable(self.action) else p.action == self.action):
            out.append(f"action: expected {self.action!r}, got {p.action!r}")
        if self.after is not None and p.time < self.after:
            out.append(f"time: expected >= {self.after:.6f}, got {p.time:.6f}")
        return out

    def __call__(self, p: Packet) -> bool:
        if self._envelope(p):
            return False
        if self.template is None:
            if self.layer is not None:
                return self.layer in p
            assert self.predicate is not None
            return bool(self.predicate(p))
        if self._fast and not _may_tunnel(p):
            f = parsed(p)
            for attr, v in self._fast:
                if attr == "layer":
                    if v not in p:
                        return False
                elif attr == "_tcp_flags":
                    if f[_h.TCP_FLAGS] != v:
                        return False
                elif getattr(p, attr) != v:
                    return False
        return not self._template_diff(p)[1]

    def _template_diff(self, p: Packet) -> tuple[int, list[str]]:
        try:
            players = _layers(p.scapy)
        except Exception as exc:  # scapy fails on some malformed bytes
            return 1000, [f"undecodable by scapy: {exc}"]
        score = 0
        lines: list[str] = []
        i = 0
        for tlayer, fields in self._tlayers:
            cls = type(tlayer)
            if cls.__name__ == "Raw" and i > 0 and "load" in fields:
                if "Raw.load" in self._ignore:
                    continue
                # The bytes after the layers matched so far, however scapy decoded them
                # (with scapy.all loaded, TCP port 80 carries HTTP layers, not Raw).
                got_load = bytes(players[i - 1].payload)
                if got_load != fields["load"]:
                    lines.append(f"Raw.load: expected {fields['load']!r}, got {got_load!r}")
                    score += 1
                continue
            j = next((k for k in range(i, len(players)) if type(players[k]) is cls), None)
            if j is None:
                have = " / ".join(type(x).__name__ for x in players)
                lines.append(
                    f"{cls.__name__}: no such layer (after the ones matched; packet: {have})"
                )
                score += 1 + len(fields)
                continue
            player = players[j]
            i = j + 1
            for k, expected in fields.items():
                if f"{cls.__name__}.{k}" in self._ignore:
                    continue
                got = player.getfieldval(k)
                if not _same(expected, got):
                    lines.append(
                        f"{cls.__name__}.{k}: expected {_show(expected)}, got {_show(got)}"
                    )
                    score += 1
        return score, lines

    def diff(self, p: Packet) -> tuple[int, list[str]]:
        """(score, lines): how far ``p`` is from a match (0 and ``[]`` for a match), one
        line per field that differs, e.g. ``TCP.flags: expected 'SA', got 'S'``."""
        lines = self._envelope(p)
        score = len(lines)
        if self.template is not None:
            s, more = self._template_diff(p)
            score += s
            lines += more
        elif not (
            self.layer in p if self.layer is not None else self.predicate and self.predicate(p)
        ):
            score += 1
            lines.append(f"does not match {self.description}")
        return score, lines


def _may_tunnel(p: Packet) -> bool:
    return _h.may_tunnel(parsed(p))


def _is_template(obj: Any) -> bool:
    return hasattr(obj, "fields_desc") and not isinstance(obj, type) and hasattr(obj, "fields")


def _check_ignore(
    ignore: Sequence[str], tlayers: list[tuple[Any, Any]], what: str
) -> frozenset[str]:
    names = {type(layer).__name__: layer for layer, _ in tlayers}
    for item in ignore:
        layer_name, _, field = item.partition(".")
        layer = names.get(layer_name)
        if layer is None or not field:
            raise ValueError(
                f"{what}(ignore={item!r}): name a field as 'Layer.field' of a layer in the "
                f"template ({', '.join(names)}), e.g. 'IP.ttl'"
            )
        valid = [f.name for f in layer.fields_desc]
        if field not in valid:
            raise ValueError(
                f"{what}(ignore={item!r}): {layer_name} has no field {field!r}; its fields: "
                + ", ".join(valid)
            )
    return frozenset(ignore)


def compile_match(match: Any, **kwargs: Any) -> Matcher:
    """``match`` as a :class:`Matcher` (a Matcher is returned as it is)."""
    if isinstance(match, Matcher):
        return match
    return Matcher(match, **kwargs)


# -- waiting ----------------------------------------------------------------------------------------


class _Watch:
    """Packets examined by one wait: kept for the failure message."""

    def __init__(self) -> None:
        self.examined: deque[Packet] = deque(maxlen=KEPT)
        self.count = 0


def _start(source: PacketSource, after: Any, what: str) -> tuple[int, float | None]:
    """``after`` as (sequence number to start after, earliest time)."""
    if after is None:
        return -1, None
    if hasattr(after, "seq") and hasattr(after, "direction"):
        return int(after.seq), None
    if isinstance(after, int | float) and not isinstance(after, bool):
        return -1, float(after)
    raise TypeError(
        f"{what}(after={after!r}): give a Packet (match what came after it) or a time in "
        "seconds since the pair came up (a Packet's .time)"
    )


def _check_timeout(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{what}: give a number of seconds >= 0, not {value!r}")
    return float(value)


def wait_match(
    source: PacketSource,
    predicate: Callable[[Packet], Any],
    *,
    after_seq: int,
    timeout: float,
    watch: _Watch | None = None,
) -> Packet | None:
    """The first packet after ``after_seq``, recorded already or within ``timeout`` s, for
    which ``predicate`` is true; ``None`` if none came. The predicate runs in the calling
    thread, so it may decode freely."""
    deadline = time.monotonic() + timeout
    last = after_seq
    while True:
        remaining = deadline - time.monotonic()
        new = source.wait_new(last, max(remaining, 0.0))
        for pkt in new:
            last = pkt.seq
            if watch is not None:
                watch.examined.append(pkt)
                watch.count += 1
            if predicate(pkt):
                return pkt
        # Under steady traffic there is always something new, so the deadline is checked
        # after the batch: every packet recorded in time gets its chance.
        if remaining <= 0:
            return None


def _trace(packets: Sequence[Packet], count: int) -> str:
    text = trace(packets, limit=TRACE_LINES)
    if count > len(packets):
        text = f"… {count - len(packets)} packets examined before these\n" + text
    return text


def _closest(matcher: Matcher, packets: Sequence[Packet]) -> str:
    scored = []
    recent = list(packets)[-SCORED:]
    for order, p in enumerate(recent):
        score, lines = matcher.diff(p)
        scored.append((score, order, p, lines))
    scored.sort(key=lambda s: (s[0], s[1]))
    if not scored:
        return "nothing to compare (no packets examined)\n"
    out = [f"closest of the last {len(recent)} examined:" if len(packets) > SCORED else "closest:"]
    for _score, _order, p, lines in scored[:CLOSEST]:
        out.append(f"  #{p.seq} {p.summary().lstrip()}")
        out.extend(f"      {line}" for line in lines)
    return "\n".join(out) + "\n"


def _timeout_error(message: str, matcher: Matcher, watch: _Watch) -> PacketTimeout:
    examined = list(watch.examined)
    count = watch.count

    def details() -> str:
        return (
            _closest(matcher, examined) + f"trace ({count} examined):\n" + _trace(examined, count)
        )

    return PacketTimeout(message + f"; {count} examined\n", packets=examined, details=details)


def expect(
    source: PacketSource,
    template: Any,
    *,
    direction: str | None = None,
    timeout: float = 2.0,
    after: Any = None,
    ignore: Iterable[str] = (),
    action: Any = None,
) -> Packet:
    """The first packet of ``source`` that matches ``template``: a scapy packet matched in
    the fields it sets, a predicate, or a layer class, as in :meth:`Capture.expect` (which
    is ``expect(packets, ...)``).

    Looks at packets captured after ``after`` (a ``Packet``, or a time in seconds since the
    pair came up; default: all kept ones) and those arriving within ``timeout`` s. Only
    delivered packets count unless ``action=`` says otherwise. ``ignore=("IP.ttl",)``
    leaves set fields out of the comparison. Raises :class:`~pytest_tunpair.PacketTimeout`
    showing, for the closest candidates, each field that differed.
    """
    __tracebackhide__ = True
    timeout = _check_timeout(timeout, f"expect(timeout={timeout!r})")
    after_seq, after_time = _start(source, after, "expect")
    matcher = compile_match(
        template, direction=direction, action=action, ignore=ignore, after=after_time
    )
    watch = _Watch()
    found = wait_match(source, matcher, after_seq=after_seq, timeout=timeout, watch=watch)
    if found is None:
        raise _timeout_error(
            f"expect: no packet matched {matcher.description} within {timeout:g} s",
            matcher,
            watch,
        )
    return found


def expect_none(
    source: PacketSource,
    match: Any,
    *,
    during: float = 0.5,
    direction: str | None = None,
    after: Any = None,
    ignore: Iterable[str] = (),
    action: Any = None,
) -> None:
    """Fail if a packet matching ``match`` (template, predicate or layer class) is captured
    within ``during`` s from now -- or was, since ``after`` (PTF's ``verify_no_packet``).

    Only delivered packets count unless ``action=`` says otherwise: a packet a hook dropped
    was never received. Raises :class:`~pytest_tunpair.UnexpectedPacket` at the first
    match, naming it.
    """
    __tracebackhide__ = True
    during = _check_timeout(during, f"expect_none(during={during!r})")
    after_seq, after_time = _start(source, after, "expect_none")
    if after is None:
        after_seq = source.last_seq
    matcher = compile_match(
        match,
        direction=direction,
        action=action,
        ignore=ignore,
        after=after_time,
        what="expect_none",
    )
    watch = _Watch()
    found = wait_match(source, matcher, after_seq=after_seq, timeout=during, watch=watch)
    if found is None:
        return
    examined = list(watch.examined)
    count = watch.count

    def details() -> str:
        return f"  {found.summary()}\ntrace ({count} examined):\n" + _trace(examined, count)

    raise UnexpectedPacket(
        f"expect_none: packet #{found.seq} matched {matcher.description}, "
        f"which must not be seen within {during:g} s:\n",
        packet=found,
        packets=examined,
        details=details,
    )


def expect_sequence(
    source: PacketSource,
    templates: Sequence[Any],
    *,
    timeout: float = 2.0,
    direction: str | None = None,
    after: Any = None,
    action: Any = None,
) -> list[Packet]:
    """Each template matched by a packet recorded after the previous one's match
    (packetdrill's script order); ``timeout`` bounds the whole sequence. Returns the
    matched packets. On failure the message names the step that found nothing."""
    __tracebackhide__ = True
    timeout = _check_timeout(timeout, f"expect_sequence(timeout={timeout!r})")
    if isinstance(templates, str | bytes) or not isinstance(templates, Sequence) or not templates:
        raise TypeError("expect_sequence() takes a non-empty list of templates or predicates")
    after_seq, after_time = _start(source, after, "expect_sequence")
    matchers = [
        compile_match(
            t, direction=direction, action=action, after=after_time, what="expect_sequence"
        )
        for t in templates
    ]
    deadline = time.monotonic() + timeout
    found: list[Packet] = []
    watch = _Watch()
    for step, matcher in enumerate(matchers, 1):
        pkt = wait_match(
            source,
            matcher,
            after_seq=after_seq,
            timeout=max(0.0, deadline - time.monotonic()),
            watch=watch,
        )
        if pkt is None:
            got = ", ".join(f"#{p.seq}" for p in found) or "none"
            raise _timeout_error(
                f"expect_sequence: step {step} of {len(matchers)}, {matcher.description}, "
                f"matched no packet within {timeout:g} s (steps matched: {got})",
                matcher,
                watch,
            )
        found.append(pkt)
        after_seq = pkt.seq
        watch = _Watch()
    return found
