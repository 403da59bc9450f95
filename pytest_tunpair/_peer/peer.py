"""The scripted peer: the test plays one side of the pair, packet by packet.

``peer = tun_pair.script("b")`` diverts every packet the relay reads that is addressed to
b's addresses: it is not written into b's device but handed to the peer (its own
:class:`~pytest_tunpair.Capture`, ``peer.packets``), and ``peer.send()`` writes packets into
a's device as if b had sent them. What runs in the relay thread is only the decision
"addressed to the peer?" (a few byte compares) and, on TAP, the ARP/neighbour answer: the
script itself runs in the test thread, so a script that stalls, answers wrongly or raises
never holds up the relay. It needs no thread of its own: what it writes is received by the
kernel inside the ``write()``, whose answer is then already queued (docs/internals.md,
"Peer: a write into a TUN runs the kernel's answer in the writer's thread"). This is packetdrill's and packetimpact's model, with Python's
control flow: the kernel under test is the real one in the pair's namespace.

On top, TCP and UDP endpoints that track state (:class:`ScriptedTcp`, :class:`ScriptedUdp`)
so a test says "accept, receive, ACK twice more" rather than computing sequence numbers.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, Protocol

from .._errors import PacketTimeout, TunPairError, UnexpectedPacket
from .._link.link import Divert
from .._packets.aio import async_form
from .._packets.capture import Capture
from .._packets.packet import Packet, parsed, trace
from .._wire import build as _build
from .._wire import headers as _h
from .._wire import neigh as _neigh
from .._wire.numbers import ETH_P_IP, ETH_P_IPV6, IP_DF, IPPROTO_TCP, IPPROTO_UDP
from .._wire.tcp import TcpOptions, offered, seq_add, seq_geq, seq_gt, timestamp_option
from .._wire.validate import is_scapy_packet, to_bytes

__all__ = ["PeerEnd", "PeerPort", "ScriptedPeer", "ScriptedTcp", "ScriptedUdp", "TcpOptions"]

# Lines of the peer's own trace a timeout message shows at most.
TRACE_LINES = 30
# Segments whose differing fields a failed conn.expect(template) shows.
CLOSEST = 3
# Packets the script never looked at, listed per peer in a failure report at most.
UNEXPECTED_LINES = 20
# Ephemeral ports for tcp_connect() (the IANA dynamic range, RFC 6335 6).
_EPHEMERAL = (49152, 65535)
_WINDOW_MAX = 0xFFFF
# RFC 7323 2.3: a shift count above 14 is treated as 14.
_WSCALE_MAX = 14


def _family(family: int | None, what: str) -> int | None:
    if family in (None, 4, 6):
        return family
    if family == socket.AF_INET:
        return 4
    if family == socket.AF_INET6:
        return 6
    raise ValueError(
        f"{what}(family={family!r}): use None (either), 4 / socket.AF_INET or 6 / socket.AF_INET6"
    )


def _check_timeout(timeout: float, what: str, name: str = "timeout") -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0:
        raise ValueError(f"{what}({name}={timeout!r}): give a number of seconds >= 0")
    return float(timeout)


class _Diffing(Protocol):
    """What a segment expectation matches with: a Matcher, or expect_next's field check."""

    def __call__(self, p: Packet) -> bool: ...
    def diff(self, p: Packet) -> tuple[int, list[str]]: ...


class PeerPort(Protocol):
    """What the peer needs of the pair it plays a side of (``TunPair.script()`` gives it).

    The peer never sees the pair itself: a port is all it touches, so it can run over any
    relay, or over a test's stand-in.
    """

    #: ``"tun"`` or ``"tap"``: the devices' kind.
    mode: str
    #: ``time.monotonic()`` and ``time.time()`` when the pair came up (``Packet.time`` counts
    #: from the first).
    t0: float
    wall_t0: float

    def divert(self, take: Divert | None) -> None:
        """Offer every packet the relay reads towards the scripted side to ``take`` first,
        in the relay thread, before hooks; those it keeps are recorded as ``"scripted"``
        and not written. ``None`` stops it."""

    def write(self, frame: bytes) -> Packet:
        """Write ``frame`` into the other device: validated, recorded as ``"injected"``."""

    def write_gso(self, frame: bytes, gso_size: int) -> Packet:
        """Write a TCP ``frame`` longer than the MTU as one GSO super-packet of
        ``gso_size``-byte segments (the virtio-net header says so), recorded as
        ``"injected"``."""

    def closed(self) -> None:
        """The peer stopped (the pair may turn offload back on)."""


class PeerEnd(Protocol):
    """One end of the pair as the peer sees it (``tun_pair.a`` / ``tun_pair.b``)."""

    @property
    def name(self) -> str: ...
    @property
    def ip(self) -> str | None: ...
    @property
    def ip6(self) -> str | None: ...
    @property
    def mac(self) -> str | None: ...


