"""The seed article's routing recipe, built with pyroute2 and sent in one rtnetlink message.

Why this is needed: traffic from one local address to another normally short-cuts through
``lo``, because adding an address puts a ``local`` route for it in table ``local``, which is
consulted first on *both* the output and the input path. The recipe:

1. give each device its address, with the other end as peer;
2. delete those addresses' ``local`` routes from table ``local`` (now output to the peer
   follows the peer route, out of the device);
3. put the same ``local`` routes in a separate table (13) consulted only by a rule
   ``iif <dev> lookup 13``. The input interface is only set on the *input* path, so the
   kernel still accepts packets arriving on the device as addressed to itself.

Both sides need step 3, otherwise requests cross but replies are dropped.

In hosts mode (:func:`apply_hosts`) none of this is needed: each device is in a network
namespace of its own, where the other end's address is not local, so the kernel routes to
it out of the device as any host routes to a neighbour. Each end gets its address with the
other as point-to-point peer (the kernel adds the local route and the peer route), and
plain routes for whatever lies beyond the peer (docs/internals.md, "Hosts: ordinary
point-to-point routes").

IPv6 needs two more things (docs/internals.md, "IPv6: no prefix route, explicit peer
routes"): addresses get ``nodad|noprefixroute`` (a kernel
prefix route for the local address would beat the route via the peer device and the packet
would leave with the wrong source), and each peer gets an explicit route via the other
device with ``prefsrc`` set, so the server sees the client's address.

pyroute2's :class:`IPBatch` compiles the requests; they go to the kernel in one ``send`` on
a plain netlink socket opened in the calling thread's namespace, which costs about as much
as one request sent alone (docs/internals.md, "Setup cost: one rtnetlink message": 0.6-0.9 ms
per request one by one).
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from .._errors import NamespaceError
from . import linux as _linux

__all__ = [
    "Recipe",
    "Route",
    "Side",
    "add_routes",
    "apply_hosts",
    "apply_recipe",
    "compile_recipe",
    "link_up_lo",
    "lo_message",
]

_NLMSG_ERROR = 2
_NLMSGHDR = struct.Struct("=IHHII")

_compiler_lock = threading.Lock()  # the batch compiles one plan at a time
_batch: Any = None


def _compiler() -> Any:
    """A process-wide pyroute2 IPBatch (it compiles requests; it sends nothing itself)."""
    global _batch
    if _batch is None:
        from pyroute2 import IPBatch

        _batch = IPBatch()
    return _batch


@dataclass(frozen=True)
class Side:
    """One device of a pair, with the other end's addresses as peers."""

    name: str
    index: int
    ip: str | None
    peer_ip: str | None
    ip6: str | None
    peer_ip6: str | None
    mac: str | None = None


#: How long the recipe waits for the kernel to install an IPv6 address's local route.
LOCAL6_TIMEOUT = 2.0

_RTMGRP_IPV6_ROUTE = 0x400
_RTM_NEWROUTE = 24
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTA = struct.Struct("=HH")
_RTA_DST = 1
_RTA_TABLE = 15


