"""Live pcapng: a capture followed into a pipe, a FIFO or a growing file as packets cross.

``tunpair run --pcap -`` pipes it into ``wireshark -k -i -`` or ``tshark -i -``;
``--tunpair-pcap-live`` streams each test's pair. A :class:`Sink` is the stream (one
section: a header, then two interfaces per pair that joins, secrets and packets as they
come); a :class:`Follower` is the thread that carries one capture into it. The relay never
waits for either: the follower sleeps on the capture (``Capture.wait_new``) and writes what
was recorded since it last looked, within about a millisecond of the record and with no
buffering of its own. A reader that goes away (``EPIPE``) or stops reading ends the stream
-- never the relay, the command or the test.

Key log lines go in as Decryption Secrets Blocks before the packets that follow them. A
one-pass reader (tshark, Wireshark's first pass) needs the keys before a connection's
handshake, and endpoints log them while it is under way, so a live view decrypts only what
comes after the keys arrived; a regular file is finished by :meth:`Sink.close` with every
secret moved to the front (:func:`hoist_secrets`), so that the file opens decrypted.
"""

from __future__ import annotations

import errno
import os
import select
import stat
import threading
import time
from typing import TYPE_CHECKING

from .._kernel.threads import own_thread
from . import pcap as _pcap
from .packet import DIRECTIONS

if TYPE_CHECKING:
    from .capture import Capture
    from .packet import Packet

__all__ = ["Follower", "Sink", "hoist_secrets", "is_regular", "lost_to_bound", "open_fifo"]

# How long the follower sleeps on the capture before it looks at the key log and whether to
# stop: bounds how late a secret written while the wire is quiet reaches the stream.
_TICK = 0.1
# A reader that takes nothing for this long while the stream is being closed is given up.
STOP_GRACE = 2.0
# Bytes of packet blocks written at once (one writev): a backlog goes out in pieces.
_CHUNK = 1 << 20
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
# After writing what it found, the follower naps this long before it looks again: at
# most ~1000 wakes a second, each taking the GIL the relay thread needs when it returns
# from a device write (the trace printer's problem, docs/cli.md). A packet still goes out
# within about a millisecond of its record, with everything recorded meanwhile.
_NAP = 0.001
_YIELD_EVERY = 16


def open_fifo(path: str) -> int:
    """A write descriptor on the FIFO ``path`` without waiting for a reader: ``OSError``
    with ``ENXIO`` when none has it open (the kernel's answer to a non-blocking open of a
    FIFO with no reader), so the caller can say "start the reader first"."""
    return os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)


