"""Running without root: a user namespace of our own, and threads that need not come back.

An unprivileged process can enter a new *user* namespace by itself (``unshare(CLONE_NEWUSER)``
while it is single-threaded, ``deny`` to ``/proc/self/setgroups``, then one-line
``uid_map``/``gid_map`` mapping 0 to its real ids). Inside it has every capability *over
namespaces it creates*, so each test can still get a fresh network namespace with TUN
devices -- provided ``/dev/net/tun`` is openable by the real user (mode 0666, the usual
distribution default).

The catch, measured (nobody, Linux 6.18): a thread that left the host network namespace
cannot go back. ``setns()`` into a network namespace needs CAP_SYS_ADMIN in the user
namespace that *owns* it, and the host's is owned by the initial user namespace, where we
have nothing (``setns`` -> EPERM). Under ``unshare -Urn`` the process's namespace is owned
by its own user namespace and ``setns`` back works. So :func:`prepare` asks the kernel
directly -- ``setns()`` into the namespace the thread is already in succeeds exactly when
returning would -- and when the answer is no, each tunnel-using test runs on a *disposable
thread* (:func:`run_in_disposable_thread`) that enters the test's namespace and simply
ends. The main thread never leaves the host namespace, so tests without a tunnel keep
seeing the host network.

Why not make every worker process enter its own user namespace: pytest-xdist workers
already run two threads when ``pytest_configure`` runs (execnet's I/O thread), and
``unshare(CLONE_NEWUSER)`` refuses a multi-threaded process (EINVAL). The controller
enters before it starts the workers, which inherit the user namespace; every test still
gets its own network namespace, so nothing is shared between workers but the uid mapping.

No pytest import here: the command-line tool uses the same machinery.
"""

from __future__ import annotations

import ctypes
import errno
import os
import pwd
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from . import _linux
from ._errors import PrivilegeError, TunPairError

__all__ = [
    "MODES",
    "Status",
    "ThreadNotStopped",
    "has_namespace_privileges",
    "prepare",
    "run_in_disposable_thread",
    "thread_can_return",
    "thread_is_disposable",
]

T = TypeVar("T")

MODES = ("auto", "always", "never")

# include/uapi/linux/capability.h
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
# include/linux/proc_ns.h: the initial user namespace always has this inode number.
PROC_USER_INIT_INO = 0xEFFFFFFD

TUN_PATH = "/dev/net/tun"
_USERNS_SYSCTLS = (
    # Ubuntu 23.10+: unprivileged user namespaces get no capabilities (AppArmor).
    ("kernel.apparmor_restrict_unprivileged_userns", "0"),
    # Debian before 11 and some hardened kernels: no unprivileged user namespaces at all.
    ("kernel.unprivileged_userns_clone", "1"),
)
_NAME_VARS = ("LOGNAME", "USER", "LNAME", "USERNAME")  # getpass.getuser()'s order