class ScriptedPeer:
    """One side of the pair played by the test (``tun_pair.script("b")``).

    Packets the relay reads that are addressed to this side's addresses are handed to the
    peer (:attr:`packets`) instead of the device; :meth:`send` writes packets into the other
    device as if this side had sent them. A context manager: leaving the ``with`` block (or
    :meth:`close`) restores forwarding.
    """

    def __init__(self, port: PeerPort, side: str, me: PeerEnd, other: PeerEnd) -> None:
        #: ``"a"`` or ``"b"``: the side this peer plays.
        self.side = side
        #: This side's IPv4 address (``None`` without IPv4): the peer's packets come from it.
        self.ip = me.ip
        #: This side's IPv6 address (``None`` without IPv6).
        self.ip6 = me.ip6
        #: This side's MAC address on TAP (``None`` on TUN).
        self.mac = me.mac
        #: The direction of the packets handed to the peer (``"a->b"`` for side b).
        self.direction = "a->b" if side == "b" else "b->a"
        #: On TAP, answer ARP requests and neighbour solicitations for this side's addresses
        #: (set False to see them in :attr:`packets` and answer, or not, yourself).
        self.answer_neighbours = True
        #: Every packet handed to the peer, as a :class:`~pytest_tunpair.Capture` of its own
        #: (each also appears in ``tun_pair.packets`` with ``action == "scripted"``).
        self.packets = Capture(mode=port.mode)
        self.packets.t0 = port.t0
        self.packets.wall_t0 = port.wall_t0
        #: ``"tun"`` or ``"tap"``: what :meth:`send` takes and :attr:`packets` holds.
        self.mode = port.mode
        self._port = port
        self._me = me
        self._other = other
        self._v4 = ipaddress.ip_address(me.ip).packed if me.ip else None
        self._v6 = ipaddress.ip_address(me.ip6).packed if me.ip6 else None
        self._mine = frozenset(a for a in (self._v4, self._v6) if a is not None)
        self._mac = _neigh.mac_bytes(me.mac) if me.mac else b""
        self._other_mac = _neigh.mac_bytes(other.mac) if other.mac else b""
        # Packets an expect, wait or endpoint looked at (the failure report lists the
        # others), and those an endpoint took as its own (tcp_accept() answers a SYN that
        # peer.expect() only looked at, never one a connection took).
        self._looked: set[int] = set()
        self._consumed: set[int] = set()
        # Each packet handed to the peer, by its number in peer.packets: the pair's record of
        # it (whose number in tun_pair.packets comes once the relay records it), so that
        # after= can take a packet of either capture.
        self._origin: dict[int, Packet] = {}
        self._errors: list[BaseException] = []
        self._flows: dict[tuple[str, int, str, int], ScriptedTcp] = {}
        self._lock = threading.Lock()
        self._closed = False
        port.divert(self._take)

    # -- relay side ------------------------------------------------------------------------
    def _take(self, pkt: Packet) -> bool:
        """Keep ``pkt`` if it is for this side (runs in the relay's thread: bytes only)."""
        try:
            data = pkt.data
            if self.mode == "tap" and _neigh.is_neighbour_query(data, v4=self._v4, v6=self._v6):
                rec = self._record(pkt)
                if self.answer_neighbours:
                    self._looked.add(rec.seq)
                    answer = _neigh.neighbour_answer(data, mac=self._mac, v4=self._v4, v6=self._v6)
                    if answer is not None:
                        self._port.write(answer)
                return True
            f = parsed(pkt)
            if f[_h.VERSION] is None or _h.packed_address(pkt.frame, f, 1) not in self._mine:
                return False
            rec = self._record(pkt)
            self._origin[rec.seq] = pkt
            return True
        except BaseException as exc:  # never into the relay: the test thread raises it
            exc.add_note(
                f"(in the scripted peer on {self._me.name}, on the {pkt.direction} packet read "
                f"at t={pkt.time:.6f}; the peer kept it)"
            )
            with self._lock:
                self._errors.append(exc)
            return True

    def _record(self, pkt: Packet) -> Packet:
        rec = Packet(pkt.time, pkt.direction, "scripted", pkt.data, 0, self.mode)
        self.packets.record(rec)
        return rec

    # -- lifecycle -------------------------------------------------------------------------
    def close(self, *, _pair_closing: bool = False) -> None:
        """Stop scripting: packets for this side are forwarded to its device again.

        Raises the first error the peer hit outside the test thread (answering a
        neighbour solicitation, say). :attr:`packets` stays readable.
        """
        if not self._closed:
            self._closed = True
            if not _pair_closing:  # else the relay stops with the pair anyway
                try:
                    self._port.divert(None)
                finally:
                    self._port.closed()
        self.check()

    def check(self) -> None:
        """Raise, in the calling thread, the first error the peer hit in the relay's."""
        __tracebackhide__ = True
        with self._lock:
            errors, self._errors = self._errors, []
        if errors:
            raise errors[0]

    def __enter__(self) -> ScriptedPeer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def active(self) -> bool:
        """True until :meth:`close`."""
        return not self._closed

    def now(self) -> float:
        """Seconds since the pair came up: the clock of ``Packet.time`` and
        ``Packet.arrival`` (``tun_pair.now()``)."""
        return time.monotonic() - self._port.t0

    def _sleep_until(self, when: float) -> None:
        """Sleep until ``now()`` is ``when`` (at once if it is past)."""
        wait = when - self.now()
        if wait > 0:
            time.sleep(wait)

    def _require_open(self) -> None:
        if self._closed:
            raise TunPairError(
                f"the scripted peer on {self._me.name} is closed: start a new one with "
                f"tun_pair.script({self.side!r})"
            )

    # -- sending ---------------------------------------------------------------------------
    def send(self, packet: Any, *, gso_size: int | None = None) -> Packet:
        """Write ``packet`` into the other device, as if this side had sent it.

        Bytes or a scapy packet: an IP packet on TUN; on TAP an Ethernet frame, or a scapy
        IP packet that the peer puts in one (from this side's MAC to the other's). Validated
        as ``inject()`` is; recorded as ``"injected"``. Returns the recorded packet.

        ``gso_size``: a TCP segment longer than the MTU goes in as one GSO super-packet of
        ``gso_size``-byte segments, which the kernel receives whole, as a NIC's GRO hands
        it up (packetdrill's ``--mss``); ``gso_size=0`` writes any packet whole, however
        long, as a TUN device takes it. Both need the pair's ``offload`` option (on by
        default). Without ``gso_size`` a packet over the MTU is refused.
        """
        self._require_open()
        if self.mode == "tap" and is_scapy_packet(packet) and not _has_ether(packet):
            from scapy.layers.l2 import Ether

            packet = Ether(src=self.mac, dst=self._other.mac) / packet
        data = to_bytes(packet, what="peer.send()")
        if gso_size is not None:
            return self._port.write_gso(data, gso_size)
        return self._port.write(data)

    def _addresses(self, family: int) -> tuple[bytes, bytes]:
        """(this side's, the other side's) address of ``family``, packed."""
        mine, theirs = (self.ip, self._other.ip) if family == 4 else (self.ip6, self._other.ip6)
        if not (mine and theirs):
            raise ValueError(f"the pair has no IPv{family} addresses (ipv{family}=None)")
        return ipaddress.ip_address(mine).packed, ipaddress.ip_address(theirs).packed

    def _send_ip(
        self,
        src: bytes,
        dst: bytes,
        proto: int,
        l4: bytes,
        *,
        gso_size: int | None = None,
        tos: int = 0,
    ) -> Packet:
        """Write a transport segment from this side to the other, built as Linux sends its
        own: DF set on IPv4 (path MTU discovery), TTL / hop limit 64."""
        self._require_open()
        packet = _build.ip_packet(src, dst, proto, l4, flags=IP_DF if len(src) == 4 else 0, tos=tos)
        if self.mode == "tap":
            ethertype = ETH_P_IP if len(src) == 4 else ETH_P_IPV6
            packet = _build.ethernet(self._other_mac, self._mac, ethertype) + packet
        if gso_size is not None:
            return self._port.write_gso(packet, gso_size)
        return self._port.write(packet)

    def _default_family(self, family: int | None) -> int:
        if family is not None:
            return family
        return 4 if self.ip else 6

    # -- looking at what the peer got ------------------------------------------------------
    def expect(
        self,
        template: Any,
        *,
        timeout: float = 2.0,
        after: Any = None,
        ignore: Iterable[str] = (),
    ) -> Packet:
        """``tun_pair.packets.expect()`` over the packets handed to this peer: the first
        whose layers and explicitly set fields match the scapy ``template``."""
        __tracebackhide__ = True
        found = self.packets.expect(
            template, timeout=timeout, after=self._after(after), ignore=ignore
        )
        self._looked.add(found.seq)
        return found

    def expect_none(
        self,
        match: Any,
        *,
        during: float = 0.5,
        after: Any = None,
        ignore: Iterable[str] = (),
    ) -> None:
        """``tun_pair.packets.expect_none()`` over the packets handed to this peer: fails if
        one matching ``match`` comes within ``during`` s (or came, since ``after``)."""
        __tracebackhide__ = True
        self.packets.expect_none(match, during=during, after=self._after(after), ignore=ignore)

    def expect_sequence(
        self, templates: Sequence[Any], *, timeout: float = 2.0, after: Any = None
    ) -> list[Packet]:
        """``tun_pair.packets.expect_sequence()`` over the packets handed to this peer."""
        __tracebackhide__ = True
        found = self.packets.expect_sequence(templates, timeout=timeout, after=self._after(after))
        self._looked.update(p.seq for p in found)
        return found

    def wait_for(self, match: Any = None, *, timeout: float = 2.0, **fields: Any) -> Packet:
        """``tun_pair.packets.wait_for()`` over the packets handed to this peer: a
        predicate, a layer class and/or fields (``peer.wait_for(flags="S", dport=80)``)."""
        __tracebackhide__ = True
        found = self.packets.wait_for(match, timeout=timeout, **fields)
        self._looked.add(found.seq)
        return found

    def _after(self, after: Any) -> Any:
        """``after=`` in this peer's numbering: a packet of ``peer.packets`` as it is, one of
        ``tun_pair.packets`` (what :meth:`send` returns) as the last packet handed to the
        peer that the pair recorded before it. Times and ``None`` pass through."""
        if not isinstance(after, Packet) or self._owns(after):
            return after
        if after.seq < 0:
            raise ValueError(
                f"after={after!r}: that packet was never recorded; give a packet of "
                "peer.packets or tun_pair.packets, or a time"
            )
        # Numbers in both captures grow in recording order: the peer's k-th packet came
        # before `after` if the pair recorded its original with a smaller number (an
        # original not recorded yet is later than anything recorded).
        last = -1
        for rec in self.packets:
            origin = self._origin.get(rec.seq)
            if origin is None or origin.seq < 0 or origin.seq > after.seq:
                break
            last = rec.seq
        return _AfterSeq(last)

    def _owns(self, pkt: Packet) -> bool:
        """``pkt`` is one of ``peer.packets`` (the same object, not an equal one)."""
        if pkt.action != "scripted" or not 0 <= pkt.seq:
            return False
        found = self.packets.since(pkt.seq)
        return bool(found) and found[0] is pkt

    def unexpected(self) -> list[Packet]:
        """Packets handed to the peer that no expect, wait, endpoint or neighbour answer
        looked at (a failure report lists them)."""
        return [p for p in self.packets if p.seq not in self._looked]

    def describe(self) -> str:
        """For failure reports: what the peer got, and what the script never looked at."""
        state = "active" if self.active else "closed"
        n = len(self.packets)
        lines = [
            f"scripted peer on {self._me.name} ({state}): {n} {_plural(n, 'packet')} handed to it"
        ]
        left = self.unexpected()
        if left:
            lines[0] += f", {len(left)} the script never looked at:"
            lines.append(trace(left, limit=UNEXPECTED_LINES))
        return "\n".join(lines)

    def _next(self, pred: Callable[[Packet], bool], timeout: float, what: str) -> Packet:
        """The first packet handed to the peer, not taken by an endpoint yet, whose fields
        satisfy ``pred``; waits up to ``timeout`` s. Marks it taken (an expect that only
        looked at it does not count: ``tcp_accept()`` answers a SYN ``peer.expect()``
        matched)."""
        __tracebackhide__ = True
        deadline = time.monotonic() + timeout
        last = -1
        while True:
            for pkt in self.packets.wait_new(last, max(0.0, deadline - time.monotonic())):
                last = pkt.seq
                if pkt.seq in self._consumed:
                    continue
                if pred(pkt):
                    self._looked.add(pkt.seq)
                    self._consumed.add(pkt.seq)
                    return pkt
            if time.monotonic() >= deadline:
                raise self._timeout(what, timeout)

    def _timeout(self, what: str, timeout: float) -> PacketTimeout:
        packets = list(self.packets)
        return PacketTimeout(
            f"{what} did not reach the scripted peer on {self._me.name} within {timeout:g} s; "
            f"{len(packets)} handed to it:\n",
            packets=packets,
            details=lambda: trace(packets, limit=TRACE_LINES),
        )

    # -- endpoints -------------------------------------------------------------------------
    def tcp_accept(
        self,
        port: int,
        *,
        timeout: float = 2.0,
        mss: int | None = 1460,
        wscale: int | None = 7,
        sack: bool = True,
        timestamps: bool = True,
        window: int = 65535,
        family: int | None = None,
        synack_delay: float = 0.0,
        complete: bool = True,
        syn_flags: str = "SA",
        syn_options: Sequence[tuple[str | int, Any]] | None = None,
        syn_window: int | None = None,
    ) -> ScriptedTcp:
        """Wait for a SYN to ``port``, answer SYN-ACK with these options, wait for the ACK.

        Options the kernel did not offer are not used (``conn.peer_options`` says what it
        offered); ``None``/``False`` leaves one out of the SYN-ACK. ``window`` is the
        receive window in bytes (scaled by ``wscale`` after the handshake). ``family``:
        4 or 6 to accept only that, ``None`` either. A SYN the kernel retransmits before
        the ACK is answered again. Returns the established connection.

        Pacing: the SYN-ACK leaves ``synack_delay`` s after the SYN arrived, so the
        kernel's first RTT sample (and its RTO, TLP and probe times) is the path's, not
        ~0. ``complete=False`` returns as soon as the SYN is in, nothing answered:
        :meth:`ScriptedTcp.complete` sends the SYN-ACK and waits for the ACK. Our SYN-ACK
        itself: ``syn_flags`` (``"SAE"`` answers an ECN setup), ``syn_options`` (sent
        as given, in order, instead of the ones built from ``mss``/``wscale``/``sack``/
        ``timestamps``; a ``("Timestamp", None)`` gets our clock's values) and
        ``syn_window`` (the header field; default ``window``, unscaled as in any SYN).
        """
        __tracebackhide__ = True
        self._require_open()
        fam = _family(family, "tcp_accept")
        timeout = _check_timeout(timeout, "tcp_accept")
        synack_delay = _check_timeout(synack_delay, "tcp_accept", "synack_delay")
        _check_port(port, "tcp_accept")
        conn_opts = _ConnOptions.make(
            mss, wscale, sack, timestamps, window, "tcp_accept",
            flags=syn_flags, options=syn_options, syn_window=syn_window, syn_flag="SA",
        )  # fmt: skip
        deadline = time.monotonic() + timeout

        def is_syn(p: Packet) -> bool:
            return (
                p.ip_proto == IPPROTO_TCP
                and p.dport == port
                and p.flags is not None
                and "S" in p.flags
                and "A" not in p.flags
                and (fam is None or p.ip_version == fam)
                and (p.dst, p.dport, p.src, p.sport) not in self._flows
            )

        syn = self._next(is_syn, timeout, f"a SYN to port {port}")
        version, src, dst, sport = syn.ip_version, syn.src, syn.dst, syn.sport
        assert version is not None and src is not None and dst is not None and sport is not None
        conn = ScriptedTcp(self, version, (dst, port), (src, sport), conn_opts)
        conn._take_syn(syn)
        conn._synack_delay = synack_delay
        if complete:
            conn.complete(timeout=max(0.0, deadline - time.monotonic()))
        return conn

    def tcp_connect(
        self,
        port: int,
        *,
        timeout: float = 2.0,
        mss: int | None = 1460,
        wscale: int | None = 7,
        sack: bool = True,
        timestamps: bool = True,
        window: int = 65535,
        family: int | None = None,
        sport: int | None = None,
        ack_delay: float = 0.0,
        complete: bool = True,
        ack_window: int | None = None,
        syn_flags: str = "S",
        syn_options: Sequence[tuple[str | int, Any]] | None = None,
        syn_window: int | None = None,
        syn_data: bytes = b"",
    ) -> ScriptedTcp:
        """Open a connection to ``port`` on the other side (a kernel server listening there).

        Sends a SYN with these options, waits for the SYN-ACK and ACKs it. A RST instead
        raises ``ConnectionRefusedError``; no answer within ``timeout``, ``PacketTimeout``.
        ``sport`` defaults to a random ephemeral port; ``family`` to IPv4 when the pair has it.

        Pacing: the ACK leaves ``ack_delay`` s after the SYN-ACK arrived (the kernel's
        first RTT sample); ``complete=False`` sends no ACK: :meth:`ScriptedTcp.complete`,
        :meth:`ScriptedTcp.ack` or any segment completes the handshake. ``ack_window``
        (bytes, scaled as negotiated) is the window of that ACK (default ``window``). Our
        SYN itself: ``syn_flags`` (``"SEC"`` asks for ECN), ``syn_options`` (sent as given,
        as in :meth:`tcp_accept`), ``syn_window`` (the header field) and ``syn_data`` (data
        in the SYN, as TCP Fast Open sends it; if the SYN-ACK does not acknowledge it,
        :attr:`ScriptedTcp.snd_nxt` goes back to the first byte of it, for
        ``conn.send()`` to send it again).
        """
        __tracebackhide__ = True
        self._require_open()
        fam = self._default_family(_family(family, "tcp_connect"))
        timeout = _check_timeout(timeout, "tcp_connect")
        ack_delay = _check_timeout(ack_delay, "tcp_connect", "ack_delay")
        _check_port(port, "tcp_connect")
        conn_opts = _ConnOptions.make(
            mss, wscale, sack, timestamps, window, "tcp_connect",
            flags=syn_flags, options=syn_options, syn_window=syn_window, syn_flag="S",
        )  # fmt: skip
        if ack_window is not None:
            _check_window(ack_window, "tcp_connect", "ack_window")
        if sport is None:
            sport = _EPHEMERAL[0] + secrets.randbelow(_EPHEMERAL[1] - _EPHEMERAL[0])
        _check_port(sport, "tcp_connect", "sport")
        local = self.ip if fam == 4 else self.ip6
        remote = self._other.ip if fam == 4 else self._other.ip6
        if not (local and remote):
            raise ValueError(f"tcp_connect(family={family!r}): the pair has no IPv{fam} addresses")
        conn = ScriptedTcp(self, fam, (_norm(local), sport), (_norm(remote), port), conn_opts)
        conn._connect(time.monotonic() + timeout, to_bytes(syn_data, what="tcp_connect(syn_data=)"))
        conn._ack_delay = ack_delay
        conn._ack_window = ack_window
        if complete:
            conn.complete()
        return conn

    def udp(self, port: int, *, family: int | None = None) -> ScriptedUdp:
        """A UDP endpoint on ``port`` of this side: ``send(data, to_port)``, ``recv()``."""
        self._require_open()
        _check_port(port, "udp")
        return ScriptedUdp(self, port, self._default_family(_family(family, "udp")))

    def _register(self, conn: ScriptedTcp) -> None:
        key = (conn.local[0], conn.local[1], conn.remote[0], conn.remote[1])
        self._flows[key] = conn

    # -- awaitable forms, for coroutines (see _packets/aio.py) ------------------------------
    expect_async = async_form(expect, "peer")
    """``await peer.expect_async(...)``: :meth:`expect` in a coroutine (asyncio, trio, anyio):
    same arguments, result and errors, and the event loop keeps running meanwhile."""

    expect_none_async = async_form(expect_none, "peer")
    """``await peer.expect_none_async(...)``: :meth:`expect_none` in a coroutine (asyncio, trio, anyio):
    same arguments, result and errors, and the event loop keeps running meanwhile."""

    expect_sequence_async = async_form(expect_sequence, "peer")
    """``await peer.expect_sequence_async(...)``: :meth:`expect_sequence` in a coroutine (asyncio, trio, anyio):
    same arguments, result and errors, and the event loop keeps running meanwhile."""

    wait_for_async = async_form(wait_for, "peer")  # type: ignore[arg-type]
    """``await peer.wait_for_async(...)``: :meth:`wait_for` in a coroutine (asyncio, trio, anyio):
    same arguments, result and errors, and the event loop keeps running meanwhile."""

    tcp_accept_async = async_form(tcp_accept, "peer")
    """``await peer.tcp_accept_async(...)``: :meth:`tcp_accept` in a coroutine (asyncio, trio, anyio):
    same arguments, result and errors, and the event loop keeps running meanwhile."""

    tcp_connect_async = async_form(tcp_connect, "peer")
    """``await peer.tcp_connect_async(...)``: :meth:`tcp_connect` in a coroutine (asyncio, trio, anyio):
    same arguments, result and errors, and the event loop keeps running meanwhile."""


