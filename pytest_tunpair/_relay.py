"""The relay: the userspace "MAC+PHY" between the two devices, in one background thread.

One thread serves both directions with ``poll()``: kernel-notes measured a thread per
direction 10x *slower* in Python (GIL hand-offs), and a blocked ``read()`` on a TUN fd is
not woken by ``close()`` from another thread -- so the loop also polls a wake-up pipe.

Fast path (no hook, no impairment on that direction): read, write to the other device,
record. Slow path: the packet goes through the hooks, then the impairment engine, and
possibly into a timer heap (delayed packets never block the other direction).
"""

from __future__ import annotations

import errno
import heapq
import itertools
import os
import select
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import _linux
from ._capture import Capture, Packet, Stats
from ._errors import HookError
from ._validate import is_scapy_packet

if TYPE_CHECKING:
    from ._device import TunDevice
    from ._impair import ImpairmentEngine

__all__ = ["Hook", "Relay"]

# Read size: big enough for a 64 KB GSO super-packet plus Ethernet and virtio-net headers,
# and under glibc's 128 KiB mmap threshold (kernel-notes: 256 KiB reads mmap a buffer on
# every call from a non-main thread: 10x slower).
READ_SIZE = 65536 + 256
# Packets drained from one device before looking at the other: fairness between directions.
BURST = 64
# A fast-path batch (read, then record under one lock, then write) ends at this many packets
# or bytes: a few GSO super-packets, so the buffers are still in cache when written out.
BATCH = 16
BATCH_BYTES = 256 * 1024
# Packets shorter than this are copied into an exact-size bytes object. read() allocates
# READ_SIZE and shrinks the block in place; a capture keeping thousands of those shrunk
# blocks, evicted oldest first, fragments the heap into holes too small for the next read
# (measured: 34 MiB of free but resident heap beside a 64 MiB capture of MTU-sized
# packets). The copy costs a small memcpy; the read buffer goes back at once.
COPY_BELOW = READ_SIZE - 4096
# Errors that mean "this write did not go through" rather than "the relay is broken":
# EIO while a device is down, ENOBUFS/EAGAIN under pressure, EINVAL for a malformed packet.
_DROP_ERRNOS = frozenset(
    {
        errno.EIO,
        errno.ENOBUFS,
        errno.EAGAIN,
        errno.EINVAL,
        errno.EMSGSIZE,
        errno.EFAULT,
        errno.ENOMEM,
        errno.EBADFD,
    }
)


class Hook:
    """A registered hook; ``remove_hook`` takes this handle."""

    __slots__ = ("direction", "fn", "name")

    def __init__(self, fn: Callable[[Packet], Any], direction: str | None) -> None:
        self.fn = fn
        self.direction = direction
        self.name = getattr(fn, "__qualname__", None) or repr(fn)

    def __repr__(self) -> str:
        return f"<Hook {self.name} direction={self.direction or 'both'}>"