class _Netlink:
    """One rtnetlink socket in the calling thread's namespace, listening to IPv6 routes.

    The listening matters because IPv6 installs an address's ``local`` route from a
    workqueue (addrconf's DAD work, even with ``nodad``), i.e. *after* the request that
    added the address was acknowledged: the recipe must wait for it before deleting it.
    """

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
        self.sock.bind((0, _RTMGRP_IPV6_ROUTE))
        self.local6: set[bytes] = set()  # IPv6 local routes seen appearing in table local

    def close(self) -> None:
        self.sock.close()

    def _note(self, buf: bytes, off: int, length: int) -> None:
        body = off + _NLMSGHDR.size
        if length < _NLMSGHDR.size + _RTMSG.size:
            return
        family, _dl, _sl, _tos, table, _proto, _scope, rtype, _f = _RTMSG.unpack_from(buf, body)
        if family != socket.AF_INET6 or rtype != _linux.RTN_LOCAL:
            return
        dst = None
        pos = body + _RTMSG.size
        end = off + length
        while pos + _RTA.size <= end:
            alen, atype = _RTA.unpack_from(buf, pos)
            if alen < _RTA.size:
                break
            if atype == _RTA_DST:
                dst = bytes(buf[pos + 4 : pos + alen])
            elif atype == _RTA_TABLE:
                (table,) = struct.unpack_from("=I", buf, pos + 4)
            pos += (alen + 3) & ~3
        if dst is not None and table == _linux.RT_TABLE_LOCAL:
            self.local6.add(dst)

    def _read(self, pending: set[int], describe: dict[int, str]) -> tuple[int, str] | None:
        first_error: tuple[int, str] | None = None
        buf = self.sock.recv(65536)
        off = 0
        while off + _NLMSGHDR.size <= len(buf):
            length, mtype, _flags, seq, _pid = _NLMSGHDR.unpack_from(buf, off)
            if mtype == _NLMSG_ERROR and seq in pending:
                pending.discard(seq)
                (code,) = struct.unpack_from("=i", buf, off + _NLMSGHDR.size)
                if code and first_error is None:
                    first_error = (-code, describe.get(seq, "?"))
            elif mtype == _RTM_NEWROUTE:
                self._note(buf, off, length)
            off += max((length + 3) & ~3, _NLMSGHDR.size)
        return first_error

    def run(self, data: bytes, steps: tuple[str, ...]) -> None:
        """Send the compiled requests in one message; raise on the first failure."""
        if not data:
            return
        seqs: list[int] = []
        off = 0
        while off < len(data):
            length, _type, _flags, seq, _pid = _NLMSGHDR.unpack_from(data, off)
            seqs.append(seq)
            off += length
        describe = dict(zip(seqs, steps, strict=True))
        self.sock.send(data)
        pending = set(seqs)
        first_error: tuple[int, str] | None = None
        while pending:
            err = self._read(pending, describe)
            first_error = first_error or err
        if first_error is not None:
            code, step = first_error
            raise NamespaceError(
                f"setting up the tunnel failed at `{step}`: {os.strerror(code)} (errno {code})"
            )

    def wait_local6(self, addrs: tuple[bytes, ...], timeout: float = LOCAL6_TIMEOUT) -> None:
        want = set(addrs)
        deadline = time.monotonic() + timeout
        while not want <= self.local6:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = ", ".join(
                    sorted(socket.inet_ntop(socket.AF_INET6, w) for w in want - self.local6)
                )
                raise NamespaceError(
                    f"the kernel did not install the local route for {missing} within "
                    f"{timeout} s; is IPv6 disabled on the device?"
                )
            self.sock.settimeout(remaining)
            try:
                self._read(set(), {})
            except TimeoutError:
                pass
            finally:
                self.sock.settimeout(None)


