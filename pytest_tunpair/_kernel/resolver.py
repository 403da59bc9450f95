"""A DNS server the test owns: names it was given, failures on demand, every query kept.

``tun_pair.dns()`` starts one on end b's address, port 53 (UDP and TCP), inside b's host,
and shows the test's thread a ``/etc/resolv.conf`` naming it (:mod:`.mountns`): the test's
``getaddrinfo``, ``dig``, dnspython and c-ares -- and what the test starts afterwards --
ask it, through the tunnel, so the queries are in the capture. The host's resolver and
files are never touched.

One thread serves both sockets with ``poll()``; a TCP query (after a truncated answer) is
read and answered on the spot, with a short timeout, so a slow client holds the server up
for at most that long.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .._errors import OptionError
from .._wire import dns as _dns
from .threads import own_thread

__all__ = ["FAILURES", "DnsQuery", "Records", "Resolver"]

#: What a failure rule does to a query: no answer, or the answer with that code; ``truncate``
#: answers over UDP with TC set and no records (the client retries over TCP, which works).
FAILURES = ("timeout", "servfail", "nxdomain", "refused", "truncate")
_TCP_TIMEOUT = 1.0


@dataclass(frozen=True)
class DnsQuery:
    """One query the resolver received, and what it did."""

    time: float
    """When it came (``time.monotonic()``)."""
    name: str
    """The name asked for, lower case, without the trailing dot."""
    type: str
    """``"A"``, ``"AAAA"``, ... (the number, as text, for types without a name here)."""
    transport: str
    """``"udp"`` or ``"tcp"``."""
    client: tuple[str, int]
    """Who asked (address, port): end a's address when the test asked."""
    outcome: str
    """``"answered"`` (with records), ``"nodata"`` (the name has none of that type),
    ``"nxdomain"``, or the failure applied: ``"timeout"``, ``"servfail"``, ``"refused"``,
    ``"truncated"``."""
    answers: tuple[str, ...]
    """The addresses sent back."""


class _FailRule:
    def __init__(self, how: str, name: str | None, times: int | None) -> None:
        self.how = how
        self.name = name
        self.left = times

    def take(self, name: str) -> bool:
        if self.left == 0 or (self.name is not None and self.name != name):
            return False
        if self.left is not None:
            self.left -= 1
        return True


def _norm(name: str) -> str:
    return name.strip().rstrip(".").lower()


def check_failure(how: object, source: str) -> str:
    if how not in FAILURES:
        raise OptionError(
            "fail", how, source=source, reason=f"use None or one of {', '.join(FAILURES)}"
        )
    return str(how)


#: What turns a record's value into addresses (``"a"``/``"b"``, an address, or a list of
#: those; an ``OptionError`` otherwise): the pair's, which knows its ends' addresses.
Expand = Callable[[Any, str], list[str]]


def _addresses_only(value: Any, source: str) -> list[str]:
    """:data:`Expand` without ends to name: addresses, or lists of them."""
    import ipaddress

    items = [value] if isinstance(value, str) else list(value)
    try:
        return [str(ipaddress.ip_address(str(item))) for item in items]
    except ValueError:
        raise OptionError("records", value, source=source, reason="use addresses") from None


class Records(dict[str, list[str]]):
    """The resolver's table: names (lower case, no trailing dot, however they are written)
    to addresses. A value set here is read as ``dns()`` reads it (``"a"``/``"b"``, an
    address, or a list), and refused with an ``OptionError`` at once when it is none of
    those -- never later, in the server's thread."""

    def __init__(
        self, items: Mapping[str, Any], expand: Expand, source: str = "resolver.records"
    ) -> None:
        super().__init__()
        self._expand = expand
        self._source = source
        for name, value in items.items():
            self[name] = value
        self._source = "resolver.records"  # later changes are the test's, on the resolver

    def __setitem__(self, name: str, value: Any) -> None:
        super().__setitem__(_norm(name), self._expand(value, f"{self._source}[{name!r}]"))

    def __getitem__(self, name: str) -> list[str]:
        return super().__getitem__(_norm(name))

    def __delitem__(self, name: str) -> None:
        super().__delitem__(_norm(name))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and super().__contains__(_norm(name))

    def get(self, name: str, default: Any = None) -> Any:
        return super().get(_norm(name), default)

    def pop(self, name: str, *default: Any) -> Any:
        return super().pop(_norm(name), *default)

    def setdefault(self, name: str, default: Any = None) -> Any:
        if name not in self:
            self[name] = default
        return self[name]

    def update(self, *args: Any, **kwargs: Any) -> None:
        other: Iterable[tuple[str, Any]] = (
            dict(*args, **kwargs).items() if args or kwargs else iter(())
        )
        for name, value in other:
            self[name] = value


