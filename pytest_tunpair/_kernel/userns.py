"""Running without root: what the kernel allows this process, and a user namespace of our own.

Kernel probes (capabilities, which user namespace, whether a thread could come back from
another network namespace), the refusal messages naming the fixes, and entering a user
namespace (:func:`prepare`). The threads that need not come back are in ``_disposable.py``.

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
thread* that enters the test's namespace and simply
ends (``_disposable.run_in_disposable_thread``). The main thread never leaves the host namespace, so tests without a tunnel keep
seeing the host network.

Why not make every worker process enter its own user namespace: pytest-xdist workers
already run two threads when ``pytest_configure`` runs (execnet's I/O thread), and
``unshare(CLONE_NEWUSER)`` refuses a multi-threaded process (EINVAL). The controller
enters before it starts the workers, which inherit the user namespace; every test still
gets its own network namespace, so nothing is shared between workers but the uid mapping.

No pytest import here: the command-line tool uses the same machinery.
"""

from __future__ import annotations

import errno
import os
import pwd
import stat
import threading
from dataclasses import dataclass

from .._errors import OptionError, PrivilegeError
from . import linux as _linux

__all__ = [
    "MODES",
    "Status",
    "check_mode",
    "has_namespace_privileges",
    "in_user_namespace",
    "prepare",
    "thread_can_return",
]

#: The user-namespace modes; :func:`check_mode` validates one. The plugin's option table
#: (``_plugin/options.py``) names them too, without importing this module (ctypes); a test
#: keeps the two equal.
MODES = ("auto", "always", "never")

# include/uapi/linux/capability.h
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
# include/linux/proc_ns.h: the initial user namespace always has this inode number.
PROC_USER_INIT_INO = 0xEFFFFFFD

TUN_PATH = _linux.TUN_PATH
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
    """True in the host's user namespace (the one every id maps to itself in)."""
    return os.stat("/proc/self/ns/user").st_ino == PROC_USER_INIT_INO


def in_user_namespace() -> bool:
    """True in a user namespace other than the initial one (``unshare -Urn``, or ours)."""
    return not in_initial_user_namespace()


def check_mode(mode: str, *, source: str) -> str:
    """``mode`` if it is one of :data:`MODES`, else :class:`OptionError` naming ``source``."""
    if mode not in MODES:
        raise OptionError("mode", mode, source=source, reason=f"use one of {', '.join(MODES)}")
    return mode


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


def _as_root(program: str) -> str:
    return f"run {program} as root"


def _unshare(program: str) -> str:
    return f"run it under `unshare -Urn {program} ...`"


_CHMOD = f"make the device usable by all users, as most distributions ship it: `sudo chmod 0666 {TUN_PATH}`"


def check_tun_device(program: str = "pytest") -> None:
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
                f"cannot open {TUN_PATH}{what}: {os.strerror(exc.errno)}",
                _CHMOD,
                _as_root(program),
            ) from None
        raise _refuse(f"cannot open {TUN_PATH}: {exc}", _as_root(program)) from None
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


def _userns_refusal(exc: OSError, program: str) -> PrivilegeError:
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
            _as_root(program),
        )
    fix = _userns_sysctl_fix()
    if fix is not None:
        return _refuse(
            f"unprivileged user namespaces are disabled ({os.strerror(exc.errno or 0)})",
            fix,
            _as_root(program),
        )
    return _refuse(
        f"cannot enter a user namespace ({exc.strerror}; in a container, its seccomp "
        "profile may forbid it)",
        _as_root(program) + " with CAP_NET_ADMIN and CAP_SYS_ADMIN (a privileged container)",
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


def enter_user_namespace(program: str = "pytest") -> None:
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
            _unshare(program),
            _as_root(program),
        )
    uid, gid = os.getuid(), os.getgid()
    try:
        _linux.unshare(_linux.CLONE_NEWUSER)
    except OSError as exc:
        raise _userns_refusal(exc, program) from None
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
        raise _userns_refusal(exc, program) from None


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

    def describe(self) -> str:
        if not self.in_userns:
            who = "root" if os.getuid() == 0 else f"uid {os.getuid()} with capabilities"
            return who
        origin = "made by pytest-tunpair" if self.entered else "inherited"
        text = f"user namespace ({origin}, uid {self.outer_uid} outside"
        if not self.can_return:
            text += "; tunnel tests run on their own threads"
        return text + ")"


def prepare(mode: str = "auto", *, may_enter: bool = True, program: str = "pytest") -> Status:
    """Make this process able to build tunnels, or raise :class:`PrivilegeError` saying why not.

    ``mode``: ``auto`` enters a user namespace only when the process lacks CAP_NET_ADMIN or
    CAP_SYS_ADMIN (unshare(CLONE_NEWNET) needs the latter); ``always`` makes sure it runs in
    one (entering one unless it already is in a user namespace other than the initial one);
    ``never`` refuses to. ``may_enter=False`` (an xdist worker: already multi-threaded)
    relies on the parent process having entered one. ``program`` is what the refusals
    tell the user to run differently (``pytest``, ``tunpair``).
    """
    check_mode(mode, source="prepare()")
    check_tun_device(program)
    privileged = has_namespace_privileges()
    if mode == "never" and not privileged:
        raise _refuse(
            "this process lacks CAP_NET_ADMIN and CAP_SYS_ADMIN, and --tunpair-userns=never "
            "forbids entering a user namespace",
            _as_root(program),
            _unshare(program),
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
                _unshare(program),
                _as_root(program),
            )
        real_uid = os.getuid()
        _keep_user_name(real_uid)
        enter_user_namespace(program)
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
                _as_root(program),
            )
        raise _refuse(
            f"cannot create a network namespace ({failure.strerror})",
            _as_root(program) + " with CAP_NET_ADMIN and CAP_SYS_ADMIN",
            "use --tunpair-userns=auto" if mode == "never" else _unshare(program),
        )
    in_userns = not in_initial_user_namespace()
    return Status(
        entered=entered,
        in_userns=in_userns,
        outer_uid=outer_uid() if in_userns else os.getuid(),
        can_return=thread_can_return(),
    )