class _AfterSeq:
    """``after=`` as a number of ``peer.packets`` (what the matcher reads of a Packet)."""

    __slots__ = ("direction", "seq")

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.direction = ""


def _plural(n: int, word: str) -> str:
    return word if n == 1 else word + "s"


def _norm(addr: str) -> str:
    return str(ipaddress.ip_address(addr))


def _has_ether(packet: Any) -> bool:
    from scapy.layers.l2 import Ether

    return bool(packet.haslayer(Ether))


def _check_port(port: object, what: str, name: str = "port") -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"{what}({name}={port!r}): give a port number 1-65535")


class _ConnOptions:
    """What this side offers in its SYN or SYN-ACK."""

    __slots__ = ("flags", "mss", "options", "sack", "syn_window", "timestamps", "window", "wscale")

    def __init__(
        self,
        mss: int | None,
        wscale: int | None,
        sack: bool,
        timestamps: bool,
        window: int,
        flags: str,
        options: list[tuple[str | int, Any]] | None,
        syn_window: int | None,
    ) -> None:
        self.mss = mss
        self.wscale = wscale
        self.sack = sack
        self.timestamps = timestamps
        self.window = window
        self.flags = flags
        self.options = options
        self.syn_window = syn_window

    @classmethod
    def make(
        cls,
        mss: int | None,
        wscale: int | None,
        sack: bool,
        timestamps: bool,
        window: int,
        what: str,
        *,
        flags: str,
        options: Sequence[tuple[str | int, Any]] | None,
        syn_window: int | None,
        syn_flag: str,
    ) -> _ConnOptions:
        if mss is not None and (
            isinstance(mss, bool) or not isinstance(mss, int) or not 0 < mss < 65536
        ):
            raise ValueError(f"{what}(mss={mss!r}): give 1-65535, or None to send no MSS option")
        if wscale is not None and (
            isinstance(wscale, bool)
            or not isinstance(wscale, int)
            or not 0 <= wscale <= _WSCALE_MAX
        ):
            raise ValueError(
                f"{what}(wscale={wscale!r}): give 0-14 (RFC 7323 2.3), or None for none"
            )
        _check_window(window, what)
        if not isinstance(flags, str):
            raise TypeError(f"{what}(syn_flags={flags!r}): give scapy's flag letters, e.g. 'SEC'")
        _h.flag_bits(flags)  # ValueError for a letter that is no flag
        if any(f not in flags for f in syn_flag):
            raise ValueError(
                f"{what}(syn_flags={flags!r}): the handshake segment needs {syn_flag!r} among "
                "its flags; send anything else with peer.send()"
            )
        opts = None
        if options is not None:
            opts = [(name, value) for name, value in options]
            _build.tcp_options(
                [(n, (0, 0) if n == "Timestamp" and v is None else v) for n, v in opts]
            )  # ValueError now, not at the first send
        if syn_window is not None and (
            isinstance(syn_window, bool)
            or not isinstance(syn_window, int)
            or not 0 <= syn_window <= _WINDOW_MAX
        ):
            raise ValueError(f"{what}(syn_window={syn_window!r}): give the header field, 0-65535")
        return cls(mss, wscale, bool(sack), bool(timestamps), window, flags, opts, syn_window)


