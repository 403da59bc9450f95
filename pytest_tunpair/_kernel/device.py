"""One TUN or TAP device, opened with the TUN ioctls (``include/uapi/linux/if_tun.h``)."""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import socket
import struct
from collections.abc import Iterable
from typing import Any

from .._errors import PrivilegeError, TunDeviceError
from .._wire import gso as _gso
from . import linux as _linux

__all__ = [
    "OFFLOAD_FLAGS",
    "DeviceCounters",
    "TunDevice",
    "native_builder",
    "release_fd",
    "release_fds",
    "tun_flags",
]

# What the relay asks the kernel to hand it when offload is on: checksum offload plus TSO
# for both families, so TCP arrives as GSO super-packets of up to 64 KB (docs/internals.md,
# "Offload: GSO super-packets through the relay": 1.0 -> 7 Gbit/s through a Python relay).
# The virtio-net header describing each one travels with it.
OFFLOAD_FLAGS = _linux.TUN_F_CSUM | _linux.TUN_F_TSO4 | _linux.TUN_F_TSO6

_TUN_PATH = _linux.TUN_PATH


def _missing_tun_message(exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return (
            f"{_TUN_PATH} does not exist: load the tun module (`modprobe tun`) or, in a "
            "container, pass the device in (`--device /dev/net/tun`)."
        )
    if exc.errno in (errno.EACCES, errno.EPERM):
        return (
            f"cannot open {_TUN_PATH} ({os.strerror(exc.errno)}): run as root, or make it "
            f"world-usable (`chmod 0666 {_TUN_PATH}`, the usual distribution default) so "
            "that a user namespace can create devices."
        )
    return f"cannot open {_TUN_PATH}: {exc}"


class TunDevice:
    """A TUN (``mode="tun"``, raw IP) or TAP (``mode="tap"``, Ethernet) device and its fd.

    The fd is non-blocking so the relay can drain a burst and go back to ``poll``.
    """

    def __init__(self, name: str, *, mode: str = "tun", vnet_hdr: bool = False) -> None:
        self.name = name
        self.mode = mode
        self.vnet_hdr = vnet_hdr
        self.hdr_len = _gso.VIRTIO_NET_HDR_LEN if vnet_hdr else 0
        self.offload = False
        flags = tun_flags(mode, vnet_hdr)
        try:
            fd = os.open(_TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            cls = PrivilegeError if exc.errno in (errno.EACCES, errno.EPERM) else TunDeviceError
            raise cls(_missing_tun_message(exc)) from exc
        try:
            fcntl.ioctl(fd, _linux.TUNSETIFF, struct.pack("16sH", name.encode(), flags))
        except OSError as exc:
            os.close(fd)
            if exc.errno == errno.EPERM:
                raise PrivilegeError(
                    f"TUNSETIFF {name}: not permitted (needs CAP_NET_ADMIN in the namespace's "
                    "user namespace): run as root or under `unshare -Urn`."
                ) from exc
            if exc.errno == errno.EBUSY:
                raise TunDeviceError(
                    f"device {name} already exists in this namespace: pick other names",
                    device=name,
                ) from exc
            raise TunDeviceError(f"TUNSETIFF {name}: {exc}", device=name) from exc
        self.fd: int | None = fd
        # if_nametoindex opens a socket in the calling thread's namespace: ours.
        self.index = socket.if_nametoindex(name)
        self.netns_inode = os.stat("/proc/thread-self/ns/net").st_ino
        """The inode of the network namespace the device was made in (and stays in)."""

    @classmethod
    def adopt(
        cls,
        fd: int,
        name: str,
        *,
        mode: str,
        vnet_hdr: bool,
        offload: bool,
        index: int,
        netns_inode: int,
    ) -> TunDevice:
        """The device of an fd made with :func:`tun_flags` by other code (the spare's builder
        in C, ``_build.c``) in the namespace of inode ``netns_inode``: the object owns the fd."""
        dev = cls.__new__(cls)
        dev.name, dev.mode, dev.vnet_hdr, dev.offload = name, mode, vnet_hdr, offload
        dev.hdr_len = _gso.VIRTIO_NET_HDR_LEN if vnet_hdr else 0
        dev.fd, dev.index, dev.netns_inode = fd, index, netns_inode
        return dev

    def set_offload(self, on: bool) -> None:
        """Switch TSO/checksum offload towards the relay (no-op without a vnet header).

        Turning it off makes the kernel segment and checksum in software before the relay
        sees the packet, even for connections that negotiated TSO already (validate_xmit_skb
        checks the device features on every transmit).
        """
        if not self.vnet_hdr or self.fd is None or on == self.offload:
            return
        fcntl.ioctl(self.fd, _linux.TUNSETOFFLOAD, OFFLOAD_FLAGS if on else 0)
        self.offload = on

    def write(self, payload: bytes) -> int:
        """Write one packet (without vnet header) into the device: the kernel receives it."""
        if self.fd is None:
            raise TunDeviceError(f"{self.name} is closed", device=self.name)
        if self.hdr_len:
            return os.write(self.fd, _gso.ZERO_VNET_HDR + payload) - self.hdr_len
        return os.write(self.fd, payload)

    def close(self) -> None:
        """Close the fd, leaving the device to its namespace (:func:`release_fd`)."""
        release_fd(self.detach())

    def detach(self) -> int | None:
        """Take the fd away from the device object (which is closed from now on): the
        caller releases it (:func:`release_fd`), here or on another thread."""
        fd, self.fd = self.fd, None
        return fd

    def __repr__(self) -> str:
        return f"<TunDevice {self.name} index={self.index} mode={self.mode} fd={self.fd}>"


def tun_flags(mode: str, vnet_hdr: bool) -> int:
    """``TUNSETIFF``'s flags for a device of ``mode`` (``"tun"``, ``"tap"``), with or
    without a virtio-net header."""
    flags = (_linux.IFF_TAP if mode == "tap" else _linux.IFF_TUN) | _linux.IFF_NO_PI
    return flags | _linux.IFF_VNET_HDR if vnet_hdr else flags


def release_fd(fd: int | None) -> None:
    """Close a device's fd (from :meth:`TunDevice.detach`), leaving the device to its
    namespace.

    The device is made persistent first, so it outlives the fd and goes away with its
    namespace, which the kernel tears down asynchronously. Closing a non-persistent TUN
    fd unregisters the device synchronously, about 25 ms per device
    (docs/internals.md, "Teardown: TUNSETPERSIST, then let the namespace go"), which
    would dominate a test's teardown.
    """
    if fd is None:
        return
    try:
        try:
            fcntl.ioctl(fd, _linux.TUNSETPERSIST, 1)
        except OSError:
            pass  # the device then unregisters synchronously: slower, still correct
    finally:
        os.close(fd)


def release_fds(fds: Iterable[int | None]) -> None:
    """:func:`release_fd` for each, in one call that holds no GIL where the C builder was
    built (``_build.c``): each of the calls takes the kernel's RTNL lock, and may wait."""
    fds = [fd for fd in fds if fd is not None]
    native = native_builder()
    if native is None:
        for fd in fds:
            release_fd(fd)
    elif fds:
        native.release(fds)


@functools.cache
def native_builder() -> Any:
    """The spare namespace's builder in C (``_build.c``: ``build``, ``release``), or
    ``None`` where it was not built (setup.py: it is optional)."""
    try:
        from . import _build  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _build


class DeviceCounters:
    """The kernel's counters of the devices of one network namespace, readable from any
    thread: ``/proc/net/dev`` opened while inside it.

    A TUN device whose transmit queue (``txqueuelen``) is full drops what the kernel sends
    it before the relay can read it, and counts that in its ``tx_dropped``
    (docs/internals.md, "TX-queue drops show only as tx_dropped"; "/proc/net/dev shows the
    namespace of the thread that opened it"). ``/proc/net/dev`` shows the
    namespace of the thread that opened it, whichever thread reads it later, and a read is
    one small file read -- no netlink socket, no pyroute2 import -- so the pair's ``stats``
    can read it every time. The open file holds a reference to the namespace: :meth:`close`
    it with the pair.
    """

    def __init__(self, fd: int | None = None) -> None:
        """Opens the file, or owns ``fd``, opened on it by other code (inside the namespace)."""
        if fd is None:
            fd = os.open("/proc/thread-self/net/dev", os.O_RDONLY | os.O_CLOEXEC)
        self._fd: int | None = fd

    def tx_dropped(self) -> dict[str, int]:
        """``tx_dropped`` per device name (empty once closed)."""
        fd = self._fd
        if fd is None:
            return {}
        try:
            # pread: no shared file offset, so threads may read concurrently.
            text = os.pread(fd, 1 << 16, 0).decode("ascii", "replace")
        except OSError:
            return {}
        counts = {}
        for line in text.splitlines()[2:]:  # two header lines
            name, sep, fields = line.partition(":")
            values = fields.split()
            # Receive: bytes packets errs drop fifo frame compressed multicast; then
            # Transmit: bytes packets errs drop ... (net/core/net-procfs.c)
            if sep and len(values) >= 12:
                counts[name.strip()] = int(values[11])
        return counts

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
