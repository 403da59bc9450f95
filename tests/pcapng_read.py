"""A pcapng reader for the tests, written from the format's draft and independent of the
writer under test (draft-ietf-opsawg-pcapng: SHB, IDB, EPB, DSB; little-endian only, as
the writer writes)."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Interface:
    linktype: int
    snaplen: int
    options: dict[int, bytes] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.options.get(2, b"").decode()

    @property
    def description(self) -> str:
        return self.options.get(3, b"").decode()


@dataclass
class Record:
    interface: int
    ts_ns: int
    caplen: int
    wire_len: int
    data: bytes
    comment: str
    flags: int


@dataclass
class Capture:
    sections: int = 0
    interfaces: list[Interface] = field(default_factory=list)
    packets: list[Record] = field(default_factory=list)
    secrets: list[tuple[int, bytes]] = field(default_factory=list)
    # Block types in file order ("shb", "idb", "epb", "dsb"), to check where secrets sit.
    order: list[str] = field(default_factory=list)


def _options(data: bytes) -> dict[int, list[bytes]]:
    out: dict[int, list[bytes]] = {}
    off = 0
    while off + 4 <= len(data):
        code, length = struct.unpack_from("<HH", data, off)
        if code == 0:
            break
        out.setdefault(code, []).append(data[off + 4 : off + 4 + length])
        off += 4 + length + (-length % 4)
    return out


def read(source: Path | str | bytes) -> Capture:
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    cap = Capture()
    off = 0
    while off + 12 <= len(data):
        btype, total = struct.unpack_from("<II", data, off)
        assert total % 4 == 0 and total >= 12, f"bad block length {total} at {off}"
        assert off + total <= len(data), f"block at {off} cut short"
        body = data[off + 8 : off + total - 4]
        assert struct.unpack_from("<I", data, off + total - 4)[0] == total, "trailing length"
        if btype == 0x0A0D0D0A:
            magic, major, minor = struct.unpack_from("<IHH", body)
            assert (magic, major, minor) == (0x1A2B3C4D, 1, 0)
            cap.sections += 1
            cap.interfaces = []  # interface ids count from 0 again in a new section
            cap.order.append("shb")
        elif btype == 1:
            linktype, _reserved, snaplen = struct.unpack_from("<HHI", body)
            opts = {code: values[0] for code, values in _options(body[8:]).items()}
            cap.interfaces.append(Interface(linktype, snaplen, opts))
            cap.order.append("idb")
        elif btype == 6:
            iface, hi, lo, caplen, wire_len = struct.unpack_from("<IIIII", body)
            packet = body[20 : 20 + caplen]
            opts = _options(body[20 + caplen + (-caplen % 4) :])
            comment = opts.get(1, [b""])[0].decode()
            flags = struct.unpack("<I", opts[2][0])[0] if 2 in opts else 0
            cap.packets.append(
                Record(iface, (hi << 32) | lo, caplen, wire_len, packet, comment, flags)
            )
            cap.order.append("epb")
        elif btype == 0x0A:
            stype, length = struct.unpack_from("<II", body)
            cap.secrets.append((stype, body[8 : 8 + length]))
            cap.order.append("dsb")
        off += total
    assert off == len(data), f"{len(data) - off} bytes after the last whole block"
    return cap