def _check_window(window: object, what: str, name: str = "window") -> None:
    if isinstance(window, bool) or not isinstance(window, int) or not 0 <= window < 1 << 30:
        raise ValueError(f"{what}({name}={window!r}): give a receive window in bytes, 0 to 2**30-1")


class ScriptedTcp:
    """A TCP connection the scripted peer plays, with its state tracked.

    Every segment of the connection handed to the peer is processed in arrival order, the
    first time any method here waits: in-order data advances :attr:`rcv_nxt` and is
    appended to :attr:`received`; ACKs advance :attr:`acked`; timestamps update the value
    echoed back (RFC 7323 4.3). With :attr:`auto_ack` (the default) the peer ACKs each data
    segment and FIN as it processes it, and answers an unacceptable segment (a window probe,
    a keepalive, a retransmission) with an ACK, as RFC 9293 3.10.7.4 says a receiver does.

    Sequence numbers come two ways, as packetdrill and Wireshark show them: relative
    (``seq=``, ``ack=``, ``sack=``: 0 is the SYN, 1 the first byte after it, counted from
    :attr:`iss` for ours and :attr:`irs` for the kernel's) and absolute (``tcp_seq=``,
    ``tcp_ack=``, ``tcp_sack=``: the header's numbers, as ``Packet.tcp_seq`` gives them).
    """

    def __init__(
        self,
        peer: ScriptedPeer,
        family: int,
        local: tuple[str, int],
        remote: tuple[str, int],
        opts: _ConnOptions,
    ) -> None:
        self._peer = peer
        #: 4 or 6.
        self.family = family
        #: (address, port) of the scripted side.
        self.local = local
        #: (address, port) of the kernel's socket.
        self.remote = remote
        #: ACK every data segment and FIN as it is processed (False: only :meth:`ack` does).
        self.auto_ack = True
        #: The options the kernel put in its SYN or SYN-ACK.
        self.peer_options = TcpOptions()
        #: Bytes the kernel sent, in sequence order (what a socket would have read).
        self.received = b""
        #: True once the kernel's FIN was processed in order.
        self.fin_received = False
        #: True once the kernel reset the connection.
        self.reset = False
        #: The highest acknowledgment number the kernel sent (its view of our data).
        self.acked = 0
        #: The kernel's advertised receive window in bytes (scaled).
        self.peer_window = 0
        #: The SYN that opened the connection: the kernel's (``tcp_accept``) or ours
        #: (``tcp_connect``, as recorded in ``tun_pair.packets``); its options in order are
        #: ``conn.syn.tcp_options``.
        self.syn: Packet | None = None
        #: The SYN-ACK: ours (``tcp_accept``) or the kernel's (``tcp_connect``); ``None``
        #: until sent or received.
        self.syn_ack: Packet | None = None
        #: True once the three-way handshake is complete (see :meth:`complete`).
        self.established = False
        self._opts = opts
        self._window = opts.window
        #: The sequence number of the next byte the peer sends (starts at a random ISS).
        self.snd_nxt = secrets.randbits(32)
        #: The sequence number of the next byte the peer expects from the kernel.
        self.rcv_nxt = 0
        self._iss = self.snd_nxt
        self._irs: int | None = None
        self._snd_shift = 0  # the kernel's window scale: applies to its windows
        self._rcv_shift = 0  # ours: applies to the windows we advertise
        self._sack = False
        self._ts = False
        self._ts_recent = 0
        self._ts_offset = secrets.randbits(32)
        self._last_ack_sent = 0
        self._ooo: dict[int, bytes] = {}
        self._segs: list[Packet] = []
        self._pos = 0
        self._scan = -1  # sequence number of the last inbox packet examined
        self._synced = False  # rcv_nxt is known: the kernel's SYN was seen
        self._accepting = False  # our side answers the handshake (tcp_accept)
        self._synack_delay = 0.0
        self._ack_delay = 0.0
        self._ack_window: int | None = None

    def __repr__(self) -> str:
        return (
            f"<ScriptedTcp {self.local[0]}:{self.local[1]} <-> {self.remote[0]}:{self.remote[1]} "
            f"snd_nxt={self.snd_nxt} rcv_nxt={self.rcv_nxt}>"
        )

    # -- what the test reads and sets --------------------------------------------------------
    @property
    def window(self) -> int:
        """The receive window (bytes) advertised in the next segment sent.

        Setting it changes what later segments say; ``conn.window = 0; conn.ack()``
        advertises a zero window at once, ``conn.window = 65535; conn.ack()`` reopens it.
        """
        return self._window

    @window.setter
    def window(self, value: int) -> None:
        _check_window(value, "conn.window = ")
        self._window = value

    @property
    def sack(self) -> bool:
        """SACK was negotiated (both SYNs offered it)."""
        return self._sack

    @property
    def timestamps(self) -> bool:
        """Timestamps were negotiated: every segment the peer sends carries TSval/TSecr."""
        return self._ts

    @property
    def iss(self) -> int:
        """Our initial sequence number (the SYN's or SYN-ACK's ``tcp_seq``): relative
        ``seq=n`` of ours is ``iss + n``."""
        return self._iss

    @property
    def irs(self) -> int:
        """The kernel's initial sequence number (its SYN's or SYN-ACK's ``tcp_seq``):
        relative ``seq=n`` of the kernel's is ``irs + n``. ``TunPairError`` before its
        SYN was seen."""
        if self._irs is None:
            raise TunPairError(f"{self}: the kernel's SYN has not been seen yet")
        return self._irs

    def _ours(self, n: int) -> int:
        return (self._iss + n) % (1 << 32)

    def _theirs(self, n: int) -> int:
        return (self.irs + n) % (1 << 32)

    # -- handshakes -------------------------------------------------------------------------
    def _negotiate(self, theirs: Packet) -> None:
        o = self._opts
        options = theirs.tcp_options
        self.peer_options = offered(options)
        mine = offered(o.options) if o.options is not None else None
        my_wscale = o.wscale if mine is None else mine.wscale
        if my_wscale is not None and self.peer_options.wscale is not None:
            self._rcv_shift = min(my_wscale, _WSCALE_MAX)
            self._snd_shift = min(self.peer_options.wscale, _WSCALE_MAX)
        my_sack = o.sack if mine is None else mine.sack
        my_ts = o.timestamps if mine is None else mine.timestamps
        self._sack = my_sack and self.peer_options.sack
        self._ts = my_ts and self.peer_options.timestamps
        stamps = timestamp_option(options)
        if stamps is not None:
            self._ts_recent = stamps[0]

    def _syn_options(self, tsecr: int, *, answering: bool) -> list[tuple[str | int, Any]]:
        o = self._opts
        if o.options is not None:
            # Given: sent as they are, a bare timestamp filled in from our clock.
            return [
                (n, (self._tsval(), tsecr) if n == "Timestamp" and v is None else v)
                for n, v in o.options
            ]
        # Linux's order (tcp_options_write): MSS, SACK-permitted with timestamps, NOP,
        # window scale -- so a capture reads like the kernel's own SYN-ACK. A SYN-ACK
        # carries only the options the SYN offered (RFC 7323 1.3, RFC 2018 2).
        peer = self.peer_options
        opts: list[tuple[str | int, Any]] = []
        if o.mss is not None:
            opts.append(("MSS", o.mss))
        if o.sack and (peer.sack or not answering):
            opts.append(("SAckOK", b""))
        if o.timestamps and (peer.timestamps or not answering):
            opts.append(("Timestamp", (self._tsval(), tsecr)))
        if o.wscale is not None and (peer.wscale is not None or not answering):
            opts += [("NOP", None), ("WScale", o.wscale)]
        return opts

    def _syn_window(self) -> int:
        # RFC 7323 2.2: a SYN's window is never scaled.
        o = self._opts
        return min(self._window, _WINDOW_MAX) if o.syn_window is None else o.syn_window

    def _take_syn(self, syn: Packet) -> None:
        """tcp_accept(): the kernel's SYN is in; nothing answered yet."""
        self._peer._register(self)
        self._accepting = True
        self.syn = syn
        self._scan = syn.seq
        self._irs = _seq(syn)
        self.rcv_nxt = seq_add(self._irs, 1 + len(syn.payload or b""))
        self._synced = True
        self._negotiate(syn)

    def _send_syn_ack(self) -> None:
        assert self.syn is not None
        self.syn_ack = self._emit(
            self._opts.flags,
            seq=self._iss,
            window_field=self._syn_window(),
            options=self._syn_options(_tsval(self.syn) or 0, answering=True),
        )
        self.snd_nxt = seq_add(self._iss, 1)

    def complete(self, *, timeout: float = 2.0) -> ScriptedTcp:
        """Finish the handshake a ``complete=False`` call left open; returns the connection.

        After ``tcp_accept(complete=False)``: send the SYN-ACK (``synack_delay`` s after
        the SYN arrived) unless sent already, and wait for the kernel's ACK (a SYN it sends
        again meanwhile is answered again). After ``tcp_connect(complete=False)``: send
        the ACK of the SYN-ACK (``ack_delay`` s after it arrived, with ``ack_window``).
        Nothing when established already.
        """
        __tracebackhide__ = True
        timeout = _check_timeout(timeout, "conn.complete")
        if self.established:
            return self
        if not self._accepting:
            assert self.syn_ack is not None
            self._peer._sleep_until(self.syn_ack.arrival + self._ack_delay)
            window = self._ack_window
            self.ack(window=self._window if window is None else window)
            return self
        deadline = time.monotonic() + timeout
        assert self.syn is not None
        if self.syn_ack is None:
            self._peer._sleep_until(self.syn.arrival + self._synack_delay)
            self._send_syn_ack()
        while True:
            seg = self._next_segment(
                lambda s: (
                    "S" in _flags(s)
                    or "R" in _flags(s)
                    or ("A" in _flags(s) and s.tcp_ack == self.snd_nxt)
                ),
                deadline,
                "the ACK of the SYN-ACK",
            )
            if "R" in _flags(seg):
                raise ConnectionResetError(
                    f"the kernel answered the SYN-ACK of {self} with a reset (packet "
                    f"#{seg.seq}): no socket waits for it any more. A client that blocks "
                    "(connect(), create_connection()) in the test's thread keeps the script "
                    "from answering until it gives up: run the client in a thread "
                    "(docs/peer.md), or connect without blocking"
                )
            if "S" in _flags(seg):  # our SYN-ACK was slow or lost: the kernel sent its SYN again
                self._send_syn_ack()
                continue
            break
        self.established = True
        if seg.payload or "F" in _flags(seg):
            self._pos -= 1  # the ACK carried data: recv() returns it
        return self

    def _connect(self, deadline: float, data: bytes) -> None:
        __tracebackhide__ = True
        self._peer._register(self)
        self._scan = self._peer.packets[-1].seq if self._peer.packets else -1
        self.syn = self._emit(
            self._opts.flags,
            data=data,
            seq=self._iss,
            ack=0,
            window_field=self._syn_window(),
            options=self._syn_options(0, answering=False),
        )
        sent_end = self.snd_nxt
        seg = self._next_segment(
            lambda s: "R" in _flags(s) or ("S" in _flags(s) and "A" in _flags(s)),
            deadline,
            f"an answer to the SYN to port {self.remote[1]}",
        )
        if "R" in _flags(seg):
            raise ConnectionRefusedError(
                f"the kernel answered the SYN to {self.remote[0]} port {self.remote[1]} with "
                f"a RST (packet #{seg.seq}): nothing listens there"
            )
        self.syn_ack = seg
        self._irs = _seq(seg)
        self.rcv_nxt = seq_add(self._irs, 1)
        self._synced = True
        self._negotiate(seg)
        if data and seq_gt(sent_end, _ack(seg)):
            # The SYN's data was not accepted (no Fast Open cookie, say): send it again
            # from where the kernel's ACK points.
            self.snd_nxt = _ack(seg)

    # -- incoming ---------------------------------------------------------------------------
    def _mine(self, p: Packet) -> bool:
        return (
            p.ip_proto == IPPROTO_TCP
            and p.sport == self.remote[1]
            and p.dport == self.local[1]
            and p.src == self.remote[0]
            and p.dst == self.local[0]
            and p.flags is not None
        )

    def _fetch(self, deadline: float) -> bool:
        """Process the connection's segments that arrived since the last look, waiting
        until ``deadline`` for the first one; True if there was any."""
        peer = self._peer
        got = False
        while not got:
            wait = max(0.0, deadline - time.monotonic())
            new = peer.packets.wait_new(self._scan, wait)
            if not new:
                return False
            for pkt in new:
                self._scan = pkt.seq
                if not self._mine(pkt):
                    continue
                peer._looked.add(pkt.seq)
                peer._consumed.add(pkt.seq)
                self._process(pkt)
                self._segs.append(pkt)
                got = True
            if time.monotonic() >= deadline:
                break
        return got

    def _process(self, s: Packet) -> None:
        flags = _flags(s)
        if "R" in flags:
            self.reset = True
            return
        if "A" in flags:
            ack = _ack(s)
            if not self.acked or seq_gt(ack, self.acked):
                self.acked = ack
            window = s.window or 0
            self.peer_window = window << (0 if "S" in flags else self._snd_shift)
        start = _seq(s)
        tsval = _tsval(s)
        if (
            tsval is not None
            and (not self._ts_recent or seq_geq(tsval, self._ts_recent))
            and not seq_gt(start, self._last_ack_sent if self._last_ack_sent else start)
        ):
            self._ts_recent = tsval  # RFC 7323 4.3 (TS.Recent)
        if not self._synced or "S" in flags:
            return
        before = self.rcv_nxt
        data = s.payload or b""
        if data:
            if seq_gt(seq_add(start, len(data)), self.rcv_nxt) and not seq_gt(start, self.rcv_nxt):
                skip = (self.rcv_nxt - start) % (1 << 32)
                self._take_data(data[skip:])
            elif seq_gt(start, self.rcv_nxt):
                self._ooo.setdefault(start, data)
        if "F" in flags and seq_add(start, len(data)) == self.rcv_nxt and not self.fin_received:
            self.rcv_nxt = seq_add(self.rcv_nxt, 1)
            self.fin_received = True
        if not self.auto_ack:
            return
        # Data, a FIN, or an unacceptable segment (a window probe at rcv_nxt - 1, a
        # keepalive, a retransmission): a receiver answers each with an ACK.
        if data or "F" in flags or self.rcv_nxt != before or start != self.rcv_nxt:
            self.ack()

    def _take_data(self, data: bytes) -> None:
        self.received += data
        self.rcv_nxt = seq_add(self.rcv_nxt, len(data))
        while self._ooo:  # a hole filled: buffered later data is in order now
            for start in list(self._ooo):
                buf = self._ooo[start]
                end = seq_add(start, len(buf))
                if not seq_gt(end, self.rcv_nxt):
                    del self._ooo[start]
                elif not seq_gt(start, self.rcv_nxt):
                    del self._ooo[start]
                    skip = (self.rcv_nxt - start) % (1 << 32)
                    self.received += buf[skip:]
                    self.rcv_nxt = end
                    break
            else:
                return

    def _next_segment(
        self,
        pred: Callable[[Packet], bool],
        deadline: float,
        what: str,
        *,
        matcher: _Diffing | None = None,
        strict: bool = False,
    ) -> Packet:
        """The next segment of the connection (after those already returned) for which
        ``pred`` holds, waiting until ``deadline``; segments before it are skipped, or,
        ``strict``, fail: the next segment must be it."""
        __tracebackhide__ = True
        start = time.monotonic()
        first = self._pos
        while True:
            while self._pos < len(self._segs):
                pkt = self._segs[self._pos]
                self._pos += 1
                if pred(pkt) and (matcher is None or matcher(pkt)):
                    return pkt
                if strict:
                    raise self._unscripted(what, pkt, matcher)
            if not self._fetch(deadline) and time.monotonic() >= deadline:
                examined = self._segs[first:]
                raise self._timeout(what, max(0.0, deadline - start), matcher, examined)

    def _unscripted(self, what: str, pkt: Packet, matcher: _Diffing | None) -> UnexpectedPacket:
        lines = matcher.diff(pkt)[1] if matcher is not None else []
        segs = list(self._segs)
        text = "".join(f"      {line}\n" for line in lines)
        return UnexpectedPacket(
            f"expect_next: expected {what} on {self.local[0]}:{self.local[1]} <-> "
            f"{self.remote[0]}:{self.remote[1]}, but the kernel's next segment was #{pkt.seq}:\n"
            f"  {pkt.summary().lstrip()}\n{text}",
            packet=pkt,
            packets=segs,
            details=lambda: trace(segs, limit=TRACE_LINES),
        )

    def _timeout(
        self,
        what: str,
        waited: float,
        matcher: _Diffing | None = None,
        examined: Sequence[Packet] = (),
    ) -> PacketTimeout:
        segs = list(self._segs)
        state = f"snd_nxt={self.snd_nxt} rcv_nxt={self.rcv_nxt} acked={self.acked}"
        if self.reset:
            state += ", the kernel reset the connection"

        def details() -> str:
            text = ""
            if matcher is not None:
                # The same diff lines tun_pair.packets.expect() shows, for the closest few.
                # Those looked at in this wait; if none came, the connection's last ones.
                pool = list(examined) or segs[-TRACE_LINES:]
                scored = sorted(
                    ((matcher.diff(p), i, p) for i, p in enumerate(pool)),
                    key=lambda s: (s[0][0], s[1]),
                )
                for (_score, lines), _i, p in scored[:CLOSEST]:
                    text += f"  #{p.seq} {p.summary().lstrip()}\n"
                    text += "".join(f"      {line}\n" for line in lines)
                text = ("closest:\n" + text) if text else ""
            return text + trace(segs, limit=TRACE_LINES)

        return PacketTimeout(
            f"{what} did not come within {waited:.3g} s on {self.local[0]}:{self.local[1]} "
            f"<-> {self.remote[0]}:{self.remote[1]} ({state}); {len(segs)} segments of this "
            "connection reached the peer:\n",
            packets=segs,
            details=details,
        )

    def recv(self, *, timeout: float = 2.0) -> Packet:
        """The next segment from the kernel that carries data (a retransmission too).

        ``ConnectionResetError`` if the kernel resets the connection meanwhile;
        ``PacketTimeout`` if no data comes within ``timeout`` s.
        """
        __tracebackhide__ = True
        timeout = _check_timeout(timeout, "recv")
        pkt = self._next_segment(
            lambda s: bool(s.payload) or "R" in _flags(s),
            time.monotonic() + timeout,
            "a data segment",
        )
        if "R" in _flags(pkt):
            raise ConnectionResetError(f"the kernel reset {self} (packet #{pkt.seq})")
        return pkt

    def expect(self, template: Any = None, *, timeout: float = 2.0, **fields: Any) -> Packet:
        """The next segment of this connection that matches; earlier ones are skipped.

        Fields: ``flags`` (scapy letters, any order: ``"A"``, ``"FA"``), ``seq`` and
        ``ack`` (relative: ``seq=1`` is the kernel's first byte after its SYN, ``ack=1``
        acknowledges our SYN), ``tcp_seq`` and ``tcp_ack`` (absolute), ``window`` (the
        header field), ``payload`` (bytes), ``len`` (payload length), ``options`` (the
        ordered list ``Packet.tcp_options`` gives); a value may also be a predicate
        (``tcp_seq=lambda n: n != 1``). Or a scapy template (``TCP(flags="FA")``), matched
        as ``tun_pair.packets.expect`` matches it, whose failure shows the fields that
        differed. ``PacketTimeout`` if none comes within ``timeout`` s.
        """
        __tracebackhide__ = True
        return self._expect(template, timeout, fields, "conn.expect", strict=False)

    def expect_next(self, template: Any = None, *, timeout: float = 2.0, **fields: Any) -> Packet:
        """The kernel's next segment of this connection, which must match (as in
        :meth:`expect`): any other segment there fails at once with
        :class:`~pytest_tunpair.UnexpectedPacket` naming it and the fields that differ,
        as packetdrill fails on an unscripted packet. ``PacketTimeout`` if no segment
        comes within ``timeout`` s."""
        __tracebackhide__ = True
        return self._expect(template, timeout, fields, "conn.expect_next", strict=True)

    def _expect(
        self, template: Any, timeout: float, fields: dict[str, Any], what: str, *, strict: bool
    ) -> Packet:
        __tracebackhide__ = True
        timeout = _check_timeout(timeout, what)
        if (template is None) == (not fields):
            raise TypeError(
                f"{what}() takes a scapy template or fields (flags='A', seq=1, ...), one of the two"
            )
        matcher: _Diffing
        if template is not None:
            from .._packets.match import compile_match

            compiled = compile_match(template, what=what)
            described = compiled.description
            matcher = compiled
        else:
            absolute = self._absolute(fields, what)
            described = ", ".join(f"{k}={v!r}" for k, v in fields.items())
            matcher = _FieldMatcher(absolute, _segment_matcher(absolute, what))
        return self._next_segment(
            _always,
            time.monotonic() + timeout,
            f"a segment with {described}",
            matcher=matcher,
            strict=strict,
        )

    def _absolute(self, fields: dict[str, Any], what: str) -> dict[str, Any]:
        """Relative ``seq``/``ack`` as the header's ``tcp_seq``/``tcp_ack``."""
        out = dict(fields)
        for rel, absolute, base in (
            ("seq", "tcp_seq", self._theirs),
            ("ack", "tcp_ack", self._ours),
        ):
            if rel not in out:
                continue
            if absolute in out:
                raise TypeError(f"{what}(): give {rel}= (relative) or {absolute}= (absolute)")
            value = out.pop(rel)
            if callable(value):
                out[absolute] = _relative_predicate(value, base)
            else:
                out[absolute] = base(int(value))
        return out

    # -- outgoing ---------------------------------------------------------------------------
    def _tsval(self) -> int:
        # A 1 ms clock (RFC 7323 5.4 recommends 1 ms to 1 s per tick), from a random start.
        return (int(time.monotonic() * 1000) + self._ts_offset) % (1 << 32)

    def _default_options(self) -> list[tuple[str | int, Any]]:
        if not self._ts:
            return []
        return [("NOP", None), ("NOP", None), ("Timestamp", (self._tsval(), self._ts_recent))]

    def _emit(
        self,
        flags: str,
        *,
        data: bytes = b"",
        seq: int | None = None,
        ack: int | None = None,
        window_field: int | None = None,
        options: Sequence[tuple[str | int, Any]] | None = None,
        gso_size: int | None = None,
    ) -> Packet:
        if seq is None:
            seq = self.snd_nxt
        if ack is None:
            ack = self.rcv_nxt if "A" in flags else 0
        if window_field is None:
            window_field = min(self._window >> self._rcv_shift, _WINDOW_MAX)
        if options is None:
            options = self._default_options()
        src, dst = self._peer._addresses(self.family)
        segment = _build.tcp(
            src,
            dst,
            self.local[1],
            self.remote[1],
            seq=seq,
            ack=ack,
            flags=_h.flag_bits(flags),
            window=window_field,
            options=options,
            payload=data,
        )
        sent = self._peer._send_ip(src, dst, IPPROTO_TCP, segment, gso_size=gso_size)
        if "A" in flags:
            self._last_ack_sent = ack
            if self._synced and not self._accepting and "S" not in flags:
                self.established = True  # our first ACK after the SYN-ACK completes it
        end = seq_add(seq, len(data) + ("S" in flags) + ("F" in flags))
        if seq_gt(end, self.snd_nxt):
            self.snd_nxt = end
        return sent

    def _numbers(
        self,
        what: str,
        seq: int | None,
        ack: int | None,
        tcp_seq: int | None,
        tcp_ack: int | None,
    ) -> tuple[int | None, int | None]:
        if seq is not None and tcp_seq is not None:
            raise TypeError(f"{what}(): give seq= (relative) or tcp_seq= (absolute), not both")
        if ack is not None and tcp_ack is not None:
            raise TypeError(f"{what}(): give ack= (relative) or tcp_ack= (absolute), not both")
        if seq is not None:
            tcp_seq = self._ours(seq)
        if ack is not None:
            tcp_ack = self._theirs(ack)
        return (
            None if tcp_seq is None else tcp_seq % (1 << 32),
            None if tcp_ack is None else tcp_ack % (1 << 32),
        )

    def send(
        self,
        data: bytes = b"",
        *,
        flags: str = "PA",
        seq: int | None = None,
        ack: int | None = None,
        tcp_seq: int | None = None,
        tcp_ack: int | None = None,
        window: int | None = None,
        options: Sequence[tuple[str | int, Any]] | None = None,
        gso_size: int | None = None,
    ) -> Packet:
        """Send one segment at :attr:`snd_nxt`, acknowledging :attr:`rcv_nxt`.

        ``data`` goes in one segment (keep it within the kernel's MSS, or give
        ``gso_size`` to send it as one GSO super-packet of such segments, see
        :meth:`ScriptedPeer.send`). Without data the default flags are a pure ``"A"``.
        Override the sequence number (``seq=`` relative to :attr:`iss`, e.g. ``seq=1``
        to retransmit the first byte, or ``tcp_seq=`` absolute), the acknowledgment
        (``ack=`` relative to :attr:`irs`, or ``tcp_ack=``), ``window`` (bytes, scaled as
        negotiated) or ``options`` (a list as ``Packet.tcp_options`` gives it, scapy's
        names: ``[("NOP", None), ("WScale", 3)]``; ``(kind, bytes)`` for any kind; the
        default carries timestamps when negotiated) to misbehave on purpose.
        :attr:`snd_nxt` moves to the end of what was sent, never backwards. Returns the
        recorded packet.
        """
        data = to_bytes(data, what="conn.send()") if not isinstance(data, bytes) else data
        if not data and flags == "PA":
            flags = "A"
        field = None
        if window is not None:
            _check_window(window, "conn.send")
            field = min(window >> self._rcv_shift, _WINDOW_MAX)
        abs_seq, abs_ack = self._numbers("conn.send", seq, ack, tcp_seq, tcp_ack)
        return self._emit(
            flags,
            data=data,
            seq=abs_seq,
            ack=abs_ack,
            window_field=field,
            options=options,
            gso_size=gso_size,
        )

    def ack(
        self,
        ack: int | None = None,
        *,
        tcp_ack: int | None = None,
        window: int | None = None,
        sack: Iterable[tuple[int, int]] = (),
        tcp_sack: Iterable[tuple[int, int]] = (),
    ) -> Packet:
        """Send a pure ACK (default: of :attr:`rcv_nxt`; ``ack=`` relative to :attr:`irs`,
        ``tcp_ack=`` absolute); repeated, a duplicate ACK.

        ``sack``: up to three (left, right) ranges received out of order, relative
        (``tcp_sack``: absolute), sent as SACK blocks (RFC 2018; needs :attr:`sack`
        negotiated). Linux counts duplicate ACKs towards a fast retransmit only with SACK
        blocks once SACK is negotiated.
        """
        field = None
        if window is not None:
            _check_window(window, "conn.ack")
            field = min(window >> self._rcv_shift, _WINDOW_MAX)
        blocks = [(self._theirs(a), self._theirs(b)) for a, b in sack]
        blocks += [(int(a) % (1 << 32), int(b) % (1 << 32)) for a, b in tcp_sack]
        options = None
        if blocks:
            if not self._sack:
                raise ValueError("conn.ack(sack=...): SACK was not negotiated (conn.sack is False)")
            if len(blocks) > 3:
                raise ValueError("conn.ack(sack=...): at most 3 blocks fit beside timestamps")
            flat = tuple(x for block in blocks for x in block)
            options = [*self._default_options(), ("NOP", None), ("NOP", None), ("SAck", flat)]
        _seq_unused, abs_ack = self._numbers("conn.ack", None, ack, None, tcp_ack)
        return self._emit(
            "A",
            ack=self.rcv_nxt if abs_ack is None else abs_ack,
            window_field=field,
            options=options,
        )

    def fin(self) -> Packet:
        """Send a FIN (with an ACK of :attr:`rcv_nxt`): this side is done sending."""
        return self._emit("FA")

    def rst(self) -> Packet:
        """Reset the connection: a RST at :attr:`snd_nxt`, which the kernel accepts
        (RFC 5961 3.2: exactly the next expected sequence number)."""
        return self._emit("R", ack=0)

    # -- awaitable forms, for coroutines (see _packets/aio.py) ------------------------------
    complete_async = async_form(complete, "conn")
    """``await conn.complete_async(...)``: :meth:`complete` in a coroutine (asyncio, trio,
    anyio): same arguments, result and errors, and the event loop keeps running meanwhile."""

    recv_async = async_form(recv, "conn")
    """``await conn.recv_async(...)``: :meth:`recv` in a coroutine (asyncio, trio, anyio):
    same arguments, result and errors, and the event loop keeps running meanwhile."""

    expect_async = async_form(expect, "conn")  # type: ignore[arg-type]
    """``await conn.expect_async(...)``: :meth:`expect` in a coroutine (asyncio, trio, anyio):
    same arguments, result and errors, and the event loop keeps running meanwhile."""

    expect_next_async = async_form(expect_next, "conn")  # type: ignore[arg-type]
    """``await conn.expect_next_async(...)``: :meth:`expect_next` in a coroutine (asyncio,
    trio, anyio): same arguments, result and errors, and the event loop keeps running
    meanwhile."""


