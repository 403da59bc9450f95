"""A pair's namespace and devices, built in one place -- and built ahead of time.

:func:`build_devices` is how a pair's two devices are made and routed in the calling
thread's namespace (the routing recipe of ``routing.py``): ``TunPair`` calls it while it
opens. :class:`SparePool` calls it too, on a thread of its own, to have the *next* test's
namespace and devices ready before that test asks: most of a tunnel test's set-up cost is
the kernel's work on these (``unshare(CLONE_NEWNET)`` ~0.5 ms, the devices ~0.35 ms, the
recipe ~0.5 ms: docs/internals.md, "What a pair's set-up costs"), and none of it depends
on anything but the pair's options -- which, test after test, are nearly always the
same. A spare namespace nobody has used is as fresh as one made when asked.

The pool builds for the plan it was last asked for (a :class:`DevicePlan`: the options
the devices and routing depend on); a test that asks for another plan gets none (it
builds its own, as without the pool) and the pool builds the next one for its plan. A
spare that will not be used is dropped without waiting for the kernel: its namespace, and
the devices in it, go when the last reference does.

No pytest here: the plugin owns a pool (``_plugin``), a ``TunPair`` made without pytest
builds its own.
"""

from __future__ import annotations

import _thread
import functools
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._errors import NamespaceError
from . import linux as _linux
from . import routing as _routing
from .device import OFFLOAD_FLAGS, DeviceCounters, TunDevice, native_builder, tun_flags
from .procs import PidMark

__all__ = [
    "BuiltDevices",
    "DevicePlan",
    "Spare",
    "SparePool",
    "build_devices",
    "build_spare",
    "describe",
    "prepare",
]

#: Writes a per-namespace sysctl (``"net/ipv4/ip_nonlocal_bind"``, ``1``) in the calling
#: thread's namespace, refusing anywhere else (the host's sysctls are never touched).
Sysctl = Callable[[str, int], None]


@functools.cache
def has_ipv6() -> bool:
    """The kernel has IPv6 (not booted with ``ipv6.disable=1``)."""
    return os.path.isdir("/proc/sys/net/ipv6")


def namespace_sysctls() -> list[tuple[str, int]]:
    """Per-namespace settings, set once in a new namespace (:func:`prepare`)."""
    # Step 2 of the recipe removes the addresses from table local, which is also how the
    # kernel answers "is this address mine?" for bind(): without this a server cannot bind
    # to a tunnel address (EADDRNOTAVAIL). Both sysctls are per namespace.
    settings = [("net/ipv4/ip_nonlocal_bind", 1)]
    if has_ipv6():
        settings.append(("net/ipv6/ip_nonlocal_bind", 1))
        # No link-local address on new devices: no router solicitations, MLD or other
        # chatter in the capture (docs/internals.md, "No link-local addresses"), only the
        # test's own traffic.
        # TAP devices too: neighbour discovery still resolves, the kernel sends the NS from
        # the global address of the packet waiting for it. What a TAP capture still shows
        # is each device's MLD report for its solicited-node group (README, "TAP mode").
        settings.append(("net/ipv6/conf/default/addr_gen_mode", 1))
    return settings


def prepare(sysctl: Sysctl) -> None:
    """Per-namespace settings, done once, inside the namespace (never on the host)."""
    for name, value in namespace_sysctls():
        sysctl(name, value)
    _routing.link_up_lo()


@dataclass(frozen=True)
class DevicePlan:
    """What a pair's two devices and their routing depend on, from its options."""

    names: tuple[str, str]
    mode: str
    vnet_hdr: bool
    v4: tuple[str | None, str | None]
    v6: tuple[str | None, str | None]
    macs: tuple[str | None, str | None]
    mtu: int
    table: int
    txqueuelen: int
    no_ipv6: bool
    """Turn IPv6 off on the devices (the pair has no IPv6 addresses)."""

    def sides(self, indexes: tuple[int, int]) -> list[_routing.Side]:
        """The recipe's two sides, for devices of these ifindexes."""
        (a, b), v4, v6, macs = self.names, self.v4, self.v6, self.macs
        return [
            _routing.Side(a, indexes[0], v4[0], v4[1], v6[0], v6[1], macs[0]),
            _routing.Side(b, indexes[1], v4[1], v4[0], v6[1], v6[0], macs[1]),
        ]


@dataclass
class BuiltDevices:
    """Two devices made and routed by :func:`build_devices`, in one namespace."""

    devices: tuple[TunDevice, TunDevice]
    steps: list[str]
    """The ``ip`` commands the routing stands for."""
    counters: DeviceCounters
    """The namespace's device counters, opened inside it."""
    sides: list[_routing.Side]
    """What the recipe was given (for :func:`_routing.remove_rules`)."""
    plan: DevicePlan

    def close(self) -> None:
        self.counters.close()
        for dev in reversed(self.devices):
            dev.close()


