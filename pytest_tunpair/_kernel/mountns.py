"""Files only one thread (and what it starts) sees: a private mount namespace per thread.

``/etc/resolv.conf`` follows the *mount* namespace, not the network one: a test in a
tunnel namespace still reads the host's nameserver. A thread can get a mount namespace of
its own (``unshare(CLONE_NEWNS)``, which also gives it a private ``fs_struct``: its root,
cwd and umask stop being shared with the other threads), make every mount in it private
(so nothing mounted there propagates back to the host's), and bind-mount a file of ours
over ``/etc/resolv.conf``. Threads and processes it starts afterwards inherit the view;
the rest of the process, and the host, keep theirs (docs/internals.md, "A mount namespace
per thread: the test's resolv.conf"). The file's source is unlinked at once: nothing is
left on disk, and the host's files are never written.

Going back is ``setns()`` into the saved namespace, which the kernel allows only to a
thread that shares its ``fs_struct`` with no other (threads it started since share it:
``unshare(CLONE_FS)`` first), and which resets the cwd to the namespace's root (put back
by its path, which names the same directory in both). In a user namespace the process entered by itself the host's mount
namespace is the initial user namespace's, so -- as with the network namespace -- a thread
cannot go back; there the thread is a disposable one, which ends with the test.
"""

from __future__ import annotations

import ctypes
import errno
import os
import tempfile
import threading

from .._errors import NamespaceError
from . import disposable as _disposable
from . import linux as _linux

__all__ = ["CLONE_NEWNS", "PrivateFiles", "private_files"]

# include/uapi/linux/sched.h
CLONE_NEWNS = 0x00020000
CLONE_FS = 0x00000200
# include/uapi/linux/mount.h
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18


def _mount(source: str | None, target: str, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    ret = libc.mount(
        None if source is None else source.encode(),
        target.encode(),
        None,
        ctypes.c_ulong(flags),
        None,
    )
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source or ''} {target}: {os.strerror(err)}")


class PrivateFiles:
    """The calling thread's private view (:func:`private_files`); :meth:`leave` ends it."""

    def __init__(self, orig: int, cwd: int, paths: tuple[str, ...]) -> None:
        self._orig: int | None = orig
        self._cwd = cwd
        self._thread = threading.get_ident()
        self.paths = paths
        """The files shown differently to the thread."""
        self.inode = os.stat("/proc/thread-self/ns/mnt").st_ino
        """The private mount namespace's inode (``/proc/PID/ns/mnt``)."""

    @property
    def active(self) -> bool:
        return self._orig is not None

    def leave(self) -> None:
        """Take the thread back to its mount namespace (and cwd). From another thread, or
        on a disposable thread that cannot go back, it only lets go: that thread keeps
        the view until it ends."""
        orig, self._orig = self._orig, None
        if orig is None:
            return
        try:
            if threading.get_ident() != self._thread:
                return
            # Where the thread is now (it may have moved since): the same path names the
            # same directory in both namespaces, which differ only by the bind mounts.
            try:
                here: str | None = os.getcwd()
            except OSError:
                here = None
            try:
                _linux.setns(orig, CLONE_NEWNS)
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    # Threads started since share this one's fs_struct: take a copy first.
                    _linux.unshare(CLONE_FS)
                    _linux.setns(orig, CLONE_NEWNS)
                else:
                    raise
            try:
                if here is None:
                    raise FileNotFoundError
                os.chdir(here)
            except OSError:
                os.fchdir(self._cwd)  # where it was when the view began
        except OSError as exc:
            if not (_disposable.thread_is_disposable() and exc.errno in _linux.EPERM_LIKE):
                raise NamespaceError(
                    f"cannot return to the original mount namespace: {exc}"
                ) from exc
        finally:
            os.close(orig)
            os.close(self._cwd)


def private_files(files: dict[str, str]) -> PrivateFiles:
    """Move the calling thread into a private mount namespace where each path of ``files``
    (an existing file) shows the given text; returns the view to :meth:`~PrivateFiles.leave`.
    """
    orig = os.open("/proc/thread-self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    cwd = os.open(".", os.O_PATH | os.O_CLOEXEC)
    try:
        _linux.unshare(CLONE_NEWNS)
    except OSError as exc:
        os.close(orig)
        os.close(cwd)
        raise NamespaceError(
            f"cannot give the test a mount namespace of its own ({exc.strerror}): this needs "
            "CAP_SYS_ADMIN (root, or the user namespace pytest-tunpair enters when "
            "unprivileged)"
        ) from exc
    view = PrivateFiles(orig, cwd, tuple(files))
    what = "/"
    try:
        # Private first: the host's mounts are usually shared (systemd), and a bind mount
        # on a shared mount would appear in the host's namespace too.
        _mount(None, "/", MS_REC | MS_PRIVATE)
        for path, text in files.items():
            what = path
            fd, source = tempfile.mkstemp(prefix="tunpair-", suffix="-" + os.path.basename(path))
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(text)
                os.chmod(source, 0o644)
                _mount(source, path, MS_BIND)
            finally:
                os.unlink(source)  # the mount holds the file; nothing stays on disk
    except BaseException as exc:
        view.leave()
        if isinstance(exc, OSError):
            if exc.errno == errno.ENOENT and what != "/" and not os.path.exists(what):
                link = f" (a symlink to {os.path.realpath(what)})" if os.path.islink(what) else ""
                raise NamespaceError(
                    f"cannot show the test its own {what}: there is no such file on this "
                    f"machine{link}, and a private view can only cover a file that exists "
                    "(the host's files are never created); create it on the machine, e.g. "
                    "an empty one, then run again"
                ) from exc
            raise NamespaceError(f"cannot show the test its own {what}: {exc}") from exc
        raise
    return view
