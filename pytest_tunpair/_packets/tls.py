"""TLS records of the capture, decrypted with the pair's key log: ``packets.tls_records()``.

For each TCP connection whose client opens with a TLS handshake, both byte streams are put
back together from the packets the receiver got (``DELIVERED``, less ``corrupted``: the
receiving stack dropped those; retransmissions and duplicates overlap and are read once),
cut into TLS records, and each encrypted record is opened with the keys its connection's
key log lines give (matched by the ClientHello's random):

* TLS 1.3 (RFC 8446, section 7): traffic keys from ``CLIENT_/SERVER_HANDSHAKE_TRAFFIC_SECRET``
  and ``..._TRAFFIC_SECRET_0`` (later generations after a KeyUpdate derived from it), and
  ``CLIENT_EARLY_TRAFFIC_SECRET`` for 0-RTT; AES-GCM, ChaCha20-Poly1305 and AES-CCM.
  Which key opens a record is found by trying the current one, then the next (the AEAD
  tag says which fits), so no handshake message needs to be understood beyond the hellos.
* TLS 1.2 (RFC 5246, 5288, 7905) with an AEAD cipher suite (AES-GCM, ChaCha20-Poly1305):
  the key block from ``CLIENT_RANDOM``'s master secret; records after each side's
  ChangeCipherSpec are encrypted.

Anything else (CBC suites, a connection without keys, bytes after a hole in the stream)
comes back undecrypted, never raised. The ciphers are ``cryptography``'s, imported when
this runs. QUIC is not covered: tshark/Wireshark decrypt it from the pcapng's secrets.
"""

from __future__ import annotations

import bisect
import hashlib
import hmac
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .packet import DELIVERED

if TYPE_CHECKING:
    from .packet import Packet

__all__ = ["TlsRecord", "parse_keylog", "tls_records"]

CONTENT_TYPES = {20: "change_cipher_spec", 21: "alert", 22: "handshake", 23: "application_data"}
_CCS, _ALERT, _HANDSHAKE, _APPDATA = 20, 21, 22, 23
_CLIENT_HELLO, _SERVER_HELLO = 1, 2
_EXT_SUPPORTED_VERSIONS = 43
# RFC 8446, 4.1.3: a ServerHello with this random is a HelloRetryRequest.
_HRR_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")
_TLS13 = 0x0304
# Receivers never got a corrupted packet's bytes (the checksum drops it): leave them out.
_RECEIVED = DELIVERED - {"corrupted"}

# cipher suite -> (AEAD, key length, hash): TLS 1.3 (RFC 8446, B.4) ...
_SUITES13 = {
    0x1301: ("aesgcm", 16, "sha256"),
    0x1302: ("aesgcm", 32, "sha384"),
    0x1303: ("chacha", 32, "sha256"),
    0x1304: ("aesccm", 16, "sha256"),
}
# ... and the TLS 1.2 AEAD suites (RFC 5288, 5289, 7905).
_SUITES12 = {
    0x009C: ("aesgcm", 16, "sha256"),
    0x009D: ("aesgcm", 32, "sha384"),
    0x009E: ("aesgcm", 16, "sha256"),
    0x009F: ("aesgcm", 32, "sha384"),
    0xC02B: ("aesgcm", 16, "sha256"),
    0xC02C: ("aesgcm", 32, "sha384"),
    0xC02F: ("aesgcm", 16, "sha256"),
    0xC030: ("aesgcm", 32, "sha384"),
    0xCCA8: ("chacha", 32, "sha256"),
    0xCCA9: ("chacha", 32, "sha256"),
    0xCCAA: ("chacha", 32, "sha256"),
}