class _Plan:
    """Requests compiled into one buffer, each with the ``ip`` command it stands for.

    Compiling is what costs with pyroute2 (about 2 ms a request: it runs an asyncio loop per
    call), while the bytes depend only on the plan's inputs -- and in a fresh namespace
    those repeat from test to test (the same names, addresses and even ifindexes). So each
    distinct plan is compiled once per process and its bytes replayed.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, tuple[Any, ...], dict[str, Any]]] = []

    def add(self, describe: str, method: str, *args: Any, **kwargs: Any) -> None:
        self.calls.append((describe, method, args, kwargs))

    def compile(self) -> tuple[bytes, tuple[str, ...]]:
        with _compiler_lock:
            ipb = _compiler()
            ipb.reset()
            for _describe, method, args, kwargs in self.calls:
                getattr(ipb, method)(*args, **kwargs)
            data = bytes(ipb.batch)
            ipb.reset()
        return data, tuple(c[0] for c in self.calls)


@lru_cache(maxsize=256)
def _lo_plan() -> tuple[bytes, tuple[str, ...]]:
    plan = _Plan()
    plan.add("ip link set lo up", "link", "set", index=1, state="up")
    return plan.compile()


def link_up_lo() -> None:
    nl = _Netlink()
    try:
        nl.run(*_lo_plan())
    finally:
        nl.close()


def lo_message() -> bytes:
    """``ip link set lo up``, compiled (what :func:`link_up_lo` sends)."""
    return _lo_plan()[0]


@dataclass(frozen=True)
class Recipe:
    """The recipe for one set of sides, compiled: the requests, then (IPv6) the local
    routes to wait for and the requests that move them, as :func:`apply_recipe` sends
    them -- or the spare's builder in C (``_build.c``)."""

    main: bytes
    main_steps: tuple[str, ...]
    wait6: tuple[bytes, ...]
    """The IPv6 local routes (packed addresses) the kernel adds from a workqueue."""
    cleanup: bytes
    cleanup_steps: tuple[str, ...]

    @property
    def steps(self) -> list[str]:
        return [*self.main_steps, *self.cleanup_steps]


@lru_cache(maxsize=256)
def compile_recipe(sides: tuple[Side, ...], mtu: int, table: int, txqueuelen: int) -> Recipe:
    """The recipe's requests for ``sides`` (indexes included), compiled once per process."""
    main, main_steps = _main_plan(sides, mtu, table, txqueuelen)
    v6 = tuple(s for s in sides if s.ip6 and s.peer_ip6)
    if not v6:
        return Recipe(main, main_steps, (), b"", ())
    cleanup, cleanup_steps = _v6_cleanup_plan(v6)
    wait6 = tuple(socket.inet_pton(socket.AF_INET6, s.ip6) for s in v6 if s.ip6)
    return Recipe(main, main_steps, wait6, cleanup, cleanup_steps)


def apply_recipe(sides: list[Side], *, mtu: int, table: int, txqueuelen: int) -> list[str]:
    """Configure every side in the calling thread's namespace; return the steps taken."""
    recipe = compile_recipe(tuple(sides), mtu, table, txqueuelen)
    nl = _Netlink()
    try:
        nl.run(recipe.main, recipe.main_steps)
        if recipe.wait6:
            # Step 2 for IPv6, once the kernel has installed the routes (see _Netlink).
            nl.wait_local6(recipe.wait6)
            nl.run(recipe.cleanup, recipe.cleanup_steps)
        return recipe.steps
    finally:
        nl.close()


@lru_cache(maxsize=256)
def _v6_cleanup_plan(sides: tuple[Side, ...]) -> tuple[bytes, tuple[str, ...]]:
    plan = _Plan()
    for s in sides:
        plan.add(
            f"ip -6 route del local {s.ip6} dev {s.name} table local",
            "route",
            "del",
            family=socket.AF_INET6,
            table=_linux.RT_TABLE_LOCAL,
            type=_linux.RTN_LOCAL,
            dst=f"{s.ip6}/128",
            oif=s.index,
        )
    return plan.compile()


@lru_cache(maxsize=256)
def _main_plan(
    sides: tuple[Side, ...], mtu: int, table: int, txqueuelen: int
) -> tuple[bytes, tuple[str, ...]]:
    return _main_calls(sides, mtu, table, txqueuelen).compile()


def remove_rules(sides: list[Side], *, mtu: int, table: int, txqueuelen: int) -> None:
    """Delete the rules :func:`apply_recipe` added for ``sides`` in the calling thread's
    namespace. Addresses and routes go with their device; a rule names its device
    (``iif NAME``) and stays: devices deleted from a namespace that goes on being used must
    take their rules with them, or the next pair's ``ip rule add`` fails (EEXIST)."""
    nl = _Netlink()
    try:
        nl.run(*_rules_undo_plan(tuple(sides), mtu, table, txqueuelen))
    finally:
        nl.close()


