"""A NAT on the link: RFC 4787 behaviours, as a rule on both directions of a pair.

:class:`NatTable` is the pure logic (no packets, no clock of its own): mappings from an
inside endpoint (address, port) to an outside one, created by outbound packets, chosen by
the *mapping* behaviour (RFC 4787 4.1: endpoint-independent, address-dependent,
address-and-port-dependent), with port preservation when the port is free and in range,
refreshed by outbound packets only (REQ-6), expiring after ``timeout`` seconds idle (TCP:
``tcp_timeout``); inbound packets pass the *filtering* behaviour (RFC 4787 5) or are
dropped. :meth:`NatTable.rebind` retires every mapping at once, as a NAT that reboots or a
carrier-grade NAT that re-maps does: the next outbound packet of each inside endpoint gets
a fresh outside port (and, when asked, the next outside address of the pool).

:class:`Nat` is the rule the relay runs (``_link.Rule``): on ``a->b`` it rewrites the
source of packets from the inside addresses (end a's), on ``b->a`` the destination of
packets to a mapping, with checksums updated (:mod:`.._wire.rewrite`); TCP, UDP and ICMP
echo (its identifier mapped as a port, RFC 5508), ICMP errors translated with the packet
they quote, non-first fragments by address. The original is recorded ``"rewritten"``,
the translated copy carries on (``"forwarded"``, or what later stages make of it). IPv6
passes untranslated (NAT44 only). It is also the handle the test holds
(``tun_pair.nat()``).
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._errors import OptionError, TunPairError
from .._packets.packet import Packet
from .._schema import Choice, Duration, Invalid, Kind
from .._wire import headers as _h
from .._wire import rewrite as _rw
from .._wire.numbers import IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, PROTO_NAMES
from .link import Verdict

__all__ = ["BEHAVIOURS", "CLASSIC", "Nat", "NatMapping", "NatTable", "NatTranslation", "check_nat"]

#: RFC 4787's behaviours, for ``mapping=`` and ``filtering=``.
BEHAVIOURS = ("endpoint-independent", "address-dependent", "address-and-port-dependent")
#: Outbound refresh and the RFC's minimum timeouts: 2 minutes for UDP (REQ-5), 2 hours 4
#: minutes for established TCP (RFC 5382 REQ-5).
UDP_TIMEOUT = 120.0
TCP_TIMEOUT = 7440.0
#: Translations kept for :attr:`Nat.translations` (the oldest go first).
MAX_TRANSLATIONS = 10_000

_FILTERED = Verdict("filtered")
_EXHAUSTED = Verdict("dropped")

Endpoint = tuple[str, int]


@dataclass
class NatMapping:
    """One mapping: the inside endpoint and the outside one it is seen as."""

    proto: str
    """``"tcp"``, ``"udp"`` or ``"icmp"`` (an echo identifier is mapped as a port)."""
    inside: Endpoint
    """(address, port) inside, as end a sent it."""
    outside: Endpoint
    """(address, port) outside, as end b sees it."""
    remote: Endpoint | None
    """The remote endpoint that made it, for dependent mappings (``None`` for
    endpoint-independent ones). The remote address alone counts for address-dependent."""
    created: float
    """When it was made (``time.monotonic()``)."""
    last_used: float
    """When an outbound packet last used it (``time.monotonic()``)."""
    sent_to: set[Endpoint]
    """Every remote endpoint end a sent to through it (what the filtering checks)."""

    def __repr__(self) -> str:
        inside = f"{self.inside[0]}:{self.inside[1]}"
        outside = f"{self.outside[0]}:{self.outside[1]}"
        return f"<NatMapping {self.proto} {inside} -> {outside}>"


@dataclass(frozen=True)
class NatTranslation:
    """One packet the NAT rewrote: the recorded original (action ``"rewritten"``, its
    ``seq`` given once recorded) with its tuple before and after."""

    packet: Packet
    """The original as the relay read it (recorded ``"rewritten"``)."""
    direction: str
    """``"a->b"`` (source rewritten) or ``"b->a"`` (destination rewritten)."""
    before: tuple[str, str, str]
    """(protocol, ``"src:port"``, ``"dst:port"``) as read."""
    after: tuple[str, str, str]
    """The same after translation (the copy that went on)."""

    def __str__(self) -> str:
        return f"{self.before[0]} {self.before[1]} > {self.before[2]} => {self.after[1]} > {self.after[2]}"


class NatTable:
    """The mappings and their behaviours: pure logic, times passed in (see module doc)."""

    def __init__(
        self,
        *,
        mapping: str,
        filtering: str,
        public: list[str],
        port_range: tuple[int, int],
        timeout: float,
        tcp_timeout: float,
    ) -> None:
        self.mapping = mapping
        self.filtering = filtering
        self.public = public
        self.port_range = port_range
        self.timeout = timeout
        self.tcp_timeout = tcp_timeout
        self._address = 0  # index of the outside address new mappings get
        self._by_key: dict[tuple[Any, ...], NatMapping] = {}
        self._by_outside: dict[tuple[str, str, int], NatMapping] = {}
        self._cursor: dict[tuple[str, str], int] = {}
        # Inside endpoint -> the outside ports it had before a rebind (never given back to it
        # right away: a rebind must change what the other end sees).
        self._retired: dict[tuple[str, Endpoint], set[int]] = {}
        # Inside endpoint -> the outside port an address-only rebind keeps for it.
        self._sticky: dict[tuple[str, Endpoint], int] = {}
        self._preserve = True

    @property
    def address(self) -> str:
        """The outside address new mappings get."""
        return self.public[self._address]

    def _key(self, proto: str, inside: Endpoint, remote: Endpoint) -> tuple[Any, ...]:
        if self.mapping == "endpoint-independent":
            return (proto, inside)
        if self.mapping == "address-dependent":
            return (proto, inside, remote[0])
        return (proto, inside, remote)

    def _expired(self, m: NatMapping, now: float) -> bool:
        limit = self.tcp_timeout if m.proto == "tcp" else self.timeout
        return now - m.last_used > limit

    def _drop(self, m: NatMapping) -> None:
        for key, value in list(self._by_key.items()):
            if value is m:
                del self._by_key[key]
        self._by_outside.pop((m.proto, m.outside[0], m.outside[1]), None)

    def expire(self, now: float) -> list[NatMapping]:
        """Forget the mappings idle past their timeout; returns them."""
        gone = [m for m in self._by_outside.values() if self._expired(m, now)]
        for m in gone:
            self._drop(m)
        return gone

    def _free(self, proto: str, address: str, port: int) -> bool:
        return (proto, address, port) not in self._by_outside

    def _allocate(self, proto: str, inside: Endpoint) -> int | None:
        low, high = self.port_range
        address = self.address
        avoid = self._retired.get((proto, inside), set())
        sticky = self._sticky.pop((proto, inside), None)
        if sticky is not None and self._free(proto, address, sticky):
            return sticky
        port = inside[1]
        if (
            self._preserve
            and low <= port <= high
            and port not in avoid
            and self._free(proto, address, port)
        ):
            return port
        span = high - low + 1
        cursor = self._cursor.get((proto, address), 0)
        for i in range(span):
            candidate = low + (cursor + i) % span
            if candidate not in avoid and self._free(proto, address, candidate):
                self._cursor[(proto, address)] = (cursor + i + 1) % span
                return candidate
        return None

    def outbound(
        self, proto: str, inside: Endpoint, remote: Endpoint, now: float
    ) -> NatMapping | None:
        """The mapping an outbound packet from ``inside`` to ``remote`` uses (made if
        needed, refreshed); ``None`` when the port range is used up."""
        key = self._key(proto, inside, remote)
        m = self._by_key.get(key)
        if m is not None and self._expired(m, now):
            self._drop(m)
            m = None
        if m is None:
            port = self._allocate(proto, inside)
            if port is None:
                self.expire(now)
                port = self._allocate(proto, inside)
                if port is None:
                    return None
            m = NatMapping(
                proto,
                inside,
                (self.address, port),
                None if self.mapping == "endpoint-independent" else remote,
                now,
                now,
                set(),
            )
            self._by_key[key] = m
            self._by_outside[(proto, self.address, port)] = m
        m.last_used = now
        m.sent_to.add(remote)
        return m

    def inbound(
        self, proto: str, outside: Endpoint, remote: Endpoint, now: float
    ) -> NatMapping | None:
        """The mapping an inbound packet from ``remote`` to ``outside`` may use, by the
        filtering behaviour; ``None``: no live mapping, or filtered."""
        m = self._by_outside.get((proto, outside[0], outside[1]))
        if m is None:
            return None
        if self._expired(m, now):
            self._drop(m)
            return None
        if self.filtering == "address-dependent":
            if not any(r[0] == remote[0] for r in m.sent_to):
                return None
        elif self.filtering == "address-and-port-dependent":
            if remote not in m.sent_to:
                return None
        return m

    def by_outside(self, proto: str, outside: Endpoint) -> NatMapping | None:
        """The mapping seen outside as ``outside`` (no filtering, no refresh)."""
        return self._by_outside.get((proto, outside[0], outside[1]))

    def find_inside(self, proto: str, inside: Endpoint, remote: Endpoint) -> NatMapping | None:
        """The live mapping of ``inside`` towards ``remote`` (none is made)."""
        return self._by_key.get(self._key(proto, inside, remote))

    def inside_address(self, outside: str) -> str | None:
        """The inside address whose mappings use the outside address ``outside`` (for
        packets without ports: a later fragment, another protocol)."""
        for m in self._by_outside.values():
            if m.outside[0] == outside:
                return m.inside[0]
        return None

    def outside_address(self, inside: str) -> str:
        """The outside address an inside address is seen as (the pool's current one when it
        has no mapping): RFC 4787's "paired" pooling, one outside address per inside one."""
        for m in self._by_outside.values():
            if m.inside[0] == inside:
                return m.outside[0]
        return self.address

    def rebind(self, *, port: bool = True, address: bool = False) -> list[NatMapping]:
        """Retire every mapping: the next outbound packet of each inside endpoint gets a
        new one, on a new port (``port``) and/or the next outside address (``address``).
        Inbound packets to a retired mapping are filtered. Returns the retired ones."""
        retired = list(self._by_outside.values())
        if address:
            self._address = (self._address + 1) % len(self.public)
        for m in retired:
            if port:
                self._retired.setdefault((m.proto, m.inside), set()).add(m.outside[1])
            else:
                self._sticky[(m.proto, m.inside)] = m.outside[1]
        self._by_key.clear()
        self._by_outside.clear()
        return retired

    def mappings(self) -> list[NatMapping]:
        """The live mappings, oldest first."""
        return sorted(self._by_outside.values(), key=lambda m: m.created)


