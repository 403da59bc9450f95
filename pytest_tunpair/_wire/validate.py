"""Checks on packets a test hands to the relay (``inject``) -- pure functions, no I/O.

The one parser (:mod:`.headers`) finds the headers, VLAN tags included; the checks here are
the strict ones the parser leaves out: a length field must fit the bytes given.
"""

from __future__ import annotations

import struct
from typing import Any

from . import headers as _h
from .numbers import ETH_HLEN, IPV4_HLEN, IPV6_HLEN

__all__ = ["is_scapy_packet", "to_bytes", "validate_frame"]


def is_scapy_packet(obj: object) -> bool:
    """True for a scapy packet, without importing scapy when nobody else has."""
    return any(c.__module__ == "scapy.packet" and c.__name__ == "Packet" for c in type(obj).__mro__)


def to_bytes(obj: Any, *, what: str = "inject()") -> bytes:
    """Bytes-like or scapy packet -> bytes; anything else is a ``TypeError``."""
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj)
    if is_scapy_packet(obj):
        return bytes(obj)
    raise TypeError(
        f"{what} takes bytes or a scapy packet, not {type(obj).__name__}: "
        "build one with scapy (IP(dst=...)/ICMP()) or pass the raw bytes"
    )


def validate_ip(data: bytes, *, mtu: int) -> None:
    """Raise ``ValueError`` unless ``data`` is one whole IPv4 or IPv6 packet within ``mtu``."""
    n = len(data)
    if n == 0:
        raise ValueError("empty packet: a TUN device carries IPv4 or IPv6 packets")
    f = _h.parse(data, 0, "tun")
    version = f[_h.VERSION]
    if version == 4:
        if n < IPV4_HLEN:
            raise ValueError(f"{n} bytes is shorter than an IPv4 header ({IPV4_HLEN} bytes)")
        ihl = f[_h.HDR_END]  # the header's length, as the packet starts at 0
        (total,) = struct.unpack_from("!H", data, 2)
        if ihl < 0:
            ihl = (data[0] & 0x0F) * 4
            raise ValueError(f"IPv4 header length {ihl} is invalid for a {n}-byte packet")
        if total < ihl or total > n:
            raise ValueError(
                f"IPv4 total length {total} does not fit the {n} bytes given "
                "(scapy fills it in if you delete the field: del pkt[IP].len)"
            )
    elif version == 6:
        if n < IPV6_HLEN:
            raise ValueError(f"{n} bytes is shorter than an IPv6 header ({IPV6_HLEN} bytes)")
        (payload,) = struct.unpack_from("!H", data, 4)
        if IPV6_HLEN + payload > n:
            raise ValueError(f"IPv6 payload length {payload} does not fit the {n} bytes given")
    else:
        raise ValueError(
            f"not an IP packet (version nibble {data[0] >> 4}): a TUN device carries IPv4 or "
            "IPv6; use mode='tap' for Ethernet frames"
        )
    if n > mtu:
        raise ValueError(f"{n}-byte packet is larger than the MTU ({mtu})")


def validate_frame(data: bytes, *, mode: str, mtu: int) -> None:
    """Validate what ``inject`` writes: an IP packet (TUN) or an Ethernet frame (TAP)."""
    if mode == "tun":
        validate_ip(data, mtu=mtu)
        return
    n = len(data)
    if n < ETH_HLEN:
        raise ValueError(f"{n} bytes is shorter than an Ethernet header ({ETH_HLEN} bytes)")
    payload = n - _h.parse(data, 0, mode)[_h.L3]  # behind the Ethernet header and its tags
    if payload > mtu:
        raise ValueError(f"{payload}-byte payload is larger than the MTU ({mtu})")
