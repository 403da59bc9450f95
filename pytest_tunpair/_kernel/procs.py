"""Processes inside a pair's namespace: ``spawn`` with readiness, and nothing left running.

A process belongs to a network namespace when ``/proc/PID/ns/net`` is the namespace's
inode (the thread-group leader's namespace; docs/internals.md, "Daemons: processes in a
namespace"). That is how processes are found at teardown, whatever they did to hide from a
process-group kill: sshd's per-connection children call ``setsid()``, so ``killpg`` misses
them, but they stay in the namespace and keep their parent. So teardown takes the
namespace's members and walks their parent links up to a process :func:`spawn` started
(plus those that still carry the spawn's environment tag, for a daemon whose parent has
already exited); the rest are *leftovers*, which the caller's policy handles. Processes of
other namespaces -- the host's -- are never looked at twice, let alone signalled.

Every signal goes through a pidfd opened after the namespace check and checked again
through it, so a pid reused meanwhile is never signalled.

Readiness is read from the namespace's socket tables (``/proc/PID/net/tcp`` and friends,
which list every socket of the namespace PID is in; docs/internals.md, "Daemons: readiness
from /proc/PID/net"): waiting for a server never puts a packet on the wire, so it adds
nothing to the capture.

No pytest here: the command-line tool uses the same machinery.
"""

from __future__ import annotations

import functools
import os
import secrets
import select
import shlex
import signal
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .._errors import LeftoverProcessError, LeftoverProcessWarning, SpawnError
from .device import native_builder

__all__ = [
    "LEFTOVER_POLICIES",
    "TERM_GRACE",
    "Keeper",
    "Proc",
    "Ready",
    "describe",
    "members",
    "parse_ready",
    "stop_all",
    "terminate",
]

#: SIGTERM, then this many seconds, then SIGKILL.
TERM_GRACE = 2.0
#: What teardown does with processes ``spawn`` did not start. The plugin's option table
#: (``_plugin/options.py``) names them too, without importing this module; a test keeps
#: the two equal.
LEFTOVER_POLICIES = ("kill", "warn", "fail")
#: Environment variable every spawned process starts with; inherited by children that keep
#: their environment, it still names them once their parent is gone (a daemon's double fork).
SPAWN_TAG = "TUNPAIR_SPAWN_TAG"
#: Lines of a spawned process's output a SpawnError shows.
OUTPUT_LINES = 20
# How often readiness is polled: first quickly (a server that binds at once is seen within
# a few ms), then less often (a slow one does not cost a core).
_POLL_FIRST, _POLL_MAX = 0.005, 0.02
# include/net/tcp_states.h: TCP_LISTEN; an unconnected UDP socket reads TCP_CLOSE.
_TCP_LISTEN = 0x0A
_TCP_CLOSE = 0x07


# -- who is in the namespace -----------------------------------------------------------------
@dataclass(frozen=True)
class Proc:
    """One process seen in the namespace (``start`` tells a reused pid from the first one)."""

    pid: int
    ppid: int
    start: int

    @property
    def key(self) -> tuple[int, int]:
        return (self.pid, self.start)


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, start time) from ``/proc/PID/stat``; the command name may hold spaces and
    parentheses, so fields are counted from the last ``)``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rfind(b")") + 2 :].split()
    try:
        return int(fields[1]), int(fields[19])
    except (IndexError, ValueError):
        return None


def _same_ns(pid: int, ns: os.stat_result) -> bool:
    # The link's text names the namespace's nsfs inode ("net:[4026532]"): half the cost of
    # a stat() of it, which a scan of /proc pays once per process.
    try:
        link = os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return False  # gone, a zombie (its namespaces are released at exit), or not ours
    return link == f"net:[{ns.st_ino}]"


