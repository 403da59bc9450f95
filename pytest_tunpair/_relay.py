"""The relay: the userspace "MAC+PHY" between the two devices, in one background thread.

One thread serves both directions with ``poll()``: a blocked ``read()`` on a TUN fd is not
woken by ``close()`` from another thread (docs/internals.md, "A blocked read() is not woken
by close()"), so the loop also polls a wake-up
pipe, and one thread keeps the hot path free of hand-offs between threads.

Fast path (no hook, no impairment on that direction): read a batch, record it, write it to
the other device (recording first: see ``_drain``). It always runs in the relay thread.

Slow path, per direction:

* **hooks** run in a worker thread of their own for that direction, started when the first
  hooked packet arrives. The relay thread reads the packet, queues it to the worker and goes
  back to ``poll()``; the worker runs the hook chain and hands the result back (a queue and
  the wake-up pipe). So a hook that blocks holds up only the packets that go through it:
  the other direction keeps flowing, and a hook may even wait on the capture. The worker's
  backlog is bounded: beyond it the relay stops reading that device, and the kernel's
  device queue (``txqueuelen``) pushes back as a slow link would. Once a direction has a
  backlog, every packet of it goes through the worker (hooked or not) so that removing a
  hook never lets later packets overtake earlier ones.
* **impairments** (``_impair.ImpairmentEngine``, pure logic, owned by the relay thread) run
  after the hooks. Delayed packets wait in a timer heap that bounds the ``poll()`` timeout:
  nothing ever sleeps, so a delay on one direction never holds up the other.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import math
import os
import queue
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import _linux
from ._capture import Capture, Packet, Stats
from ._errors import HookError
from ._validate import is_scapy_packet

if TYPE_CHECKING:
    from ._device import TunDevice
    from ._impair import Emit, ImpairmentEngine

__all__ = ["Hook", "Relay"]

# Read size: big enough for a 64 KB GSO super-packet plus Ethernet and virtio-net headers,
# and under glibc's 128 KiB mmap threshold (docs/internals.md, "Read size: under glibc's mmap
# threshold": 256 KiB reads mmap a buffer on every call from a non-main thread: 10x slower).
READ_SIZE = 65536 + 256
# Packets drained from one device before looking at the other: fairness between directions.
BURST = 64
# Packets a direction's hook worker may have queued before the relay stops reading that
# device (the kernel's own queue then holds, and beyond txqueuelen drops, as a link would).
MAX_BACKLOG = 512
# Errors kept for the test thread; a hook failing on every packet of a bulk transfer must
# not hold thousands of tracebacks (and the frames they reference).
MAX_ERRORS = 20
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
# When a hook and the impairment engine both label a packet, the capture keeps the label
# that says most about what the receiver got.
_RANK = {
    a: i
    for i, a in enumerate(
        ("forwarded", "delayed", "reordered", "duplicated", "modified", "corrupted", "lost")
    )
}


def _merge(hook_action: str, engine_action: str) -> str:
    return hook_action if _RANK[hook_action] >= _RANK[engine_action] else engine_action


class Hook:
    """A registered hook; ``remove_hook`` takes this handle.

    A hook never runs concurrently with itself: one registered for both directions is
    called from both directions' workers, one call at a time (``lock``).
    """

    __slots__ = ("direction", "fn", "lock", "name", "where")

    def __init__(self, fn: Callable[[Packet], Any], direction: str | None) -> None:
        self.fn = fn
        self.direction = direction
        self.name: str = getattr(fn, "__qualname__", None) or repr(fn)
        code = getattr(fn, "__code__", None)
        self.where = f"{os.path.basename(code.co_filename)}:{code.co_firstlineno}" if code else "?"
        self.lock = threading.Lock()

    def __str__(self) -> str:
        return f"{self.name} ({self.where})"

    def __repr__(self) -> str:
        return f"<Hook {self.name} at {self.where} direction={self.direction or 'both'}>"


# What a worker hands back: (direction, packet as read, outputs or None, error or None).
# An output is (bytes, action); [] means "dropped by the hooks".
_Result = tuple[str, Packet, list[tuple[bytes, str]] | None, "_HookFailure | None"]


class _HookFailure:
    """A hook raised or returned something unusable; the relay thread turns it into a
    :class:`HookError` once it has recorded the dropped packet (and knows its number)."""

    __slots__ = ("exc", "hook", "packet", "what")

    def __init__(self, hook: Hook, what: str, exc: BaseException | None, packet: Packet) -> None:
        self.hook = hook
        self.what = what
        self.exc = exc
        # Decoded here, in the worker: the first scapy import can take a second or more,
        # which must not stall the relay thread.
        try:
            self.packet = packet.scapy.summary()
        except Exception:
            self.packet = f"{packet.wire_len} bytes"


class _HookWorker:
    """Runs the hook chain for one direction in its own thread."""

    def __init__(self, relay: Relay, direction: str) -> None:
        self.relay = relay
        self.direction = direction
        self.inbox: queue.SimpleQueue[tuple[Packet, tuple[Hook, ...]] | None] = queue.SimpleQueue()
        self.current: Hook | None = None
        self.stopping = False
        self.thread = threading.Thread(
            target=self._main, name=f"{relay.name}-hooks-{direction}", daemon=True
        )
        self.thread.start()

    def _main(self) -> None:
        relay = self.relay
        while True:
            item = self.inbox.get()
            if item is None:
                return
            pkt, hooks = item
            if self.stopping:  # the pair is closing: hand it back unprocessed
                relay.done.append((self.direction, pkt, None, None))
                continue
            outputs, failure = self._run(hooks, pkt)
            relay.done.append((self.direction, pkt, outputs, failure))
            relay.wake()

    def _run(
        self, hooks: tuple[Hook, ...], original: Packet
    ) -> tuple[list[tuple[bytes, str]] | None, _HookFailure | None]:
        items: list[Packet] = [original]
        for hook in hooks:
            nxt: list[Packet] = []
            for pkt in items:
                self.current = hook
                try:
                    with hook.lock:
                        result = hook.fn(pkt)
                    datas = _normalize(result, pkt)
                except _BadReturn as exc:
                    return None, _HookFailure(hook, str(exc), None, pkt)
                # BaseException: pytest.fail() in a hook raises one, and must not kill us.
                except BaseException as exc:
                    what = f"raised {type(exc).__name__}: {exc}"
                    return None, _HookFailure(hook, what, exc, pkt)
                finally:
                    self.current = None
                for data in datas:
                    if data is pkt.data:
                        nxt.append(pkt)
                    else:
                        nxt.append(Packet(pkt.time, pkt.direction, "modified", data, 0, pkt.mode))
            items = nxt
        return _label(original.data, [p.data for p in items]), None


class _BadReturn(Exception):
    pass


def _normalize(result: Any, pkt: Packet) -> list[bytes]:
    if result is None:
        return [pkt.data]
    if isinstance(result, (list, tuple)):
        return [_one(r, pkt) for r in result]
    return [_one(result, pkt)]


def _one(item: Any, pkt: Packet) -> bytes:
    if item is None:  # inside a list: "this packet, unchanged" (so [None, None] duplicates)
        return pkt.data
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, Packet):
        return item.data
    if is_scapy_packet(item):
        try:
            return bytes(item)
        except Exception as exc:
            raise _BadReturn(
                f"returned a scapy packet that scapy cannot build ({type(exc).__name__}: {exc})"
            ) from exc
    raise _BadReturn(
        f"returned {type(item).__name__} {_short_repr(item)}: a hook returns None (forward "
        "unchanged), bytes or a scapy packet (forward that instead), or a list/tuple of "
        "those ([] drops the packet, two items duplicate it)"
    )


def _short_repr(obj: object) -> str:
    r = repr(obj)
    return r if len(r) <= 60 else r[:57] + "..."


def _label(original: bytes, outputs: list[bytes]) -> list[tuple[bytes, str]]:
    """Actions for what the hooks made of one packet: the first copy of given bytes is
    "forwarded" (unchanged) or "modified"; any further identical copy is "duplicated"."""
    seen: set[bytes] = set()
    labelled = []
    for data in outputs:
        if data in seen:
            action = "duplicated"
        else:
            action = "forwarded" if data == original else "modified"
            seen.add(data)
        labelled.append((data, action))
    return labelled


class Relay:
    """Carries packets between ``dev_a`` and ``dev_b`` until :meth:`stop`."""

    def __init__(
        self,
        dev_a: TunDevice,
        dev_b: TunDevice,
        capture: Capture,
        stats: Stats,
    ) -> None:
        self.devs = (dev_a, dev_b)
        self.capture = capture
        self.stats = stats
        self.mode = dev_a.mode
        self.name = f"tunpair-relay-{dev_a.name}-{dev_b.name}"
        self.errors: list[BaseException] = []
        self.errors_dropped = 0
        self._errors_lock = threading.Lock()
        # Copy-on-write tuples: the relay reads them without a lock, the test thread swaps.
        self.hooks: dict[str, tuple[Hook, ...]] = {"a->b": (), "b->a": ()}
        # Owned by the relay thread; the test thread asks for changes with set_engine().
        self.engines: dict[str, ImpairmentEngine | None] = {"a->b": None, "b->a": None}
        self._engine_swaps: dict[str, ImpairmentEngine | None] = {}
        self._swap_lock = threading.Lock()
        self._timers: list[tuple[float, int, int, bytes, str, str]] = []
        self._tseq = itertools.count()
        self._workers: dict[str, _HookWorker] = {}
        self._backlog = {"a->b": 0, "b->a": 0}
        self._paused: set[str] = set()
        self.done: deque[_Result] = deque()
        self._syncs: list[threading.Event] = []
        self._poller: Any = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False
        self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)

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
        except OSError:
            pass  # stopped already (fd closed): nothing to wake

    def set_engine(self, direction: str, engine: ImpairmentEngine | None) -> None:
        """Replace a direction's impairment engine (``None``: no impairment).

        The relay thread makes the swap before it reads another packet, and first releases
        what the old engine still holds (a packet held back for reordering), so changing or
        switching off impairments never loses a packet.
        """
        with self._swap_lock:
            self._engine_swaps[direction] = engine
        self.wake()

    def sync(self, timeout: float) -> bool:
        """Wait until the relay has read what the devices hold and the hook workers have
        handed back every packet: errors of hooks that already saw a packet are then in
        :attr:`errors`. False if that took longer than ``timeout`` (a slow hook)."""
        if not self._workers or not self._thread.is_alive():
            return True  # without hooks, nothing is in flight that could fail
        event = threading.Event()
        with self._swap_lock:
            self._syncs.append(event)
        self.wake()
        return event.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop and the hook workers and join them.

        Packets still in flight (delayed, held for reordering, or waiting for a hook) are
        not written: the receivers are going away with the namespace. They are recorded as
        ``"dropped"`` and counted in the stats.
        """
        if self._wake_w < 0:
            return
        self._stopping = True
        self.wake()
        if self._thread.ident is not None:
            self._thread.join(timeout)
        if self._thread.is_alive():  # pragma: no cover - the loop itself never blocks
            self._add_error(
                RuntimeError(f"relay thread {self.name} did not stop within {timeout} s")
            )
            return  # keep the fds: the thread may still use them
        deadline = time.monotonic() + timeout
        for worker in self._workers.values():
            worker.stopping = True
            worker.inbox.put(None)
        for direction, worker in self._workers.items():
            worker.thread.join(max(0.0, deadline - time.monotonic()))
            if worker.thread.is_alive():
                stuck = worker.current
                what = f"hook {stuck}" if stuck else "a hook"
                self._add_error(
                    HookError(
                        f"{what} on {direction} did not return within {timeout:g} s of the "
                        "pair closing; its thread was left behind. A hook must return "
                        "(hooks run while the test runs: do not block in one forever).",
                        hook=stuck.name if stuck else "?",
                        direction=direction,
                    )
                )
        self._discard_in_flight()
        # -1 before closing: a hook left running may still call wake(), and must not write
        # into whatever file reuses the descriptor number.
        wake_r, wake_w = self._wake_r, self._wake_w
        self._wake_r = self._wake_w = -1
        os.close(wake_r)
        os.close(wake_w)

    def _add_error(self, exc: BaseException) -> None:
        with self._errors_lock:
            if len(self.errors) < MAX_ERRORS:
                self.errors.append(exc)
            else:
                self.errors_dropped += 1

    def take_errors(self) -> list[BaseException]:
        with self._errors_lock:
            errors, self.errors = self.errors, []
            more, self.errors_dropped = self.errors_dropped, 0
        if errors and (more or len(errors) > 1):
            errors[0].add_note(
                f"(the relay hit {len(errors) + more - 1} more error(s) after this one)"
            )
        return errors

    # -- the loop (relay thread) -------------------------------------------------------------
    def _main(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # never die silently: the test thread re-raises it
            exc.add_note(f"(raised in relay thread {self.name})")
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
        self._poller = poller = select.poll()
        poller.register(fd_a, select.POLLIN)
        poller.register(fd_b, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        routes = {
            fd_a: (dev_a, dev_b, "a->b", self.stats.counters["a->b"]),
            fd_b: (dev_b, dev_a, "b->a", self.stats.counters["b->a"]),
        }
        wake_r = self._wake_r
        while not self._stopping:
            events = poller.poll(self._timeout_ms())
            # Engine swaps first: one asked for before a packet was sent applies to it.
            if self._engine_swaps:
                self._apply_swaps()
            for fd, _ev in events:
                if fd == wake_r:
                    try:
                        os.read(wake_r, 4096)
                    except BlockingIOError:
                        pass
                    continue
                src, dst, direction, counters = routes[fd]
                self._drain(src, dst, direction, counters)
            # After the pipe was emptied, so a result queued meanwhile wakes the next poll.
            if self.done:
                self._process_done()
            if self._timers or self.engines["a->b"] or self.engines["b->a"]:
                self._run_timers()
            if self._syncs and not (self._backlog["a->b"] or self._backlog["b->a"]):
                with self._swap_lock:
                    syncs, self._syncs = self._syncs, []
                for event in syncs:
                    event.set()

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
        hdr = src.hdr_len
        mode = self.mode
        t0 = self.capture.t0
        hooks = self.hooks[direction]
        # After the last hook goes, packets still with the worker finish first, in order.
        hooked = bool(hooks) or self._backlog[direction] > 0
        engine = self.engines[direction]
        if hooked or engine is not None:
            for _ in range(BURST):
                if hooked and self._backlog[direction] >= MAX_BACKLOG:
                    self._pause(direction, src_fd)
                    return
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
                now = monotonic()
                if hooked:
                    pkt = Packet(now - t0, direction, "forwarded", buf, hdr, mode)
                    self._to_worker(pkt, hooks)
                    continue
                data = buf[hdr:]
                self._deliver(direction, data, [(data, "forwarded")], buf[:hdr], now, c)
            return
        record_many = self.capture.record_many
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

    # -- slow path: hooks (worker threads) ---------------------------------------------------
    def _to_worker(self, pkt: Packet, hooks: tuple[Hook, ...]) -> None:
        direction = pkt.direction
        worker = self._workers.get(direction)
        if worker is None:
            worker = self._workers[direction] = _HookWorker(self, direction)
        self._backlog[direction] += 1
        worker.inbox.put((pkt, hooks))

    def _pause(self, direction: str, fd: int) -> None:
        if direction not in self._paused:
            self._poller.modify(fd, 0)
            self._paused.add(direction)

    def _process_done(self) -> None:
        done = self.done
        counters = self.stats.counters
        while done:
            direction, pkt, outputs, failure = done.popleft()
            self._backlog[direction] -= 1
            c = counters[direction]
            now = time.monotonic()
            if not outputs:  # dropped by a hook, or a hook failed
                c[2] += 1
                rec = Packet(
                    now - self.capture.t0, direction, "dropped", pkt._raw, pkt._off, self.mode
                )
                self.capture.record(rec)
                if failure is not None:
                    self._add_error(_hook_error(failure, rec))
                continue
            self._deliver(direction, pkt.data, outputs, pkt._raw[: pkt._off], now, c)
        for direction in list(self._paused):
            if self._backlog[direction] <= MAX_BACKLOG // 2:
                self._paused.discard(direction)
                src = self.devs[0] if direction == "a->b" else self.devs[1]
                if src.fd is not None:
                    self._poller.modify(src.fd, select.POLLIN)
                    # Packets may have queued in the kernel meanwhile: poll() will say so.

    # -- slow path: impairments (relay thread) -----------------------------------------------
    def _deliver(
        self,
        direction: str,
        original: bytes,
        outputs: list[tuple[bytes, str]],
        vnet: bytes,
        now: float,
        c: list[int],
    ) -> None:
        """Write what the hooks produced, through the direction's engine if it has one.

        ``vnet`` is the virtio-net header ``original`` came with; it is kept only for
        unchanged bytes, since it may say "checksum still to do" or "GSO" about them.
        """
        dst = self.devs[1] if direction == "a->b" else self.devs[0]
        zero = _linux.ZERO_VNET_HDR if dst.hdr_len else b""
        engine = self.engines[direction]
        t = now - self.capture.t0
        for payload, action in outputs:
            frame_hdr = vnet if payload == original else zero
            if engine is None:
                self._send(dst, frame_hdr + payload, t, direction, action, c)
                continue
            for emit in engine.submit(payload, now):
                self._emit(emit, payload, frame_hdr, dst, now, direction, action, c)

    def _emit(
        self,
        emit: Emit,
        payload: bytes,
        frame_hdr: bytes,
        dst: TunDevice,
        now: float,
        direction: str,
        hook_action: str,
        c: list[int],
    ) -> None:
        if emit.data is not payload and emit.data != payload:  # corrupted: header invalid
            frame_hdr = _linux.ZERO_VNET_HDR if dst.hdr_len else b""
        frame = frame_hdr + emit.data
        action = _merge(hook_action, emit.action)
        if emit.due is None:  # lost
            c[2] += 1
            self.capture.record(
                Packet(now - self.capture.t0, direction, action, frame, dst.hdr_len, self.mode)
            )
            return
        if emit.due <= now:
            self._send(dst, frame, now - self.capture.t0, direction, action, c)
            return
        index = 0 if dst is self.devs[0] else 1
        heapq.heappush(self._timers, (emit.due, next(self._tseq), index, frame, direction, action))

    def _apply_swaps(self) -> None:
        with self._swap_lock:
            swaps, self._engine_swaps = self._engine_swaps, {}
        for direction, engine in swaps.items():
            old = self.engines[direction]
            self.engines[direction] = engine
            if old is not None:
                # Release what the old engine held back (reorder): with their own due
                # times, through the timer heap, so switching impairments off loses nothing.
                self._expire(direction, old, math.inf)

    def _expire(self, direction: str, engine: ImpairmentEngine, now: float) -> None:
        dst = self.devs[1] if direction == "a->b" else self.devs[0]
        zero = _linux.ZERO_VNET_HDR if dst.hdr_len else b""
        c = self.stats.counters[direction]
        t = time.monotonic()
        for emit in engine.expire(now):
            self._emit(emit, emit.data, zero, dst, t, direction, "forwarded", c)

    def _run_timers(self) -> None:
        now = time.monotonic()
        for direction, engine in self.engines.items():
            if engine is not None:
                d = engine.deadline()
                if d is not None and d <= now:
                    self._expire(direction, engine, now)
        timers = self._timers
        while timers and timers[0][0] <= now:
            _due, _seq, index, frame, direction, action = heapq.heappop(timers)
            self._send(
                self.devs[index],
                frame,
                now - self.capture.t0,
                direction,
                action,
                self.stats.counters[direction],
            )

    def _send(
        self, dst: TunDevice, frame: bytes, t: float, direction: str, action: str, c: list[int]
    ) -> None:
        # Record first, for the same reason as in _drain.
        hdr = dst.hdr_len
        size = len(frame) - hdr
        c[0] += 1
        c[1] += size
        pkt = Packet(t, direction, action, frame, hdr, self.mode)
        self.capture.record(pkt)
        fd = dst.fd
        try:
            if fd is None:
                raise OSError(errno.EBADFD, "device closed")
            os.write(fd, frame)
        except OSError as exc:
            if exc.errno not in _DROP_ERRNOS:
                raise
            c[0] -= 1
            c[1] -= size
            c[2] += 1
            pkt.action = "dropped"

    def _discard_in_flight(self) -> None:
        """At stop (threads joined): record what never reached the other device."""
        t = time.monotonic() - self.capture.t0
        counters = self.stats.counters
        leftovers: list[tuple[str, bytes, int]] = []
        for direction, engine in self.engines.items():
            if engine is not None:
                for emit in engine.expire(math.inf):
                    leftovers.append((direction, emit.data, 0))
        for _due, _seq, index, frame, direction, _action in sorted(self._timers):
            leftovers.append((direction, frame, self.devs[index].hdr_len))
        self._timers.clear()
        for direction, pkt, outputs, failure in self.done:
            if failure is not None:
                self._add_error(_hook_error(failure, pkt))
            for data, _a in outputs or [(pkt.data, "")]:
                leftovers.append((direction, data, 0))
        self.done.clear()
        for worker in self._workers.values():
            while True:
                try:
                    item = worker.inbox.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    leftovers.append((item[0].direction, item[0].data, 0))
        for direction, frame, off in leftovers:
            counters[direction][2] += 1
            self.capture.record(Packet(t, direction, "dropped", frame, off, self.mode))


def _hook_error(failure: _HookFailure, rec: Packet) -> HookError:
    err = HookError(
        f"hook {failure.hook} {failure.what} -- on {rec.direction} packet #{rec.seq} "
        f"at t={rec.time:.6f} ({failure.packet}); the relay dropped that packet and kept "
        "running",
        hook=failure.hook.name,
        direction=rec.direction,
    )
    if failure.exc is not None:
        err.__cause__ = failure.exc
    return err
