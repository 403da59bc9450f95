"""Conversations in a capture: ``packets.flows()`` groups packets by protocol and endpoints.

Built from the header fields (no scapy), so it stays quick on a capture of a download.
For TCP a flow also answers what one reads a trace for: was there a handshake, which
packets were retransmissions, and what bytes did each side's application receive.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from functools import cached_property
from typing import TYPE_CHECKING

from .._wire import headers as _h
from .._wire.numbers import PROTO_NAMES, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN
from .packet import DELIVERED, DIRECTIONS, parsed

if TYPE_CHECKING:
    from .packet import Packet

__all__ = ["Flow", "flows"]

_MOD = 1 << 32
_HALF = 1 << 31

Endpoint = tuple[str, int | None]


class _Unwrap:
    """32-bit TCP sequence numbers on a line that does not wrap (RFC 9293 arithmetic:
    the nearer of the two ways round)."""

    __slots__ = ("last_abs", "last_raw")

    def __init__(self, first: int) -> None:
        self.last_raw = first
        self.last_abs = first

    def __call__(self, raw: int) -> int:
        diff = (raw - self.last_raw) % _MOD
        if diff >= _HALF:
            diff -= _MOD
        self.last_raw = raw
        self.last_abs += diff
        return self.last_abs


def _order(p: Packet) -> float:
    # The order the sender sent in: when the relay read the packet (``arrival``), which a
    # reordering or delaying relay may write much later (``time``).
    return p.arrival


class Flow:
    """One conversation: a protocol and two endpoints, with the packets between them.

    ``endpoints`` are ``(address, port)`` pairs (port ``None`` for ICMP), the sender of the
    first packet first. Directions are the relay's, ``"a->b"`` and ``"b->a"``.
    """

    def __init__(self, proto: str, endpoints: tuple[Endpoint, Endpoint]) -> None:
        #: ``"tcp"``, ``"udp"``, ``"icmp"``, ``"icmpv6"`` or the IP protocol number.
        self.proto = proto
        #: ``((address, port), (address, port))``; the initiator's first.
        self.endpoints = endpoints
        #: Every packet of the flow, as recorded (dropped and lost ones too).
        self.packets: list[Packet] = []

    # -- every protocol ------------------------------------------------------------------------
    @property
    def start(self) -> float:
        """``time`` of the first packet (seconds since the pair came up)."""
        return self.packets[0].time

    @property
    def end(self) -> float:
        """``time`` of the last packet."""
        return max(p.time for p in self.packets)

    @property
    def stats(self) -> dict[str, dict[str, int]]:
        """Per direction: packets and bytes the relay delivered, and packets it did not
        (dropped or lost), as ``tun_pair.stats`` counts them for the whole pair."""
        out = {d: {"packets": 0, "bytes": 0, "dropped": 0} for d in DIRECTIONS}
        for p in self.packets:
            c = out[p.direction]
            if p.action not in DELIVERED:
                c["dropped"] += 1
            else:
                c["packets"] += 1
                c["bytes"] += p.wire_len
        return out

    def in_direction(self, direction: str) -> list[Packet]:
        """The flow's packets in one direction, as recorded."""
        _check(direction)
        return [p for p in self.packets if p.direction == direction]

    # -- TCP -----------------------------------------------------------------------------------
    @property
    def handshake(self) -> bool:
        """A SYN, the SYN-ACK answering it and the ACK of that were delivered."""
        if self.proto != "tcp":
            return False
        syn = synack = None
        for p in self._delivered():
            f = parsed(p)[_h.TCP_FLAGS] or 0
            if syn is None:
                if f & (TCP_SYN | TCP_ACK) == TCP_SYN:
                    syn = p
            elif synack is None:
                if f & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK and p.direction != syn.direction:
                    if p.tcp_ack == ((syn.tcp_seq or 0) + 1) % _MOD:
                        synack = p
            elif (
                f & (TCP_SYN | TCP_ACK) == TCP_ACK
                and p.direction == syn.direction
                and p.tcp_ack == ((synack.tcp_seq or 0) + 1) % _MOD
            ):
                return True
        return False

    @property
    def resets(self) -> list[Packet]:
        """TCP packets with RST set."""
        return [p for p in self.packets if (parsed(p)[_h.TCP_FLAGS] or 0) & TCP_RST]

    @property
    def fins(self) -> list[Packet]:
        """TCP packets with FIN set (retransmitted FINs too)."""
        return [p for p in self.packets if (parsed(p)[_h.TCP_FLAGS] or 0) & TCP_FIN]

    @cached_property
    def retransmissions(self) -> list[Packet]:
        """TCP packets whose sequence range (payload, SYN and FIN) had been sent before.

        Counted as the kernel counts ``RetransSegs`` (docs/internals.md, "RetransSegs
        counts re-sent sequence ranges, per segment"), from the sender's side, in the
        order the relay read the packets: a packet the relay lost or dropped was still
        sent, so resending it is a retransmission; the relay's own duplicates
        (``"duplicated"``) are not. A GSO super-packet covers its whole payload, so a
        wire-sized resend of part of it counts. Keep-alives (one byte
        or none, just below what was sent) do not count, as the kernel does not count them.
        """
        if self.proto != "tcp":
            return []
        out: list[Packet] = []
        for direction in DIRECTIONS:
            sent = sorted(
                (p for p in self.in_direction(direction) if p.action != "duplicated"),
                key=_order,
            )
            unwrap: _Unwrap | None = None
            high = -math.inf
            for p in sent:
                f = parsed(p)
                flags = f[_h.TCP_FLAGS]
                seq = p.tcp_seq
                if flags is None or seq is None:
                    continue
                # By the IP length, not the bytes kept: snaplen may have cut the payload.
                poff = f[_h.PAYLOAD]
                length = f[_h.END] - poff if poff >= 0 else 0
                length += bool(flags & TCP_SYN) + bool(flags & TCP_FIN)
                if length == 0:
                    continue
                if unwrap is None:
                    unwrap = _Unwrap(seq)
                start = unwrap(seq)
                end = start + length
                if start < high:
                    keepalive = (
                        length <= 1 and start == high - 1 and not flags & (TCP_SYN | TCP_FIN)
                    )
                    if not keepalive:
                        out.append(p)
                high = max(high, end)
        out.sort(key=lambda p: p.seq)
        return out

    @property
    def retransmitted_segments(self) -> int:
        """Retransmissions counted in wire-sized segments, as the kernel's ``RetransSegs``
        counts them: a GSO super-packet counts once per segment it stands for."""
        total = 0
        for p in self.retransmissions:
            gso = p.gso
            payload = len(p.payload or b"")
            if gso is not None and gso.is_super_packet and gso.size:
                total += max(1, -(-payload // gso.size))
            else:
                total += 1
        return total

    def stream(self, direction: str) -> bytes:
        """The payload bytes the relay delivered in ``direction``, reassembled in sequence
        order with duplicates and retransmitted copies collapsed: what the receiving
        application could read. It ends at the first hole (bytes never delivered, or cut
        by ``snaplen``). Corrupted packets are left out: the receiver drops them."""
        _check(direction)
        if self.proto != "tcp":
            raise ValueError(f"stream() is for TCP flows; this one is {self.proto}")
        pieces: list[tuple[int, bytes]] = []
        unwrap: _Unwrap | None = None
        base: int | None = None
        for p in sorted(self.in_direction(direction), key=_order):
            if p.action not in DELIVERED or p.action == "corrupted":
                continue
            flags = parsed(p)[_h.TCP_FLAGS]
            seq = p.tcp_seq
            if flags is None or seq is None:
                continue
            if unwrap is None:
                unwrap = _Unwrap(seq)
            start = unwrap(seq)
            if flags & TCP_SYN:
                base = start + 1 if base is None else base
                start += 1
            data = p.payload or b""
            if data:
                pieces.append((start, data))
        if not pieces:
            return b""
        pieces.sort(key=lambda piece: piece[0])
        pos = pieces[0][0] if base is None else base
        out = bytearray()
        for start, data in pieces:
            if start > pos:
                break  # a hole: nothing after it reached the application
            end = start + len(data)
            if end > pos:
                out += data[pos - start :]
                pos = end
        return bytes(out)

    def _delivered(self) -> Iterable[Packet]:
        return (p for p in self.packets if p.action in DELIVERED)

    def __repr__(self) -> str:
        (a, ap), (b, bp) = self.endpoints

        def show(addr: str, port: int | None) -> str:
            host = f"[{addr}]" if ":" in addr else addr
            return host if port is None else f"{host}:{port}"

        extra = ""
        if self.proto == "tcp" and self.retransmissions:
            extra = f", {len(self.retransmissions)} retransmissions"
        return (
            f"<Flow {self.proto} {show(a, ap)} <-> {show(b, bp)}, "
            f"{len(self.packets)} packets{extra}>"
        )


def _check(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 'a->b' or 'b->a', not {direction!r}")


def flows(packets: Sequence[Packet]) -> list[Flow]:
    """Group ``packets`` into flows, in order of each flow's first packet.

    A flow is one IP protocol between two (address, port) endpoints; packets without
    addresses (ARP, non-IP frames) belong to none. A TCP SYN without ACK on a four-tuple
    whose earlier connection ended (FIN or RST) starts a new flow.
    """
    found: dict[tuple[int | None, frozenset[Endpoint]], Flow] = {}
    ordered: list[Flow] = []
    for p in packets:
        src, dst = p.src, p.dst
        if src is None or dst is None or p.ip_version is None:
            continue
        f = parsed(p)
        ip_proto = f[_h.IP_PROTO]
        a: Endpoint = (src, f[_h.SPORT])
        b: Endpoint = (dst, f[_h.DPORT])
        key = (ip_proto, frozenset((a, b)))
        flow = found.get(key)
        flags = f[_h.TCP_FLAGS]
        if (
            flow is not None
            and flags is not None
            and flags & (TCP_SYN | TCP_ACK) == TCP_SYN
            and any((parsed(q)[_h.TCP_FLAGS] or 0) & (TCP_FIN | TCP_RST) for q in flow.packets)
            and all(q.tcp_seq != p.tcp_seq for q in flow.packets[-8:])  # not a SYN resend
        ):
            flow = None
        if flow is None:
            name = PROTO_NAMES.get(ip_proto) or str(ip_proto)
            flow = found[key] = Flow(name, (a, b))
            ordered.append(flow)
        flow.packets.append(p)
    return ordered
