"""A one-shot timer with nanosecond resolution that ``poll()`` can wait on: a timerfd.

``select.poll()`` takes its timeout in whole milliseconds and the relay's loop rounded the
next deadline up, so ``delay="200us"`` each way gave a ping RTT of 2.66 ms instead of about
0.74 ms (docs/internals.md, "poll() rounds timeouts to milliseconds"). A timerfd armed
(docs/internals.md, "A timerfd wakes poll() at a sub-millisecond deadline") at the absolute
``CLOCK_MONOTONIC`` time of the next deadline -- the clock ``time.monotonic()`` reads --
becomes readable when it expires, so the loop polls it with the devices and never sleeps
or spins: the kernel's hrtimer wakes it.

Python 3.13 has ``os.timerfd_create``; 3.11 and 3.12 call libc through ctypes
(``include/uapi/linux/timerfd.h``, ``timerfd_create(2)``).
"""

from __future__ import annotations

import ctypes
import os
import time

from . import linux as _linux

__all__ = ["Timer", "set_timer_slack"]

# include/uapi/linux/timerfd.h: TFD_* reuse the O_* values; include/uapi/linux/time.h
CLOCK_MONOTONIC = 1
TFD_TIMER_ABSTIME = 1
TFD_NONBLOCK = os.O_NONBLOCK
TFD_CLOEXEC = os.O_CLOEXEC
# include/uapi/linux/prctl.h; per thread (docs/internals.md, "Timer slack is per thread")
PR_SET_TIMERSLACK = 29
#: Timer slack for the relay thread, in ns: poll()'s own timeouts (and any other timer of
#: the thread) may then fire at most 1 us late instead of the default 50 us.
TIMER_SLACK_NS = 1000


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class Timer:
    """A timerfd on ``CLOCK_MONOTONIC``: :meth:`arm` at a ``time.monotonic()`` deadline.

    ``fd`` becomes readable (``POLLIN``) at the deadline, or at once if it has passed;
    :meth:`ack` reads the expiry so it stops being readable. Arming again at the deadline
    it is already armed for costs nothing (no system call).
    """

    def __init__(self) -> None:
        self._os = hasattr(os, "timerfd_create")
        if self._os:
            fd = os.timerfd_create(time.CLOCK_MONOTONIC, flags=TFD_NONBLOCK | TFD_CLOEXEC)  # type: ignore[attr-defined,unused-ignore]
        else:
            libc = _linux._libc()
            fd = libc.timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
            if fd < 0:
                err = ctypes.get_errno()
                raise OSError(err, f"timerfd_create: {os.strerror(err)}")
            self._settime = libc.timerfd_settime
            self._spec = _Itimerspec()
            self._spec_ref = ctypes.byref(self._spec)
        self.fd: int = fd
        #: The deadline armed now (``time.monotonic()`` seconds), or ``None``.
        self.armed: float | None = None

    def arm(self, deadline: float) -> None:
        """Expire at ``deadline`` (``time.monotonic()`` seconds; the past expires at once)."""
        if deadline == self.armed:
            return
        self.armed = deadline
        # 0 would disarm the timer: a deadline at or before the clock's origin is "now".
        ns = max(1, int(deadline * 1e9))
        if self._os:
            os.timerfd_settime_ns(self.fd, flags=TFD_TIMER_ABSTIME, initial=ns)  # type: ignore[attr-defined,unused-ignore]
            return
        value = self._spec.it_value
        value.tv_sec, value.tv_nsec = divmod(ns, 1_000_000_000)
        if self._settime(self.fd, TFD_TIMER_ABSTIME, self._spec_ref, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_settime: {os.strerror(err)}")

    def ack(self) -> None:
        """Consume an expiry (after ``poll()`` said the fd is readable)."""
        self.armed = None
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            pass  # re-armed meanwhile, or read already

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def set_timer_slack(ns: int = TIMER_SLACK_NS) -> bool:
    """Set the calling thread's timer slack (``PR_SET_TIMERSLACK`` is per thread).

    False if the kernel refused (e.g. a seccomp filter); the timers are then merely coarser.
    """
    try:
        prctl = _linux.quick_libc().prctl
        return int(prctl(PR_SET_TIMERSLACK, ctypes.c_ulong(ns), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False
