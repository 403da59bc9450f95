"""Capture files: pcapng (the default) and classic libpcap.

pcapng (https://www.ietf.org/archive/id/draft-ietf-opsawg-pcapng-03.html) is what a person
opening a failed test's capture in Wireshark wants: one interface per direction (``a->b``,
``b->a``), each packet with the direction bits of ``epb_flags`` and a comment saying what the
relay did with it (``lost``, ``dropped``, its sojourn, a GSO super-packet's segments), and a
Decryption Secrets Block carrying the pair's TLS/QUIC key log so that the file opens
decrypted. Classic pcap (https://www.tcpdump.org/manpages/pcap-savefile.5.html) has none of
that and stays for tools that read nothing else.

Blocks are built here as bytes and written by the caller: a whole file
(:func:`write_pcapng`), or a stream that grows as packets cross (``_packets/stream.py``).
Everything is little-endian, whatever the host: the byte-order magic of the section header
says so and readers swap as needed.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from .._wire import gso as _gso
from .packet import DELIVERED, DIRECTIONS

if TYPE_CHECKING:
    from .packet import Packet

__all__ = [
    "FORMATS",
    "LINKTYPE_ETHERNET",
    "LINKTYPE_RAW",
    "LINKTYPE_RAW_PCAPNG",
    "SECRETS_TLS_KEYLOG",
    "comment",
    "epb_flags",
    "interface_block",
    "linktype",
    "packet_block",
    "packet_block_parts",
    "secrets_block",
    "section_header",
    "split_blocks",
    "timestamp_ns",
    "write_pcap",
    "write_pcapng",
]

#: What ``to_pcap(format=...)`` writes.
FORMATS = ("pcapng", "pcap")

PCAP_MAGIC = 0xA1B2C3D4  # microsecond timestamps; written in native order, readers swap
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101  # raw IPv4 or IPv6, told apart by the version nibble: mixes in one file
# Raw IP in pcapng files: DLT_RAW's own value (Linux, macOS, Windows) rather than
# LINKTYPE_RAW. libpcap's pcapng reader (tcpdump) compares each further interface's link
# type with the *DLT* it made of the first one's (101 -> 12), so a file with two raw-IP
# interfaces of type 101 stops at the second; with 12 both are 12 (docs/internals.md,
# "pcapng: raw IP interfaces as link type 12"). Wireshark, tshark and scapy read 12 as raw IP.
LINKTYPE_RAW_PCAPNG = 12
# Bigger than any packet the relay reads (a 64 KiB GSO super-packet plus headers).
_SNAPLEN = 262144

# -- pcapng: block types and option codes (draft-ietf-opsawg-pcapng, section 4) ----------------
BT_SHB = 0x0A0D0D0A
BT_IDB = 0x00000001
BT_EPB = 0x00000006
BT_DSB = 0x0000000A
BYTE_ORDER_MAGIC = 0x1A2B3C4D
OPT_ENDOFOPT = 0
OPT_COMMENT = 1
SHB_USERAPPL = 4
IF_NAME = 2
IF_DESCRIPTION = 3
IF_TSRESOL = 9
EPB_FLAGS = 2
#: epb_flags bits 0-1: the packet's direction (01 inbound, 10 outbound).
EPB_INBOUND = 0x1
EPB_OUTBOUND = 0x2
#: Decryption Secrets Block type of an NSS key log (``SSLKEYLOGFILE``'s format): "TLSK".
#: Wireshark's TLS and QUIC dissectors both read it.
SECRETS_TLS_KEYLOG = 0x544C534B
# Rule verdicts whose packet carries on as other packets (``Verdict.forward``): counted
# neither dropped nor delivered, so the comment says what replaced it rather than "not
# delivered" (a display filter for what the receiver never got would list every packet a
# NAT translated).
_REPLACED = {
    "rewritten": "rewritten (replaced by its translation)",
    "fragmented": "fragmented (replaced by its fragments)",
}
# if_tsresol 9: timestamps in nanoseconds (the default, 6, would round the relay's sojourns).
_TSRESOL_NS = 9


def linktype(mode: str, *, pcapng: bool = True) -> int:
    """The link type of a pair's packets: raw IP for TUN (IPv4 and IPv6 mixed), Ethernet for
    TAP. Raw IP is :data:`LINKTYPE_RAW_PCAPNG` in pcapng files, :data:`LINKTYPE_RAW` in
    classic pcap ones (one link type per file there: libpcap's comparison never runs)."""
    if mode == "tap":
        return LINKTYPE_ETHERNET
    return LINKTYPE_RAW_PCAPNG if pcapng else LINKTYPE_RAW


def _pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + _pad4(value)


def _options(opts: Sequence[tuple[int, bytes]]) -> bytes:
    if not opts:
        return b""
    return b"".join(_option(code, value) for code, value in opts) + _option(OPT_ENDOFOPT, b"")


def _block(block_type: int, body: bytes) -> bytes:
    total = 12 + len(body)  # type, length, body (a multiple of 4), length again
    return struct.pack("<II", block_type, total) + body + struct.pack("<I", total)


def section_header(application: str = "pytest-tunpair") -> bytes:
    """The Section Header Block a pcapng file (or stream) starts with; length unknown (-1)."""
    body = struct.pack("<IHHq", BYTE_ORDER_MAGIC, 1, 0, -1)
    return _block(BT_SHB, body + _options([(SHB_USERAPPL, application.encode())]))


def interface_block(
    link: int, name: str, description: str = "", snaplen: int | None = None
) -> bytes:
    """An Interface Description Block: ``name`` is what Wireshark shows as the interface
    (``frame.interface_name``), ``description`` its ``frame.interface_description``."""
    opts = [(IF_NAME, name.encode())]
    if description:
        opts.append((IF_DESCRIPTION, description.encode()))
    opts.append((IF_TSRESOL, bytes([_TSRESOL_NS])))
    body = struct.pack("<HHI", link, 0, snaplen or _SNAPLEN) + _options(opts)
    return _block(BT_IDB, body)


def packet_block(
    interface: int, ts_ns: int, data: bytes, wire_len: int, flags: int = 0, note: str = ""
) -> bytes:
    """An Enhanced Packet Block: ``data`` as kept, ``wire_len`` its length on the wire,
    ``flags`` the ``epb_flags`` word, ``note`` its ``opt_comment``."""
    return b"".join(packet_block_parts(interface, ts_ns, data, wire_len, flags, note))


def packet_block_parts(
    interface: int, ts_ns: int, data: bytes, wire_len: int, flags: int = 0, note: str = ""
) -> tuple[bytes, bytes, bytes]:
    """:func:`packet_block` in three pieces (header, ``data`` itself, padding with the
    options and the trailer), for ``os.writev``: a 64 KB super-packet is never copied."""
    opts: list[tuple[int, bytes]] = []
    if note:
        opts.append((OPT_COMMENT, note.encode()))
    if flags:
        opts.append((EPB_FLAGS, struct.pack("<I", flags)))
    tail = b"\0" * (-len(data) % 4) + _options(opts)
    total = 12 + 20 + len(data) + len(tail)
    head = struct.pack(
        "<IIIIIII",
        BT_EPB,
        total,
        interface,
        ts_ns >> 32,
        ts_ns & 0xFFFFFFFF,
        len(data),
        wire_len,
    )
    return head, data, tail + struct.pack("<I", total)


def secrets_block(secrets: bytes, secrets_type: int = SECRETS_TLS_KEYLOG) -> bytes:
    """A Decryption Secrets Block: ``secrets`` as the key log file holds them."""
    return _block(BT_DSB, struct.pack("<II", secrets_type, len(secrets)) + _pad4(secrets))


def split_blocks(data: bytes) -> list[tuple[int, bytes]]:
    """``(block type, block bytes)`` for each whole block of a little-endian pcapng stream
    as written here; a cut-off block at the end is left out."""
    blocks = []
    off = 0
    while off + 12 <= len(data):
        block_type, total = struct.unpack_from("<II", data, off)
        if total < 12 or off + total > len(data):
            break
        blocks.append((block_type, data[off : off + total]))
        off += total
    return blocks


# -- what a packet's comment and flags say ----------------------------------------------------
def epb_flags(direction: str) -> int:
    """The direction bits, as a capture on side a's device would have them: what a sent
    (``a->b``) is outbound, what it received (``b->a``) inbound."""
    return EPB_OUTBOUND if direction == "a->b" else EPB_INBOUND


def _duration(seconds: float) -> str:
    if seconds <= 0:
        return "0"  # the fast path writes in the batch it read: no time is measured
    if seconds >= 1.0:
        return f"{seconds:.3f}s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f}ms"
    return f"{seconds * 1e6:.1f}us"


def comment(p: Packet) -> str:
    """The packet's ``opt_comment``: what the relay did first (the action word, so a display
    filter ``frame.comment contains "lost"`` finds it), ``(not delivered)`` when the
    receiver never got it (a NAT's original: ``(replaced by its translation)``; a path
    MTU's: ``(replaced by its fragments)``), the class whose link carried it (``class
    video``, for ``impair(match=..., name="video")``), then the sojourn, a GSO super-packet's
    segments, a checksum left to the offload and a cut by ``snaplen``: ``"lost (not
    delivered); sojourn 0"``, ``"delayed; sojourn 20.113ms"``, ``"forwarded; sojourn
    31.2us; gso tcpv4 super-packet: 45 segments of 1448 on a wire; checksum partial
    (offload)"``."""
    action = p.action
    if action in DELIVERED:
        parts = [action]
    else:
        parts = [_REPLACED.get(action) or f"{action} (not delivered)"]
    if p.link_class is not None:
        parts.append(f"class {p.link_class}")
    parts.append(f"sojourn {_duration(p.time - p.arrival)}")
    frame = p.frame
    vnet = len(p.vnet_header)
    if vnet >= _gso.VIRTIO_NET_HDR_LEN:
        # The virtio-net header read directly (Packet.gso builds an object per packet: the
        # live stream writes thousands a second).
        flags, gtype, _hdr, size, _cs, _co = _gso.VIRTIO_NET_HDR.unpack_from(frame)
        gtype &= ~_gso.VIRTIO_NET_HDR_GSO_ECN
        if gtype != _gso.VIRTIO_NET_HDR_GSO_NONE:
            name = _gso.GSO_NAMES.get(gtype, str(gtype))
            if len(p.data) == p.wire_len:
                _wire, segments = _gso.wire_size(frame, vnet, tap=p.mode == "tap")
                count = f"{segments} segments"
            else:  # cut by snaplen: too little left to count segments by
                count = "segments"
            parts.append(f"gso {name} super-packet: {count} of {size} on a wire")
        if flags & _gso.VIRTIO_NET_HDR_F_NEEDS_CSUM:
            parts.append("checksum partial (offload)")
    kept = len(p.data)
    if kept < p.wire_len:
        parts.append(f"{kept} of {p.wire_len} bytes kept (snaplen)")
    return "; ".join(parts)


def timestamp_ns(wall_t0: float, time: float) -> int:
    """Nanoseconds since the epoch of a packet at ``time`` s after the pair came up.

    ``Packet.time`` is monotonic, relative to the pair's start; anchored to the wall clock
    read at the same moment, the file shows when things happened. Rounded separately: a
    float of seconds since 1970 holds ~0.2 us, the relay's sojourns are finer."""
    return round(wall_t0 * 1e9) + round(time * 1e9)


# -- whole files ---------------------------------------------------------------------------------
def write_pcapng(
    path: str | os.PathLike[str],
    packets: Iterable[Packet],
    *,
    mode: str,
    wall_t0: float,
    snaplen: int | None = None,
    secrets: bytes = b"",
    descriptions: Sequence[str] = (),
) -> str:
    """Write ``packets`` to ``path`` as pcapng: a section header, one interface per
    direction (named ``a->b`` and ``b->a``, ``descriptions`` their longer names), the key
    log ``secrets`` as a Decryption Secrets Block *before* the packets (Wireshark and tshark
    read a file in one pass: keys after the packets they open come too late), then one
    Enhanced Packet Block per packet with its comment and direction flags."""
    path = os.fspath(path)
    link = linktype(mode)
    index = {d: i for i, d in enumerate(DIRECTIONS)}
    with open(path, "wb") as f:
        f.write(section_header())
        for i, d in enumerate(DIRECTIONS):
            text = descriptions[i] if i < len(descriptions) else ""
            f.write(interface_block(link, d, text, snaplen))
        if secrets:
            f.write(secrets_block(secrets))
        for p in packets:
            f.write(
                packet_block(
                    index.get(p.direction, 0),
                    timestamp_ns(wall_t0, p.time),
                    p.data,
                    p.wire_len,
                    epb_flags(p.direction),
                    comment(p),
                )
            )
    return path


def write_pcap(
    path: str | os.PathLike[str],
    packets: Iterable[Packet],
    *,
    mode: str,
    wall_t0: float,
    snaplen: int | None = None,
) -> str:
    """Write ``packets`` to ``path`` as a classic pcap file (no directions, comments or
    secrets); each record keeps the packet's original length, so a packet cut by
    ``snaplen`` shows as truncated in tcpdump rather than as malformed."""
    path = os.fspath(path)
    with open(path, "wb") as f:
        f.write(
            struct.pack(
                "=IHHiIII",
                PCAP_MAGIC,
                2,
                4,
                0,
                0,
                snaplen or _SNAPLEN,
                linktype(mode, pcapng=False),
            )
        )
        for p in packets:
            data = p.data
            ts = wall_t0 + p.time
            sec = int(ts)
            usec = round((ts - sec) * 1_000_000)
            if usec >= 1_000_000:
                sec, usec = sec + 1, usec - 1_000_000
            f.write(struct.pack("=IIII", sec, usec, len(data), p.wire_len))
            f.write(data)
    return path
