"""ECN on the IP header: read the codepoint, mark Congestion Experienced (RFC 3168).

What an AQM or a lossy link does to an ECN-capable packet instead of dropping it; the
IP header is found by the one parser (TUN or TAP, VLAN tags, after the virtio-net header).
"""

from __future__ import annotations

from . import headers as _h
from .numbers import ECN_CE, ECN_NOT_ECT

__all__ = ["ecn_codepoint", "set_ce"]


def _ip(frame: bytes, offset: int, tap: bool) -> tuple[int, int, int] | None:
    """(IP version, offset of the IP header, ECN codepoint), or None if not IP."""
    f = _h.parse(frame, offset, "tap" if tap else "tun")
    tclass = f[_h.TCLASS]
    if tclass is None:
        return None
    version = f[_h.VERSION]
    assert version is not None  # a traffic class is read only from an IP header
    return version, f[_h.L3], tclass & 0x03


def ecn_codepoint(frame: bytes, offset: int = 0, *, tap: bool = False) -> int | None:
    """The ECN field (RFC 3168: 0 not-ECT, 1 ECT(1), 2 ECT(0), 3 CE) of the IP packet at
    ``offset`` in ``frame`` (an Ethernet frame when ``tap``); ``None`` if it is not IPv4
    or IPv6."""
    ip = _ip(frame, offset, tap)
    return None if ip is None else ip[2]


def set_ce(frame: bytes, offset: int = 0, *, tap: bool = False) -> bytes | None:
    """``frame`` with Congestion Experienced set in its IP header, or ``None`` if the packet
    is not ECN-capable (not-ECT, or not IP) and must be dropped instead.

    IPv4: the TOS byte's ECN bits become 11 and the header checksum is updated
    incrementally (RFC 1624, eqn. 3), so nothing else of the packet is touched; IPv6: the
    traffic class's ECN bits (IPv6 has no header checksum).  A packet already CE is
    returned unchanged.  Transport checksums do not cover these bits (RFC 3168 section 6.1.1).
    """
    found = _ip(frame, offset, tap)
    if found is None or found[2] == ECN_NOT_ECT:
        return None
    version, ip, codepoint = found
    if codepoint == ECN_CE:
        return frame
    out = bytearray(frame)
    if version == 6:
        # The traffic class spans the low nibble of byte 0 and the high nibble of byte 1;
        # its two ECN bits are bits 4-5 of byte 1.
        out[ip + 1] |= 0x30
        return bytes(out)
    old_word = (frame[ip] << 8) | frame[ip + 1]
    out[ip + 1] |= 0x03
    new_word = (out[ip] << 8) | out[ip + 1]
    checksum = (frame[ip + 10] << 8) | frame[ip + 11]
    # RFC 1624: HC' = ~(~HC + ~m + m'), in ones' complement arithmetic.
    total = (~checksum & 0xFFFF) + (~old_word & 0xFFFF) + new_word
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    checksum = ~total & 0xFFFF
    out[ip + 10] = checksum >> 8
    out[ip + 11] = checksum & 0xFF
    return bytes(out)
