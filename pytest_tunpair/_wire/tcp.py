"""TCP for the scripted peer: what a SYN offered, timestamps, sequence arithmetic -- pure
functions, no I/O. The peer reads segments through ``Packet``'s fields (the one parser)
and builds them with :mod:`.build`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["TcpOptions", "offered", "seq_add", "seq_geq", "seq_gt", "seq_lt", "timestamp_option"]

_MOD = 1 << 32


def seq_add(a: int, n: int) -> int:
    return (a + n) % _MOD


def seq_lt(a: int, b: int) -> bool:
    """``a`` before ``b`` in 32-bit sequence space (RFC 9293 3.4: arithmetic modulo 2**32)."""
    return 0 < (b - a) % _MOD < 1 << 31


def seq_gt(a: int, b: int) -> bool:
    return seq_lt(b, a)


def seq_geq(a: int, b: int) -> bool:
    return a == b or seq_gt(a, b)


@dataclass(frozen=True)
class TcpOptions:
    """The TCP options one side put in its SYN (``conn.peer_options``): ``None``/``False``
    for an option it did not offer."""

    #: Maximum segment size (RFC 9293 3.7.1).
    mss: int | None = None
    #: Window scale shift count (RFC 7323 2).
    wscale: int | None = None
    #: SACK permitted (RFC 2018).
    sack: bool = False
    #: Timestamps offered (RFC 7323 3).
    timestamps: bool = False


def offered(options: Sequence[tuple[str | int, Any]] | None) -> TcpOptions:
    """What a SYN's options list (``Packet.tcp_options``) offers; a value of the wrong
    size counts as not offered."""
    mss = wscale = None
    sack = stamps = False
    for name, value in options or ():
        if name == "MSS" and isinstance(value, int):
            mss = value
        elif name == "WScale" and isinstance(value, int):
            wscale = value
        elif name == "SAckOK":
            sack = True
        elif name == "Timestamp" and isinstance(value, tuple):
            stamps = True
    return TcpOptions(mss, wscale, sack, stamps)


def timestamp_option(options: Sequence[tuple[str | int, Any]] | None) -> tuple[int, int] | None:
    """(TSval, TSecr) of a segment's timestamp option (RFC 7323 3), ``None`` without one."""
    for name, value in options or ():
        if name == "Timestamp" and isinstance(value, tuple):
            return value[0], value[1]
    return None
