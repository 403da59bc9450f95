"""The relay: the userspace "MAC+PHY" between the two devices, in one background thread.

One thread serves both directions with ``poll()``: a blocked ``read()`` on a TUN fd is not
woken by ``close()`` from another thread (docs/internals.md, "A blocked read() is not woken
by close()"), so the loop also polls a wake-up pipe, and one thread keeps the hot path free
of hand-offs between threads. Each direction is a :class:`~pytest_tunpair._link.link.Link`
holding everything it owns; the loop's one timeout is the earliest of the links'
deadlines, waited for with a timerfd (``_timer``) so that sub-millisecond delays are kept.

Fast path (nothing configured on that direction): read a batch, then record and write it
in one critical section (see ``_service``). It always runs in the relay thread.

Slow path, per packet, in the stages of ``_link``: divert, hooks, rules, engine, queue,
timers. What is ready goes out at the end of a burst, recorded and written under one lock
(``_flush``), so what a reader sees of a packet never changes afterwards.

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
  after the hooks and rules; then the link's **queue** (``queue.PacketQueue``: the bound,
  the discipline, ``rate`` and the propagation delay) holds what it must. Packets wait in
  the queue or on their link's timer heap: nothing ever sleeps, so a delay on one
  direction never holds up the other.
"""

from __future__ import annotations

import errno
import io
import math
import os
import queue
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._errors import HookError
from .._kernel.threads import QuickThread, own_thread
from .._kernel.timer import Timer, set_timer_slack
from .._packets.capture import Capture
from .._packets.packet import Packet, PacketBatch, SegmentGroup
from .._wire import gso as _gso
from .._wire.ecn import ecn_codepoint
from .._wire.numbers import ECN_CE, ECN_ECT0, ECN_ECT1
from . import core as _fast
from .counters import Stats
from .hooks import Hook, HookFailure, HookWorker, Result
from .impair import RUN_LOST, RUN_MARK
from .link import Divert, Item, Link, Queue, Rule, Run
from .queue import PacketQueue

if TYPE_CHECKING:
    from .impair import Emit, ImpairmentEngine
    from .link import _Device

__all__ = ["Hook", "Relay"]

# Read size: big enough for a 64 KB GSO super-packet plus Ethernet and virtio-net headers,
# and under glibc's 128 KiB mmap threshold (docs/internals.md, "Read size: under glibc's mmap
# threshold": 256 KiB reads mmap a buffer on every call from a non-main thread: 10x slower).
READ_SIZE = 65536 + 256
# Packets read from one device before looking at the other: fairness between directions.
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
        (
            "forwarded",
            "delayed",
            "reordered",
            "marked",
            "duplicated",
            "modified",
            "corrupted",
            "lost",
        )
    )
}


def _merge(hook_action: str, engine_action: str) -> str:
    return hook_action if _RANK[hook_action] >= _RANK[engine_action] else engine_action


# What the relay thread does with a packet at flush time (see Relay._flush).
_WRITE = 0  # write to the link's destination; count it delivered (or dropped if that fails)
_REPLY = 1  # write back into the link's source (a rule's reply), recorded as "injected"
_DROP = 2  # record only; count it dropped
_TAKEN = 3  # record only; count it delivered (taken by the divert function)
_INJECT = 4  # write to the link's destination, recorded as given (Relay.write); not counted
_REPLACED = 5  # record only; not counted (a rule forwarded other frames in its place)

_Out = tuple[Item, bytes | None, Link, int]

# The C core's action codes, as the capture names them.
_CORE_ACTIONS = ("forwarded", "delayed", "dropped")

#: Frames of each device's arrival-stamp ring (256 bytes each: 512 KB), the packets that
#: can wait in a device's queue with their stamps kept; more (a saturated direction) keep
#: their read times (_core.c, "Arrival times").
STAMP_FRAMES = 2048

#: The relay thread's kernel name (``/proc/self/task/TID/comm``: ``top -H``, and how the
#: benchmarks find it; Python's ``threading.enumerate()`` does not list it).
RELAY_COMM = "tunpair-relay"


def _stamp_index(dev: Any) -> int:
    """The device's index for the core's arrival stamps, which it opens in the relay
    thread's namespace -- this thread's, which starts it: 0 (no stamps) for a device
    elsewhere (another host of the topology) or a stand-in without one."""
    inode = getattr(dev, "netns_inode", None)
    if inode is None or inode != os.stat("/proc/thread-self/ns/net").st_ino:
        return 0
    return int(dev.index)