def _always(p: Packet) -> bool:
    return True


def _relative_predicate(
    test: Callable[[int], Any], base: Callable[[int], int]
) -> Callable[[int], Any]:
    def absolute(n: int) -> Any:
        return test((n - base(0)) % (1 << 32))

    return absolute


class _FieldMatcher:
    """``expect_next(**fields)``'s diff: which field of the segment differed."""

    def __init__(self, absolute: dict[str, Any], pred: Callable[[Packet], bool]) -> None:
        self.pred = pred
        self.absolute = absolute

    def __call__(self, p: Packet) -> bool:
        return self.pred(p)

    def diff(self, p: Packet) -> tuple[int, list[str]]:
        lines = []
        for name, want in self.absolute.items():
            got = _segment_value(p, name)
            if not _field_ok(name, want, got):
                shown = "a predicate" if callable(want) else repr(want)
                lines.append(f"{name}: expected {shown}, got {got!r}")
        return len(lines), lines


def _flags(p: Packet) -> str:
    return p.flags or ""


def _seq(p: Packet) -> int:
    return p.tcp_seq or 0


def _ack(p: Packet) -> int:
    return p.tcp_ack or 0


def _tsval(p: Packet) -> int | None:
    stamps = timestamp_option(p.tcp_options)
    return None if stamps is None else stamps[0]