class Relay:
    """Carries packets between ``dev_a`` and ``dev_b`` until :meth:`stop`."""

    def __init__(
        self,
        dev_a: TunDevice,
        dev_b: TunDevice,
        capture: Capture,
        stats: Stats,
        *,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.devs = (dev_a, dev_b)
        self.capture = capture
        self.stats = stats
        self.mode = dev_a.mode
        self.errors: list[BaseException] = []
        self._errors_lock = threading.Lock()
        # Copy-on-write tuples: the relay reads them without a lock, the test thread swaps.
        self.hooks: dict[str, tuple[Hook, ...]] = {"a->b": (), "b->a": ()}
        self.engines: dict[str, ImpairmentEngine | None] = {"a->b": None, "b->a": None}
        self._timers: list[tuple[float, int, int, bytes, str, str]] = []
        self._tseq = itertools.count()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False
        self._thread = threading.Thread(
            target=self._main, name=f"tunpair-relay-{dev_a.name}-{dev_b.name}", daemon=True
        )

    # -- control (test thread) -------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # a wake-up is already pending

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop and join the thread; packets still delayed are discarded."""
        if self._wake_w < 0:
            return
        self._stopping = True
        self.wake()
        if self._thread.is_alive() or self._thread.ident is not None:
            self._thread.join(timeout)
        if self._thread.is_alive():  # pragma: no cover - a hook stuck forever
            self._add_error(
                RuntimeError(
                    f"relay thread {self._thread.name} did not stop within {timeout} s "
                    "(a hook that never returns?)"
                )
            )
            return  # keep the fds: the thread may still use them
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._wake_r = self._wake_w = -1

    def _add_error(self, exc: BaseException) -> None:
        with self._errors_lock:
            self.errors.append(exc)

    def take_errors(self) -> list[BaseException]:
        with self._errors_lock:
            errors, self.errors = self.errors, []
        return errors

    # -- the loop (relay thread) -------------------------------------------------------------
    def _main(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # never die silently: the test thread re-raises it
            exc.add_note(f"(raised in relay thread {self._thread.name})")
            self._add_error(exc)

    def _timeout_ms(self) -> int:
        due = self._timers[0][0] if self._timers else None
        for engine in self.engines.values():
            if engine is not None:
                d = engine.deadline()
                if d is not None and (due is None or d < due):
                    due = d
        if due is None:
            return -1
        return max(0, int((due - time.monotonic()) * 1000 + 0.999))

    def _loop(self) -> None:
        dev_a, dev_b = self.devs
        fd_a, fd_b = dev_a.fd, dev_b.fd
        assert fd_a is not None and fd_b is not None
        poller = select.poll()
        poller.register(fd_a, select.POLLIN)
        poller.register(fd_b, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        routes = {
            fd_a: (dev_a, dev_b, "a->b", self.stats.counters["a->b"]),
            fd_b: (dev_b, dev_a, "b->a", self.stats.counters["b->a"]),
        }
        wake_r = self._wake_r
        while not self._stopping:
            for fd, _ev in poller.poll(self._timeout_ms()):
                if fd == wake_r:
                    try:
                        os.read(wake_r, 4096)
                    except BlockingIOError:
                        pass
                    continue
                src, dst, direction, counters = routes[fd]
                self._drain(src, dst, direction, counters)
            if self._timers or self.engines["a->b"] or self.engines["b->a"]:
                self._run_timers()

    def _drain(self, src: TunDevice, dst: TunDevice, direction: str, c: list[int]) -> None:
        """Move what ``src`` has queued (up to ``BURST`` packets) to ``dst``, recording it.

        Fast path, NAPI-style: read a batch (until the queue is empty, ``BATCH`` packets or
        ``BATCH_BYTES``), record and count the whole batch under one capture lock, then write
        it out. Recording comes *before* writing because a write into a TUN runs the
        receiving stack in this thread: the receiver -- and the test waiting on it -- may
        wake before ``write()`` returns, and must find the packet captured and counted.
        Per packet: one read, one write, one ``Packet`` around the bytes object ``read``
        returned, no decoding (``Packet`` slices and decodes lazily); only packets shorter
        than ``COPY_BELOW`` are copied, to an exact-size object.
        """
        src_fd, dst_fd = src.fd, dst.fd
        if src_fd is None or dst_fd is None:
            return
        read, write, monotonic = os.read, os.write, time.monotonic
        if self.hooks[direction] or self.engines[direction] is not None:
            for _ in range(BURST):
                try:
                    buf = read(src_fd, READ_SIZE)
                except BlockingIOError:
                    return
                except OSError as exc:
                    if exc.errno in _DROP_ERRNOS:
                        return
                    raise
                if len(buf) < COPY_BELOW:
                    buf = bytes(memoryview(buf))
                self._slow_path(buf, monotonic(), src, dst, direction, c)
            return
        hdr = src.hdr_len
        mode = self.mode
        record_many = self.capture.record_many
        t0 = self.capture.t0
        left = BURST
        while left > 0:
            bufs: list[bytes] = []
            pkts: list[Packet] = []
            size = 0
            empty = False
            while len(bufs) < BATCH and size < BATCH_BYTES:
                try:
                    buf = read(src_fd, READ_SIZE)
                except BlockingIOError:
                    empty = True
                    break
                except OSError as exc:
                    if exc.errno not in _DROP_ERRNOS:
                        raise
                    empty = True
                    break
                if len(buf) < COPY_BELOW:
                    buf = bytes(memoryview(buf))
                bufs.append(buf)
                pkts.append(Packet(monotonic() - t0, direction, "forwarded", buf, hdr, mode))
                size += len(buf)
            if bufs:
                n = len(bufs)
                record_many(pkts)
                c[0] += n
                c[1] += size - n * hdr
                for i, buf in enumerate(bufs):
                    try:
                        write(dst_fd, buf)
                    except OSError as exc:
                        if exc.errno not in _DROP_ERRNOS:
                            raise
                        c[0] -= 1
                        c[1] -= len(buf) - hdr
                        c[2] += 1
                        pkts[i].action = "dropped"
                left -= n
            if empty:
                return

    # -- slow path: hooks and impairments ----------------------------------------------------
    def _slow_path(
        self, buf: bytes, now: float, src: TunDevice, dst: TunDevice, direction: str, c: list[int]
    ) -> None:
        hdr = src.hdr_len
        t = now - self.capture.t0
        original = Packet(t, direction, "forwarded", buf, hdr, self.mode)
        outputs: list[tuple[bytes, str]]
        hooks = self.hooks[direction]
        if hooks:
            try:
                payloads = self._run_hooks(hooks, original, direction)
            except HookError as exc:
                self._add_error(exc)
                original.action = "dropped"
                c[2] += 1
                self.capture.record(original)
                return
            if not payloads:
                original.action = "dropped"
                c[2] += 1
                self.capture.record(original)
                return
            orig_data = original.data
            outputs = []
            seen_original = False
            for p in payloads:
                if p == orig_data:
                    outputs.append((p, "duplicated" if seen_original else "forwarded"))
                    seen_original = True
                else:
                    outputs.append((p, "modified"))
        else:
            outputs = [(original.data, "forwarded")]
        engine = self.engines[direction]
        header = buf[:hdr]
        for payload, action in outputs:
            # Keep the kernel's virtio-net header only for bytes we did not change: it may
            # say "checksum still to do", which must not be applied to edited bytes.
            frame_hdr = (
                header
                if payload is original.data or payload == original.data
                else (_linux.ZERO_VNET_HDR if hdr else b"")
            )
            if engine is None:
                self._send(dst, frame_hdr + payload, hdr, t, direction, action, c)
                continue
            for emit in engine.submit(payload, now):
                act = emit.action if emit.action != "forwarded" else action
                self._emit(emit.due, emit.data, payload, frame_hdr, dst, now, direction, act, c)

    def _emit(
        self,
        due: float | None,
        data: bytes,
        payload: bytes,
        frame_hdr: bytes,
        dst: TunDevice,
        now: float,
        direction: str,
        action: str,
        c: list[int],
    ) -> None:
        hdr = dst.hdr_len
        if data is not payload and data != payload:
            frame_hdr = _linux.ZERO_VNET_HDR if hdr else b""
        frame = frame_hdr + data
        if due is None:  # lost
            c[2] += 1
            self.capture.record(
                Packet(now - self.capture.t0, direction, action, frame, hdr, self.mode)
            )
            return
        if due <= now:
            self._send(dst, frame, hdr, now - self.capture.t0, direction, action, c)
            return
        heapq.heappush(self._timers, (due, next(self._tseq), id(dst), frame, direction, action))

    def _run_timers(self) -> None:
        now = time.monotonic()
        for direction, engine in self.engines.items():
            if engine is None:
                continue
            d = engine.deadline()
            if d is not None and d <= now:
                dst = self.devs[1] if direction == "a->b" else self.devs[0]
                c = self.stats.counters[direction]
                for emit in engine.expire(now):
                    hdr = _linux.ZERO_VNET_HDR if dst.hdr_len else b""
                    self._emit(
                        emit.due, emit.data, emit.data, hdr, dst, now, direction, emit.action, c
                    )
        timers = self._timers
        while timers and timers[0][0] <= now:
            _due, _seq, dst_id, frame, direction, action = heapq.heappop(timers)
            dst = self.devs[0] if id(self.devs[0]) == dst_id else self.devs[1]
            self._send(
                dst,
                frame,
                dst.hdr_len,
                now - self.capture.t0,
                direction,
                action,
                self.stats.counters[direction],
            )

    def _send(
        self,
        dst: TunDevice,
        frame: bytes,
        hdr: int,
        t: float,
        direction: str,
        action: str,
        c: list[int],
    ) -> None:
        fd = dst.fd
        try:
            if fd is None:
                raise OSError(errno.EBADFD, "device closed")
            os.write(fd, frame)
            c[0] += 1
            c[1] += len(frame) - hdr
        except OSError as exc:
            if exc.errno not in _DROP_ERRNOS:
                raise
            c[2] += 1
            action = "dropped"
        self.capture.record(Packet(t, direction, action, frame, hdr, self.mode))

    def _run_hooks(self, hooks: tuple[Hook, ...], original: Packet, direction: str) -> list[bytes]:
        items = [original]
        for hook in hooks:
            nxt: list[Packet] = []
            for pkt in items:
                try:
                    result = hook.fn(pkt)
                except Exception as exc:
                    err = HookError(
                        f"hook {hook.name} raised {type(exc).__name__}: {exc} "
                        f"(on {direction} packet #{pkt.seq} at t={pkt.time:.6f}); "
                        "the packet was dropped",
                        hook=hook.name,
                        direction=direction,
                    )
                    err.__cause__ = exc
                    raise err from exc
                for data in _normalize(result, pkt, hook, direction):
                    if data is pkt.data:
                        nxt.append(pkt)
                    else:
                        nxt.append(Packet(pkt.time, direction, "modified", data, 0, self.mode))
            items = nxt
        return [p.data for p in items]


def _normalize(result: Any, pkt: Packet, hook: Hook, direction: str) -> list[bytes]:
    if result is None:
        return [pkt.data]
    if isinstance(result, (list, tuple)):
        return [_one(r, hook, direction) for r in result]
    return [_one(result, hook, direction)]


def _one(item: Any, hook: Hook, direction: str) -> bytes:
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if is_scapy_packet(item):
        return bytes(item)
    if isinstance(item, Packet):
        return item.data
    raise HookError(
        f"hook {hook.name} returned {type(item).__name__}: a hook returns None (forward "
        "unchanged), bytes or a scapy packet (forward that instead), or a list of those "
        "([] drops); the packet was dropped",
        hook=hook.name,
        direction=direction,
    )