@lru_cache(maxsize=64)
def _rules_undo_plan(
    sides: tuple[Side, ...], mtu: int, table: int, txqueuelen: int
) -> tuple[bytes, tuple[str, ...]]:
    undo = _Plan()
    for describe, method, args, kwargs in _main_calls(sides, mtu, table, txqueuelen).calls:
        if method == "rule" and args == ("add",):
            undo.add(describe.replace(" rule add ", " rule del "), method, "del", **kwargs)
    return undo.compile()


def _main_calls(sides: tuple[Side, ...], mtu: int, table: int, txqueuelen: int) -> _Plan:
    plan = _Plan()
    for s in sides:
        link: dict[str, Any] = {"index": s.index, "state": "up", "mtu": mtu, "txqlen": txqueuelen}
        if s.mac:
            link["address"] = s.mac
        # Up first: taking a TUN down and up again re-adds its addresses to table local
        # (docs/internals.md, "Down and up re-adds the local addresses"), which would silently
        # route traffic through lo again.
        plan.add(
            f"ip link set {s.name} up mtu {mtu} txqueuelen {txqueuelen}", "link", "set", **link
        )
    for s in sides:
        if s.ip and s.peer_ip:
            # 1. address with the other end as point-to-point peer (adds the peer route).
            plan.add(
                f"ip addr add {s.ip} peer {s.peer_ip} dev {s.name}",
                "addr",
                "add",
                index=s.index,
                local=s.ip,
                address=s.peer_ip,
                prefixlen=32,
            )
            # 2. out of table local. pyroute2 needs scope and proto spelled out here, where
            # iproute2 fills them in (docs/internals.md, "pyroute2 needs scope and proto for
            # local routes": ESRCH otherwise).
            plan.add(
                f"ip route del local {s.ip} dev {s.name} table local",
                "route",
                "del",
                table=_linux.RT_TABLE_LOCAL,
                type=_linux.RTN_LOCAL,
                dst=f"{s.ip}/32",
                oif=s.index,
                scope=_linux.RT_SCOPE_HOST,
                proto=_linux.RTPROT_KERNEL,
            )
            # 3. into a table that only the input path consults.
            plan.add(
                f"ip route add local {s.ip} dev {s.name} table {table}",
                "route",
                "add",
                table=table,
                type=_linux.RTN_LOCAL,
                dst=f"{s.ip}/32",
                oif=s.index,
                scope=_linux.RT_SCOPE_HOST,
                proto=_linux.RTPROT_KERNEL,
            )
            plan.add(
                f"ip rule add iif {s.name} lookup {table}",
                "rule",
                "add",
                family=socket.AF_INET,
                iifname=s.name,
                table=table,
            )
        if s.ip6 and s.peer_ip6:
            plan.add(
                f"ip -6 addr add {s.ip6}/128 dev {s.name} nodad noprefixroute",
                "addr",
                "add",
                index=s.index,
                address=s.ip6,
                prefixlen=128,
                flags=_linux.IFA_F_NODAD | _linux.IFA_F_NOPREFIXROUTE,
            )
            plan.add(
                f"ip -6 route add local {s.ip6} dev {s.name} table {table}",
                "route",
                "add",
                family=socket.AF_INET6,
                table=table,
                type=_linux.RTN_LOCAL,
                dst=f"{s.ip6}/128",
                oif=s.index,
                proto=_linux.RTPROT_KERNEL,
            )
            plan.add(
                f"ip -6 route add {s.peer_ip6} dev {s.name} src {s.ip6}",
                "route",
                "add",
                family=socket.AF_INET6,
                dst=f"{s.peer_ip6}/128",
                oif=s.index,
                prefsrc=s.ip6,
            )
            plan.add(
                f"ip -6 rule add iif {s.name} lookup {table}",
                "rule",
                "add",
                family=socket.AF_INET6,
                iifname=s.name,
                table=table,
            )
    return plan