@dataclass(frozen=True)
class TlsRecord:
    """One TLS record as its receiver read it, decrypted when the key log allows."""

    direction: str
    """Who sent it: ``"a->b"`` or ``"b->a"``."""
    client: tuple[str, int]
    """The connection's client (address, port): the side that sent the ClientHello."""
    server: tuple[str, int]
    """The connection's server (address, port)."""
    type: str
    """The content type: ``"handshake"``, ``"application_data"``, ``"alert"``,
    ``"change_cipher_spec"`` (the inner type for a decrypted TLS 1.3 record), or the
    number as text for others."""
    data: bytes
    """The plaintext: what the record carried, decrypted if it was encrypted and the keys
    were there; the ciphertext otherwise (``decrypted`` False)."""
    encrypted: bool
    """It was encrypted on the wire."""
    decrypted: bool
    """``data`` is the plaintext of an encrypted record."""
    version: str
    """The connection's version: ``"TLS 1.3"``, ``"TLS 1.2"`` (``"?"`` before the ServerHello)."""
    seq: int
    """``Packet.seq`` of the packet that completed the record."""
    time: float
    """``Packet.time`` of that packet."""

    def __repr__(self) -> str:
        state = "decrypted" if self.decrypted else ("encrypted" if self.encrypted else "clear")
        return (
            f"<TlsRecord #{self.seq} {self.direction} {self.type} {len(self.data)} bytes "
            f"{state} {self.version}>"
        )


