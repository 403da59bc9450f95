"""The virtio-net header that comes before each packet when offload is on, and what a GSO
super-packet stands for on a real wire.

The layout is the kernel's (include/uapi/linux/virtio_net.h): the TUN driver reads and
writes it in front of every packet of a device opened with ``IFF_VNET_HDR``
(docs/internals.md, "Offload: GSO super-packets through the relay").
"""

from __future__ import annotations

import struct

from . import headers as _h
from .numbers import IPPROTO_TCP

__all__ = [
    "GSO_NAMES",
    "VIRTIO_NET_HDR",
    "VIRTIO_NET_HDR_F_NEEDS_CSUM",
    "VIRTIO_NET_HDR_GSO_ECN",
    "VIRTIO_NET_HDR_GSO_NONE",
    "VIRTIO_NET_HDR_GSO_TCPV4",
    "VIRTIO_NET_HDR_GSO_TCPV6",
    "VIRTIO_NET_HDR_GSO_UDP",
    "VIRTIO_NET_HDR_LEN",
    "ZERO_VNET_HDR",
    "wire_size",
]

# include/uapi/linux/virtio_net.h: struct virtio_net_hdr (the 10-byte legacy layout the TUN
# driver uses by default): flags u8, gso_type u8, hdr_len u16, gso_size u16, csum_start u16,
# csum_offset u16 -- in the host's byte order for legacy virtio.
VIRTIO_NET_HDR = struct.Struct("=BBHHHH")
VIRTIO_NET_HDR_LEN = VIRTIO_NET_HDR.size
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_ECN = 0x80
#: "No offload work to do": what goes before a packet the relay builds or changes.
ZERO_VNET_HDR = bytes(VIRTIO_NET_HDR_LEN)

#: ``GsoInfo.type`` by ``gso_type`` (without the ECN bit).
GSO_NAMES = {
    VIRTIO_NET_HDR_GSO_NONE: "none",
    VIRTIO_NET_HDR_GSO_TCPV4: "tcpv4",
    VIRTIO_NET_HDR_GSO_UDP: "udp",
    VIRTIO_NET_HDR_GSO_TCPV6: "tcpv6",
}
_TCP_GSO = (VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6)


def wire_size(frame: bytes, vnet_len: int = 0, *, tap: bool = False) -> tuple[int, int]:
    """``(bytes, packets)`` that ``frame`` stands for on a real wire.

    ``frame`` starts with a ``vnet_len``-byte virtio-net header (0 without offload).  A TCP
    GSO super-packet (``gso_type`` TCPV4/TCPV6) is ``ceil(payload / gso_size)`` segments,
    each repeating the Ethernet (TAP, with its VLAN tags), IP (with options or extension
    headers) and TCP headers; anything else is one packet of its own length.  Cheap: a
    header unpack, and a parse only for a super-packet.
    """
    length = len(frame) - vnet_len
    if vnet_len < VIRTIO_NET_HDR_LEN or len(frame) < vnet_len:
        return length, 1
    _flags, gso_type, _hdr_len, gso_size, _cs, _co = VIRTIO_NET_HDR.unpack_from(frame)
    if gso_size == 0 or gso_type & ~VIRTIO_NET_HDR_GSO_ECN not in _TCP_GSO:
        return length, 1
    f = _h.parse(frame, vnet_len, "tap" if tap else "tun")
    headers = f[_h.PAYLOAD]  # Ethernet + IP + TCP end: what every segment repeats
    if f[_h.IP_PROTO] != IPPROTO_TCP or headers < 0:
        return length, 1
    payload = len(frame) - headers
    if payload <= gso_size:
        return length, 1
    segments = -(-payload // gso_size)
    per_segment = headers - vnet_len
    return length + (segments - 1) * per_segment, segments