@dataclass(frozen=True)
class Route:
    """A route in a host: ``dst`` (an address or a network) through the device
    ``dev``/``index``, via the gateway ``via`` (the link's other end) when given, with
    ``src`` as the preferred source (``None``: the kernel's choice)."""

    dst: str
    dev: str
    index: int
    via: str | None = None
    src: str | None = None

    def _args(self) -> tuple[str, dict[str, Any]]:
        import ipaddress

        net = ipaddress.ip_network(self.dst, strict=False)
        words = [f"ip{' -6' if net.version == 6 else ''} route add {net} dev {self.dev}"]
        kwargs: dict[str, Any] = {
            "family": socket.AF_INET6 if net.version == 6 else socket.AF_INET,
            "dst": str(net),
            "oif": self.index,
        }
        if self.via is not None:
            words.append(f"via {self.via}")
            kwargs["gateway"] = self.via
        if self.src is not None:
            words.append(f"src {self.src}")
            kwargs["prefsrc"] = self.src
        return " ".join(words), kwargs


def apply_hosts(side: Side, *, mtu: int, txqueuelen: int) -> list[str]:
    """Configure one end in a namespace of its own (the calling thread's): the device up,
    its addresses with the other end as point-to-point peer. Returns the steps taken."""
    data, steps = _host_plan(side, mtu, txqueuelen)
    nl = _Netlink()
    try:
        nl.run(data, steps)
    finally:
        nl.close()
    return list(steps)


def add_routes(routes: tuple[Route, ...]) -> list[str]:
    """Add ``routes`` in the calling thread's namespace (``EEXIST`` for one already there
    is not an error: the same route is asked for twice when two things need it)."""
    if not routes:
        return []
    done: list[str] = []
    for route in routes:
        data, steps = _route_plan(route)
        nl = _Netlink()
        try:
            nl.run(data, steps)
        except NamespaceError as exc:
            if "File exists" not in str(exc):
                raise
        finally:
            nl.close()
        done += steps
    return done


@lru_cache(maxsize=256)
def _route_plan(route: Route) -> tuple[bytes, tuple[str, ...]]:
    plan = _Plan()
    describe, kwargs = route._args()
    plan.add(describe, "route", "add", **kwargs)
    return plan.compile()


@lru_cache(maxsize=256)
def _host_plan(s: Side, mtu: int, txqueuelen: int) -> tuple[bytes, tuple[str, ...]]:
    plan = _Plan()
    link: dict[str, Any] = {"index": s.index, "state": "up", "mtu": mtu, "txqlen": txqueuelen}
    if s.mac:
        link["address"] = s.mac
    plan.add(f"ip link set {s.name} up mtu {mtu} txqueuelen {txqueuelen}", "link", "set", **link)
    if s.ip and s.peer_ip:
        # The address with the other end as peer: the kernel adds `local ip` to table local
        # (this host's own address, as it should be here) and the route to the peer.
        plan.add(
            f"ip addr add {s.ip} peer {s.peer_ip} dev {s.name}",
            "addr",
            "add",
            index=s.index,
            local=s.ip,
            address=s.peer_ip,
            prefixlen=32,
        )
    if s.ip6 and s.peer_ip6:
        # nodad: usable at once; noprefixroute + an explicit peer route, as in the
        # one-namespace recipe (docs/internals.md, "IPv6: no prefix route, explicit peer
        # routes"), so the peer is reached through this device with this source.
        plan.add(
            f"ip -6 addr add {s.ip6}/128 dev {s.name} nodad noprefixroute",
            "addr",
            "add",
            index=s.index,
            address=s.ip6,
            prefixlen=128,
            flags=_linux.IFA_F_NODAD | _linux.IFA_F_NOPREFIXROUTE,
        )
        plan.add(
            f"ip -6 route add {s.peer_ip6} dev {s.name} src {s.ip6}",
            "route",
            "add",
            family=socket.AF_INET6,
            dst=f"{s.peer_ip6}/128",
            oif=s.index,
            prefsrc=s.ip6,
        )
    return plan.compile()