# -- validation -------------------------------------------------------------------------------
class _Public(Kind):
    allowed = "an IPv4 address or network, e.g. '198.18.1.1' or '198.18.1.0/29'"

    def check(self, value: object) -> list[str]:
        try:
            net = ipaddress.ip_network(str(value), strict=False)
        except ValueError:
            raise Invalid(f"give {self.allowed}") from None
        if net.version != 4:
            raise Invalid("the NAT translates IPv4 only (NAT44): give an IPv4 address or network")
        hosts = [str(a) for a in (net.hosts() if net.num_addresses > 2 else net)]
        if len(hosts) > 256:
            raise Invalid("give a pool of at most 256 addresses (a /24)")
        return hosts


class _PortRange(Kind):
    allowed = "(low, high) with 1 <= low <= high <= 65535"

    def check(self, value: object) -> tuple[int, int]:
        if (
            not isinstance(value, (tuple, list))
            or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            or not 1 <= value[0] <= value[1] <= 65535
        ):
            raise Invalid(f"give {self.allowed}, e.g. (20000, 20099)")
        return (value[0], value[1])


def _checked(kind: Kind, name: str, value: object) -> Any:
    try:
        return kind.check(value)
    except Invalid as exc:
        raise OptionError(name, value, source="nat()", reason=exc.reason) from None