@dataclass(frozen=True)
class PidMark:
    """A moment in the pid allocator's life: the last pid given out in our pid namespace
    (``/proc/sys/kernel/ns_last_pid``) and the number of processes created since boot (the
    ``processes`` line of ``/proc/stat``, all pid namespaces). A process created after it
    has a pid after ``last`` in the allocator's cycle, which restarts from the bottom after
    ``pid_max`` (docs/internals.md, "Which pids are new").
    """

    last: int
    forks: int

    @classmethod
    def now(cls) -> PidMark | None:
        """The current mark, or ``None`` if the kernel does not say."""
        native = native_builder()
        if native is not None:  # the same reads, holding no GIL (_build.c)
            numbers = native.pid_mark()
            return None if numbers is None else cls(*numbers)
        try:
            with open("/proc/sys/kernel/ns_last_pid", "rb") as f:
                last = int(f.read())
            with open("/proc/stat", "rb") as f:
                for line in f:
                    if line.startswith(b"processes "):
                        return cls(last, int(line.split()[1]))
        except (OSError, ValueError):
            pass
        return None

    def newer(self) -> tuple[range, ...] | None:
        """The pids given out since this mark (processes' and threads'); ``None`` if the
        allocator may have come all the way round since (so that any pid may be new)."""
        now = PidMark.now()
        if now is None or now.forks - self.forks >= _pid_cycle():
            return None
        start, end = self.last, now.last
        if end >= start:  # no wrap
            return (range(start + 1, end + 1),)
        return (range(start + 1, 1 << 22), range(0, end + 1))  # wrapped once (pid_max <= 2^22)


#: Up to this many new pids, members() looks each up instead of listing /proc.
_FEW = 256


def _is_process(pid: int) -> bool:
    """``pid`` is a process's (a thread group leader's), not only a thread's."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1]) == pid
    except (OSError, ValueError):
        pass
    return False


@functools.cache
def _pid_cycle() -> int:
    """How many pids the allocator gives out before it can reach a pid again (less the
    first 300, never reused after boot): a lower bound."""
    try:
        with open("/proc/sys/kernel/pid_max", "rb") as f:
            return max(int(f.read()) - 301, 1)
    except (OSError, ValueError):
        return 1


def members(ns: os.stat_result, since: PidMark | None = None) -> dict[int, Proc]:
    """The processes (other than this one) whose network namespace is ``ns``; with
    ``since``, a mark taken when the namespace was new, only those created after it (so
    only their links are read: a namespace's processes are made in it -- one that entered
    it by ``setns`` itself, being older, is not looked for)."""
    me = os.getpid()
    found: dict[int, Proc] = {}
    newer = since.newer() if since is not None else None
    pids: Iterable[int]
    if newer is not None and sum(len(r) for r in newer) <= _FEW:
        # Few new pids (the usual test's: a thread or two): look each up, rather than list
        # /proc. A pid may be a thread's, which /proc's listing leaves out: skip those.
        # Most are this process's own threads (a relay's): a lookup in our task list, not a
        # read of their status (which the kernel writes out, 20-70 us a pid here).
        pids = (
            pid
            for r in newer
            for pid in r
            if _same_ns(pid, ns)
            and not os.path.exists(f"/proc/self/task/{pid}")
            and _is_process(pid)
        )
    else:
        listed = (int(name) for name in os.listdir("/proc") if name.isdigit())
        pids = listed if newer is None else (p for p in listed if any(p in r for r in newer))
    for pid in pids:
        if pid == me or not _same_ns(pid, ns):
            continue
        st = _stat(pid)
        if st is not None:
            found[pid] = Proc(pid, st[0], st[1])
    return found


def _tagged(pid: int, tag: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return tag in f.read().split(b"\0")
    except OSError:
        return False


def describe(pid: int) -> str:
    """``PID (command line)`` for messages; the command name if the line is unreadable."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        argv = []
    if not argv:
        try:
            argv = [f"[{Path(f'/proc/{pid}/comm').read_text().strip()}]"]
        except OSError:
            argv = ["?"]
    line = " ".join(argv)
    return f"{pid} ({line if len(line) <= 80 else line[:77] + '...'})"


def _pidfds(pids: Iterable[int], ns: os.stat_result) -> dict[int, int]:
    """``{pid: pidfd}`` for those still in ``ns``, re-checked through the pidfd's pid: the
    first look may have been at a pid that was reused since."""
    fds: dict[int, int] = {}
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            continue
        if _same_ns(pid, ns):
            fds[pid] = fd
        else:
            os.close(fd)
    return fds


def stop_all(ns: os.stat_result, *, grace: float = TERM_GRACE) -> list[str]:
    """Stop every process (but this one) in the namespace ``ns``; their descriptions."""
    found = members(ns)
    names = [describe(pid) for pid in sorted(found)]
    if found:
        terminate(_pidfds(found, ns), grace=grace)
    return names