_SEGMENT_FIELDS = (
    "flags",
    "seq",
    "ack",
    "tcp_seq",
    "tcp_ack",
    "window",
    "payload",
    "len",
    "options",
)


def _segment_value(s: Packet, name: str) -> Any:
    if name == "len":
        return len(s.payload or b"")
    if name == "payload":
        return s.payload or b""
    if name == "options":
        return s.tcp_options
    return getattr(s, name)


def _field_ok(name: str, want: Any, got: Any) -> bool:
    if callable(want):
        return bool(want(got))
    if name == "flags":
        return got is not None and set(got) == set(want)
    if name == "options":
        return bool(got == [tuple(o) for o in want])
    return bool(got == want)


def _segment_matcher(fields: dict[str, Any], what: str = "conn.expect") -> Callable[[Packet], bool]:
    unknown = set(fields) - set(_SEGMENT_FIELDS)
    if unknown:
        raise TypeError(
            f"{what}() got unknown field(s) {', '.join(sorted(unknown))}: "
            f"use {', '.join(_SEGMENT_FIELDS)}"
        )
    items = list(fields.items())

    def pred(s: Packet) -> bool:
        return all(_field_ok(name, want, _segment_value(s, name)) for name, want in items)

    return pred


class ScriptedUdp:
    """A UDP endpoint the scripted peer plays (``peer.udp(port)``)."""

    def __init__(self, peer: ScriptedPeer, port: int, family: int) -> None:
        self._peer = peer
        #: The port on the scripted side.
        self.port = port
        #: 4 or 6: the family :meth:`send` uses.
        self.family = family

    def __repr__(self) -> str:
        return f"<ScriptedUdp port {self.port} IPv{self.family}>"

    def send(self, data: bytes, to_port: int) -> Packet:
        """Send ``data`` from this port to ``to_port`` on the other side."""
        _check_port(to_port, "udp.send", "to_port")
        src, dst = self._peer._addresses(self.family)
        datagram = _build.udp(src, dst, self.port, to_port, bytes(data))
        return self._peer._send_ip(src, dst, IPPROTO_UDP, datagram)

    def recvfrom(self, timeout: float = 2.0) -> tuple[bytes, tuple[str, int]]:
        """The next datagram to this port (IPv4 or IPv6): (data, (address, port))."""
        __tracebackhide__ = True
        timeout = _check_timeout(timeout, "udp.recv")
        got = self._peer._next(
            lambda p: p.ip_proto == IPPROTO_UDP and p.dport == self.port,
            timeout,
            f"a UDP datagram to port {self.port}",
        )
        src, sport, payload = got.src, got.sport, got.payload
        assert src is not None and sport is not None and payload is not None
        return payload, (src, sport)

    def recv(self, timeout: float = 2.0) -> bytes:
        """The next datagram to this port: its payload."""
        __tracebackhide__ = True
        return self.recvfrom(timeout)[0]

    # -- awaitable forms, for coroutines (see _packets/aio.py) ------------------------------
    recvfrom_async = async_form(recvfrom, "udp")
    """``await udp.recvfrom_async(...)``: :meth:`recvfrom` in a coroutine (asyncio, trio, anyio):
    same arguments, result and errors, and the event loop keeps running meanwhile."""

    recv_async = async_form(recv, "udp")
    """``await udp.recv_async(...)``: :meth:`recv` in a coroutine (asyncio, trio, anyio):
    same arguments, result and errors, and the event loop keeps running meanwhile."""
