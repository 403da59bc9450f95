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
from typing import TYPE_CHECKING, Any, Protocol

from .._errors import PacketTimeout, TunPairError
from .._link.link import Divert
from .._packets.capture import Capture
from .._packets.packet import Packet, parsed, trace
from .._wire import build as _build
from .._wire import headers as _h
from .._wire import neigh as _neigh
from .._wire.numbers import ETH_P_IP, ETH_P_IPV6, IP_DF, IPPROTO_TCP, IPPROTO_UDP
from .._wire.tcp import TcpOptions, offered, seq_add, seq_geq, seq_gt, timestamp_option
from .._wire.validate import is_scapy_packet, to_bytes

if TYPE_CHECKING:
    from .._packets.match import Matcher

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


def _check_timeout(timeout: float, what: str) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0:
        raise ValueError(f"{what}(timeout={timeout!r}): give a number of seconds >= 0")
    return float(timeout)


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
        self._looked: set[int] = set()
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
            self._record(pkt)
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

    def _require_open(self) -> None:
        if self._closed:
            raise TunPairError(
                f"the scripted peer on {self._me.name} is closed: start a new one with "
                f"tun_pair.script({self.side!r})"
            )

    # -- sending ---------------------------------------------------------------------------
    def send(self, packet: Any) -> Packet:
        """Write ``packet`` into the other device, as if this side had sent it.

        Bytes or a scapy packet: an IP packet on TUN; on TAP an Ethernet frame, or a scapy
        IP packet that the peer puts in one (from this side's MAC to the other's). Validated
        as ``inject()`` is; recorded as ``"injected"``. Returns the recorded packet.
        """
        self._require_open()
        if self.mode == "tap" and is_scapy_packet(packet) and not _has_ether(packet):
            from scapy.layers.l2 import Ether

            packet = Ether(src=self.mac, dst=self._other.mac) / packet
        return self._port.write(to_bytes(packet, what="peer.send()"))

    def _addresses(self, family: int) -> tuple[bytes, bytes]:
        """(this side's, the other side's) address of ``family``, packed."""
        mine, theirs = (self.ip, self._other.ip) if family == 4 else (self.ip6, self._other.ip6)
        if not (mine and theirs):
            raise ValueError(f"the pair has no IPv{family} addresses (ipv{family}=None)")
        return ipaddress.ip_address(mine).packed, ipaddress.ip_address(theirs).packed

    def _send_ip(self, src: bytes, dst: bytes, proto: int, l4: bytes) -> Packet:
        """Write a transport segment from this side to the other, built as Linux sends its
        own: DF set on IPv4 (path MTU discovery), TTL / hop limit 64."""
        self._require_open()
        packet = _build.ip_packet(src, dst, proto, l4, flags=IP_DF if len(src) == 4 else 0)
        if self.mode == "tap":
            ethertype = ETH_P_IP if len(src) == 4 else ETH_P_IPV6
            packet = _build.ethernet(self._other_mac, self._mac, ethertype) + packet
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
        found = self.packets.expect(template, timeout=timeout, after=after, ignore=ignore)
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
        self.packets.expect_none(match, during=during, after=after, ignore=ignore)

    def expect_sequence(
        self, templates: Sequence[Any], *, timeout: float = 2.0, after: Any = None
    ) -> list[Packet]:
        """``tun_pair.packets.expect_sequence()`` over the packets handed to this peer."""
        __tracebackhide__ = True
        found = self.packets.expect_sequence(templates, timeout=timeout, after=after)
        self._looked.update(p.seq for p in found)
        return found

    def wait_for(self, match: Any = None, *, timeout: float = 2.0, **fields: Any) -> Packet:
        """``tun_pair.packets.wait_for()`` over the packets handed to this peer: a
        predicate, a layer class and/or fields (``peer.wait_for(flags="S", dport=80)``)."""
        __tracebackhide__ = True
        found = self.packets.wait_for(match, timeout=timeout, **fields)
        self._looked.add(found.seq)
        return found

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
        """The first packet handed to the peer, not looked at yet, whose fields satisfy
        ``pred``; waits up to ``timeout`` s. Marks it looked at."""
        __tracebackhide__ = True
        deadline = time.monotonic() + timeout
        last = -1
        while True:
            for pkt in self.packets.wait_new(last, max(0.0, deadline - time.monotonic())):
                last = pkt.seq
                if pkt.seq in self._looked:
                    continue
                if pred(pkt):
                    self._looked.add(pkt.seq)
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
    ) -> ScriptedTcp:
        """Wait for a SYN to ``port``, answer SYN-ACK with these options, wait for the ACK.

        Options the kernel did not offer are not used (``conn.peer_options`` says what it
        offered); ``None``/``False`` leaves one out of the SYN-ACK. ``window`` is the
        receive window in bytes (scaled by ``wscale`` after the handshake). ``family``:
        4 or 6 to accept only that, ``None`` either. A SYN the kernel retransmits before
        the ACK is answered again. Returns the established connection.
        """
        __tracebackhide__ = True
        self._require_open()
        fam = _family(family, "tcp_accept")
        timeout = _check_timeout(timeout, "tcp_accept")
        _check_port(port, "tcp_accept")
        conn_opts = _ConnOptions.make(mss, wscale, sack, timestamps, window, "tcp_accept")
        deadline = time.monotonic() + timeout

        def is_syn(p: Packet) -> bool:
            return (
                p.ip_proto == IPPROTO_TCP
                and p.dport == port
                and p.flags == "S"
                and (fam is None or p.ip_version == fam)
                and (p.dst, p.dport, p.src, p.sport) not in self._flows
            )

        syn = self._next(is_syn, timeout, f"a SYN to port {port}")
        version, src, dst, sport = syn.ip_version, syn.src, syn.dst, syn.sport
        assert version is not None and src is not None and dst is not None and sport is not None
        conn = ScriptedTcp(self, version, (dst, port), (src, sport), conn_opts)
        conn._accept(syn, deadline)
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
    ) -> ScriptedTcp:
        """Open a connection to ``port`` on the other side (a kernel server listening there).

        Sends a SYN with these options, waits for the SYN-ACK and ACKs it. A RST instead
        raises ``ConnectionRefusedError``; no answer within ``timeout``, ``PacketTimeout``.
        ``sport`` defaults to a random ephemeral port; ``family`` to IPv4 when the pair has it.
        """
        __tracebackhide__ = True
        self._require_open()
        fam = self._default_family(_family(family, "tcp_connect"))
        timeout = _check_timeout(timeout, "tcp_connect")
        _check_port(port, "tcp_connect")
        conn_opts = _ConnOptions.make(mss, wscale, sack, timestamps, window, "tcp_connect")
        if sport is None:
            sport = _EPHEMERAL[0] + secrets.randbelow(_EPHEMERAL[1] - _EPHEMERAL[0])
        _check_port(sport, "tcp_connect", "sport")
        local = self.ip if fam == 4 else self.ip6
        remote = self._other.ip if fam == 4 else self._other.ip6
        if not (local and remote):
            raise ValueError(f"tcp_connect(family={family!r}): the pair has no IPv{fam} addresses")
        conn = ScriptedTcp(self, fam, (_norm(local), sport), (_norm(remote), port), conn_opts)
        conn._connect(time.monotonic() + timeout)
        return conn

    def udp(self, port: int, *, family: int | None = None) -> ScriptedUdp:
        """A UDP endpoint on ``port`` of this side: ``send(data, to_port)``, ``recv()``."""
        self._require_open()
        _check_port(port, "udp")
        return ScriptedUdp(self, port, self._default_family(_family(family, "udp")))

    def _register(self, conn: ScriptedTcp) -> None:
        key = (conn.local[0], conn.local[1], conn.remote[0], conn.remote[1])
        self._flows[key] = conn


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

    __slots__ = ("mss", "sack", "timestamps", "window", "wscale")

    def __init__(
        self, mss: int | None, wscale: int | None, sack: bool, timestamps: bool, window: int
    ) -> None:
        self.mss = mss
        self.wscale = wscale
        self.sack = sack
        self.timestamps = timestamps
        self.window = window

    @classmethod
    def make(
        cls,
        mss: int | None,
        wscale: int | None,
        sack: bool,
        timestamps: bool,
        window: int,
        what: str,
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
        return cls(mss, wscale, bool(sack), bool(timestamps), window)


def _check_window(window: object, what: str) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or not 0 <= window < 1 << 30:
        raise ValueError(f"{what}(window={window!r}): give a receive window in bytes, 0 to 2**30-1")


class ScriptedTcp:
    """A TCP connection the scripted peer plays, with its state tracked.

    Every segment of the connection handed to the peer is processed in arrival order, the
    first time any method here waits: in-order data advances :attr:`rcv_nxt` and is
    appended to :attr:`received`; ACKs advance :attr:`acked`; timestamps update the value
    echoed back (RFC 7323 4.3). With :attr:`auto_ack` (the default) the peer ACKs each data
    segment and FIN as it processes it, and answers an unacceptable segment (a window probe,
    a keepalive, a retransmission) with an ACK, as RFC 9293 3.10.7.4 says a receiver does.
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
        self._opts = opts
        self._window = opts.window
        #: The sequence number of the next byte the peer sends (starts at a random ISS).
        self.snd_nxt = secrets.randbits(32)
        #: The sequence number of the next byte the peer expects from the kernel.
        self.rcv_nxt = 0
        self._iss = self.snd_nxt
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

    # -- handshakes -------------------------------------------------------------------------
    def _negotiate(self, theirs: Packet) -> None:
        o = self._opts
        options = theirs.tcp_options
        self.peer_options = offered(options)
        if o.wscale is not None and self.peer_options.wscale is not None:
            self._rcv_shift = o.wscale
            self._snd_shift = min(self.peer_options.wscale, _WSCALE_MAX)
        self._sack = o.sack and self.peer_options.sack
        self._ts = o.timestamps and self.peer_options.timestamps
        stamps = timestamp_option(options)
        if stamps is not None:
            self._ts_recent = stamps[0]

    def _syn_options(self, tsecr: int, *, answering: bool) -> list[tuple[str, Any]]:
        # Linux's order (tcp_options_write): MSS, SACK-permitted with timestamps, NOP,
        # window scale -- so a capture reads like the kernel's own SYN-ACK. A SYN-ACK
        # carries only the options the SYN offered (RFC 7323 1.3, RFC 2018 2).
        o = self._opts
        peer = self.peer_options
        opts: list[tuple[str, Any]] = []
        if o.mss is not None:
            opts.append(("MSS", o.mss))
        if o.sack and (peer.sack or not answering):
            opts.append(("SAckOK", b""))
        if o.timestamps and (peer.timestamps or not answering):
            opts.append(("Timestamp", (self._tsval(), tsecr)))
        if o.wscale is not None and (peer.wscale is not None or not answering):
            opts += [("NOP", None), ("WScale", o.wscale)]
        return opts

    def _accept(self, syn: Packet, deadline: float) -> None:
        __tracebackhide__ = True
        self._peer._register(self)
        self._scan = syn.seq
        self.rcv_nxt = seq_add(_seq(syn), 1)
        self._synced = True
        self._negotiate(syn)
        window = min(self._window, _WINDOW_MAX)  # RFC 7323 2.2: a SYN's window is unscaled

        def syn_ack() -> None:
            self._emit(
                "SA",
                seq=self._iss,
                window_field=window,
                options=self._syn_options(_tsval(syn) or 0, answering=True),
            )

        syn_ack()
        self.snd_nxt = seq_add(self._iss, 1)
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
                syn_ack()
                continue
            break
        if seg.payload or "F" in _flags(seg):
            self._pos -= 1  # the ACK carried data: recv() returns it

    def _connect(self, deadline: float) -> None:
        __tracebackhide__ = True
        self._peer._register(self)
        self._scan = self._peer.packets[-1].seq if self._peer.packets else -1
        o = self._opts
        self._emit(
            "S",
            seq=self._iss,
            ack=0,
            window_field=min(o.window, _WINDOW_MAX),
            options=self._syn_options(0, answering=False),
        )
        self.snd_nxt = seq_add(self._iss, 1)
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
        self.rcv_nxt = seq_add(_seq(seg), 1)
        self._synced = True
        self._negotiate(seg)
        self.ack()

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
        matcher: Matcher | None = None,
    ) -> Packet:
        """The next segment of the connection (after those already returned) for which
        ``pred`` holds, waiting until ``deadline``; segments before it are skipped."""
        __tracebackhide__ = True
        start = time.monotonic()
        first = self._pos
        while True:
            while self._pos < len(self._segs):
                pkt = self._segs[self._pos]
                self._pos += 1
                if pred(pkt) and (matcher is None or matcher(pkt)):
                    return pkt
            if not self._fetch(deadline) and time.monotonic() >= deadline:
                examined = self._segs[first:]
                raise self._timeout(what, max(0.0, deadline - start), matcher, examined)

    def _timeout(
        self,
        what: str,
        waited: float,
        matcher: Matcher | None = None,
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

        Fields: ``flags`` (scapy letters, any order: ``"A"``, ``"FA"``), ``tcp_seq``,
        ``tcp_ack``, ``window`` (the header field), ``payload`` (bytes), ``len`` (payload
        length); a value may also be a predicate (``tcp_seq=lambda n: n != 1``). Or a scapy
        template (``TCP(flags="FA")``), matched as ``tun_pair.packets.expect`` matches it,
        whose failure shows the fields that differed. ``PacketTimeout`` if none comes
        within ``timeout`` s.
        """
        __tracebackhide__ = True
        timeout = _check_timeout(timeout, "conn.expect")
        if (template is None) == (not fields):
            raise TypeError(
                "conn.expect() takes a scapy template or fields (flags='A', tcp_seq=...), "
                "one of the two"
            )
        matcher = None
        if template is not None:
            from .._packets.match import compile_match

            matcher = compile_match(template, what="conn.expect")
            described = matcher.description
        else:
            described = ", ".join(f"{k}={v!r}" for k, v in fields.items())
        pred = _segment_matcher(fields)
        return self._next_segment(
            pred, time.monotonic() + timeout, f"a segment with {described}", matcher=matcher
        )

    # -- outgoing ---------------------------------------------------------------------------
    def _tsval(self) -> int:
        # A 1 ms clock (RFC 7323 5.4 recommends 1 ms to 1 s per tick), from a random start.
        return (int(time.monotonic() * 1000) + self._ts_offset) % (1 << 32)

    def _default_options(self) -> list[tuple[str, Any]]:
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
        options: list[tuple[str, Any]] | None = None,
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
        sent = self._peer._send_ip(src, dst, IPPROTO_TCP, segment)
        if "A" in flags:
            self._last_ack_sent = ack
        end = seq_add(seq, len(data) + ("S" in flags) + ("F" in flags))
        if seq_gt(end, self.snd_nxt):
            self.snd_nxt = end
        return sent

    def send(
        self,
        data: bytes = b"",
        *,
        flags: str = "PA",
        seq: int | None = None,
        window: int | None = None,
        options: list[tuple[str, Any]] | None = None,
    ) -> Packet:
        """Send one segment at :attr:`snd_nxt`, acknowledging :attr:`rcv_nxt`.

        ``data`` goes in one segment (keep it within the kernel's MSS). Without data the
        default flags are a pure ``"A"``. Override ``seq`` (e.g. to retransmit), ``window``
        (bytes, scaled as negotiated) or ``options`` (a list as ``Packet.tcp_options``
        gives it, scapy's names: ``[("NOP", None), ("WScale", 3)]``; ``(kind, bytes)`` for
        any kind; the default carries timestamps when negotiated) to misbehave on purpose.
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
        return self._emit(flags, data=data, seq=seq, window_field=field, options=options)

    def ack(
        self,
        n: int | None = None,
        *,
        window: int | None = None,
        sack: Iterable[tuple[int, int]] = (),
    ) -> Packet:
        """Send a pure ACK of ``n`` (default :attr:`rcv_nxt`); repeated, a duplicate ACK.

        ``sack``: up to three (left, right) sequence ranges received out of order, sent
        as SACK blocks (RFC 2018; needs :attr:`sack` negotiated). Linux counts duplicate
        ACKs towards a fast retransmit only with SACK blocks once SACK is negotiated.
        """
        field = None
        if window is not None:
            _check_window(window, "conn.ack")
            field = min(window >> self._rcv_shift, _WINDOW_MAX)
        blocks = [(int(a) % (1 << 32), int(b) % (1 << 32)) for a, b in sack]
        options = None
        if blocks:
            if not self._sack:
                raise ValueError("conn.ack(sack=...): SACK was not negotiated (conn.sack is False)")
            if len(blocks) > 3:
                raise ValueError("conn.ack(sack=...): at most 3 blocks fit beside timestamps")
            flat = tuple(x for block in blocks for x in block)
            options = [*self._default_options(), ("NOP", None), ("NOP", None), ("SAck", flat)]
        ack = self.rcv_nxt if n is None else n % (1 << 32)
        return self._emit("A", ack=ack, window_field=field, options=options)

    def fin(self) -> Packet:
        """Send a FIN (with an ACK of :attr:`rcv_nxt`): this side is done sending."""
        return self._emit("FA")

    def rst(self) -> Packet:
        """Reset the connection: a RST at :attr:`snd_nxt`, which the kernel accepts
        (RFC 5961 3.2: exactly the next expected sequence number)."""
        return self._emit("R", ack=0)


def _flags(p: Packet) -> str:
    return p.flags or ""


def _seq(p: Packet) -> int:
    return p.tcp_seq or 0


def _ack(p: Packet) -> int:
    return p.tcp_ack or 0


def _tsval(p: Packet) -> int | None:
    stamps = timestamp_option(p.tcp_options)
    return None if stamps is None else stamps[0]


def _segment_matcher(fields: dict[str, Any]) -> Callable[[Packet], bool]:
    allowed = {"flags", "tcp_seq", "tcp_ack", "window", "payload", "len"}
    unknown = set(fields) - allowed
    if unknown:
        raise TypeError(
            f"conn.expect() got unknown field(s) {', '.join(sorted(unknown))}: "
            f"use {', '.join(sorted(allowed))}"
        )

    def value(s: Packet, name: str) -> Any:
        if name == "len":
            return len(s.payload or b"")
        if name == "payload":
            return s.payload or b""
        return getattr(s, name)

    def pred(s: Packet) -> bool:
        for name, want in fields.items():
            got = value(s, name)
            if callable(want):
                if not want(got):
                    return False
            elif name == "flags":
                if set(got) != set(want):
                    return False
            elif got != want:
                return False
        return True

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