class Sink:
    """One pcapng stream into ``fd``, shared by the followers of one or more pairs.

    Writes are whole blocks under a lock, with the descriptor non-blocking: a full pipe is
    waited on with ``poll`` in short slices, so :meth:`abandon` can end a write to a reader
    that stopped reading. ``name`` says where it goes in messages. ``path``: a regular file
    this stream may finish in place at :meth:`close` (secrets to the front).
    """

    def __init__(self, fd: int, *, name: str, path: str | None = None, own: bool = True) -> None:
        self.fd: int | None = fd
        self.name = name
        self.path = path
        self._own = own
        self._lock = threading.Lock()
        self._abandon = threading.Event()
        self.broken: str | None = None
        """Why the stream ended early (the reader went away), or ``None``."""
        self.packets = 0
        """Packet blocks written so far."""
        self.secret_lines = 0
        """Key log lines written so far (each Decryption Secrets Block's lines)."""
        self._interfaces = 0
        self._late_secrets = False  # a secrets block came after a packet block
        self._flags = os.get_blocking(fd)
        os.set_blocking(fd, False)
        self._write(_pcap.section_header())

    def add_pair(
        self, mode: str, descriptions: tuple[str, ...] = (), snaplen: int | None = None
    ) -> int:
        """Two interfaces (``a->b``, ``b->a``) for one pair's packets; the first one's id."""
        link = _pcap.linktype(mode)
        blocks = b"".join(
            _pcap.interface_block(
                link, d, descriptions[i] if i < len(descriptions) else "", snaplen
            )
            for i, d in enumerate(DIRECTIONS)
        )
        with self._lock:
            first = self._interfaces
            self._interfaces += 2
            self._write_locked(blocks)
        return first

    def write_secrets(self, lines: bytes) -> bool:
        """Key log lines as a Decryption Secrets Block; False once the stream is broken."""
        with self._lock:
            if self.packets:
                self._late_secrets = True
            self.secret_lines += lines.count(b"\n")
            return self._write_locked(_pcap.secrets_block(lines))

    def write_packets(self, parts: list[bytes], count: int) -> bool:
        """``count`` packet blocks, in pieces (``packet_block_parts``) written with one
        ``writev``; False once the stream is broken."""
        with self._lock:
            ok = self._writev_locked(parts)
            if ok:
                self.packets += count
            return ok

    def _write(self, data: bytes) -> bool:
        with self._lock:
            return self._write_locked(data)

    def _write_locked(self, data: bytes) -> bool:
        return self._writev_locked([data])

    def _writev_locked(self, parts: list[bytes]) -> bool:
        if self.broken is not None or self.fd is None:
            return False
        bufs: list[bytes | memoryview] = [p for p in parts if p]
        first = 0
        poller: select.poll | None = None
        while first < len(bufs):
            try:
                n = os.writev(self.fd, bufs[first : first + _IOV_MAX])
            except BlockingIOError:
                if poller is None:
                    poller = select.poll()
                    poller.register(self.fd, select.POLLOUT)
                while not poller.poll(100):
                    if self._abandon.is_set():
                        self.broken = "the reader stopped reading"
                        return False
                continue
            except OSError as exc:
                self.broken = (
                    "the reader went away"
                    if exc.errno in (errno.EPIPE, errno.ECONNRESET)
                    else f"cannot write: {exc.strerror or exc}"
                )
                return False
            # A short write (a pipe taking what fits): go on from where it stopped.
            while n and first < len(bufs):
                size = len(bufs[first])
                if n >= size:
                    n -= size
                    first += 1
                else:
                    bufs[first] = memoryview(bufs[first])[n:]
                    n = 0
        return True

    def abandon(self) -> None:
        """Stop waiting for a reader that takes nothing (from another thread)."""
        self._abandon.set()

    def close(self, secrets: bytes = b"") -> None:
        """Close the descriptor (if it is ours); a regular file that got secrets after its
        first packet is rewritten with ``secrets`` (all of them) in front."""
        with self._lock:
            fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            os.set_blocking(fd, self._flags)
        except OSError:
            pass
        if self._own:
            os.close(fd)
        if self.path is not None and self._late_secrets and secrets and self.broken is None:
            hoist_secrets(self.path, secrets)


