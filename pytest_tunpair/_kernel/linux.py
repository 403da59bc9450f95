"""Thin, typed wrappers over the Linux calls Python's stdlib lacks (3.11 has no os.unshare/setns).

Constants keep their kernel names and cite the header they come from.
"""

from __future__ import annotations

import ctypes
import errno
import os
from functools import lru_cache

# include/uapi/linux/sched.h
CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000

# Documentation/networking/tuntap.rst: the clone device every TUN/TAP fd is opened from.
TUN_PATH = "/dev/net/tun"

# include/uapi/linux/if_tun.h (_IOW('T', n, int) on every arch with the asm-generic ioctl layout)
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOFFLOAD = 0x400454D0
IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04

# include/uapi/linux/if_addr.h
IFA_F_NODAD = 0x02
IFA_F_NOPREFIXROUTE = 0x200

# include/uapi/linux/rtnetlink.h
RT_TABLE_LOCAL = 255
RT_SCOPE_HOST = 254
RTPROT_KERNEL = 2
RTN_LOCAL = 2


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


@lru_cache(maxsize=1)
def quick_libc() -> ctypes.PyDLL:
    """libc for calls that never wait (``prctl``): made holding the GIL. A ``CDLL`` call lets
    go of it and takes it back after, which costs a wait whenever another thread runs
    Python meanwhile -- a test's set-up runs beside the relay thread that is starting."""
    return ctypes.PyDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    """unshare(2). CLONE_NEWNET affects only the calling thread (docs/internals.md,
    "A network namespace per thread")."""
    _check(_libc().unshare(ctypes.c_int(flags)), "unshare")


def setns(fd: int, nstype: int) -> None:
    """setns(2) for the calling thread."""
    _check(_libc().setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns")


# include/uapi/linux/prctl.h
PR_SET_NAME = 15


def set_thread_name(name: str) -> None:
    """Name the calling thread for the kernel (``/proc/self/task/TID/comm``, cut to 15
    bytes), where Python's own thread names do not reach: a thread of the package that has
    been joined may still be in the kernel's task list a moment longer, and its name is
    how the leftover-thread check tells it from a test's (``threads.threads_in``). Best
    effort: a refusal changes nothing else."""
    quick_libc().prctl(ctypes.c_int(PR_SET_NAME), ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


EPERM_LIKE = (errno.EPERM, errno.EACCES)
