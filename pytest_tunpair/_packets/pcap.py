"""Classic libpcap files (https://www.tcpdump.org/manpages/pcap-savefile.5.html)."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .packet import Packet

__all__ = ["LINKTYPE_ETHERNET", "LINKTYPE_RAW", "write_pcap"]

PCAP_MAGIC = 0xA1B2C3D4  # microsecond timestamps; written in native order, readers swap
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101  # raw IPv4 or IPv6, told apart by the version nibble: mixes in one file
# Bigger than any packet the relay reads (a 64 KiB GSO super-packet plus headers).
_SNAPLEN = 262144


def write_pcap(
    path: str | os.PathLike[str],
    packets: Iterable[Packet],
    *,
    mode: str,
    wall_t0: float,
    snaplen: int | None = None,
) -> str:
    """Write ``packets`` to ``path``; each record keeps the packet's original length, so a
    packet cut by ``snaplen`` shows as truncated in tcpdump rather than as malformed."""
    path = os.fspath(path)
    linktype = LINKTYPE_ETHERNET if mode == "tap" else LINKTYPE_RAW
    with open(path, "wb") as f:
        f.write(struct.pack("=IHHiIII", PCAP_MAGIC, 2, 4, 0, 0, snaplen or _SNAPLEN, linktype))
        for p in packets:
            data = p.data
            # Packet.time is monotonic, relative to the pair's start; anchor it to the wall
            # clock read at the same moment so the file shows when things happened.
            ts = wall_t0 + p.time
            sec = int(ts)
            usec = round((ts - sec) * 1_000_000)
            if usec >= 1_000_000:
                sec, usec = sec + 1, usec - 1_000_000
            f.write(struct.pack("=IIII", sec, usec, len(data), p.wire_len))
            f.write(data)
    return path