def build_devices(plan: DevicePlan, sysctl: Sysctl) -> BuiltDevices:
    """Make both devices of ``plan`` in the calling thread's namespace and route them with
    the recipe; on failure, close what was made and raise."""
    made: list[TunDevice] = []
    try:
        for name in plan.names:
            made.append(TunDevice(name, mode=plan.mode, vnet_hdr=plan.vnet_hdr))
            # With a vnet header the pair wants the kernel's offloads (its ``offload``
            # option): switched on here, so that a spare's devices come ready.
            made[-1].set_offload(plan.vnet_hdr)
        for name, value in device_sysctls(plan):
            sysctl(name, value)
        sides = plan.sides((made[0].index, made[1].index))
        steps = _routing.apply_recipe(
            sides, mtu=plan.mtu, table=plan.table, txqueuelen=plan.txqueuelen
        )
        counters = DeviceCounters()  # opened here, inside the namespace
    except BaseException:
        for d in reversed(made):
            d.close()
        raise
    return BuiltDevices((made[0], made[1]), steps, counters, sides, plan)


def device_sysctls(plan: DevicePlan) -> list[tuple[str, int]]:
    """The devices' own settings, once they exist."""
    if plan.no_ipv6 and has_ipv6():
        return [(f"net/ipv6/conf/{name}/disable_ipv6", 1) for name in plan.names]
    return []


@dataclass
class Spare:
    """A namespace made ahead of time by a :class:`SparePool`, prepared (:func:`prepare`),
    with the devices of ``plan`` in it if the pool had a plan."""

    fd: int
    """An fd on the namespace (``/proc/thread-self/ns/net``): whoever takes the spare owns it."""
    plan: DevicePlan | None
    built: BuiltDevices | None = None
    born: PidMark | None = None
    """The pid allocator just before the namespace was made: every process in it is newer
    (the namespace's ``Keeper`` looks for leftovers among those only)."""

    def discard(self) -> None:
        """Drop it unused: the namespace goes when its last reference does, its devices with
        it (persistent, so no synchronous unregister; docs/internals.md, "Teardown:
        TUNSETPERSIST, then let the namespace go")."""
        self.discard_devices(delete=False)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def discard_devices(self, *, delete: bool) -> None:
        """Drop its devices unused. Without ``delete`` they go with the namespace (see
        :meth:`discard`). A namespace a test uses and whose devices are not wanted must
        lose them for good (``delete``): they would be in the way of a pair's own (names,
        addresses, the recipe's rules, which name them); a non-persistent device is deleted
        as its fd closes, synchronously (the plugin hands devices only to the pair they were
        built for, unless a fixture of the test makes a pair of other options first)."""
        built, self.built = self.built, None
        if built is None:
            return
        built.counters.close()
        if not delete:
            for dev in reversed(built.devices):
                dev.close()
            return
        for dev in reversed(built.devices):
            fd, dev.fd = dev.fd, None
            if fd is not None:
                os.close(fd)  # not persistent: the kernel unregisters it now
        p = built.plan
        _routing.remove_rules(built.sides, mtu=p.mtu, table=p.table, txqueuelen=p.txqueuelen)


class SparePool:
    """Keeps one :class:`Spare` ready for the next :meth:`take`.

    The spare is built on a thread of its own (:meth:`take` and :meth:`close` wait for it),
    which makes a new namespace for itself with ``unshare``, prepares it, builds the
    devices of the plan asked for last, and ends there: it never comes back, so it works in a user namespace too (a
    thread there cannot return from a namespace: ``_userns.py``). A build that fails leaves
    no spare (the next test builds its own and meets the error itself).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spare: Spare | None = None
        # Set while no build is under way (a build clears it and sets it when done).
        self._idle = threading.Event()
        self._idle.set()
        self._plan: DevicePlan | None = None
        self._closed = False
        self.built = 0
        """Spares built so far."""
        self.used = 0
        """Spares taken (handed to a test)."""

    def take(self, plan: DevicePlan | None) -> Spare | None:
        """The spare, if it was built for ``plan`` (``None``: a namespace alone), else
        ``None``; then starts building the next one for ``plan`` (or, for ``None``, the
        last plan asked for). Waits for a build under way."""
        with self._lock:
            if self._closed:
                return None
        self._idle.wait()
        with self._lock:
            spare, self._spare = self._spare, None
            if plan is not None:
                self._plan = plan
            if spare is not None and spare.plan != plan:
                spare.discard()
                spare = None
            if spare is not None:
                self.used += 1
            self._start(self._plan)
        return spare

    def _start(self, plan: DevicePlan | None) -> None:
        # A bare thread (_thread), not threading.Thread: start() of the latter waits until
        # the new thread runs (a cross-CPU wake-up, ~0.15 ms here), in the test's set-up.
        self._idle.clear()
        _thread.start_new_thread(self._run, (plan,))

    def _run(self, plan: DevicePlan | None) -> None:
        # Never in a test's namespace (it starts before the test enters its own and goes to
        # the spare's at once), so no leftover-thread check meets it; not named, because
        # naming a bare thread leaves a threading._DummyThread behind when it ends.
        try:
            self._build(plan)
        finally:
            self._idle.set()

    def _build(self, plan: DevicePlan | None) -> None:
        try:
            spare = build_spare(plan)
        except Exception:
            return  # no spare: the next test makes its own namespace (and meets the error)
        with self._lock:
            if self._closed:
                spare.discard()
                return
            self._spare = spare
            self.built += 1

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no build is under way (the one a :meth:`take` started opens fds and
        devices meanwhile); False after ``timeout`` s."""
        return self._idle.wait(timeout)

    def close(self) -> None:
        """Wait for a build under way and drop the spare: nothing is left behind."""
        with self._lock:
            self._closed = True
        self._idle.wait()
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is not None:
            spare.discard()


