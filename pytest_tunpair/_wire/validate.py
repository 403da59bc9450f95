"""Checks on packets a test hands to the relay (``inject``) -- pure functions, no I/O."""

from __future__ import annotations

import struct
from typing import Any

__all__ = ["is_scapy_packet", "to_bytes", "validate_frame"]

ETH_HLEN = 14  # include/uapi/linux/if_ether.h
_ETH_P_8021Q = 0x8100
_ETH_P_8021AD = 0x88A8


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
    version = data[0] >> 4
    if version == 4:
        if n < 20:
            raise ValueError(f"{n} bytes is shorter than an IPv4 header (20 bytes)")
        ihl = (data[0] & 0x0F) * 4
        (total,) = struct.unpack_from("!H", data, 2)
        if ihl < 20 or ihl > n:
            raise ValueError(f"IPv4 header length {ihl} is invalid for a {n}-byte packet")
        if total < ihl or total > n:
            raise ValueError(
                f"IPv4 total length {total} does not fit the {n} bytes given "
                "(scapy fills it in if you delete the field: del pkt[IP].len)"
            )
    elif version == 6:
        if n < 40:
            raise ValueError(f"{n} bytes is shorter than an IPv6 header (40 bytes)")
        (payload,) = struct.unpack_from("!H", data, 4)
        if 40 + payload > n:
            raise ValueError(f"IPv6 payload length {payload} does not fit the {n} bytes given")
    else:
        raise ValueError(
            f"not an IP packet (version nibble {version}): a TUN device carries IPv4 or "
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
    hlen = ETH_HLEN
    (ethertype,) = struct.unpack_from("!H", data, 12)
    while ethertype in (_ETH_P_8021Q, _ETH_P_8021AD) and n >= hlen + 4:
        (ethertype,) = struct.unpack_from("!H", data, hlen + 2)
        hlen += 4
    if n - hlen > mtu:
        raise ValueError(f"{n - hlen}-byte payload is larger than the MTU ({mtu})")