def terminate(procs: Mapping[int, int], *, grace: float = TERM_GRACE) -> None:
    """SIGTERM every pidfd, wait up to ``grace`` s for them to exit, SIGKILL the rest and
    wait for those to be gone too. Closes the pidfds."""
    try:
        for fd in procs.values():
            _signal(fd, signal.SIGTERM)
        alive = _wait_exit(procs.values(), grace)
        for fd in alive:
            _signal(fd, signal.SIGKILL)
        # SIGKILL is delivered asynchronously: "nothing left running" means waiting for it.
        _wait_exit(alive, 5.0)
    finally:
        for fd in procs.values():
            os.close(fd)


def _signal(pidfd: int, sig: int) -> None:
    try:
        signal.pidfd_send_signal(pidfd, sig)
    except ProcessLookupError:
        pass


def _wait_exit(fds: Iterable[int], timeout: float) -> set[int]:
    """Wait until every pidfd is readable (its process has exited); return those still not."""
    alive = set(fds)
    poller = select.poll()
    for fd in alive:
        poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    while alive:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        for fd, _ev in poller.poll(remaining * 1000):
            alive.discard(fd)
            poller.unregister(fd)
    return alive


# -- readiness ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ready:
    """What ``spawn(ready=...)`` waits for, parsed once (bad values fail before the start)."""

    kind: str  # "tcp", "udp", "path", "call"
    port: int = 0
    path: str = ""
    call: Callable[[], object] | None = None

    def describe(self) -> str:
        if self.kind == "tcp":
            return f"a TCP socket listening on port {self.port}"
        if self.kind == "udp":
            return f"a UDP socket bound to port {self.port}"
        if self.kind == "path":
            return f"{self.path} to exist"
        return f"{getattr(self.call, '__qualname__', repr(self.call))}() to return true"

    def met(self, pid: int) -> bool:
        if self.kind == "path":
            return os.path.exists(self.path)
        if self.kind == "call":
            assert self.call is not None
            return bool(self.call())
        return _port_bound(pid, self.kind, self.port)


_READY_HELP = (
    "use a TCP port (ready=8080), ('udp', 5353), ('tcp', 8080), a path that must exist, "
    "or a callable polled until it returns true"
)


def parse_ready(ready: object) -> Ready | None:
    if ready is None:
        return None
    if isinstance(ready, bool):
        raise TypeError(f"spawn(ready={ready!r}): {_READY_HELP}")
    if isinstance(ready, int):
        return Ready("tcp", port=_port(ready))
    if isinstance(ready, tuple) and len(ready) == 2 and ready[0] in ("tcp", "udp"):
        if isinstance(ready[1], int) and not isinstance(ready[1], bool):
            return Ready(ready[0], port=_port(ready[1]))
    if isinstance(ready, (str, os.PathLike)):
        return Ready("path", path=os.fspath(ready))
    if callable(ready):
        return Ready("call", call=ready)
    raise TypeError(f"spawn(ready={ready!r}): {_READY_HELP}")


def _port(port: int) -> int:
    if not 1 <= port <= 65535:
        raise ValueError(f"spawn(ready={port}): a port is 1-65535")
    return port


def _port_bound(pid: int, proto: str, port: int) -> bool:
    """True if the socket table of ``pid``'s namespace has a socket on ``port``: listening
    (TCP) or bound and unconnected (UDP)."""
    want = _TCP_LISTEN if proto == "tcp" else _TCP_CLOSE
    for table in (proto, proto + "6"):
        try:
            with open(f"/proc/{pid}/net/{table}", "rb") as f:
                lines = f.read().splitlines()[1:]
        except FileNotFoundError:
            continue  # no IPv6 in this kernel
        for line in lines:
            # "  0: 0200120C:1F90 00000000:0000 0A ...": local address:port, remote, state
            fields = line.split()
            if len(fields) > 3 and int(fields[3], 16) == want:
                if int(fields[1].rsplit(b":", 1)[1], 16) == port:
                    return True
    return False