class Follower:
    """Carries one capture into a :class:`Sink` from a thread of its own; ``label`` goes
    into its interfaces' descriptions (the test id, in a stream shared by many pairs)."""

    def __init__(
        self, capture: Capture, sink: Sink, *, label: str = "", name: str = "tunpair-pcapng"
    ) -> None:
        self.capture = capture
        self.sink = sink
        described = tuple(f"{d} ({label})" if label else d for d in capture.interfaces)
        self._first = sink.add_pair(capture.mode, described, capture.snaplen)
        self._stop = threading.Event()
        self._last = -1
        self._secrets_sent = 0  # bytes of the key log written (it only ever grows)
        self.skipped = 0
        """Packets the capture let go (its bounds) before the follower could write them."""
        self._thread = own_thread(self._main, name)

    def start(self) -> Follower:
        self._thread.start()
        return self

    def stop(self, grace: float = STOP_GRACE) -> None:
        """Write what is left (call it once the relay has stopped), then end the thread; a
        reader that takes nothing for ``grace`` s is given up."""
        self._stop.set()
        self._thread.join(grace)
        if self._thread.is_alive():
            self.sink.abandon()
            self._thread.join()

    def _main(self) -> None:
        capture = self.capture
        while self.sink.broken is None:
            stopping = self._stop.is_set()
            new = capture.wait_new(self._last, 0 if stopping else _TICK)
            # The secrets first: a reader needs them before the packets they open.
            if not self._secrets():
                return
            if new:
                if not self._packets(new):
                    return
            elif stopping:
                self._secrets()  # written while the last packets went out
                return

    def _secrets(self) -> bool:
        lines = self.capture.secrets()[self._secrets_sent :]
        if not lines:
            return True
        self._secrets_sent += len(lines)
        return self.sink.write_secrets(lines)

    def _packets(self, new: list[Packet]) -> bool:
        wall_t0 = self.capture.wall_t0
        first = self._first
        gap = new[0].seq - self._last - 1
        self._last = new[-1].seq
        chunk: list[bytes] = []
        size = 0
        count = 0
        for p in new:
            note = _pcap.comment(p)
            if gap > 0:
                self.skipped += gap
                note = f"{note}; {gap} packets before this one not streamed (capture bound)"
                gap = 0
            parts = _pcap.packet_block_parts(
                first + (p.direction == "b->a"),
                _pcap.timestamp_ns(wall_t0, p.time),
                p.data,
                p.wire_len,
                _pcap.epb_flags(p.direction),
                note,
            )
            chunk.extend(parts)
            size += len(parts[1])
            count += 1
            if not count % _YIELD_EVERY:
                # The relay thread returning from a write waits for the GIL: let go often
                # (the trace printer does after every packet; this costs less per packet).
                time.sleep(0)
            if size >= _CHUNK or len(chunk) >= _IOV_MAX:
                if not self.sink.write_packets(chunk, count):
                    return False
                chunk, size, count = [], 0, 0
                time.sleep(0)  # let the relay thread have the GIL between pieces
        ok = self.sink.write_packets(chunk, count) if chunk else True
        if not self._stop.is_set():
            time.sleep(_NAP)
        return ok


def lost_to_bound(skipped: int, bound: str) -> str:
    """What to tell a user whose stream missed ``skipped`` packets (``Follower.skipped``):
    they crossed while the stream was behind (a slow reader, a per-segment link faster
    than the stream) and the capture's ``bound`` had let them go before it caught up. Each
    gap is also in the comment of the packet after it."""
    return (
        f"{skipped} packet{'s' if skipped != 1 else ''} not streamed: the capture let them "
        f"go before the stream caught up; a larger {bound} gives it more slack"
    )


def is_regular(fd: int) -> bool:
    """True for a regular file (one that can be finished in place at the end)."""
    return stat.S_ISREG(os.fstat(fd).st_mode)


def hoist_secrets(path: str, secrets: bytes) -> None:
    """Rewrite the pcapng file ``path`` with ``secrets`` as a Decryption Secrets Block right
    after its header and interfaces, where a one-pass reader finds them before any packet.

    The rest is copied as it is, in the kernel (``copy_file_range``), secrets blocks
    included: a key listed twice does no harm. Replaced atomically (``os.replace``)."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        return  # never replace a device or a FIFO with a file
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    offset = 0
    for block_type, block in _pcap.split_blocks(head):
        if block_type not in (_pcap.BT_SHB, _pcap.BT_IDB):
            break
        offset += len(block)
    tmp = f"{path}.tunpair-{os.getpid()}"
    src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.fchmod(dst, stat.S_IMODE(os.fstat(src).st_mode))
            _write_all(dst, head[:offset] + _pcap.secrets_block(secrets))
            size = os.fstat(src).st_size
            pos = offset
            while pos < size:
                try:
                    n = os.copy_file_range(src, dst, size - pos, pos)
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    n = _write_all(dst, os.pread(src, min(size - pos, 1 << 22), pos))
                if n == 0:
                    break
                pos += n
        finally:
            os.close(dst)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    finally:
        os.close(src)


def _write_all(fd: int, data: bytes) -> int:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    return len(data)