#: The classic (RFC 3489) names people reach for, as RFC 4787's (mapping, filtering).
CLASSIC = {
    "full-cone": ("endpoint-independent", "endpoint-independent"),
    "restricted-cone": ("endpoint-independent", "address-dependent"),
    "port-restricted-cone": ("endpoint-independent", "address-and-port-dependent"),
    "symmetric": ("address-and-port-dependent", "address-and-port-dependent"),
}


def _behaviour(name: str, value: object) -> str:
    reason = f"use one of {', '.join(BEHAVIOURS)}"
    classic = CLASSIC.get(str(value).lower().replace(" ", "-").replace("_", "-"))
    if classic is not None:
        reason += f" (a {value} NAT is nat(mapping={classic[0]!r}, filtering={classic[1]!r}))"
    return str(_checked(Choice(BEHAVIOURS, reason=reason), name, value))


def check_nat(
    mapping: object,
    filtering: object,
    public: object,
    port_range: object,
    timeout: object,
    tcp_timeout: object,
    rebind_every: object,
    rebind_address: object = False,
) -> dict[str, Any]:
    """``nat()``'s arguments, checked (an :class:`OptionError` names the bad one)."""
    out: dict[str, Any] = {
        "mapping": _behaviour("mapping", mapping),
        "filtering": _behaviour("filtering", filtering),
        "public": _checked(_Public(), "public", public),
        "port_range": _checked(_PortRange(), "port_range", port_range),
        "timeout": _checked(Duration(), "timeout", timeout),
        "tcp_timeout": _checked(Duration(), "tcp_timeout", tcp_timeout),
        "rebind_every": None
        if rebind_every is None
        else _checked(Duration(), "rebind_every", rebind_every),
    }
    for name in ("timeout", "tcp_timeout", "rebind_every"):
        if out[name] is not None and out[name] <= 0:
            raise OptionError(name, out[name], source="nat()", reason="give a duration > 0")
    if rebind_address:
        # Nothing documented may silently do nothing: an address rebind needs a second
        # address to move to, and a period to happen on.
        if out["rebind_every"] is None:
            raise OptionError(
                "rebind_address",
                rebind_address,
                source="nat()",
                reason="it applies to rebind_every's rebinds: give rebind_every='3s' too, "
                "or call nat.rebind(address=True) when the test wants one",
            )
        if len(out["public"]) < 2:
            raise OptionError(
                "rebind_address",
                rebind_address,
                source="nat()",
                reason=f"public={public!r} is one address, so there is none to move to: "
                "give a pool, e.g. public='198.18.1.0/29'",
            )
    return out