# -- what the kernel says about this process ---------------------------------------------
def effective_capabilities() -> int:
    """CapEff of this process (relative to its own user namespace)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def has_namespace_privileges() -> bool:
    """CAP_NET_ADMIN (devices, routes) *and* CAP_SYS_ADMIN (unshare(CLONE_NEWNET))."""
    caps = effective_capabilities()
    return bool(caps >> CAP_NET_ADMIN & 1) and bool(caps >> CAP_SYS_ADMIN & 1)


def in_initial_user_namespace() -> bool:
    return os.stat("/proc/self/ns/user").st_ino == PROC_USER_INIT_INO


def outer_uid() -> int:
    """The uid our uid maps to in the parent user namespace (ours, outside any user ns)."""
    uid = os.getuid()
    try:
        with open("/proc/self/uid_map") as f:
            for line in f:
                inside, outside, count = (int(x) for x in line.split())
                if inside <= uid < inside + count:
                    return outside + uid - inside
    except (OSError, ValueError):
        pass
    return uid


def thread_can_return() -> bool:
    """Could the calling thread come back to its network namespace after leaving it?

    ``setns()`` into the namespace the thread is already in makes exactly the permission
    check that coming back would (CAP_SYS_ADMIN in the namespace's owning user namespace and
    in ours), and changes nothing.
    """
    fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _linux.setns(fd, _linux.CLONE_NEWNET)
    except OSError as exc:
        if exc.errno in _linux.EPERM_LIKE:
            return False
        raise
    finally:
        os.close(fd)
    return True


# -- why it cannot work: one message each, naming the fixes -------------------------------
def _refuse(cause: str, *fixes: str) -> PrivilegeError:
    return PrivilegeError(
        f"pytest-tunpair cannot create tunnels here: {cause}. Fix: {'; or '.join(fixes)}."
    )


_AS_ROOT = "run pytest as root"
_UNSHARE = "run it under `unshare -Urn pytest ...`"
_CHMOD = f"make the device usable by all users, as most distributions ship it: `sudo chmod 0666 {TUN_PATH}`"


def check_tun_device() -> None:
    """Refuse early when ``/dev/net/tun`` is missing or the real user cannot open it.

    A user namespace does not help with the second: opening the node is an ordinary
    permission check against the real uid.
    """
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise _refuse(
                f"{TUN_PATH} does not exist",
                "load the tun module (`sudo modprobe tun`)",
                "in a container, pass the device in (`--device /dev/net/tun`)",
            ) from None
        if exc.errno in _linux.EPERM_LIKE:
            try:
                st = os.stat(TUN_PATH)
                owner = pwd.getpwuid(st.st_uid).pw_name
                what = f" (mode {stat.S_IMODE(st.st_mode):04o}, owner {owner})"
            except (OSError, KeyError):
                what = ""
            raise _refuse(
                f"cannot open {TUN_PATH}{what}: {os.strerror(exc.errno)}", _CHMOD, _AS_ROOT
            ) from None
        raise _refuse(f"cannot open {TUN_PATH}: {exc}", _AS_ROOT) from None
    os.close(fd)


def _userns_sysctl_fix() -> str | None:
    for name, good in _USERNS_SYSCTLS:
        try:
            with open("/proc/sys/" + name.replace(".", "/")) as f:
                value = f.read().strip()
        except OSError:
            continue
        if value != good:
            return f"`sudo sysctl -w {name}={good}`"
    return None


def _userns_refusal(exc: OSError) -> PrivilegeError:
    if exc.errno == errno.ENOSPC:
        # user.max_user_namespaces = 0 (or the limit is used up).
        try:
            with open("/proc/sys/user/max_user_namespaces") as f:
                limit = f.read().strip()
        except OSError:
            limit = "?"
        return _refuse(
            f"user namespaces are disabled or used up (user.max_user_namespaces = {limit})",
            "`sudo sysctl -w user.max_user_namespaces=10000`",
            _AS_ROOT,
        )
    fix = _userns_sysctl_fix()
    if fix is not None:
        return _refuse(
            f"unprivileged user namespaces are disabled ({os.strerror(exc.errno or 0)})",
            fix,
            _AS_ROOT,
        )
    return _refuse(
        f"cannot enter a user namespace ({exc.strerror}; in a container, its seccomp "
        "profile may forbid it)",
        _AS_ROOT + " with CAP_NET_ADMIN and CAP_SYS_ADMIN (a privileged container)",
        "allow user namespaces in the container's seccomp profile",
    )


# -- entering a user namespace -------------------------------------------------------------
def _keep_user_name(uid: int) -> None:
    """Make ``getpass.getuser()`` keep naming the real user inside the user namespace.

    It falls back to the passwd entry of ``getuid()``, which is 0 -- "root" -- inside, so
    pytest's base temp directory would become ``/tmp/pytest-of-root``: root's own directory
    (refused as "not owned by the current user"), or squatted by us if it did not exist yet.
    The environment comes first in ``getuser()``, so naming the user there keeps every
    user-derived path as it was (the name pytest would use outside, "unknown" included).
    """
    if any(os.environ.get(var) for var in _NAME_VARS):
        return
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = "unknown"  # what pytest's get_user() falls back to
    os.environ["LOGNAME"] = name


def _thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


def enter_user_namespace() -> None:
    """Move this (single-threaded) process into a new user namespace, as root inside it.

    Files it creates stay owned by the real user: uid and gid 0 inside map to the real
    ids, one id each, which is all an unprivileged process may map.
    """
    threads = _thread_count()
    if threads > 1:
        raise _refuse(
            f"the process must enter a user namespace, which Linux allows only while it is "
            f"single-threaded, and it already runs {threads} threads (started by a "
            "conftest.py or plugin before pytest-tunpair's pytest_configure)",
            _UNSHARE,
            _AS_ROOT,
        )
    uid, gid = os.getuid(), os.getgid()
    try:
        _linux.unshare(_linux.CLONE_NEWUSER)
    except OSError as exc:
        raise _userns_refusal(exc) from None
    # setgroups must be denied before an unprivileged process may write gid_map
    # (user_namespaces(7)); supplementary groups are kept, just frozen.
    try:
        for path, text in (
            ("/proc/self/setgroups", "deny"),
            ("/proc/self/uid_map", f"0 {uid} 1"),
            ("/proc/self/gid_map", f"0 {gid} 1"),
        ):
            with open(path, "w") as f:
                f.write(text)
    except OSError as exc:
        raise _userns_refusal(exc) from None


def _probe_netns() -> OSError | None:
    """Create (and drop) one network namespace on a throwaway thread: can tests do it?

    Catches what only shows once inside the user namespace, e.g. Ubuntu's AppArmor rule
    that lets unprivileged processes create user namespaces but gives them no capabilities.
    """
    errors: list[OSError] = []

    def probe() -> None:
        try:
            _linux.unshare(_linux.CLONE_NEWNET)
        except OSError as exc:
            errors.append(exc)
        # The thread ends inside the new namespace, which the kernel then reclaims.

    t = threading.Thread(target=probe, name="tunpair-netns-probe", daemon=True)
    t.start()
    t.join()
    return errors[0] if errors else None


@dataclass(frozen=True)
class Status:
    """How tunnels run in this process (``pytest_report_header`` shows :meth:`describe`)."""

    entered: bool
    """We made the user namespace (else: root, or one we were started in)."""
    in_userns: bool
    outer_uid: int
    can_return: bool
    """False: tunnel tests must run on disposable threads."""

    @property
    def how(self) -> str:
        return "user namespace" if self.in_userns else "root"

    def describe(self) -> str:
        if not self.in_userns:
            who = "root" if os.getuid() == 0 else f"uid {os.getuid()} with capabilities"
            return who
        origin = "made by pytest-tunpair" if self.entered else "inherited"
        text = f"user namespace ({origin}, uid {self.outer_uid} outside"
        if not self.can_return:
            text += "; tunnel tests run on their own threads"
        return text + ")"


def prepare(mode: str = "auto", *, may_enter: bool = True) -> Status:
    """Make this process able to build tunnels, or raise :class:`PrivilegeError` saying why not.

    ``mode``: ``auto`` enters a user namespace only when the process lacks CAP_NET_ADMIN or
    CAP_SYS_ADMIN (unshare(CLONE_NEWNET) needs the latter); ``always`` makes sure it runs in
    one (entering one unless it already is in a user namespace other than the initial one);
    ``never`` refuses to. ``may_enter=False`` (an xdist worker: already multi-threaded)
    relies on the parent process having entered one.
    """
    if mode not in MODES:
        raise ValueError(f"bad user-namespace mode {mode!r}: use one of {', '.join(MODES)}")
    check_tun_device()
    privileged = has_namespace_privileges()
    if mode == "never" and not privileged:
        raise _refuse(
            "this process lacks CAP_NET_ADMIN and CAP_SYS_ADMIN, and --tunpair-userns=never "
            "forbids entering a user namespace",
            _AS_ROOT,
            _UNSHARE,
            "use --tunpair-userns=auto",
        )
    enter = (mode == "auto" and not privileged) or (
        mode == "always" and in_initial_user_namespace()
    )
    entered = False
    if enter:
        if not may_enter:
            raise _refuse(
                "this worker process lacks CAP_NET_ADMIN and CAP_SYS_ADMIN and is already "
                "multi-threaded, so it cannot enter a user namespace (its parent should have)",
                _UNSHARE,
                _AS_ROOT,
            )
        real_uid = os.getuid()
        _keep_user_name(real_uid)
        enter_user_namespace()
        entered = True
    elif not in_initial_user_namespace() and os.getuid() == 0:
        # Started in one (`unshare -Urn`): same user-name pitfall as above.
        _keep_user_name(outer_uid())
    failure = _probe_netns()
    if failure is not None:
        if entered or not in_initial_user_namespace():
            fix = _userns_sysctl_fix()
            raise _refuse(
                f"cannot create a network namespace inside the user namespace ({failure.strerror})",
                *([fix] if fix else []),
                _AS_ROOT,
            )
        raise _refuse(
            f"cannot create a network namespace ({failure.strerror})",
            _AS_ROOT + " with CAP_NET_ADMIN and CAP_SYS_ADMIN",
            "use --tunpair-userns=auto" if mode == "never" else _UNSHARE,
        )
    in_userns = not in_initial_user_namespace()
    return Status(
        entered=entered,
        in_userns=in_userns,
        outer_uid=outer_uid() if in_userns else os.getuid(),
        can_return=thread_can_return(),
    )


# -- disposable threads --------------------------------------------------------------------
_local = threading.local()


def thread_is_disposable() -> bool:
    """True on a thread started by :func:`run_in_disposable_thread`.

    Such a thread need not return from the network namespace it enters (``NetNamespace``
    then only drops its references): it ends right after, and the namespace with it.
    """
    return bool(getattr(_local, "disposable", False))


class ThreadNotStopped(TunPairError):
    """An interruption (e.g. a pytest-timeout failure) could not stop a disposable thread."""


def _clone_exception_type(exc: BaseException, landed: threading.Event) -> type[BaseException]:
    """A subclass of ``type(exc)`` whose no-argument construction recreates ``exc``.

    ``PyThreadState_SetAsyncExc`` takes a type on Python 3.11 and builds the instance with
    no arguments, in the target thread, when the exception lands there: this keeps the
    message (e.g. pytest-timeout's "Timeout (>5.0s)") and tells us it has landed.
    """
    base = type(exc)

    def __init__(self: BaseException) -> None:
        try:
            base.__init__(self, *exc.args)
        except TypeError:
            BaseException.__init__(self, *exc.args)
        self.__dict__.update(getattr(exc, "__dict__", {}))
        landed.set()

    return type(
        base.__name__,
        (base,),
        {"__init__": __init__, "__module__": base.__module__, "__qualname__": base.__qualname__},
    )


def _raise_in_thread(ident: int, exc: BaseException, landed: threading.Event) -> None:
    set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
    set_async_exc.argtypes = (ctypes.c_ulong, ctypes.py_object)
    set_async_exc(ident, _clone_exception_type(exc, landed))


_POLL = 0.1


def _wait(event: threading.Event, timeout: float | None = None) -> bool:
    """``event.wait(timeout)`` that lets the calling thread run its signal handlers.

    A lock wait is woken by a signal only if the kernel delivers it to this very thread,
    and it need not (measured: a SIGINT sent by another of our threads with ``kill()``
    left the main thread asleep for good, its handler pending). Returning to the
    interpreter every 0.1 s lets the main thread run pending handlers -- raising
    KeyboardInterrupt or pytest-timeout's failure -- wherever the signal landed.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        step = _POLL if deadline is None else min(_POLL, deadline - time.monotonic())
        if step <= 0:
            return event.is_set()
        if event.wait(step):
            return True


def run_in_disposable_thread(fn: Callable[[], T], *, name: str, grace: float = 5.0) -> T:
    """Run ``fn`` on a fresh thread that may end inside another network namespace.

    The calling thread waits interruptibly. An exception that reaches it while it waits --
    KeyboardInterrupt from Ctrl-C, pytest-timeout's failure from SIGALRM, both delivered
    to the main thread only -- is raised in the worker too, at its next Python instruction,
    so the test fails or stops there as it would have on the main thread, and its teardown
    runs. A thread blocked in a system call (``time.sleep``, a ``recv`` without timeout)
    only sees it when the call returns: if it has not landed within ``grace`` seconds,
    KeyboardInterrupt is raised here at once and anything else becomes
    :class:`ThreadNotStopped`; the worker is left behind (a daemon thread).
    """
    outcome: dict[str, object] = {}
    running, done = threading.Event(), threading.Event()

    def body() -> None:
        _local.disposable = True
        try:
            try:
                running.set()
                outcome["value"] = fn()
            except BaseException as exc:
                outcome["error"] = exc
        except BaseException as late:  # an interruption that landed after fn returned
            outcome.setdefault("error", late)
        finally:
            done.set()

    worker = threading.Thread(target=body, name=name, daemon=True)
    try:
        # start() waits for the thread to boot, by which time fn may be running: an
        # interruption there must be forwarded too.
        worker.start()
        _wait(done)
    except BaseException as exc:
        if done.is_set() or not running.wait(grace) or worker.ident is None:
            raise  # finished, or never started
        landed = threading.Event()
        _raise_in_thread(worker.ident, exc, landed)
        if not _wait(landed, grace) and not done.is_set():
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            raise ThreadNotStopped(
                f"{exc.__class__.__name__}: {exc} -- and the test's thread {name!r} did not "
                f"stop within {grace:g} s (it is blocked in a system call, which only the "
                "main thread's signal handlers can interrupt). Use pytest-timeout's thread "
                "method (timeout_method = thread), or run under `unshare -Urn` or as root, "
                "where tests run on the main thread."
            ) from exc
        _wait(done)
    if "error" in outcome:
        error = outcome["error"]
        assert isinstance(error, BaseException)
        raise error
    return outcome["value"]  # type: ignore[return-value]