class Resolver:
    """The test's DNS server (``tun_pair.dns()``): see the module docstring.

    :attr:`records` maps names to addresses (change it at will: the next query sees it);
    :meth:`fail` adds a failure for a name (or all) for some queries (or all);
    :attr:`queries` lists what came in."""

    def __init__(
        self,
        records: Mapping[str, Any],
        *,
        sockets: list[socket.socket],
        address: str,
        ttl: int,
        expand: Expand = _addresses_only,
    ) -> None:
        self.records: dict[str, list[str]] = Records(records, expand)
        """Name -> addresses (A for IPv4, AAAA for IPv6), changeable at any time (the next
        query sees it): ``resolver.records["new.test"] = "b"`` takes what ``dns()`` takes;
        names are kept lower case without the trailing dot."""
        self.address = address
        """Where it listens (port 53): end b's address; what ``resolv.conf`` names."""
        self.ttl = ttl
        """The TTL of its records, in seconds."""
        self.queries: list[DnsQuery] = []
        """Every query received, oldest first."""
        self._rules: list[_FailRule] = []
        self._lock = threading.Lock()
        self._socks = sockets
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False
        self._errors: list[BaseException] = []
        self._view: Any = None  # the test thread's private resolv.conf (mountns)
        self._thread = own_thread(self._main, "tunpair-dns")
        self._thread.start()

    # -- the test's side -------------------------------------------------------------------
    def fail(self, how: str | None, *, name: str | None = None, times: int | None = None) -> None:
        """From now on, the next ``times`` queries (``None``: all) for ``name`` (``None``:
        any) get ``how``: ``"timeout"`` (no answer), ``"servfail"``, ``"nxdomain"``,
        ``"refused"`` or ``"truncate"`` (UDP answer with TC and no records: the client
        retries over TCP, which is answered). ``how=None`` clears the failures of ``name``
        (of every name with ``name=None``). ``times`` counts queries: ``getaddrinfo``
        sends A and AAAA, and retries per ``resolv.conf``'s ``attempts``."""
        with self._lock:
            if how is None:
                key = None if name is None else _norm(name)
                self._rules = [r for r in self._rules if key is not None and r.name != key]
                return
            check_failure(how, "dns.fail()")
            if times is not None and (
                isinstance(times, bool) or not isinstance(times, int) or times < 1
            ):
                raise OptionError(
                    "times", times, source="dns.fail()", reason="an int >= 1, or None"
                )
            self._rules.append(_FailRule(how, None if name is None else _norm(name), times))

    def asked(self, name: str) -> list[DnsQuery]:
        """The queries for ``name``."""
        key = _norm(name)
        with self._lock:
            return [q for q in self.queries if q.name == key]

    def close(self) -> None:
        """Stop serving, close the sockets, and give the test's thread its own
        ``resolv.conf`` back (when called from that thread; the pair does at teardown)."""
        if self._stopping:
            return
        self._stopping = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        self._thread.join(5.0)
        for s in self._socks:
            s.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        view, self._view = self._view, None
        if view is not None:
            view.leave()
        if self._errors:
            raise self._errors[0]

    def describe(self) -> str:
        """One line for failure reports: where it listens, its names, its failures."""
        names = ", ".join(sorted(self.records)) or "no names"
        with self._lock:
            rules = [f"{r.how} {r.name or '*'}" for r in self._rules if r.left != 0]
        fails = f"; failing: {', '.join(rules)}" if rules else ""
        return f"dns at {self.address}:53: {names}{fails} ({len(self.queries)} queries)"

    def __repr__(self) -> str:
        return f"<Resolver {self.describe()}>"

    # -- the server's side ----------------------------------------------------------------
    def _decide(self, q: _dns.Question, transport: str, client: tuple[str, int]) -> bytes | None:
        with self._lock:
            how = next((r.how for r in self._rules if r.take(q.name)), None)
            addresses = self.records.get(q.name)
            outcome = "answered"
            answers: list[str] = []
            reply: bytes | None
            if how == "timeout":
                outcome, reply = "timeout", None
            elif how == "truncate" and transport == "udp":
                outcome, reply = "truncated", _dns.response(q, truncated=True)
            elif how in ("servfail", "nxdomain", "refused"):
                outcome, reply = how, _dns.response(q, rcode=_dns.RCODES[how])
            elif addresses is None:
                outcome, reply = "nxdomain", _dns.response(q, rcode=_dns.RCODES["nxdomain"])
            else:
                want = {1: 4, 28: 6}.get(q.qtype)
                answers = [a for a in addresses if want is None or (":" in a) == (want == 6)]
                if q.qtype not in (1, 28, 255):
                    answers = []
                outcome = "answered" if answers else "nodata"
                reply = _dns.response(q, addresses=answers, ttl=self.ttl)
            self.queries.append(
                DnsQuery(
                    time.monotonic(),
                    q.name,
                    q.type_name,
                    transport,
                    client,
                    outcome,
                    tuple(answers),
                )
            )
        return reply

    def _main(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # surfaced by close()
            exc.add_note("(raised in the test resolver's thread)")
            self._errors.append(exc)

    def _loop(self) -> None:
        poller = select.poll()
        by_fd = {s.fileno(): s for s in self._socks}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._stopping:
            for fd, _ev in poller.poll():
                if fd == self._wake_r:
                    continue
                sock = by_fd[fd]
                if sock.type == socket.SOCK_DGRAM:
                    self._serve_udp(sock)
                else:
                    self._serve_tcp(sock)

    def _serve_udp(self, sock: socket.socket) -> None:
        try:
            data, peer = sock.recvfrom(4096)
        except BlockingIOError:
            return
        try:
            q = _dns.parse_query(data)
        except ValueError:
            return  # not a query we can read: a real server would FORMERR; we stay quiet
        reply = self._decide(q, "udp", (peer[0], peer[1]))
        if reply is not None:
            try:
                sock.sendto(reply, peer)
            except OSError:
                pass  # the client went away

    def _serve_tcp(self, listener: socket.socket) -> None:
        try:
            conn, peer = listener.accept()
        except BlockingIOError:
            return
        with conn:
            conn.settimeout(_TCP_TIMEOUT)
            try:
                while True:  # RFC 7766: several queries may share a connection
                    head = _recv_exact(conn, 2)
                    if head is None:
                        return
                    data = _recv_exact(conn, int.from_bytes(head, "big"))
                    if data is None:
                        return
                    try:
                        q = _dns.parse_query(data)
                    except ValueError:
                        return
                    reply = self._decide(q, "tcp", (peer[0], peer[1]))
                    if reply is None:
                        return
                    conn.sendall(len(reply).to_bytes(2, "big") + reply)
            except OSError:
                return


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def open_sockets(addresses: list[str], port: int = 53) -> list[socket.socket]:
    """A UDP and a listening TCP socket on each of ``addresses`` (call it inside the
    server's host: sockets belong to the namespace they are made in)."""
    socks: list[socket.socket] = []
    try:
        for addr in addresses:
            family = socket.AF_INET6 if ":" in addr else socket.AF_INET
            for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                s = socket.socket(family, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
                socks.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((addr, port))
                if kind == socket.SOCK_STREAM:
                    s.listen(16)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks
