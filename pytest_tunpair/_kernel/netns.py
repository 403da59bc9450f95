"""A fresh, anonymous network namespace for the calling thread.

Linux lets a single *thread* change network namespace (``unshare(CLONE_NEWNET)`` or
``setns``): other threads stay where they were, and threads and child processes started
from that thread inherit its namespace. That is what lets a test body, its subprocesses
and nothing else live inside the tunnel's namespace.

The namespace is anonymous (no ``ip netns add``, nothing under ``/run/netns``): it lives
exactly as long as something refers to it -- our fd, a thread inside it, a socket or a
child process -- and the kernel reclaims it (and its devices) when the last reference
goes, even if this process is SIGKILLed.
"""

from __future__ import annotations

import errno
import functools
import os
import threading
from collections.abc import Callable
from types import TracebackType
from typing import TypeVar

from .._errors import NamespaceError, PrivilegeError
from . import disposable as _disposable
from . import linux as _linux
from . import userns as _userns

__all__ = ["NetNamespace", "Visit", "current_netns_inode", "new_namespace", "run_in"]

T = TypeVar("T")


def current_netns_inode() -> int:
    """Inode of the calling thread's network namespace (``/proc/thread-self/ns/net``)."""
    return os.stat("/proc/thread-self/ns/net").st_ino


@functools.cache
def _always_returns() -> bool:
    # Root of the host's user namespace: CAP_SYS_ADMIN over every namespace (asked once).
    return _userns.in_initial_user_namespace() and _userns.has_namespace_privileges()


class NetNamespace:
    """Enter a new network namespace in the calling thread; ``exit()`` returns to the old one."""

    def __init__(self) -> None:
        self._orig_fd: int | None = None
        self._fd: int | None = None
        self._thread: int | None = None
        self._disposable = False
        self.inode: int | None = None

    @property
    def active(self) -> bool:
        return self._fd is not None

    @property
    def fd(self) -> int:
        if self._fd is None:
            raise NamespaceError("the namespace is not open")
        return self._fd

    @property
    def path(self) -> str:
        """A path ``nsenter --net=PATH`` accepts while the namespace is open.

        ``/proc/PID/fd/N`` names our own fd on the namespace, so it stays valid even while
        no thread is inside it.
        """
        return f"/proc/{os.getpid()}/fd/{self.fd}"

    def enter(self, spare: int | None = None) -> NetNamespace:
        """Move the calling thread into a new namespace: one ``unshare`` makes, or
        ``spare``, an fd on a namespace made ahead of time that nobody uses (``spare.py``),
        which this object then owns (it closes the fd, even if entering fails)."""
        if self._fd is not None:
            raise NamespaceError("this namespace is already entered", netns=self.path)
        try:
            orig = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            if spare is not None:
                os.close(spare)
            raise
        disposable = _disposable.thread_is_disposable()
        if spare is not None:
            if not disposable:
                try:
                    self._refuse_one_way_trip(orig)  # closes orig when it refuses
                except BaseException:
                    os.close(spare)
                    raise
            try:
                # Made by this process: owned by our user namespace, so joining works
                # rootless too (docs/internals.md, "Daemons: joining a namespace the
                # process made").
                _linux.setns(spare, _linux.CLONE_NEWNET)
            except BaseException:
                os.close(orig)
                os.close(spare)
                raise
            self._fd = spare
            self._orig_fd = orig
            self._thread = threading.get_ident()
            self._disposable = disposable
            self.inode = os.fstat(spare).st_ino
            return self
        if not disposable:
            self._refuse_one_way_trip(orig)
        try:
            _linux.unshare(_linux.CLONE_NEWNET)
        except OSError as exc:
            os.close(orig)
            if exc.errno in (errno.EPERM, errno.EACCES):
                raise PrivilegeError(
                    "cannot create a network namespace (unshare(CLONE_NEWNET): "
                    f"{os.strerror(exc.errno)}): this needs CAP_NET_ADMIN and CAP_SYS_ADMIN. "
                    "Run as root, or under `unshare -Urn` (the pytest plugin and `tunpair "
                    "run` enter a user namespace by themselves when unprivileged)."
                ) from exc
            raise NamespaceError(f"cannot create a network namespace: {exc}") from exc
        try:
            self._fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            _linux.setns(orig, _linux.CLONE_NEWNET)
            os.close(orig)
            raise
        self._orig_fd = orig
        self._thread = threading.get_ident()
        self._disposable = disposable
        self.inode = os.fstat(self._fd).st_ino
        return self

    @staticmethod
    def _refuse_one_way_trip(orig: int) -> None:
        """Refuse to move a thread that could never come back (see ``_userns.py``); at once
        for a process with namespace privileges in the host's user namespace, which can
        enter every namespace.

        In a user namespace that does not own the thread's network namespace (one the
        process entered by itself), ``setns`` back fails with EPERM: the thread would stay
        in the test's namespace for good. ``setns`` into the namespace the thread is in
        makes the same permission check; without namespace privileges at all we let
        ``unshare`` below fail with its own message.
        """
        if _always_returns():
            return
        try:
            _linux.setns(orig, _linux.CLONE_NEWNET)
        except OSError as exc:
            if exc.errno not in _linux.EPERM_LIKE or not _userns.has_namespace_privileges():
                return
            os.close(orig)
            raise NamespaceError(
                "this thread could not come back from a new network namespace: the process "
                "runs in a user namespace that does not own the current one (it entered it "
                "by itself). Open the pair on a thread that ends with it (the pytest plugin "
                "does this for tests that request tun_pair or tun_pair_factory as an "
                "argument or with usefixtures), or run under `unshare -Urn`, or as root."
            ) from exc

    def stat(self) -> os.stat_result:
        """``fstat`` of the namespace (``st_dev``/``st_ino`` identify it, as in
        ``/proc/PID/ns/net``)."""
        return os.fstat(self.fd)

    # -- long-lived namespaces (module and session pairs) ---------------------------------
    def detach(self) -> Visit:
        """Hand the way back of the thread that :meth:`enter`-ed to a :class:`Visit`.

        The namespace then lives on by our fd alone: threads :meth:`join` and leave it, and
        :meth:`exit` (from any thread) only drops the fd.
        """
        if self._orig_fd is None or self._thread is None:
            raise NamespaceError("detach() needs a namespace this thread entered")
        if self._thread != threading.get_ident():
            raise NamespaceError("detach() must be called by the thread that entered")
        visit = Visit(self._orig_fd, self._disposable)
        self._orig_fd = None
        self._thread = None
        return visit

    def join(self) -> Visit:
        """Move the calling thread into this (open) namespace; ``leave()`` the returned
        :class:`Visit` to go back.

        In a user namespace the process entered by itself, only a disposable thread may
        join (it could not come back; see ``_userns``): any other is refused here.
        """
        orig = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        disposable = _disposable.thread_is_disposable()
        if not disposable:
            self._refuse_one_way_trip(orig)
        try:
            # The namespace was made by this process, so it is owned by our user namespace,
            # where we have CAP_SYS_ADMIN: joining works rootless too (docs/internals.md,
            # "Daemons: joining a namespace the process made").
            _linux.setns(self.fd, _linux.CLONE_NEWNET)
        except BaseException:
            os.close(orig)
            raise
        return Visit(orig, disposable)

    def is_current(self) -> bool:
        """True when the calling thread is inside this namespace."""
        return self.inode is not None and current_netns_inode() == self.inode

    def exit(self) -> None:
        """Go back to the namespace the thread came from and drop our reference.

        A disposable thread (``_disposable.py``) that cannot go back stays inside, and any thread
        may drop the references of a namespace a disposable thread entered.
        """
        if self._fd is None:
            return
        if self._orig_fd is None:  # detached: no thread to bring back
            os.close(self._fd)
            self._fd = None
            self.inode = None
            return
        same_thread = threading.get_ident() == self._thread
        if not same_thread and not self._disposable:
            raise NamespaceError(
                "a namespace must be left by the thread that entered it; "
                "close the pair from the thread that opened it",
                netns=self.path,
            )
        assert self._orig_fd is not None
        try:
            if same_thread:
                _linux.setns(self._orig_fd, _linux.CLONE_NEWNET)
            # else: a disposable thread entered and has ended (or been interrupted); dropping
            # our fds is all that is left to do.
        except OSError as exc:
            # A disposable thread that cannot come back stays: it ends right after the
            # test, and the namespace goes with it.
            if not (self._disposable and exc.errno in _linux.EPERM_LIKE):
                raise NamespaceError(
                    f"cannot return to the original network namespace: {exc}", netns=self.path
                ) from exc
        finally:
            os.close(self._orig_fd)
            os.close(self._fd)
            self._orig_fd = self._fd = None
            self.inode = None

    def write_sysctl(self, name: str, value: str | int) -> None:
        """Set a per-namespace sysctl, e.g. ``net/ipv4/ip_nonlocal_bind``.

        ``/proc/sys/net`` resolves against the *calling thread's* namespace, so this refuses
        to write unless the caller is inside this namespace: the host's sysctls are never
        touched.
        """
        if not self.is_current():
            raise NamespaceError(
                f"refusing to set {name}: the calling thread is not inside the tunnel namespace",
                netns=self.path if self._fd is not None else None,
            )
        path = "/proc/sys/" + name
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise NamespaceError(f"cannot set sysctl {name}: {exc}") from exc
        try:
            os.write(fd, str(value).encode())
        finally:
            os.close(fd)

    def __enter__(self) -> NetNamespace:
        return self.enter()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.exit()


class Visit:
    """A thread's stay in a namespace it joined: what ``TunPairFactory.detach()`` and
    ``join()`` return; :meth:`leave` takes the thread back."""

    def __init__(self, orig_fd: int, disposable: bool) -> None:
        self._orig_fd: int | None = orig_fd
        self._thread = threading.get_ident()
        self._disposable = disposable

    def leave(self) -> None:
        """Take the thread back where it came from (a disposable thread, which cannot, just
        stays: it ends with the test). Call it from the thread that joined."""
        orig = self._orig_fd
        if orig is None:
            return
        self._orig_fd = None
        try:
            if threading.get_ident() != self._thread:
                if self._disposable:
                    return
                raise NamespaceError("a namespace must be left by the thread that joined it")
            _linux.setns(orig, _linux.CLONE_NEWNET)
        except OSError as exc:
            if not (self._disposable and exc.errno in _linux.EPERM_LIKE):
                raise NamespaceError(
                    f"cannot return to the original network namespace: {exc}"
                ) from exc
        finally:
            os.close(orig)


def new_namespace() -> NetNamespace:
    """A fresh network namespace that no thread stays in: held by our fd alone, as a
    detached one (:meth:`NetNamespace.detach`). Threads :meth:`~NetNamespace.join` and
    leave it; :meth:`~NetNamespace.exit` drops it.

    A short-lived thread makes it with ``unshare(CLONE_NEWNET)``, opens it and ends inside
    it, so no thread has to come back (which, in a user namespace the process entered by
    itself, only works between namespaces this process made: docs/internals.md, "Daemons:
    joining a namespace the process made"). The calling thread stays where it is.
    """
    made: list[int] = []
    failed: list[BaseException] = []

    def make() -> None:
        try:
            _linux.unshare(_linux.CLONE_NEWNET)
            made.append(os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC))
        except BaseException as exc:
            failed.append(exc)

    t = threading.Thread(target=make, name="tunpair-new-netns", daemon=True)
    t.start()
    t.join()
    if failed:
        exc = failed[0]
        if isinstance(exc, OSError) and exc.errno in (errno.EPERM, errno.EACCES):
            raise PrivilegeError(
                f"cannot create a network namespace for a host ({exc.strerror}): run as "
                "root, or let pytest-tunpair enter a user namespace (it does when unprivileged)"
            ) from exc
        raise NamespaceError(f"cannot create a network namespace for a host: {exc}") from exc
    ns = NetNamespace()
    ns._fd = made[0]
    ns.inode = os.fstat(made[0]).st_ino
    return ns


def run_in(ns: NetNamespace | None, fn: Callable[[], T]) -> T:
    """``fn()`` with the calling thread inside ``ns``: here if it is in already, else on a
    short-lived thread that joins it (so what ``fn`` forks starts in the namespace, and
    threads it starts do too)."""
    if ns is None or not ns.active:
        raise NamespaceError("the namespace is closed (the pair is not open)")
    if ns.is_current():
        return fn()

    def joined() -> T:
        visit = ns.join()
        try:
            return fn()
        finally:
            visit.leave()

    return _disposable.run_in_disposable_thread(joined, name="tunpair-run-in")
