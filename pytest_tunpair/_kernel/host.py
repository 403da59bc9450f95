"""A host: one network stack (a network namespace), the processes in it, and ways in.

In hosts mode each end of a pair, and each machine of a topology, is a :class:`Host`: its
own interfaces, routes, sysctls and netfilter rules, its own processes (a :class:`Keeper`
per namespace, so teardown stops what runs there and nothing else), and its own sockets.
The test reaches into it by running code there (:meth:`Host.run`, :meth:`Host.entered`),
spawning daemons (:meth:`Host.spawn`) or pointing ``nsenter`` at it (:attr:`Host.ns_path`,
:attr:`Host.pid`).

No pytest here: the command-line tool uses the same machinery.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from .._errors import NamespaceError, PairClosedError
from .netns import NetNamespace, new_namespace, run_in
from .procs import Keeper

if TYPE_CHECKING:
    from .sockets import SocketInfo

__all__ = ["Host", "prepare_host"]

T = TypeVar("T")


def prepare_host(ns: NetNamespace) -> None:
    """A new host's settings, made inside it: ``lo`` up, and no link-local IPv6 addresses
    on its devices (no router solicitations or MLD in the capture: docs/internals.md, "No
    link-local addresses"). Nothing else: a host keeps the kernel's defaults, so a test's
    own sysctls are the only difference between hosts."""
    from . import routing

    if os.path.isdir("/proc/sys/net/ipv6"):
        ns.write_sysctl("net/ipv6/conf/default/addr_gen_mode", 1)
    routing.link_up_lo()


def _congestion_hint(path: str, err: int | None) -> str:
    """Why a congestion control was refused: not available, or (EPERM) restricted. Outside
    the initial namespace only the algorithms of ``tcp_allowed_congestion_control`` may be
    chosen (net/ipv4/tcp_cong.c, tcp_set_default_congestion_control)."""
    which = "allowed" if err == errno.EPERM else "available"
    listed = ""
    with (
        contextlib.suppress(OSError),
        open(path.replace("tcp_congestion", f"tcp_{which}_congestion")) as f,
    ):
        listed = f.read().strip()
    if err == errno.EPERM:
        return (
            " (outside the machine's own namespace only the algorithms of "
            f"net.ipv4.tcp_allowed_congestion_control may be picked: {listed}; that list is "
            "set on the machine itself)"
        )
    return f" (available here: {listed})"


class Host:
    """One network stack of a pair or a topology (``tun_pair.b.host``, ``topo["router"]``).

    ``name`` is how reports and errors call it (``"a"``, ``"b"``, ``"client1"``). A host
    made for the pair (:meth:`new`) is torn down with it: its processes stopped, its
    namespace (and the devices in it) released. A host over the pair's own namespace (host
    ``a`` in hosts mode, both ends otherwise) belongs to whoever made that namespace.
    """

    def __init__(self, name: str, netns: NetNamespace, keeper: Keeper, *, own: bool) -> None:
        self.name = name
        """The host's name in reports (``"a"``, ``"b"``, ``"client1"``, ...)."""
        self._netns = netns
        self._keeper = keeper
        self._own = own
        self._holder: subprocess.Popen[Any] | None = None
        self._stopped = False
        self._closed = False
        # Each sysctl() write as (path, value before): what a longer-lived pair's test
        # changed is put back at its end (_restore_sysctls).
        self._sysctl_log: list[tuple[str, str]] = []

    @classmethod
    def new(cls, name: str, *, leftovers: str = "warn") -> Host:
        """A host with a fresh namespace of its own (``lo`` up, nothing else)."""
        ns = new_namespace()
        try:
            run_in(ns, lambda: prepare_host(ns))
            keeper = Keeper(ns.stat(), leftovers=leftovers)
        except BaseException:
            ns.exit()
            raise
        return cls(name, ns, keeper, own=True)

    # -- ways in ---------------------------------------------------------------------------
    def _ns(self) -> NetNamespace:
        """The host's network namespace (``PairClosedError`` once the host is closed)."""
        if self._closed or not self._netns.active:
            raise PairClosedError(f"host {self.name} is closed: use it while the pair is open")
        return self._netns

    def _open_keeper(self) -> Keeper:
        self._ns()  # raises once closed
        return self._keeper

    def checkpoint(self) -> tuple[set[tuple[int, int]], int]:
        """Who runs here now, and how many processes :meth:`spawn` started so far: what
        :meth:`restore` stops the processes started after (one test of a longer-lived
        pair)."""
        keeper = self._open_keeper()
        return keeper.snapshot(), len(keeper.spawned)

    def restore(self, checkpoint: tuple[set[tuple[int, int]], int]) -> None:
        """Stop what was started here since ``checkpoint``: spawned families quietly, other
        processes by the leftover policy (may raise ``LeftoverProcessError``)."""
        since, spawned = checkpoint
        keeper = self._open_keeper()
        if len(keeper.spawned) > spawned:
            keeper.stop_family(keeper.spawned[spawned:])
        keeper.stop_leftovers(since=since)

    @property
    def ns_path(self) -> str:
        """``nsenter --net=PATH`` enters this host's network namespace (while it is open)."""
        return self._ns().path

    @property
    def pid(self) -> int:
        """A process living in this host's namespace (started on first use, stopped at
        teardown): ``nsenter -t PID -n ...``, or ``/proc/PID/ns/net`` for tools that want a
        namespace file."""
        holder = self._holder
        if holder is None or holder.poll() is not None:
            holder = self._holder = self.spawn(["sleep", "infinity"])
        return holder.pid

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` inside this host: on the calling thread if it is there
        already, else on a short-lived thread that joins it (what ``fn`` forks or starts
        runs there too). Its result, or its exception, comes back to the caller."""
        return run_in(self._ns(), lambda: fn(*args, **kwargs))

    @contextmanager
    def entered(self) -> Iterator[Host]:
        """``with host.entered(): ...`` runs the block with the calling thread inside this
        host (sockets made there are this host's), and takes it back after."""
        ns = self._ns()
        if ns.is_current():
            yield self
            return
        visit = ns.join()
        try:
            yield self
        finally:
            visit.leave()

    def spawn(
        self,
        args: Sequence[str] | str,
        *,
        ready: object = None,
        timeout: float = 10.0,
        **popen_kwargs: Any,
    ) -> subprocess.Popen[Any]:
        """Start ``args`` in this host; the same ``ready`` forms and teardown as
        ``TunPair.spawn`` (readiness is read from this host's socket tables)."""
        return self._open_keeper().spawn(
            args,
            ready=ready,
            timeout=timeout,
            run_inside=lambda fn: run_in(self._ns(), fn),
            **popen_kwargs,
        )

    def output(self, proc: subprocess.Popen[Any]) -> str:
        """What a process :meth:`spawn` started here wrote ("" if its output went elsewhere)."""
        return self._open_keeper().output(proc)

    def sysctl(self, name: str, value: str | int | None = None) -> str:
        """Read (``value=None``) or set a per-namespace sysctl of this host only, e.g.
        ``host.sysctl("net.ipv4.tcp_congestion_control", "reno")``; returns the value now
        in force. Names use dots or slashes. Only ``net.*`` sysctls are per namespace."""
        path = "/proc/sys/" + name.strip().replace(".", "/")
        if not name.startswith("net.") and not name.startswith("net/"):
            raise ValueError(
                f"sysctl({name!r}): only net.* sysctls belong to a network namespace; "
                "others are the machine's and are never changed"
            )

        def inside() -> str:
            try:
                if value is not None:
                    with open(path) as f:
                        before = f.read().strip()
                    with open(path, "w") as f:
                        f.write(str(value))
                    self._sysctl_log.append((path, before))
                with open(path) as f:
                    return f.read().strip()
            except OSError as exc:
                if not os.path.exists(path):
                    why = "this kernel has no such sysctl (see `sysctl -a | grep net.`)"
                elif value is None:
                    why = f"it cannot be read: {exc.strerror}"
                else:
                    why = f"the kernel refused the value: {exc.strerror}"
                    if path.endswith("/tcp_congestion_control"):
                        why += _congestion_hint(path, exc.errno)
                raise NamespaceError(
                    f"host {self.name}: sysctl {name}"
                    + (f" = {value!r}" if value is not None else "")
                    + f" failed: {why}",
                    netns=self.ns_path,
                ) from exc

        return self.run(inside)

    def _sysctl_mark(self) -> int:
        """Where :meth:`_restore_sysctls` goes back to (a module or session pair's test)."""
        return len(self._sysctl_log)

    def _restore_sysctls(self, mark: int) -> None:
        """Put back, newest first, every value :meth:`sysctl` set since ``mark``."""
        undo = self._sysctl_log[mark:]
        del self._sysctl_log[mark:]
        if undo and not self.closed:

            def inside() -> None:
                for path, before in reversed(undo):
                    with open(path, "w") as f:
                        f.write(before)

            self.run(inside)

    def sockets(self, proto: str = "tcp") -> list[SocketInfo]:
        """Every ``proto`` (``"tcp"``/``"udp"``) socket of this host, whichever process owns
        it, as the kernel reports it (NETLINK_SOCK_DIAG, with ``tcp_info`` for TCP)."""
        from .sockets import PROTOCOLS, dump

        if proto not in PROTOCOLS:
            raise ValueError(f"sockets(proto={proto!r}): use one of {', '.join(PROTOCOLS)}")
        return self.run(dump, proto)

    # -- teardown -------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop the processes of a host made by :meth:`new` (by the leftover policy: may
        raise ``LeftoverProcessError``, after stopping them all); :meth:`close` then
        releases its namespace. A host over someone else's namespace leaves both to them."""
        if self._own and not self._stopped:
            self._stopped = True
            self._keeper.close()

    def close(self) -> None:
        """:meth:`stop`, then release the namespace (and the devices in it)."""
        if self._closed:
            return
        try:
            self.stop()
        finally:
            self._closed = True
            if self._own and self._netns.active:
                self._netns.exit()

    @property
    def closed(self) -> bool:
        """True once the host's pair (or topology) has closed."""
        return self._closed or not self._netns.active

    def __repr__(self) -> str:
        state = "closed" if self.closed else self.ns_path
        return f"<Host {self.name} {state}>"