def build_spare(plan: DevicePlan | None) -> Spare:
    """Move the calling thread into a new namespace and make it a :class:`Spare`: prepared,
    with the devices of ``plan`` (if any) built and routed. The thread stays there (it is
    made for that: ``SparePool``'s ends there). Raises what failed, leaving nothing open.

    In C where it was built (``_build.c``: no GIL held, so the build runs beside a test
    running Python), else here.
    """
    native = native_builder()
    if native is not None and plan is not None:
        return _build_natively(native, plan)
    born = PidMark.now()
    _linux.unshare(_linux.CLONE_NEWNET)
    fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    inode = os.fstat(fd).st_ino
    spare = Spare(fd, plan, born=born)

    def sysctl(name: str, value: int) -> None:
        if os.stat("/proc/thread-self/ns/net").st_ino != inode:  # pragma: no cover
            raise NamespaceError(f"refusing to set {name} outside the spare namespace")
        with open("/proc/sys/" + name, "w") as f:
            f.write(str(value))

    try:
        prepare(sysctl)
        if plan is not None:
            spare.built = build_devices(plan, sysctl)
    except BaseException:
        spare.discard()
        raise
    return spare


def describe() -> str:
    """One line for the run's header: who builds the spare namespaces."""
    if native_builder() is not None:
        return "spares: C builder"
    return (
        "spares: Python builder (the C one was not built; reinstall with a C compiler and "
        "Python's headers, e.g. apt-get install gcc python3-dev)"
    )


#: The ifindexes a new namespace gives a pair's two devices (``lo`` is 1; modules such as
#: ``sit`` add a device of their own to every namespace): the C builder sends the recipe
#: compiled for these, and where the devices got others the recipe is sent from here.
_indexes: tuple[int, int] | None = None


def _build_natively(native: Any, plan: DevicePlan) -> Spare:
    global _indexes
    expect = _indexes
    recipe = None
    if expect is not None:
        compiled_for = tuple(plan.sides(expect))
        recipe = _routing.compile_recipe(compiled_for, plan.mtu, plan.table, plan.txqueuelen)
    flags = tun_flags(plan.mode, plan.vnet_hdr)
    offload = OFFLOAD_FLAGS if plan.vnet_hdr else -1
    (ns_fd, inode), ((fd_a, index_a), (fd_b, index_b)), counters_fd, routed, mark = native.build(
        [(name, str(value)) for name, value in namespace_sysctls()],
        _routing.lo_message(),
        [(name, flags, offload) for name in plan.names],
        [(name, str(value)) for name, value in device_sysctls(plan)],
        expect or (0, 0),
        recipe.main if recipe else b"",
        recipe.wait6 if recipe else (),
        recipe.cleanup if recipe else b"",
        int(_routing.LOCAL6_TIMEOUT * 1000),
    )
    born = PidMark(*mark) if min(mark) >= 0 else None  # else the keeper takes one itself
    spare = Spare(ns_fd, plan, born=born)
    raw = [fd_a, fd_b, counters_fd]  # until objects own them
    try:
        devices = tuple(
            TunDevice.adopt(
                fd,
                name,
                mode=plan.mode,
                vnet_hdr=plan.vnet_hdr,
                offload=plan.vnet_hdr,
                index=i,
                netns_inode=inode,
            )
            for fd, name, i in ((fd_a, plan.names[0], index_a), (fd_b, plan.names[1], index_b))
        )
        sides = plan.sides((index_a, index_b))
        built = BuiltDevices((devices[0], devices[1]), [], DeviceCounters(counters_fd), sides, plan)
        spare.built, raw = built, []
        if routed and recipe is not None:
            built.steps = recipe.steps
        else:
            built.steps = _routing.apply_recipe(
                sides, mtu=plan.mtu, table=plan.table, txqueuelen=plan.txqueuelen
            )
            _indexes = (index_a, index_b)
    except BaseException:
        for fd in raw:
            os.close(fd)
        spare.discard()
        raise
    return spare
