"""The few DNS messages the test's resolver reads and writes (RFC 1035, RFC 3596).

A query: header, one question. An answer: the question echoed, A or AAAA records, a
response code, the TC bit. Names are compared lower-case without the trailing dot.
Compression pointers are followed when reading (a query has none, but nothing forbids
them) and never written.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

__all__ = ["QTYPES", "RCODES", "Question", "parse_query", "response"]

_HEADER = struct.Struct("!HHHHHH")
#: Record types by number, the names ``dig`` shows (RFC 1035 3.2.2, RFC 3596).
QTYPES = {
    1: "A",
    2: "NS",
    5: "CNAME",
    6: "SOA",
    12: "PTR",
    15: "MX",
    16: "TXT",
    28: "AAAA",
    33: "SRV",
    65: "HTTPS",
    255: "ANY",
}
#: Response codes (RFC 1035 4.1.1).
RCODES = {"noerror": 0, "formerr": 1, "servfail": 2, "nxdomain": 3, "notimp": 4, "refused": 5}
_QR = 0x8000
_AA = 0x0400
_TC = 0x0200
_RD = 0x0100
_RA = 0x0080
_OPCODE = 0x7800


@dataclass(frozen=True)
class Question:
    """A query's header and question: what the resolver answers."""

    id: int
    flags: int
    name: str
    qtype: int
    qclass: int
    raw_question: bytes

    @property
    def type_name(self) -> str:
        return QTYPES.get(self.qtype, str(self.qtype))


def _read_name(data: bytes, off: int) -> tuple[str, int]:
    labels: list[str] = []
    end = -1
    jumps = 0
    while True:
        if off >= len(data):
            raise ValueError("name runs past the message")
        length = data[off]
        if length & 0xC0 == 0xC0:  # a compression pointer (RFC 1035 4.1.4)
            if off + 1 >= len(data) or jumps > 16:
                raise ValueError("bad compression pointer")
            if end < 0:
                end = off + 2
            off = (length & 0x3F) << 8 | data[off + 1]
            jumps += 1
            continue
        off += 1
        if length == 0:
            break
        labels.append(data[off : off + length].decode("ascii", "replace"))
        off += length
    return ".".join(labels).lower(), end if end >= 0 else off


def parse_query(data: bytes) -> Question:
    """The header and first question of a query; ``ValueError`` for anything else."""
    if len(data) < _HEADER.size:
        raise ValueError("shorter than a DNS header")
    ident, flags, qdcount, _an, _ns, _ar = _HEADER.unpack_from(data)
    if flags & _QR or qdcount < 1:
        raise ValueError("not a query")
    name, off = _read_name(data, _HEADER.size)
    if off + 4 > len(data):
        raise ValueError("question cut short")
    qtype, qclass = struct.unpack_from("!HH", data, off)
    return Question(ident, flags, name, qtype, qclass, data[_HEADER.size : off + 4])


def _encode_name(name: str) -> bytes:
    out = b""
    for label in name.strip(".").split("."):
        if label:
            out += bytes([len(label)]) + label.encode("ascii")
    return out + b"\0"


def response(
    q: Question,
    *,
    rcode: int = 0,
    addresses: list[str] = (),  # type: ignore[assignment]
    ttl: int = 60,
    truncated: bool = False,
) -> bytes:
    """The answer to ``q``: ``addresses`` as A (IPv4) or AAAA (IPv6) records for the
    question's name, the response code, TC when ``truncated`` (then without records, as a
    server whose answer did not fit)."""
    flags = _QR | _AA | _RA | (q.flags & (_RD | _OPCODE)) | (rcode & 0xF)
    answers = b""
    count = 0
    if not truncated and rcode == 0:
        name = _encode_name(q.name)
        for addr in addresses:
            family = socket.AF_INET6 if ":" in addr else socket.AF_INET
            rtype = 28 if family == socket.AF_INET6 else 1
            if rtype != q.qtype and q.qtype != 255:
                continue
            packed = socket.inet_pton(family, addr)
            answers += name + struct.pack("!HHIH", rtype, 1, ttl, len(packed)) + packed
            count += 1
    else:
        flags |= _TC if truncated else 0
    return _HEADER.pack(q.id, flags, 1, count, 0, 0) + q.raw_question + answers
