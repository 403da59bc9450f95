"""Topologies: several hosts, each link between two of them a relayed pair of its own.

``tun_pair_factory.star(3)`` makes hosts ``client1``..``client3`` and ``server``, each
client with a link (a :class:`TunPair`: relay, capture, impairments, rules) to the server;
``chain()`` makes ``client`` -- ``router`` -- ``server``, where the router forwards with the
kernel (``ip_forward``), so TTLs drop and ICMP errors come from it as from any router;
``topology(links=[...], routers=[...])`` any graph. Every host gets a route to every
address of the topology through the first link of a shortest path towards it, with that
link's other end as gateway (ordinary routes: docs/internals.md, "Hosts: ordinary
point-to-point routes"); only routers forward.

Each link is named after its ends (``"client1<->server"``; ``a->b`` is ``client1->server``)
and is one of the factory's pairs, so failure reports, pcaps and plots show each link on
its own.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ._errors import OptionError, TunPairError
from ._kernel import routing as _routing
from ._kernel.host import Host

if TYPE_CHECKING:
    from ._factory import TunPairFactory
    from ._pair import TunPair

__all__ = ["Topology"]


def _check_name(name: object, source: str) -> str:
    if (
        not isinstance(name, str)
        or not name
        or not name.replace("-", "").replace("_", "").isalnum()
    ):
        raise OptionError(
            "links", name, source=source, reason="host names are words (letters, digits, - _)"
        )
    return name


class Topology:
    """Hosts and the links between them (see the module docstring). ``topo["server"]`` is
    a :class:`~pytest_tunpair.Host`; :meth:`link` a link's :class:`~pytest_tunpair.TunPair`.
    Made by ``tun_pair_factory.topology()``, ``star()``, ``chain()``; closed with the
    factory."""

    def __init__(self) -> None:
        self.hosts: dict[str, Host] = {}
        """The hosts by name, in the order they first appear in the links."""
        self.links: dict[str, TunPair] = {}
        """The links by name (``"client1<->server"``), in the order given."""
        self.routers: tuple[str, ...] = ()
        """The hosts that forward between their links."""
        self._ends: dict[str, tuple[str, str]] = {}

    @classmethod
    def build(
        cls,
        factory: TunPairFactory,
        links: Sequence[tuple[str, str]],
        *,
        routers: Sequence[str] = (),
        options: Mapping[str, Any] | None = None,
        source: str = "topology()",
    ) -> Topology:
        """Make the hosts, the links (pairs of ``factory``) and the routes; on failure,
        close what was made."""
        topo = cls()
        try:
            topo._build(factory, links, routers, dict(options or {}), source)
        except BaseException:
            topo.close()
            raise
        return topo

    def _build(
        self,
        factory: TunPairFactory,
        links: Sequence[tuple[str, str]],
        routers: Sequence[str],
        options: dict[str, Any],
        source: str,
    ) -> None:
        if not links:
            raise OptionError("links", links, source=source, reason="give at least one (a, b) link")
        if "hosts" in options:
            raise OptionError(
                "hosts",
                options["hosts"],
                source=source,
                reason="a topology's ends are hosts already",
            )
        seen: set[frozenset[str]] = set()
        for pair in links:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise OptionError(
                    "links", pair, source=source, reason="each link is a pair of host names"
                )
            x, y = (_check_name(n, source) for n in pair)
            if x == y or frozenset((x, y)) in seen:
                raise OptionError(
                    "links", pair, source=source, reason="a link joins two different hosts, once"
                )
            seen.add(frozenset((x, y)))
        for r in routers:
            if not any(r in pair for pair in links):
                raise OptionError("routers", r, source=source, reason="not a host of the links")
        self.routers = tuple(routers)
        leftovers = factory.keeper.leftovers if factory.keeper is not None else "warn"
        for x, y in links:
            for name in (x, y):
                if name not in self.hosts:
                    self.hosts[name] = Host.new(name, leftovers=leftovers)
        for x, y in links:
            link = factory.make(options, source=source, _hosts=(self.hosts[x], self.hosts[y]))
            label = f"{x}<->{y}"
            link.label = label
            self.links[label] = link
            self._ends[label] = (x, y)
        for r in self.routers:
            host = self.hosts[r]
            host.sysctl("net.ipv4.ip_forward", 1)
            if any(p.options.ipv6 for p in self.links.values()):
                host.sysctl("net.ipv6.conf.all.forwarding", 1)
        self._route()

    # -- routes ---------------------------------------------------------------------------------
    def _neighbours(self, host: str) -> Iterator[tuple[str, TunPair, str]]:
        """(neighbour, link, this host's end "a"/"b") for each link of ``host``."""
        for name, (x, y) in self._ends.items():
            if x == host:
                yield y, self.links[name], "a"
            elif y == host:
                yield x, self.links[name], "b"

    def _first_hops(self, start: str) -> dict[str, tuple[TunPair, str]]:
        """For each other host: the link (and ``start``'s end of it) a shortest path from
        ``start`` leaves by."""
        first: dict[str, tuple[TunPair, str]] = {}
        queue: deque[str] = deque([start])
        seen = {start}
        while queue:
            here = queue.popleft()
            for nxt, link, end in self._neighbours(here):
                if nxt in seen:
                    continue
                seen.add(nxt)
                first[nxt] = first[here] if here != start else (link, end)
                # Only routers carry traffic on: a path through another host is no path.
                if nxt in self.routers:
                    queue.append(nxt)
        return first

    def _route(self) -> None:
        for name, host in self.hosts.items():
            own = set(self.addresses(name))
            routes: list[_routing.Route] = []
            for other, (link, end) in self._first_hops(name).items():
                me = link.a if end == "a" else link.b
                peer = link.b if end == "a" else link.a
                for addr in self.addresses(other):
                    if addr in own:
                        continue
                    via = peer.ip6 if ":" in addr else peer.ip
                    if via is None or addr == via:
                        continue  # the peer itself: its point-to-point route is there
                    routes.append(_routing.Route(addr, me.name, me.index, via=via))
            if routes:
                steps = host.run(_routing.add_routes, tuple(routes))
                for link in self.links.values():
                    if host in (link.a.host, link.b.host):
                        link.steps += [f"[host {name}] {s}" for s in steps]
                        break

    # -- what tests use -------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Host:
        try:
            return self.hosts[name]
        except KeyError:
            raise KeyError(f"no host {name!r} here: {', '.join(self.hosts)}") from None

    def link(self, x: str, y: str) -> TunPair:
        """The link between hosts ``x`` and ``y`` (either order). Its end ``a`` is the host
        named first when the link was declared."""
        for name, ends in self._ends.items():
            if ends in ((x, y), (y, x)):
                return self.links[name]
        raise TunPairError(f"no link between {x!r} and {y!r}: links are {', '.join(self.links)}")

    def addresses(self, name: str) -> list[str]:
        """Every address of host ``name`` (one end of each of its links), IPv4 first."""
        v4: list[str] = []
        v6: list[str] = []
        for _other, link, end in self._neighbours(name):
            me = link.a if end == "a" else link.b
            if me.ip and me.ip not in v4:
                v4.append(me.ip)
            if me.ip6 and me.ip6 not in v6:
                v6.append(me.ip6)
        return v4 + v6

    def address(self, name: str, family: int = 4) -> str:
        """Host ``name``'s first IPv4 (``family=4``) or IPv6 address: reachable from every
        host of the topology by its routes."""
        for addr in self.addresses(name):
            if (":" in addr) == (family == 6):
                return addr
        raise TunPairError(f"host {name!r} has no IPv{family} address")

    def close(self) -> None:
        """Close the links, then the hosts (their processes stopped, namespaces released).
        The factory does this at teardown."""
        errors: list[BaseException] = []
        for link in reversed(list(self.links.values())):
            try:
                link.close(drain=False)
            except BaseException as exc:
                errors.append(exc)
        for host in reversed(list(self.hosts.values())):
            try:
                host.close()
            except BaseException as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def __repr__(self) -> str:
        return f"<Topology {', '.join(self.links)}>"