# -- spawned processes ---------------------------------------------------------------------------
class Keeper:
    """Spawns processes into one namespace and stops them (and what else is there) at the end.

    ``ns`` is the namespace's ``fstat`` (kept open by its owner for as long as the keeper is
    used). ``spawn``'s ``run_inside`` runs a callable with the calling thread inside the
    namespace, so that the child forked there starts in it.
    """

    def __init__(
        self, ns: os.stat_result, *, leftovers: str = "warn", born: PidMark | None = None
    ) -> None:
        if leftovers not in LEFTOVER_POLICIES:
            raise ValueError(f"leftovers={leftovers!r}: use one of {', '.join(LEFTOVER_POLICIES)}")
        self._ns = ns
        # Taken before the namespace was made (``born``: by whoever made it, e.g. a spare's
        # builder), or now, with it: every process in it is newer (members(since=)).
        self._born = born or PidMark.now()
        self.leftovers = leftovers
        self.spawned: list[subprocess.Popen[Any]] = []
        self._logs: dict[int, IO[bytes]] = {}  # pid -> its output file
        self._tag = f"{SPAWN_TAG}={os.getpid()}-{secrets.token_hex(6)}"
        #: How a ``warn`` policy warns (the plugin points the warning at the test).
        self.warn: Callable[[str], None] = _warn
        self._lock = threading.Lock()

    # -- spawn -------------------------------------------------------------------------------
    def spawn(
        self,
        args: Sequence[str] | str,
        *,
        ready: object = None,
        timeout: float = 10.0,
        run_inside: Callable[[Callable[[], subprocess.Popen[Any]]], subprocess.Popen[Any]],
        **popen_kwargs: Any,
    ) -> subprocess.Popen[Any]:
        wait_for = parse_ready(ready)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0:
            raise ValueError(f"spawn(timeout={timeout!r}): give seconds >= 0")
        env = popen_kwargs.pop("env", None)
        env = dict(os.environ if env is None else env)
        name, _, value = self._tag.partition("=")
        env[name] = value
        popen_kwargs.setdefault("start_new_session", True)
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        log: IO[bytes] | None = None
        if "stdout" not in popen_kwargs or "stderr" not in popen_kwargs:
            # Unlinked at once (O_TMPFILE on Linux): nothing to clean up on disk, readable
            # for SpawnError and output() while the keeper lives.
            log = tempfile.TemporaryFile()
            popen_kwargs.setdefault("stdout", log)
            popen_kwargs.setdefault("stderr", log)
        try:
            proc = run_inside(lambda: subprocess.Popen(args, env=env, **popen_kwargs))
        except BaseException:
            if log is not None:
                log.close()
            raise
        with self._lock:
            self.spawned.append(proc)
            if log is not None:
                self._logs[proc.pid] = log
        if wait_for is not None:
            self._wait_ready(proc, args, wait_for, timeout)
        return proc

    def output(self, proc: subprocess.Popen[Any]) -> str:
        """What a spawned process wrote to the output file ``spawn`` gave it ("" if none)."""
        log = self._logs.get(proc.pid)
        if log is None:
            return ""
        fd = log.fileno()
        chunks = []
        offset = 0
        while chunk := os.pread(fd, 1 << 16, offset):
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks).decode(errors="replace")

    def _wait_ready(
        self, proc: subprocess.Popen[Any], args: Sequence[str] | str, ready: Ready, timeout: float
    ) -> None:
        deadline = time.monotonic() + timeout
        step = _POLL_FIRST
        while True:
            status = proc.poll()
            if status is None:
                try:
                    if ready.met(proc.pid):
                        return
                except Exception as exc:
                    self._fail(proc, args, f"failed its readiness check: {exc!r}", exc)
            if status is not None:
                self._fail(proc, args, f"exited with status {status} before {ready.describe()}")
            if time.monotonic() >= deadline:
                self._fail(
                    proc,
                    args,
                    f"was not ready within {timeout:g} s: still waiting for {ready.describe()} "
                    "in the namespace (stopped it)",
                )
            time.sleep(step)
            step = min(step * 2, _POLL_MAX)

    def _fail(
        self,
        proc: subprocess.Popen[Any],
        args: Sequence[str] | str,
        what: str,
        cause: BaseException | None = None,
    ) -> None:
        self.stop_family([proc])
        output = self.output(proc)
        tail = output.splitlines()[-OUTPUT_LINES:]
        command = args if isinstance(args, str) else shlex.join(map(str, args))
        text = f"spawn: `{command}` {what}"
        if proc.pid in self._logs:
            text += (
                "; its last output:\n" + "\n".join("    " + line for line in tail)
                if tail
                else "; it wrote no output"
            )
        raise SpawnError(
            text,
            command=args,
            returncode=proc.returncode,
            output="\n".join(tail),
        ) from cause

    # -- teardown ------------------------------------------------------------------------------
    def snapshot(self) -> set[tuple[int, int]]:
        """Who is in the namespace now (for :meth:`stop_leftovers` ``since=``)."""
        return {p.key for p in members(self._ns, self._born).values()}

    def _split(self, found: Mapping[int, Proc]) -> tuple[set[int], set[int]]:
        """(spawned processes and their descendants, everything else) among ``found``."""
        roots = {p.pid for p in self.spawned if p.returncode is None}
        family: set[int] = set()
        for pid in found:
            seen: set[int] = set()
            cur = pid
            # Up the parent links, inside the namespace only: a spawned process's children
            # stay in it (they inherit it), and the host's processes are not our business.
            while cur in found and cur not in seen:
                if cur in roots or cur in family:
                    family.add(pid)
                    break
                seen.add(cur)
                cur = found[cur].ppid
        tag = self._tag.encode()
        for pid in set(found) - family:
            if _tagged(pid, tag):
                family.add(pid)
        return family, set(found) - family

    def stop_family(self, procs: Iterable[subprocess.Popen[Any]] | None = None) -> None:
        """SIGTERM, then SIGKILL, the spawned processes (all, or ``procs``) and every process
        in the namespace descended from them; reap the ones we started."""
        ns = self._ns
        chosen = list(self.spawned if procs is None else procs)
        for _round in range(3):  # a dying parent may still fork: look again
            found = members(ns, self._born)
            family, _rest = self._split(found)
            if procs is not None:
                wanted = {p.pid for p in chosen}
                family = {pid for pid in family if _descends(pid, wanted, found)}
            if not family:
                break
            terminate(_pidfds(family, ns))
        for proc in chosen:
            try:
                proc.wait(timeout=5.0)  # our child: reap it
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILLed above
                pass

    def stop_leftovers(
        self, *, since: set[tuple[int, int]] | None = None, policy: str | None = None
    ) -> list[str]:
        """Handle processes in the namespace that :meth:`spawn` did not start (only those
        that were not there at ``since``, a :meth:`snapshot`): stop them, and by the policy
        (``kill``, ``warn``, ``fail``) warn or raise :class:`LeftoverProcessError` naming
        them. Returns their descriptions."""
        policy = policy or self.leftovers
        ns = self._ns
        found = members(ns, self._born)
        _family, rest = self._split(found)
        if since is not None:
            rest = {pid for pid in rest if found[pid].key not in since}
        if not rest:
            return []
        names = [describe(pid) for pid in sorted(rest)]
        terminate(_pidfds(rest, ns))
        if policy == "kill":
            return names
        count = "1 process" if len(names) == 1 else f"{len(names)} processes"
        message = (
            f"stopped {count} left running in the tunnel namespace: {'; '.join(names)}. "
            "Start daemons with tun_pair.spawn() (stopped quietly at teardown), or stop them "
            "before the test ends; --tunpair-leftovers=kill stops them without a word"
        )
        if policy == "fail":
            raise LeftoverProcessError(message, processes=names)
        self.warn(message)
        return names

    def close(self, *, leftovers: bool = True) -> None:
        """Stop everything in the namespace: spawned families quietly, then the leftovers by
        the policy (may raise :class:`LeftoverProcessError`, after stopping them all)."""
        try:
            if self.spawned:
                self.stop_family()
            if leftovers:
                self.stop_leftovers()
        finally:
            for log in self._logs.values():
                log.close()
            self._logs.clear()


def _warn(message: str) -> None:
    warnings.warn(LeftoverProcessWarning(message), stacklevel=4)


def _descends(pid: int, roots: set[int], found: Mapping[int, Proc]) -> bool:
    seen: set[int] = set()
    while pid in found and pid not in seen:
        if pid in roots:
            return True
        seen.add(pid)
        pid = found[pid].ppid
    return pid in roots