def parse_keylog(text: bytes) -> dict[bytes, dict[str, bytes]]:
    """NSS key log lines as ``{client random: {label: secret}}``; comments and lines that
    are not ``LABEL <hex> <hex>`` are skipped."""
    keys: dict[bytes, dict[str, bytes]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 3 or line.startswith(b"#"):
            continue
        try:
            random, secret = bytes.fromhex(parts[1].decode()), bytes.fromhex(parts[2].decode())
        except (ValueError, UnicodeDecodeError):
            continue
        keys.setdefault(random, {})[parts[0].decode(errors="replace")] = secret
    return keys


# -- TCP streams ---------------------------------------------------------------------------------
Endpoint = tuple[str, int]


class _Stream:
    """One direction of a TCP connection: its bytes in order, as far as they go without a
    hole, with the packet that brought each byte range."""

    def __init__(self) -> None:
        self.isn: int | None = None
        self.syn: int | None = None  # the SYN's sequence number + 1 (a client's stream)
        self.syn_acked: int | None = None  # what the SYN-ACK acknowledged (a server's)
        self.segments: list[tuple[int, int, bytes, Packet]] = []  # (seq, order, payload, pkt)
        self.data = b""
        self.ends: list[tuple[int, Packet]] = []  # (stream offset after, packet)
        self.complete = True

    def add(self, p: Packet, order: int) -> None:
        seq = p.tcp_seq
        flags = p.flags or ""
        if seq is None:
            return
        if "S" in flags:
            self.isn = (seq + 1) & 0xFFFFFFFF
            if "A" in flags:
                self.syn_acked = p.tcp_ack
            else:
                self.syn = self.isn
        payload = p.payload or b""
        if len(p.data) < p.wire_len:  # cut by snaplen: the bytes after the cut are missing
            self.segments.append((seq, order, b"", p))
            self.complete = False
            return
        if payload:
            self.segments.append((seq, order, payload, p))

    def assemble(self) -> None:
        if not self.segments:
            return
        if self.isn is None:  # the SYN was not captured (cleared, bounded): start at the first
            self.isn = min(self.segments, key=lambda s: s[1])[0]
        isn = self.isn
        ordered = sorted(((s - isn) & 0xFFFFFFFF, o, d, p) for s, o, d, p in self.segments)
        chunks: list[bytes] = []
        end = 0
        for rel, _order, data, p in ordered:
            if rel > end:
                self.complete = False  # a hole: nothing after it can be read in order
                break
            if rel + len(data) <= end:
                continue  # a retransmission or duplicate of bytes we have
            chunks.append(data[end - rel :])
            end = rel + len(data)
            self.ends.append((end, p))
        self.data = b"".join(chunks)

    def packet_at(self, offset: int) -> Packet:
        """The packet that brought the byte just before ``offset``."""
        i = bisect.bisect_left(self.ends, offset, key=lambda entry: entry[0])
        return self.ends[min(i, len(self.ends) - 1)][1]


def _streams(packets: Iterable[Packet]) -> dict[tuple[Endpoint, Endpoint], _Stream]:
    streams: dict[tuple[Endpoint, Endpoint], _Stream] = {}
    for order, p in enumerate(packets):
        if p.action not in _RECEIVED or p.proto != "tcp":
            continue
        src, dst, sport, dport = p.src, p.dst, p.sport, p.dport
        if src is None or dst is None or sport is None or dport is None:
            continue
        key = ((src, sport), (dst, dport))
        stream = streams.get(key)
        if stream is None:
            stream = streams[key] = _Stream()
        stream.add(p, order)
    for stream in streams.values():
        stream.assemble()
    return streams


# -- TLS records on a stream ------------------------------------------------------------------
@dataclass
class _Raw:
    type: int
    version: int
    body: bytes
    header: bytes
    packet: Packet


def _records(stream: _Stream) -> list[_Raw]:
    data = stream.data
    out = []
    off = 0
    while off + 5 <= len(data):
        ctype, version, length = struct.unpack_from("!BHH", data, off)
        if off + 5 + length > len(data):
            break
        out.append(
            _Raw(
                ctype,
                version,
                data[off + 5 : off + 5 + length],
                data[off : off + 5],
                stream.packet_at(off + 5 + length),
            )
        )
        off += 5 + length
    return out


def _looks_like_tls(stream: _Stream) -> bool:
    d = stream.data
    # A handshake record (22) of TLS 1.0-1.3 framing carrying a ClientHello (1).
    return len(d) >= 6 and d[0] == _HANDSHAKE and d[1] == 3 and d[5] == _CLIENT_HELLO


def _handshake_messages(records: Iterable[_Raw]) -> Iterable[tuple[int, bytes]]:
    """(type, body) of the handshake messages in the clear records, before encryption."""
    buf = b""
    for r in records:
        if r.type == _CCS:
            break  # TLS 1.2: the rest is encrypted
        if r.type != _HANDSHAKE:
            continue
        buf += r.body
        while len(buf) >= 4:
            length = int.from_bytes(buf[1:4], "big")
            if len(buf) < 4 + length:
                break
            yield buf[0], buf[4 : 4 + length]
            buf = buf[4 + length :]


def _client_random(records: Sequence[_Raw]) -> bytes | None:
    for mtype, body in _handshake_messages(records):
        if mtype == _CLIENT_HELLO and len(body) >= 34:
            return body[2:34]
    return None


def _server_hello(records: Sequence[_Raw]) -> tuple[bytes, int, int] | None:
    """(server random, cipher suite, version) of the (last) ServerHello that is not a
    HelloRetryRequest."""
    found = None
    for mtype, body in _handshake_messages(records):
        if mtype != _SERVER_HELLO or len(body) < 38:
            continue
        random = body[2:34]
        if random == _HRR_RANDOM:
            continue
        version = int.from_bytes(body[0:2], "big")
        sid_len = body[34]
        pos = 35 + sid_len
        if len(body) < pos + 3:
            continue
        suite = int.from_bytes(body[pos : pos + 2], "big")
        pos += 3  # suite, compression method
        if len(body) >= pos + 2:
            end = pos + 2 + int.from_bytes(body[pos : pos + 2], "big")
            pos += 2
            while pos + 4 <= min(end, len(body)):
                ext, elen = struct.unpack_from("!HH", body, pos)
                if ext == _EXT_SUPPORTED_VERSIONS and elen == 2:
                    version = int.from_bytes(body[pos + 4 : pos + 6], "big")
                pos += 4 + elen
        found = (random, suite, version)
        if version == _TLS13:
            break
    return found


# -- keys and ciphers -------------------------------------------------------------------------------
def _aead(kind: str, key: bytes, tag: int = 16) -> Any:
    from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESGCM, ChaCha20Poly1305

    if kind == "aesgcm":
        return AESGCM(key)
    if kind == "aesccm":
        return AESCCM(key, tag_length=tag)
    return ChaCha20Poly1305(key)


def _expand_label(secret: bytes, label: bytes, length: int, hash_name: str) -> bytes:
    """HKDF-Expand-Label (RFC 8446, 7.1) with an empty context."""
    full = b"tls13 " + label
    info = struct.pack("!HB", length, len(full)) + full + b"\0"
    out = b""
    block = b""
    counter = 1
    while len(out) < length:
        block = hmac.new(secret, block + info + bytes([counter]), hash_name).digest()
        out += block
        counter += 1
    return out[:length]


def _prf12(secret: bytes, label: bytes, seed: bytes, length: int, hash_name: str) -> bytes:
    """TLS 1.2's PRF (RFC 5246, 5): P_hash(secret, label + seed)."""
    seed = label + seed
    out = b""
    a = seed
    while len(out) < length:
        a = hmac.new(secret, a, hash_name).digest()
        out += hmac.new(secret, a + seed, hash_name).digest()
    return out[:length]


class _Keys13:
    """A TLS 1.3 direction's traffic keys in the order they come into use."""

    def __init__(self, secrets: list[bytes], kind: str, key_len: int, hash_name: str) -> None:
        self.secrets = secrets  # early (maybe), handshake, application 0; more derived
        self.kind, self.key_len, self.hash = kind, key_len, hash_name
        self.index = 0
        self.seq = 0
        self._aeads: dict[int, tuple[Any, bytes]] = {}

    def _at(self, i: int) -> tuple[Any, bytes] | None:
        while i >= len(self.secrets):
            if len(self.secrets) < 2:
                return None
            digest = hashlib.new(self.hash).digest_size
            self.secrets.append(_expand_label(self.secrets[-1], b"traffic upd", digest, self.hash))
        if i not in self._aeads:
            secret = self.secrets[i]
            key = _expand_label(secret, b"key", self.key_len, self.hash)
            iv = _expand_label(secret, b"iv", 12, self.hash)
            self._aeads[i] = (_aead(self.kind, key), iv)
        return self._aeads[i]

    def open(self, r: _Raw) -> tuple[int, bytes] | None:
        """(inner content type, plaintext), trying the current key, then the next ones."""
        from cryptography.exceptions import InvalidTag

        # The current key, then a later one (the handshake ends, a KeyUpdate): at most a
        # couple of steps, and a key generation at most once ahead of the last success.
        for step in range(3):
            i = self.index + step
            entry = self._at(i)
            if entry is None:
                return None
            aead, iv = entry
            seq = self.seq if step == 0 else 0
            nonce = (int.from_bytes(iv, "big") ^ seq).to_bytes(12, "big")
            try:
                plain = aead.decrypt(nonce, r.body, r.header)
            except InvalidTag:
                continue
            self.index, self.seq = i, seq + 1
            inner = plain.rstrip(b"\0")
            if not inner:
                return None
            return inner[-1], inner[:-1]
        return None


class _Keys12:
    """A TLS 1.2 direction's AEAD key (encryption starts after its ChangeCipherSpec)."""

    def __init__(self, kind: str, key: bytes, iv: bytes) -> None:
        self.kind = kind
        self.aead = _aead(kind, key)
        self.iv = iv
        self.seq = 0

    def open(self, r: _Raw) -> bytes | None:
        from cryptography.exceptions import InvalidTag

        body = r.body
        if self.kind == "aesgcm":
            if len(body) < 24:
                return None
            nonce, ciphertext = self.iv + body[:8], body[8:]
        else:
            nonce = (int.from_bytes(self.iv, "big") ^ self.seq).to_bytes(12, "big")
            ciphertext = body
        aad = struct.pack("!QBHH", self.seq, r.type, r.version, len(ciphertext) - 16)
        self.seq += 1
        try:
            return bytes(self.aead.decrypt(nonce, ciphertext, aad))
        except InvalidTag:
            return None


# -- connections ------------------------------------------------------------------------------
def tls_records(packets: Sequence[Packet], secrets: bytes) -> list[TlsRecord]:
    """Every TLS record of the TLS connections in ``packets``, decrypted where ``secrets``
    (an NSS key log) allows, in the order their last bytes were captured."""
    keylog = parse_keylog(secrets)
    streams = _streams(packets)
    found: list[tuple[int, int, int, TlsRecord]] = []
    for number, ((client, server), c_stream) in enumerate(streams.items()):
        if not _looks_like_tls(c_stream):
            continue
        s_stream = streams.get((server, client)) or _reply_stream(streams, server, c_stream)
        c_recs = _records(c_stream)
        s_recs = _records(s_stream) if s_stream is not None else []
        client_dir = c_recs[0].packet.direction if c_recs else "a->b"
        server_dir = "b->a" if client_dir == "a->b" else "a->b"
        random = _client_random(c_recs)
        hello = _server_hello(s_recs)
        keys = keylog.get(random or b"", {})
        for side, recs, direction in (
            ("CLIENT", c_recs, client_dir),
            ("SERVER", s_recs, server_dir),
        ):
            opened = _open(side, recs, hello, keys, random)
            for i, (r, ctype, data, encrypted, decrypted) in enumerate(opened):
                record = TlsRecord(
                    direction=direction,
                    client=client,
                    server=server,
                    type=CONTENT_TYPES.get(ctype, str(ctype)),
                    data=data,
                    encrypted=encrypted,
                    decrypted=decrypted,
                    version=_version_name(hello),
                    seq=r.packet.seq,
                    time=r.packet.time,
                )
                found.append((r.packet.seq, number * 2 + (side == "SERVER"), i, record))
    found.sort(key=lambda entry: entry[:3])
    return [entry[3] for entry in found]


def _reply_stream(
    streams: dict[tuple[Endpoint, Endpoint], _Stream], server: Endpoint, c_stream: _Stream
) -> _Stream | None:
    """The server's side of a connection whose client address a NAT on the link changed:
    b received the translated source, a the translated-back destination, so the two
    delivered streams do not name the same endpoints. The server's SYN-ACK acknowledges
    the client's SYN, which no NAT changes."""
    if c_stream.syn is None:
        return None
    for (src, _dst), stream in streams.items():
        if src == server and stream.syn_acked == c_stream.syn:
            return stream
    return None


def _version_name(hello: tuple[bytes, int, int] | None) -> str:
    if hello is None:
        return "?"
    return {0x0304: "TLS 1.3", 0x0303: "TLS 1.2", 0x0302: "TLS 1.1", 0x0301: "TLS 1.0"}.get(
        hello[2], f"0x{hello[2]:04x}"
    )


def _open(
    side: str,
    recs: Sequence[_Raw],
    hello: tuple[bytes, int, int] | None,
    keys: dict[str, bytes],
    client_random: bytes | None,
) -> list[tuple[_Raw, int, bytes, bool, bool]]:
    """Each record of one direction: (record, content type, data, encrypted, decrypted)."""
    out: list[tuple[_Raw, int, bytes, bool, bool]] = []
    if hello is not None and hello[2] == _TLS13:
        suite = _SUITES13.get(hello[1])
        k13: _Keys13 | None = None
        if suite is not None:
            names = [f"{side}_HANDSHAKE_TRAFFIC_SECRET", f"{side}_TRAFFIC_SECRET_0"]
            if side == "CLIENT" and "CLIENT_EARLY_TRAFFIC_SECRET" in keys:
                names.insert(0, "CLIENT_EARLY_TRAFFIC_SECRET")
            if all(n in keys for n in names):
                k13 = _Keys13([keys[n] for n in names], *suite)
        for r in recs:
            # TLS 1.3 encrypts every record after the hellos as application_data (23);
            # ChangeCipherSpec stays a clear compatibility record.
            if r.type != _APPDATA:
                out.append((r, r.type, r.body, False, False))
                continue
            opened = k13.open(r) if k13 is not None else None
            if opened is None:
                out.append((r, r.type, r.body, True, False))
            else:
                out.append((r, opened[0], opened[1], True, True))
        return out
    k12: _Keys12 | None = None
    if hello is not None and client_random is not None and "CLIENT_RANDOM" in keys:
        suite = _SUITES12.get(hello[1])
        if suite is not None:
            kind, key_len, hash_name = suite
            iv_len = 4 if kind == "aesgcm" else 12
            block = _prf12(
                keys["CLIENT_RANDOM"],
                b"key expansion",
                hello[0] + client_random,
                2 * (key_len + iv_len),
                hash_name,
            )
            ck, sk = block[:key_len], block[key_len : 2 * key_len]
            civ = block[2 * key_len : 2 * key_len + iv_len]
            siv = block[2 * key_len + iv_len :]
            k12 = _Keys12(kind, ck, civ) if side == "CLIENT" else _Keys12(kind, sk, siv)
    encrypting = False
    for r in recs:
        if not encrypting:
            out.append((r, r.type, r.body, False, False))
            encrypting = r.type == _CCS
            continue
        plain = k12.open(r) if k12 is not None else None
        if plain is None:
            out.append((r, r.type, r.body, True, False))
        else:
            out.append((r, r.type, plain, True, True))
    return out