# -- the rule -----------------------------------------------------------------------------------
_PROTO = {IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp", IPPROTO_ICMP: "icmp"}


def _ip(packed: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET, packed)


def _fmt(addr: bytes, port: int | None) -> str:
    return _ip(addr) if port is None else f"{_ip(addr)}:{port}"


def _translation(pkt: Packet, new: bytes) -> NatTranslation:
    """The record of one rewrite: both tuples read from the bytes before and after."""
    tuples = []
    for data in (pkt.data, new):
        e = _rw.endpoints(data, _h.parse(data, 0, pkt.mode))
        assert e is not None  # the NAT rewrote it: an IPv4 packet
        name = PROTO_NAMES.get(e.proto, str(e.proto))
        tuples.append((name, _fmt(e.src, e.sport), _fmt(e.dst, e.dport)))
    return NatTranslation(pkt, pkt.direction, tuples[0], tuples[1])


class Nat:
    """A NAT between end a (inside) and end b (outside): see the module docstring.
    Returned by ``tun_pair.nat()``; :meth:`rebind` re-maps, :meth:`remove` takes it off the
    link (``with tun_pair.nat(...):`` too)."""

    def __init__(
        self,
        *,
        inside: tuple[str, ...],
        mapping: str,
        filtering: str,
        public: list[str],
        port_range: tuple[int, int],
        timeout: float,
        tcp_timeout: float,
        rebind_every: float | None,
        rebind_address: bool,
        start: float,
        on_remove: Callable[[Nat], None],
    ) -> None:
        self._table = NatTable(
            mapping=mapping,
            filtering=filtering,
            public=public,
            port_range=port_range,
            timeout=timeout,
            tcp_timeout=tcp_timeout,
        )
        self.inside = inside
        """The inside addresses (end a's IPv4 address): packets from them are translated."""
        self.rebind_every = rebind_every
        """Seconds between automatic rebinds (``None``: only :meth:`rebind`)."""
        self.rebind_address = rebind_address
        """Whether automatic rebinds move to the next outside address too."""
        self.rewritten = 0
        """Packets translated so far (both directions)."""
        self.filtered = 0
        """Inbound packets dropped: no live mapping, or the filtering said no."""
        self.exhausted = 0
        """Outbound packets dropped because the port range was used up."""
        self._rebinds = 0
        self._inside = {socket.inet_pton(socket.AF_INET, a) for a in inside}
        self._public = {socket.inet_pton(socket.AF_INET, a) for a in public}
        self._log: deque[tuple[Packet, bytes]] = deque(maxlen=MAX_TRANSLATIONS)
        self._next_rebind = None if rebind_every is None else start + rebind_every
        self._lock = threading.Lock()
        self._on_remove = on_remove
        self._removed = False

    # -- the test's side -------------------------------------------------------------------
    @property
    def public(self) -> str:
        """The outside address new mappings get now."""
        with self._lock:
            self._catch_up(time.monotonic())
            return self._table.address

    @property
    def pool(self) -> list[str]:
        """Every outside address (``public=``'s pool; one for a single address)."""
        return list(self._table.public)

    @property
    def mapping(self) -> str:
        """The mapping behaviour (RFC 4787 4.1)."""
        return self._table.mapping

    @property
    def filtering(self) -> str:
        """The filtering behaviour (RFC 4787 5)."""
        return self._table.filtering

    @property
    def port_range(self) -> tuple[int, int]:
        """The outside ports mappings get, inclusive."""
        return self._table.port_range

    @property
    def rebinds(self) -> int:
        """Rebinds so far: :meth:`rebind`'s, and each period of ``rebind_every`` that has
        passed (counted with or without traffic)."""
        with self._lock:
            self._catch_up(time.monotonic())
            return self._rebinds

    def _catch_up(self, now: float) -> None:
        """The ``rebind_every`` rebinds due by ``now`` (the lock held): the mappings retired
        once, the pool address moved once per period (``rebind_address``). Done when a
        packet comes or the test looks, so an idle NAT costs nothing."""
        due = self._next_rebind
        every = self.rebind_every
        if due is None or every is None or now < due:
            return
        periods = int((now - due) // every) + 1
        self._next_rebind = due + periods * every
        self._table.rebind(port=True, address=self.rebind_address)
        if self.rebind_address:
            for _ in range((periods - 1) % len(self._table.public)):
                self._table.rebind(port=False, address=True)  # nothing left to retire
        self._rebinds += periods

    @property
    def mappings(self) -> list[NatMapping]:
        """The live mappings, oldest first (a copy: later packets do not change it)."""
        with self._lock:
            self._catch_up(time.monotonic())
            return [
                NatMapping(
                    m.proto, m.inside, m.outside, m.remote, m.created, m.last_used, set(m.sent_to)
                )
                for m in self._table.mappings()
            ]

    @property
    def translations(self) -> list[NatTranslation]:
        """The packets rewritten so far (the newest 10,000), oldest first."""
        with self._lock:
            raw = list(self._log)
        return [_translation(pkt, new) for pkt, new in raw]

    def rebind(self, *, port: bool = True, address: bool = False) -> None:
        """Re-map every inside endpoint from the next packet on: a new outside port
        (``port``), the next outside address of the ``public`` pool (``address``), or both.
        What end b sent to the old mappings is dropped from now on (``"filtered"``), as
        behind a NAT that rebinds: QUIC's migration and NAT-rebinding tests. ``address=True``
        needs a pool (``public="198.18.1.0/29"``)."""
        if not port and not address:
            raise ValueError("rebind(port=False, address=False) changes nothing: ask for one")
        if address and len(self._table.public) < 2:
            raise OptionError(
                "address",
                True,
                source="nat.rebind()",
                reason=f"public={self._table.public[0]!r} is one address: give nat() a pool, "
                "e.g. public='198.18.1.0/29'",
            )
        if self._removed:
            raise TunPairError(
                "this NAT was removed from the link, so a rebind would change nothing: "
                "rebind before remove(), or put a new one on with tun_pair.nat()"
            )
        with self._lock:
            self._catch_up(time.monotonic())
            self._table.rebind(port=port, address=address)
            self._rebinds += 1

    def remove(self) -> None:
        """Take the NAT off the link (no-op once removed): packets pass untranslated."""
        with self._lock:
            if self._removed:
                return
            self._removed = True
        self._on_remove(self)

    def __enter__(self) -> Nat:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # -- the relay's side (Rule) ----------------------------------------------------------------
    def in_force(self, now: float) -> bool:
        """True until removed."""
        return not self._removed

    def apply(self, pkt: Packet, now: float) -> Verdict | None:
        """The relay's call (``Rule.apply``): the packet translated (``"rewritten"``, the
        new bytes forwarded), filtered, or ``None`` when the NAT leaves it alone."""
        data = pkt.data
        f = _h.parse(data, 0, pkt.mode)
        if f[_h.VERSION] != 4:
            return None  # NAT44: IPv6 and ARP pass
        e = _rw.endpoints(data, f)
        if e is None:
            return None
        with self._lock:
            self._catch_up(now)
            if pkt.direction == "a->b":
                return self._outbound(pkt, data, f, e, now)
            return self._inbound(pkt, data, f, e, now)

    def _done(
        self, pkt: Packet, data: bytes, new: bytes, f: _h.Parsed, e: _rw.Endpoints
    ) -> Verdict:
        # Both versions are kept as bytes and read when the test asks (translations): the
        # relay's per-packet cost stays the rewrite itself.
        self._log.append((pkt, new))
        self.rewritten += 1
        return Verdict("rewritten", forward=(new,))

    def _outbound(
        self, pkt: Packet, data: bytes, f: _h.Parsed, e: _rw.Endpoints, now: float
    ) -> Verdict | None:
        if e.src not in self._inside:
            return None
        table = self._table
        inside_ip = _ip(e.src)
        start = _rw.inner_start(data, f)
        if start >= 0:
            # An error end a's kernel sends about a packet that came in through a mapping:
            # its quote names the inside endpoint as destination.
            inner = _h.parse(data[start:], 0, "tun")
            q = _rw.endpoints(data[start:], inner)
            if (
                q is not None
                and q.dst in self._inside
                and q.proto in _PROTO
                and q.dport is not None
            ):
                rport = q.sport or 0 if q.proto != IPPROTO_ICMP else 0
                m = table.find_inside(_PROTO[q.proto], (_ip(q.dst), q.dport), (_ip(q.src), rport))
                if m is not None:
                    outside = socket.inet_pton(socket.AF_INET, m.outside[0])
                    new = _rw.translate_error(data, f, 0, outside, start, outside, m.outside[1])
                    return self._done(pkt, data, new, f, e)
        proto = _PROTO.get(e.proto)
        is_query = e.proto != IPPROTO_ICMP or e.icmp_type == 8
        if proto is not None and e.sport is not None and is_query and f[_h.FRAG] <= 0:
            # An echo's identifier is the inside "port"; the remote has none (0), so that the
            # reply, which carries the mapped identifier, passes port-dependent filtering.
            remote = (_ip(e.dst), e.dport or 0 if e.proto != IPPROTO_ICMP else 0)
            m = table.outbound(proto, (inside_ip, e.sport), remote, now)
            if m is None:
                self.exhausted += 1
                return _EXHAUSTED
            outside = socket.inet_pton(socket.AF_INET, m.outside[0])
            new = _rw.translate(data, f, 0, outside, m.outside[1])
            return self._done(pkt, data, new, f, e)
        # No ports to map (a later fragment, another protocol, an ICMP error without a
        # mapping): the address alone, as the inside address is seen.
        outside = socket.inet_pton(socket.AF_INET, table.outside_address(inside_ip))
        return self._done(pkt, data, _rw.translate(data, f, 0, outside, None), f, e)

    def _inbound(
        self, pkt: Packet, data: bytes, f: _h.Parsed, e: _rw.Endpoints, now: float
    ) -> Verdict | None:
        if e.dst in self._inside:
            # The inside address is not reachable from outside a NAT.
            self.filtered += 1
            return _FILTERED
        if e.dst not in self._public:
            return None
        table = self._table
        start = _rw.inner_start(data, f)
        if start >= 0:
            # An error about a packet that left through a mapping: its quote names the
            # outside endpoint as source.
            inner = _h.parse(data[start:], 0, "tun")
            q = _rw.endpoints(data[start:], inner)
            m = None
            if q is not None and q.proto in _PROTO and q.sport is not None:
                m = table.by_outside(_PROTO[q.proto], (_ip(q.src), q.sport))
            if m is None:
                self.filtered += 1
                return _FILTERED
            inside = socket.inet_pton(socket.AF_INET, m.inside[0])
            new = _rw.translate_error(data, f, 1, inside, start, inside, m.inside[1])
            return self._done(pkt, data, new, f, e)
        proto = _PROTO.get(e.proto)
        is_reply = e.proto != IPPROTO_ICMP or e.icmp_type == 0
        if proto is not None and e.dport is not None and is_reply and f[_h.FRAG] <= 0:
            rport = e.sport or 0 if e.proto != IPPROTO_ICMP else 0
            m = table.inbound(proto, (_ip(e.dst), e.dport), (_ip(e.src), rport), now)
            if m is None:
                self.filtered += 1
                return _FILTERED
            inside = socket.inet_pton(socket.AF_INET, m.inside[0])
            return self._done(pkt, data, _rw.translate(data, f, 1, inside, m.inside[1]), f, e)
        owner = table.inside_address(_ip(e.dst))
        if owner is None:
            self.filtered += 1
            return _FILTERED
        inside = socket.inet_pton(socket.AF_INET, owner)
        return self._done(pkt, data, _rw.translate(data, f, 1, inside, None), f, e)

    def describe(self) -> str:
        """One line for failure reports: behaviours, pool, ports, counts."""
        t = self._table
        with self._lock:
            self._catch_up(time.monotonic())
            count = len(t.mappings())
            rebinds = self._rebinds
        pool = t.public[0] if len(t.public) == 1 else f"{t.public[0]}..{t.public[-1]}"
        every = f", rebinding every {self.rebind_every:g}s" if self.rebind_every else ""
        return (
            f"nat a->b: {t.mapping} mapping, {t.filtering} filtering, public {pool} "
            f"(now {t.address}), ports {t.port_range[0]}-{t.port_range[1]}{every}; "
            f"{count} mappings, {self.rewritten} rewritten, {self.filtered} filtered, "
            f"{rebinds} rebinds"
        )

    def __repr__(self) -> str:
        return f"<Nat {self.describe()}>"