class Relay:
    """Carries packets between ``dev_a`` and ``dev_b`` until :meth:`stop`.

    ``dev_a``/``dev_b`` need ``fd``, ``name``, ``mode`` and ``hdr_len`` (a ``TunDevice``;
    the unit tests pass socket stand-ins), and may have ``index`` and ``netns_inode`` (for
    the core's arrival stamps). The methods below are how other modules and
    threads change what the relay does; the fields are the relay thread's.
    """

    def __init__(self, dev_a: _Device, dev_b: _Device, capture: Capture, stats: Stats) -> None:
        if dev_a.fd is None or dev_b.fd is None:
            raise ValueError("the relay needs two open devices")
        self._fds = (dev_a.fd, dev_b.fd)
        self.capture = capture
        self.stats = stats
        self.mode = dev_a.mode
        self.name = f"tunpair-relay-{dev_a.name}-{dev_b.name}"
        self.errors: list[BaseException] = []
        self.errors_dropped = 0
        self._errors_lock = threading.Lock()
        self.links: dict[str, Link] = {
            "a->b": Link("a->b", dev_a, dev_b, stats.counters["a->b"]),
            "b->a": Link("b->a", dev_b, dev_a, stats.counters["b->a"]),
        }
        self._sides = {"a": self.links["b->a"], "b": self.links["a->b"]}
        self._pair = (self.links["a->b"], self.links["b->a"])
        # Changes the relay thread applies before it reads another packet:
        # ("engine" | "queue" | "split", direction, None) -> the new one (the last asked
        # for wins).
        self._swaps: dict[tuple[str, str, str | None], Any] = {}
        # (direction, class name, the new class or None), applied in the order asked: a
        # class removed and added again goes to the end, wherever the relay was meanwhile.
        self._class_swaps: list[tuple[str, str, Any]] = []
        # Class links taken off their direction that still hold packets (served to the end).
        self._retired: list[Link] = []
        self._swap_lock = threading.Lock()
        # Serialises the test threads' read-modify-write of the copy-on-write tuples.
        self._edit_lock = threading.Lock()
        self.done: deque[Result] = deque()
        self._out: list[_Out] = []
        self._failures: list[tuple[HookFailure, Packet]] = []
        self._syncs: list[threading.Event] = []
        self._idle_waiters: list[threading.Event] = []
        self._poller: Any = None
        # Per device fd: the bound ``read`` of an unbuffered FileIO on it (``_reader``), which
        # returns None when the device is empty where os.read raises BlockingIOError: the
        # read that ends every batch makes no exception (~1 us a packet at low rates).
        self._readers: dict[int, Callable[[int], bytes | None]] = {}
        try:
            self._timer: Timer | None = Timer()
        except OSError:  # pragma: no cover - timerfd exists since Linux 2.6.25
            self._timer = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # The C core (_core.c) runs the loop while both directions are plain or only
        # delayed; its records come in through the capture's lock (_pull_core).
        self._core: Any = None
        core = _fast.load()
        if core is not None and dev_a.hdr_len == dev_b.hdr_len:
            self._core = core.Core(
                dev_a.fd,
                dev_b.fd,
                self._wake_r,
                dev_a.hdr_len,
                capture.t0,
                index_a=_stamp_index(dev_a),
                index_b=_stamp_index(dev_b),
                stamp_frames=STAMP_FRAMES,
            )
            capture.set_source(self._pull_core, self._core_waiters)
        # Arrival stamps asked for, per direction, and the threads setting them up.
        self._stamps_asked = [False, False]
        self._stampers: list[threading.Thread] = []
        self._stopping = False
        # Started without waiting for it (QuickThread): it is the set-up's last step.
        self._thread = QuickThread(self._main, self.name, comm=RELAY_COMM)

    # -- control (any thread) ----------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        """The relay thread is running."""
        return self._thread.is_alive()

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # a wake-up is already pending
        except OSError:
            pass  # stopped already (fd closed): nothing to wake

    def _leave_core(self) -> None:
        """After a change that the C core cannot carry out (a hook, a rule, a divert, a
        swap): return once the core has stopped relaying, so that no packet read after the
        change passes without it. The relay thread then runs the Python loop, which sees
        the change before it reads another packet."""
        core = self._core
        if core is None or threading.get_ident() == self._thread.ident:
            self.wake()
            return
        # A return, not "not running": the loop may enter the core again before it reads
        # the pipe (then the core returns at once, having read nothing).
        exits = core.exits
        self.wake()
        deadline = time.monotonic() + 1.0  # the core returns within a batch's writes
        while core.running and core.exits == exits and time.monotonic() < deadline:
            time.sleep(0.0001)

    def _links(self, direction: str | None) -> tuple[Link, ...]:
        if direction is None:
            return tuple(self.links.values())
        return (self.links[direction],)

    def add_hook(self, hook: Hook) -> None:
        """Run ``hook`` on its direction(s) (``hook.direction``; ``None``: both), after the
        hooks already there. Packets read from now on go through it."""
        with self._edit_lock:
            for link in self._links(hook.direction):
                link.hooks = (*link.hooks, hook)
        self._leave_core()

    def remove_hook(self, hook: Hook) -> bool:
        """Stop running ``hook``; False if it was not registered. Packets already handed to
        the hook worker still pass through it, in order; later ones do not (and never
        overtake them)."""
        found = False
        with self._edit_lock:
            for link in self.links.values():
                if hook in link.hooks:
                    link.hooks = tuple(h for h in link.hooks if h is not hook)
                    found = True
        return found

    def hooks(self, direction: str) -> tuple[Hook, ...]:
        """The hooks of ``direction``, in the order they run."""
        return self.links[direction].hooks

    def add_rule(self, direction: str, rule: Rule) -> None:
        """Run ``rule.apply(pkt, now)`` on each packet of ``direction`` after the hooks and
        before the impairment engine (see :class:`~pytest_tunpair._link.link.Verdict`)."""
        with self._edit_lock:
            link = self.links[direction]
            link.rules = (*link.rules, rule)
        self._leave_core()

    def remove_rule(self, direction: str, rule: Rule) -> bool:
        """Stop applying ``rule`` to ``direction``; False if it was not there."""
        with self._edit_lock:
            link = self.links[direction]
            if rule not in link.rules:
                return False
            link.rules = tuple(r for r in link.rules if r is not rule)
            return True

    def rules(self, direction: str) -> tuple[Rule, ...]:
        return self.links[direction].rules

    def set_divert(self, direction: str, fn: Divert | None) -> None:
        """Offer every packet read on ``direction`` to ``fn`` first (relay thread, before
        the hooks): ``True`` means taken -- recorded as ``"scripted"``, counted as
        delivered, not written to the other device. ``None`` stops diverting."""
        self.links[direction].divert = fn
        if fn is not None:
            self._leave_core()

    def link_needs_segments(self, direction: str) -> bool:
        """A stage of ``direction`` that must see wire-sized packets is set (hooks, rules,
        divert): the pair then turns offload off."""
        return self.links[direction].wants_segments()

    def set_engine(self, direction: str, engine: ImpairmentEngine | None) -> None:
        """Replace a direction's impairment engine (``None``: no impairment).

        The relay thread makes the swap before it reads another packet, and first releases
        what the old engine still holds (a packet held back for reordering), so changing or
        switching off impairments never loses a packet.
        """
        with self._swap_lock:
            self._swaps["engine", direction, None] = engine
        self._leave_core()

    def set_split(self, direction: str, split: bool) -> None:
        """Decide per wire packet on ``direction`` (``True``): GSO super-packets are split
        into their segments before the engine and the queue. Applied with the engine and
        queue swaps asked for before it, before the next packet is read."""
        with self._swap_lock:
            self._swaps["split", direction, None] = split
        self._leave_core()

    def set_queue(self, direction: str, queue: Queue | None) -> None:
        """Replace a direction's bottleneck queue (``None``: none). As with
        :meth:`set_engine`, what the old queue holds is released, not lost."""
        with self._swap_lock:
            self._swaps["queue", direction, None] = queue
        self._leave_core()

    def set_class(
        self,
        direction: str,
        name: str,
        match: Callable[[Packet], object],
        engine: ImpairmentEngine | None,
        queue: Queue | None,
        split: bool,
    ) -> None:
        """Give the packets of ``direction`` that ``match`` takes (after the rules, before
        the engine) a link of their own: ``engine``, ``queue``, per-segment or not,
        counted under ``stats[direction]["classes"][name]``. A class of that name is
        replaced in place (what its old engine and queue hold is released, as with
        :meth:`set_engine`); a new one goes after the others."""
        with self._swap_lock:
            self._class_swaps.append((direction, name, (match, engine, queue, split)))
        self._leave_core()

    def remove_class(self, direction: str, name: str) -> None:
        """Take class ``name`` off ``direction``: its packets get the direction's own link
        again; what it holds is served to the end."""
        with self._swap_lock:
            self._class_swaps.append((direction, name, None))
        self._leave_core()

    def class_names(self, direction: str) -> tuple[str, ...]:
        """The classes on ``direction`` now, in the order they are tried."""
        return tuple(c.name or "" for c in self.links[direction].classes)

    def queued(self, direction: str, name: str | None = None) -> int:
        """Packets ``direction``'s queue (or its class ``name``'s) holds now (0 without
        one); any thread may ask."""
        link = self.links[direction]
        if name is not None:
            link = next((c for c in link.classes if c.name == name), link)
            if link.name != name:
                return 0
        queue = link.queue
        return len(queue) if queue is not None else 0

    def _all_links(self) -> list[Link]:
        """Every link with something to run: the directions', their classes', retired ones."""
        out: list[Link] = []
        for link in self.links.values():
            out.append(link)
            out.extend(link.classes)
        out.extend(self._retired)
        return out

    def pending(self) -> int:
        """Packets held anywhere in the relay now: with a hook worker, in an engine or a
        queue, on a delay timer. (Packets still in a device's own queue are not counted.)"""
        held = sum(link.pending() for link in self._all_links())
        return held + self._core.pending if self._core is not None else held

    def wait_idle(self, timeout: float) -> bool:
        """Wait, while the relay runs, until :meth:`pending` is 0; False after ``timeout``
        seconds with packets still held (or if the relay is not running)."""
        if not self._thread.is_alive():
            return self.pending() == 0
        if not self._swaps and not self._retired and all(x.plain() for x in self._pair):
            # Nothing configured: the relay writes what it reads in the same pass and holds
            # nothing between passes (a test's teardown need not wait for one).
            return True
        event = threading.Event()
        with self._swap_lock:
            self._idle_waiters.append(event)
        self.wake()
        return event.wait(timeout)

    def write(
        self, side: str, frame: bytes, action: str = "injected", *, vnet_hdr: bytes | None = None
    ) -> Packet:
        """Write ``frame`` (without virtio-net header) into device ``"a"`` or ``"b"``: that
        device's kernel receives it. Any thread may call it.

        The packet is recorded in the direction that enters ``side`` (``"b->a"`` for
        ``"a"``) before the write, in one critical section with it: the kernel's answer,
        which the write itself may produce, is recorded after it, and a reader never sees
        the action change. A failed write raises ``OSError``, the record saying
        ``"dropped"``. From the relay thread itself (a divert function), the frame goes out
        with the packets being processed, in order, and a failure only shows as
        ``"dropped"``. ``vnet_hdr`` replaces the all-zero virtio-net header (a GSO
        super-packet for the kernel to receive whole, as a NIC's GRO would hand it up).
        """
        link = self._sides[side]
        dev = link.dst
        hdr = dev.hdr_len
        if vnet_hdr is not None and len(vnet_hdr) != hdr:
            raise ValueError(
                f"{dev.name} takes no virtio-net header of {len(vnet_hdr)} bytes (it has "
                f"{hdr}): GSO super-packets need the pair's offload option on"
            )
        raw = (vnet_hdr or _gso.ZERO_VNET_HDR) + frame if hdr else frame
        capture = self.capture
        pkt = Packet(0.0, link.direction, action, raw, hdr, self.mode)
        if threading.get_ident() == self._thread.ident:
            # From the relay thread (a divert function or a rule answering a packet): queued
            # behind what the relay is about to record -- the packet being answered -- and
            # written with it, so an answer never precedes its request in the capture.
            # Made now: its sojourn is the moment until the batch goes out, not since t0.
            pkt.arrival = time.monotonic() - capture.t0
            self._out.append((pkt, raw, link, _INJECT))
            return pkt
        with capture.lock:
            pkt.time = pkt.arrival = time.monotonic() - capture.t0
            capture.record_locked((pkt,))
            try:
                fd = dev.fd
                if fd is None:
                    raise OSError(errno.EBADFD, f"{dev.name} is closed")
                os.write(fd, raw)
            except OSError:
                pkt.action = "dropped"
                raise
        return pkt

    def sync(self, timeout: float) -> bool:
        """Wait until the relay has read what the devices hold and the hook workers have
        handed back every packet: errors of hooks that already saw a packet are then in
        :attr:`errors`. False if that took longer than ``timeout`` (a slow hook)."""
        if not any(link.worker for link in self.links.values()) or not self._thread.is_alive():
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
        if self._thread.ident is not None:  # started
            self._thread.join(timeout)
        if self._thread.is_alive():  # pragma: no cover - the loop itself never blocks
            self._add_error(
                RuntimeError(f"relay thread {self.name} did not stop within {timeout} s")
            )
            return  # keep the fds: the thread may still use them
        deadline = time.monotonic() + timeout
        workers = [link.worker for link in self.links.values() if link.worker is not None]
        for worker in workers:
            worker.stopping = True
            worker.inbox.put(None)
        for worker in workers:
            worker.thread.join(max(0.0, deadline - time.monotonic()))
            if worker.thread.is_alive():
                stuck = worker.current
                what = f"hook {stuck}" if stuck else "a hook"
                self._add_error(
                    HookError(
                        f"{what} on {worker.direction} did not return within {timeout:g} s "
                        "of the pair closing; its thread was left behind. A hook must return "
                        "(hooks run while the test runs: do not block in one forever).",
                        hook=stuck.name if stuck else "?",
                        direction=worker.direction,
                    )
                )
        self._discard_in_flight()
        for stamper in self._stampers:
            stamper.join()  # ~15 ms at most (a ring being set up)
        if self._core is not None and self._core.close():
            _fast.release_later(self._core)  # its arrival-stamp rings: ~15 ms, not here
        # -1 before closing: a hook left running may still call wake(), and must not write
        # into whatever file reuses the descriptor number.
        wake_r, wake_w = self._wake_r, self._wake_w
        self._wake_r = self._wake_w = -1
        os.close(wake_r)
        os.close(wake_w)
        if self._timer is not None:
            self._timer.close()

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
            set_timer_slack()
            self._loop()
        except BaseException as exc:  # never die silently: the test thread re-raises it
            exc.add_note(f"(raised in relay thread {self.name})")
            self._add_error(exc)

    def _deadline(self) -> float | None:
        """The one source of the loop's timeout: the earliest of the links' deadlines."""
        due = None
        a, b = self._pair
        links = self._all_links() if a.classes or b.classes or self._retired else self._pair
        for link in links:
            if link.timers or link.engine is not None or link.queue is not None:
                d = link.deadline()
                if d is not None and (due is None or d < due):
                    due = d
        return due

    def _loop(self) -> None:
        fd_a, fd_b = self._fds
        self._poller = poller = select.poll()
        poller.register(fd_a, select.POLLIN)
        poller.register(fd_b, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        timer = self._timer
        timer_fd = -2
        if timer is not None:
            timer_fd = timer.fd
            poller.register(timer_fd, select.POLLIN)
        routes = {fd_a: self.links["a->b"], fd_b: self.links["b->a"]}
        wake_r = self._wake_r
        monotonic = time.monotonic
        core = self._core
        while not self._stopping:
            if core is not None:
                specs = self._core_specs()
                if specs is not None:
                    # Until something else is asked of the relay (the wake-up pipe).
                    held = core.run(specs[0], specs[1], self._core_size, self._core_notify)
                    if held:
                        self._take_back(held)
            due = self._deadline()
            timeout = -1
            if due is not None:
                wait = due - monotonic()
                if wait <= 0:
                    timeout = 0
                elif timer is not None:
                    timer.arm(due)  # poll() itself would round up to whole milliseconds
                else:  # pragma: no cover - no timerfd
                    timeout = int(wait * 1000 + 0.999)
            events = poller.poll(timeout)
            # Swaps first: one asked for before a packet was sent applies to it.
            if self._swaps or self._class_swaps:
                self._apply_swaps()
            for fd, _ev in events:
                if fd == wake_r:
                    try:
                        os.read(wake_r, 4096)
                    except BlockingIOError:
                        pass
                    continue
                if fd == timer_fd:
                    timer.ack()  # type: ignore[union-attr]
                    continue
                self._service(routes[fd])
            # After the pipe was emptied, so a result queued meanwhile wakes the next poll.
            if self.done:
                self._process_done()
            # Only once something is due: a wake-up for a packet leaves the timers alone
            # (what it made due at once went out with it; the next _deadline() sees the rest).
            if due is not None and due <= monotonic():
                self._run_timers()
            if self._syncs and not any(link.backlog for link in self.links.values()):
                with self._swap_lock:
                    syncs, self._syncs = self._syncs, []
                for event in syncs:
                    event.set()
            if self._idle_waiters and self.pending() == 0:
                with self._swap_lock:
                    waiters, self._idle_waiters = self._idle_waiters, []
                for event in waiters:
                    event.set()

    # -- the C core (relay thread, but _pull_core) ----------------------------------------------
    def _core_specs(self) -> tuple[tuple[float, int, int] | None, ...] | None:
        """Each direction as the core takes it (``None``: plain; ``(delay, limit,
        limit_bytes)``: a queue that only delays), or ``None`` if the Python loop must run:
        anything else is configured, or it holds packets (a hook's, a timer's, a result)."""
        if (
            self._swaps
            or self._class_swaps
            or self._retired
            or self.done
            or self._out
            or self._syncs
            or self._idle_waiters
        ):
            return None
        specs: list[tuple[float, int, int] | None] = []
        for link in self._pair:
            if link.timers or link.held:
                return None  # the Python loop delivers what it holds first
            if link.plain():
                specs.append(None)
                continue
            queue = link.queue
            if (
                link.hooks
                or link.backlog
                or link.engine is not None
                or link.rules
                or link.divert is not None
                or link.classes
                or link.split
                or not isinstance(queue, PacketQueue)
                or len(queue)
                or queue.deadline() is not None
            ):
                return None
            q = queue.queue
            spec = q.spec
            if not q.delays_only or q.delay <= 0:
                return None
            specs.append(
                (
                    q.delay,
                    -1 if spec.limit is None else spec.limit,
                    -1 if spec.limit_bytes is None else spec.limit_bytes,
                )
            )
        self._ask_stamps(specs)
        return tuple(specs)

    def _ask_stamps(self, specs: list[tuple[float, int, int] | None]) -> None:
        """The first time a direction is delayed in the core, set its arrival stamps up on
        a thread of its own (_core.c, "Arrival times": that takes an RCU grace period, ~15
        ms, which the relay thread does not wait for); it wakes the relay when done, and the
        core stamps from its next entry. Started here, the thread is in the relay's
        namespace, as the core's stamp sockets must be."""
        asked = self._stamps_asked
        want = [spec is not None and not a for spec, a in zip(specs, asked, strict=True)]
        if not any(want):
            return
        self._stamps_asked = [a or w for a, w in zip(asked, want, strict=True)]
        core = self._core

        def prepare() -> None:
            core.prepare_stamps(*want)
            self.wake()

        stamper = own_thread(prepare, f"{self.name}-stamps", comm="tunpair-stamps")
        self._stampers.append(stamper)
        stamper.start()

    def _core_size(self, frame: bytes) -> tuple[int, int]:
        """A GSO super-packet's wire bytes and segments, for a delayed direction's bound."""
        return _gso.wire_size(frame, self._pair[0].src.hdr_len, tap=self.mode == "tap")

    def _core_notify(self) -> None:
        """The core recorded packets that a thread waits for, or holds many: taking the
        capture's lock pulls them in, and recording wakes the waiters."""
        with self.capture.lock:
            pass

    def _core_waiters(self, n: int) -> None:
        self._core.waiters = n

    def _pull_core(self) -> None:
        """Record what the core recorded since the last pull, with its counts (the
        capture's lock is held: :class:`~pytest_tunpair._packets.capture.PullLock`)."""
        got = self._core.pull()
        if got is None:
            return
        frames, meta, counts = got
        if meta:
            self.capture.record_locked(
                (
                    PacketBatch(
                        frames,
                        meta,
                        off=self._pair[0].src.hdr_len,
                        mode=self.mode,
                        directions=("a->b", "b->a"),
                        actions=_CORE_ACTIONS,
                    ),
                )
            )
        for link, (packets, nbytes, dropped, peak) in zip(self._pair, counts, strict=True):
            c = link.counters
            c.packets += packets
            c.bytes += nbytes
            c.dropped += dropped
            if peak > c.queue_peak:
                c.queue_peak = peak

    def _take_back(self, held: list[tuple[int, float, float, bytes]]) -> None:
        """The packets the core still held when it returned, onto their links' timers:
        delivered when due by this loop, or recorded dropped at stop."""
        for index, due, arrival, frame in held:
            link = self._pair[index]
            hdr = link.src.hdr_len
            link.schedule(
                due, Packet(arrival, link.direction, "delayed", frame, hdr, self.mode), None
            )

    def _service(self, link: Link) -> None:
        """Move what the link's source has queued (up to ``BURST`` packets) on, recording it.

        Fast path, NAPI-style: read a batch (until the queue is empty, ``BATCH`` packets or
        ``BATCH_BYTES``), then record, write and count the whole batch in one critical
        section under the capture's lock. Recording comes *before* writing because a write
        into a TUN runs the receiving stack in this thread (docs/internals.md, "A write into
        a TUN device wakes the receiver before write() returns"): the receiver -- and the
        test waiting on it -- may wake before ``write()`` returns, and must find the packet
        captured and counted; holding the lock across the writes means that a reader who
        looks meanwhile waits for the batch, and sees every packet with its final action
        (a failed write makes it "dropped"). Per packet: one read, one write, one
        ``Packet`` around the bytes object ``read`` returned, no decoding; only packets
        shorter than ``COPY_BELOW`` are copied, to an exact-size object.
        """
        src_fd, dst_fd = link.src.fd, link.dst.fd
        if src_fd is None or dst_fd is None:
            return
        if not link.plain():
            self._service_slow(link, src_fd)
            return
        read, write, monotonic = self._reader(src_fd), os.write, time.monotonic
        hdr = link.src.hdr_len
        mode = self.mode
        direction = link.direction
        capture = self.capture
        t0 = capture.t0
        lock = capture.lock
        record_locked = capture.record_locked
        c = link.counters
        left = BURST
        while left > 0:
            bufs: list[bytes] = []
            pkts: list[Packet] = []
            size = 0
            empty = False
            while len(bufs) < BATCH and size < BATCH_BYTES:
                try:
                    buf = read(READ_SIZE)
                except OSError as exc:
                    if exc.errno not in _DROP_ERRNOS:
                        raise
                    empty = True
                    break
                if buf is None:  # EAGAIN: the device is empty
                    empty = True
                    break
                if len(buf) < COPY_BELOW:
                    buf = bytes(memoryview(buf))
                bufs.append(buf)
                pkts.append(Packet(monotonic() - t0, direction, "forwarded", buf, hdr, mode))
                size += len(buf)
            if bufs:
                n = len(bufs)
                with lock:
                    record_locked(pkts)
                    for i, buf in enumerate(bufs):
                        try:
                            write(dst_fd, buf)
                        except OSError as exc:
                            if exc.errno not in _DROP_ERRNOS:
                                raise
                            n -= 1
                            size -= len(buf)
                            c.dropped += 1
                            pkts[i].action = "dropped"
                    c.packets += n
                    c.bytes += size - n * hdr
                left -= len(bufs)
            if empty:
                return

    def _reader(self, fd: int) -> Callable[[int], bytes | None]:
        """``read(size)`` of ``fd``: ``None`` when it is empty (see ``_readers``)."""
        read = self._readers.get(fd)
        if read is None:
            read = self._readers[fd] = io.FileIO(fd, "rb", closefd=False).read
        return read

    # -- slow path (relay thread) -------------------------------------------------------------
    def _service_slow(self, link: Link, src_fd: int) -> None:
        """Per packet, through the stages the link has: divert, hooks, rules, engine, queue,
        timers. What is ready now goes out in one critical section at the end."""
        read, monotonic = self._reader(src_fd), time.monotonic
        hdr = link.src.hdr_len
        mode = self.mode
        direction = link.direction
        t0 = self.capture.t0
        for _ in range(BURST):
            if (link.hooks or link.backlog) and link.backlog >= MAX_BACKLOG:
                self._pause(link, src_fd)
                break
            try:
                buf = read(READ_SIZE)
            except OSError as exc:
                if exc.errno in _DROP_ERRNOS:
                    break
                raise
            if buf is None:  # EAGAIN: the device is empty
                break
            if len(buf) < COPY_BELOW:
                buf = bytes(memoryview(buf))
            now = monotonic()
            pkt = Packet(now - t0, direction, "forwarded", buf, hdr, mode)
            divert = link.divert
            if divert is not None and self._divert(link, divert, pkt):
                continue
            hooks = link.hooks
            # After the last hook goes, packets still with the worker finish first, in order.
            if hooks or link.backlog:
                self._to_worker(link, pkt, hooks)
                continue
            if link.engine is None and not (link.rules or link.classes or (link.split and hdr)):
                # A queue alone (delay, rate): what _after_hooks and _after_rules would do,
                # without ``pkt.data`` -- a copy of the payload when offload is on.
                self._forward(link, pkt, buf, now, now)
                continue
            self._after_hooks(link, pkt, None, now)
        self._flush()

    def _divert(self, link: Link, divert: Divert, pkt: Packet) -> bool:
        out = self._out
        mark = len(out)
        try:
            taken = divert(pkt)
        except Exception as exc:
            exc.add_note(f"(raised by the divert function of {link.direction}; packet passed)")
            self._add_error(exc)
            return False
        if taken:
            pkt.action = "scripted"
            # Before whatever the function wrote in answer (Relay.write queued it).
            out.insert(mark, (pkt, pkt.frame, link, _TAKEN))
        return bool(taken)

    def _to_worker(self, link: Link, pkt: Packet, hooks: tuple[Hook, ...]) -> None:
        worker = link.worker
        if worker is None:
            worker = link.worker = HookWorker(
                link, self.done, self.wake, name=f"{self.name}-hooks-{link.direction}"
            )
        link.backlog += 1
        worker.inbox.put((pkt, hooks))

    def _pause(self, link: Link, fd: int) -> None:
        if not link.paused:
            self._poller.modify(fd, 0)
            link.paused = True

    def _process_done(self) -> None:
        done = self.done
        monotonic = time.monotonic
        while done:
            link, pkt, outputs, failure = done.popleft()
            link.backlog -= 1
            if not outputs:  # dropped by a hook, or a hook failed: the packet the hook saw
                pkt.action = "dropped"
                self._out.append((pkt, pkt.frame, link, _DROP))
                if failure is not None:
                    self._failures.append((failure, pkt))
                continue
            self._after_hooks(link, pkt, outputs, monotonic())
        self._flush()
        for link in self.links.values():
            if link.paused and link.backlog <= MAX_BACKLOG // 2:
                link.paused = False
                if link.src.fd is not None:
                    self._poller.modify(link.src.fd, select.POLLIN)
                    # Packets may have queued in the kernel meanwhile: poll() will say so.

    def _after_hooks(
        self, link: Link, pkt: Packet, outputs: list[tuple[bytes, str]] | None, now: float
    ) -> None:
        """Rules, engine and queue for what the hooks made of ``pkt`` (``None``: the hooks
        did not run; the packet goes on unchanged).

        An unchanged copy keeps the virtio-net header the packet came with (it may say
        "checksum still to do" or "GSO" about those bytes); a changed one gets a zero one.
        The first unchanged "forwarded" copy is ``pkt`` itself, so a hook that kept a
        reference sees the number the capture gives it.
        """
        dst_hdr = link.dst.hdr_len
        zero = _gso.ZERO_VNET_HDR if dst_hdr else b""
        original = pkt.data
        vnet = pkt.vnet_header
        reuse = True
        for payload, action in outputs or ((original, "forwarded"),):
            same = payload is original or payload == original
            frame_hdr = vnet if same else zero
            if reuse and same and action == "forwarded":
                reuse = False
                out = pkt
                frame = pkt.frame
            else:
                frame = frame_hdr + payload
                out = Packet(
                    pkt.arrival, link.direction, action, frame, dst_hdr, self.mode, pkt.arrival
                )
            self._after_rules(link, out, frame, payload, frame_hdr, action, now, 0)

    def _after_rules(
        self,
        link: Link,
        out: Packet,
        frame: bytes,
        payload: bytes,
        frame_hdr: bytes,
        action: str,
        now: float,
        first_rule: int,
    ) -> None:
        """The rules from ``first_rule`` on, then the engine and the queue, for one packet."""
        if len(link.rules) > first_rule and self._apply_rules(link, out, frame, now, first_rule):
            return
        if link.classes:
            link = self._classify(link, out)
        if link.split and len(frame_hdr) >= _gso.VIRTIO_NET_HDR_LEN and frame_hdr[1]:
            # A GSO super-packet (gso_type set) on a per-segment link.
            plan = _gso.plan(frame, len(frame_hdr), self.mode)
            if plan is not None:
                self._split(link, out, plan, action, now)
                return
        engine = link.engine
        if engine is None:
            self._forward(link, out, frame, now, now)
            return
        if frame_hdr and frame_hdr[0] & _gso.VIRTIO_NET_HDR_F_NEEDS_CSUM and not frame_hdr[1]:
            # Offload on: the checksum is the receiving device's to finish. The engine may
            # change the bytes (corrupt, mark) or hold them past this header (reorder), so
            # it gets the packet a wire would carry: checksum done, no offload work left.
            payload = _gso.finish_checksum(frame, len(frame_hdr))
            frame_hdr = _gso.ZERO_VNET_HDR
            frame = frame_hdr + payload
            out = Packet(
                out.arrival, link.direction, action, frame, len(frame_hdr), self.mode, out.arrival
            )
        emits = engine.submit(payload, now)
        if not emits:  # held back for reordering: remember when it came
            link.held_arrival = out.arrival
        link.held = int(engine.deadline() is not None)
        for emit in emits:
            arrival = link.held_arrival if emit.action == "reordered" else out.arrival
            self._emit(link, emit, payload, frame_hdr, now, action, arrival)

    def _classify(self, link: Link, pkt: Packet) -> Link:
        """The class of ``link`` whose ``match`` takes ``pkt`` first, else ``link``."""
        for cls in link.classes:
            match = cls.match
            try:
                if match is not None and match(pkt):
                    return cls
            except Exception as exc:
                exc.add_note(
                    f"(raised by the match of class {cls.name!r} on {link.direction}; the "
                    "packet did not match)"
                )
                self._add_error(exc)
        return link

    def _split(self, link: Link, pkt: Packet, plan: _gso.GsoPlan, action: str, now: float) -> None:
        """The engine and the queue for each segment of the super-packet ``pkt``.

        With loss (and ECN) as the only random effect and a drop-tail queue (or none),
        runs of segments move on together (:class:`~pytest_tunpair._link.link.Run`): each
        segment is decided and paced on its own, and those that share their fate and
        leave in the same flush go out in one write. Otherwise (an AQM, corruption,
        duplication, reordering, jitter) each segment becomes a packet of its own, as the
        kernel would have sent it with offload off.
        """
        engine = link.engine
        queue = link.queue
        if (engine is None or engine.runs) and (queue is None or queue.runs):
            if engine is None:
                self._forward(link, Run(pkt, plan, 0, plan.count, action), None, now, now)
                return
            ect = ecn_codepoint(pkt.frame, len(pkt.vnet_header), tap=self.mode == "tap") in (
                ECN_ECT0, ECN_ECT1, ECN_CE,
            )  # fmt: skip
            latency, runs = engine.submit_run(plan.count, now, ect=ect)
            keep = _merge(action, "delayed" if latency > 0.0 else "forwarded")
            for first, count, kind in runs:
                if kind == RUN_LOST:
                    self._out.append((Run(pkt, plan, first, count, "lost"), None, link, _DROP))
                    continue
                if kind == RUN_MARK:
                    run = Run(pkt, plan, first, count, _merge(action, "marked"), ce=True)
                else:
                    run = Run(pkt, plan, first, count, keep)
                self._forward(link, run, None, now + latency, now, latency)
            return
        dst_hdr = link.dst.hdr_len
        zero = _gso.ZERO_VNET_HDR if dst_hdr else b""
        rules = len(link.rules)
        source = pkt.frame
        for i in range(plan.count):
            data = _gso.segments(source, plan, i, 1, vnet=False, partial=False)
            frame = zero + data
            seg = Packet(
                pkt.arrival, link.direction, action, frame, dst_hdr, self.mode, pkt.arrival
            )
            self._after_rules(link, seg, frame, data, zero, action, now, rules)

    def _apply_rules(
        self, link: Link, pkt: Packet, frame: bytes, now: float, first_rule: int = 0
    ) -> bool:
        """True if a rule took the packet (recorded with the verdict's action); frames it
        forwards instead go on through the later rules, the engine and the queue."""
        rules = link.rules
        for index in range(first_rule, len(rules)):
            rule = rules[index]
            try:
                verdict = rule.apply(pkt, now)
            except Exception as exc:
                exc.add_note(f"(raised by rule {rule!r} on {link.direction}; packet passed)")
                self._add_error(exc)
                continue
            if verdict is None:
                continue
            pkt.action = verdict.action
            out = self._out
            out.append((pkt, frame, link, _REPLACED if verdict.forward else _DROP))
            src_hdr = link.src.hdr_len
            reverse = "b->a" if link.direction == "a->b" else "a->b"
            for reply in verdict.replies:
                raw = _gso.ZERO_VNET_HDR + bytes(reply) if src_hdr else bytes(reply)
                # Its arrival is the answered packet's: the sojourn is how long it took.
                rec = Packet(pkt.arrival, reverse, "injected", raw, src_hdr, self.mode)
                out.append((rec, raw, link, _REPLY))
            dst_hdr = link.dst.hdr_len
            zero = _gso.ZERO_VNET_HDR if dst_hdr else b""
            for data in verdict.forward:
                data = bytes(data)
                f = zero + data
                rec = Packet(
                    pkt.arrival, link.direction, "forwarded", f, dst_hdr, self.mode, pkt.arrival
                )
                self._after_rules(link, rec, f, data, zero, "forwarded", now, index + 1)
            return True
        return False

    def _emit(
        self,
        link: Link,
        emit: Emit,
        payload: bytes,
        frame_hdr: bytes,
        now: float,
        hook_action: str,
        arrival: float,
    ) -> None:
        dst_hdr = link.dst.hdr_len
        if emit.data is not payload and emit.data != payload:  # corrupted: header invalid
            frame_hdr = _gso.ZERO_VNET_HDR if dst_hdr else b""
        frame = frame_hdr + emit.data
        action = _merge(hook_action, emit.action)
        pkt = Packet(arrival, link.direction, action, frame, dst_hdr, self.mode, arrival)
        if emit.due is None:  # lost
            self._out.append((pkt, frame, link, _DROP))
            return
        # A reordered packet released late may be due already: it leaves the engine now.
        self._forward(link, pkt, frame, emit.due, now, max(0.0, emit.due - now))

    def _forward(
        self,
        link: Link,
        pkt: Item,
        frame: bytes | None,
        due: float,
        now: float,
        latency: float | None = None,
    ) -> None:
        """Into the queue if the link has one (``latency``: the engine's delay and jitter
        for it, applied behind the bottleneck), else on a timer, else out now."""
        queue = link.queue
        if queue is not None:
            for dropped in queue.enqueue(pkt, now, latency):
                self._out.append((dropped, None, link, _DROP))
            if len(queue) > link.counters.queue_peak:
                link.counters.queue_peak = queue.peak
            self._dequeue(link, queue, now)
            return
        self._schedule(link, pkt, frame, due, now)

    def _dequeue(self, link: Link, queue: Queue, now: float, until: float | None = None) -> None:
        """What the queue made ready by ``until`` (default ``now``): onto the timers (or out
        now), or recorded as dropped."""
        for pkt, at in queue.dequeue_ready(now if until is None else until):
            frame = pkt.frame if isinstance(pkt, Packet) else None
            if at is None:
                self._out.append((pkt, frame, link, _DROP))
            else:
                self._schedule(link, pkt, frame, at, now)

    def _schedule(self, link: Link, pkt: Item, frame: bytes | None, due: float, now: float) -> None:
        # Straight out only when nothing is waiting: a timer due earlier must not be
        # overtaken by a packet that happens to be due now.
        if due <= now and not link.timers:
            self._out.append((pkt, frame, link, _WRITE))
        else:
            link.schedule(due, pkt, frame)

    def _apply_swaps(self) -> None:
        with self._swap_lock:
            swaps, self._swaps = self._swaps, {}
            class_swaps, self._class_swaps = self._class_swaps, []
        now = time.monotonic()
        for direction, name, new in class_swaps:
            self._swap_class(self.links[direction], name, new, now)
        for (kind, direction, _name), new in swaps.items():
            link = self.links[direction]
            if kind == "split":
                link.split = bool(new)
            elif kind == "engine":
                old_engine, link.engine = link.engine, new
                if old_engine is not None:
                    # Release what the old engine held back (reorder): with their own due
                    # times, through the timers, so switching impairments off loses nothing.
                    self._expire(link, old_engine, math.inf, now)
            else:
                old_queue, link.queue = link.queue, new
                if old_queue is not None:
                    # The old link finishes serving what it holds, on its own schedule.
                    self._dequeue(link, old_queue, now, math.inf)
        self._flush()

    def _swap_class(self, link: Link, name: str, new: Any, now: float) -> None:
        old = next((c for c in link.classes if c.name == name), None)
        if new is None:
            if old is None:
                return
            link.classes = tuple(c for c in link.classes if c is not old)
            self._release(old, None, None, now)
            if old.pending():
                self._retired.append(old)
            return
        match, engine, queue, split = new
        if old is None:
            old = Link(
                link.direction, link.src, link.dst, self.stats.of_class(link.direction, name)
            )
            old.name = name
            link.classes = (*link.classes, old)
        old.match = match
        old.split = split
        self._release(old, engine, queue, now)

    def _release(
        self, link: Link, engine: ImpairmentEngine | None, queue: Queue | None, now: float
    ) -> None:
        """Put ``engine`` and ``queue`` on ``link``; what the old ones hold goes on, on
        their own schedule (its timers)."""
        old_engine, link.engine = link.engine, engine
        if old_engine is not None:
            self._expire(link, old_engine, math.inf, now)
        old_queue, link.queue = link.queue, queue
        if old_queue is not None:
            self._dequeue(link, old_queue, now, math.inf)

    def _expire(self, link: Link, engine: ImpairmentEngine, until: float, now: float) -> None:
        zero = _gso.ZERO_VNET_HDR if link.dst.hdr_len else b""
        for emit in engine.expire(until):
            self._emit(link, emit, emit.data, zero, now, "forwarded", link.held_arrival)
        link.held = int(link.engine is not None and link.engine.deadline() is not None)

    def _run_timers(self) -> None:
        now = time.monotonic()
        out = self._out
        for link in self._all_links():
            engine = link.engine
            if engine is not None:
                d = engine.deadline()
                if d is not None and d <= now:
                    self._expire(link, engine, now, now)
            queue = link.queue
            if queue is not None:
                d = queue.deadline()
                if d is not None and d <= now:
                    self._dequeue(link, queue, now)
            if link.timers:
                for pkt, frame in link.pop_due(now):
                    out.append((pkt, frame, link, _WRITE))
        if self._retired:
            self._retired = [link for link in self._retired if link.pending()]
        self._flush()

    def _flush(self) -> None:
        """Record and write what the stages made ready, in one critical section (see
        :meth:`_service`); then raise the hook errors, which name the recorded packets.

        A run of segments is recorded as its segments and written as one frame (made
        before the lock is taken): :meth:`_flush_runs`; without runs, the per-packet loop
        as it always was."""
        out = self._out
        if out:
            self._out = []
            if any(type(entry[0]) is Run for entry in out):
                self._flush_runs(out)
            else:
                self._flush_packets(out)  # type: ignore[arg-type]
        if self._failures:
            failures, self._failures = self._failures, []
            for failure, pkt in failures:
                self._add_error(_hook_error(failure, pkt))

    def _flush_packets(self, out: list[tuple[Packet, bytes | None, Link, int]]) -> None:
        capture = self.capture
        with capture.lock:
            t = time.monotonic() - capture.t0
            for entry in out:
                entry[0].time = t
                if entry[2].name is not None:  # carried by a class's link
                    entry[0].link_class = entry[2].name
            capture.record_locked([entry[0] for entry in out])
            for pkt, frame, link, kind in out:
                c = link.counters
                if kind == _DROP:
                    c.dropped += 1
                    continue
                if kind == _REPLACED:
                    continue
                if kind == _TAKEN:
                    c.packets += 1
                    c.bytes += pkt.wire_len
                    continue
                dev = link.src if kind == _REPLY else link.dst
                try:
                    fd = dev.fd
                    if fd is None:
                        raise OSError(errno.EBADFD, "device closed")
                    os.write(fd, pkt.frame if frame is None else frame)
                except OSError as exc:
                    if exc.errno not in _DROP_ERRNOS:
                        raise
                    pkt.action = "dropped"
                    if kind == _WRITE:
                        c.dropped += 1
                    continue
                if kind == _WRITE:
                    c.packets += 1
                    c.bytes += pkt.wire_len
                    if pkt.action == "marked":
                        c.marked += 1

    def _flush_runs(self, out: list[_Out]) -> None:
        frames: dict[int, tuple[bytes, memoryview]] = {}
        for index, entry in enumerate(out):
            run = entry[0]
            if type(run) is Run and entry[3] == _WRITE:
                frames[index] = run.frame()
        capture = self.capture
        with capture.lock:
            t = time.monotonic() - capture.t0
            records: list[Packet | SegmentGroup] = []
            runs: dict[int, SegmentGroup] = {}
            for index, entry in enumerate(out):
                item = entry[0]
                if isinstance(item, Run):
                    group = runs[index] = item.record(t)
                    group.link_class = entry[2].name
                    records.append(group)
                else:
                    item.time = t
                    item.link_class = entry[2].name
                    records.append(item)
            capture.record_locked(records)
            for index, (item, frame, link, kind) in enumerate(out):
                c = link.counters
                is_run = isinstance(item, Run)
                count = item.count if isinstance(item, Run) else 1
                if kind == _DROP:
                    c.dropped += count
                    continue
                if kind == _REPLACED:
                    continue
                if kind == _TAKEN:
                    c.packets += 1
                    c.bytes += item.wire_len
                    continue
                dev = link.src if kind == _REPLY else link.dst
                try:
                    fd = dev.fd
                    if fd is None:
                        raise OSError(errno.EBADFD, "device closed")
                    if isinstance(item, Run):
                        os.writev(fd, frames[index])  # one packet: TUN takes a writev whole
                    else:
                        os.write(fd, item.frame if frame is None else frame)
                except OSError as exc:
                    if exc.errno not in _DROP_ERRNOS:
                        raise
                    if is_run:
                        runs[index].action = "dropped"
                    else:
                        item.action = "dropped"
                    if kind == _WRITE:
                        c.dropped += count
                    continue
                if kind == _WRITE:
                    c.packets += count
                    c.bytes += item.wire_len
                    if item.action == "marked":
                        c.marked += count

    def _discard_in_flight(self) -> None:
        """At stop (threads joined): record what never reached the other device."""
        self._out = []
        out = self._out
        t = time.monotonic() - self.capture.t0
        for link in self._all_links():
            hdr = link.dst.hdr_len
            zero = _gso.ZERO_VNET_HDR if hdr else b""
            if link.engine is not None:
                for emit in link.engine.expire(math.inf):
                    pkt = Packet(t, link.direction, "dropped", zero + emit.data, hdr, self.mode)
                    out.append((pkt, pkt.frame, link, _DROP))
            if link.queue is not None:
                for held, at in link.queue.dequeue_ready(math.inf):
                    if at is None:
                        out.append((held, None, link, _DROP))
                    else:
                        link.schedule(math.inf, held, None)
            for _due, _seq, late, frame in sorted(link.timers, key=lambda e: e[:2]):
                late.action = "dropped"
                out.append((late, frame, link, _DROP))
            link.timers.clear()
        for link, pkt, _outputs, failure in self.done:
            if failure is not None:
                self._failures.append((failure, pkt))
            pkt.action = "dropped"
            out.append((pkt, pkt.frame, link, _DROP))
        self.done.clear()
        for link in self.links.values():
            worker = link.worker
            if worker is None:
                continue
            while True:
                try:
                    item = worker.inbox.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    pkt = item[0]
                    pkt.action = "dropped"
                    out.append((pkt, pkt.frame, link, _DROP))
        self._flush()


def _hook_error(failure: HookFailure, rec: Packet) -> HookError:
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
