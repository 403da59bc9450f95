"""``TunPair``: two devices, the routing recipe and a relay -- usable without pytest.

from pytest_tunpair import TunPair

with TunPair() as pair:           # the calling thread is now in a fresh namespace
    subprocess.run(["ping", "-c1", pair.b.ip], check=True)
    print(pair.packets.summary())
"""

from __future__ import annotations

import math
import os
import secrets
import select
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from ._errors import (
    LeftoverProcessError,
    NamespaceError,
    OptionError,
    PairClosedError,
    TunPairError,
)
from ._kernel import linux as _linux
from ._kernel import routing as _routing
from ._kernel import spare as _spare
from ._kernel.device import DeviceCounters, TunDevice, release_fds
from ._kernel.host import Host
from ._kernel.netns import NetNamespace, run_in
from ._kernel.procs import Keeper
from ._kernel.spare import BuiltDevices, DevicePlan
from ._kernel.threads import own_thread
from ._link.control import Direction, DirectionState
from ._link.counters import Stats
from ._link.endpoint import Endpoint
from ._link.hooks import Hook
from ._link.relay import Relay
from ._options import PairOptions
from ._packets.capture import Capture
from ._packets.packet import DIRECTIONS, Packet

if TYPE_CHECKING:
    import ssl
    from concurrent.futures import ThreadPoolExecutor

    from ._kernel.resolver import Resolver
    from ._kernel.sockets import SocketInfo
    from ._link.link import Divert, Rule
    from ._link.nat import Nat
    from ._link.rules import Fault, Outage, PathMtu
    from ._packets.keylog import KeyLog
    from ._peer.peer import ScriptedPeer

T = TypeVar("T")
# How often settle() looks at the devices' queues once the relay holds nothing.
_SETTLE_POLL = 0.002
# How long wait_quiet() lets the relay finish the turn of its loop it is in (a busy machine
# may keep its thread off the CPU for a while; held packets are counted anyway).
_QUIET_TURN = 0.05

__all__ = ["Checkpoint", "TunPair", "run_in"]


def prepare_namespace(ns: NetNamespace) -> None:
    """Per-namespace settings, done once, inside the namespace (never on the host)."""
    _spare.prepare(ns.write_sysctl)


def _macs(mode: str, index: int) -> tuple[str | None, str | None]:
    """The devices' MAC addresses in TAP mode: stable, so captures and pcaps compare across
    runs (02 = locally administered unicast, never a vendor's; 74:70 = "tp"; then the
    pair's index and the side)."""
    if mode != "tap":
        return (None, None)
    return (f"02:74:70:00:{index & 0xFF:02x}:01", f"02:74:70:00:{index & 0xFF:02x}:02")


def device_plan(o: PairOptions, index: int = 0) -> DevicePlan | None:
    """What the devices of a pair with options ``o`` (the ``index``-th of its factory) depend
    on, when they are built in the pair's namespace by the recipe (:func:`_spare.build_devices`);
    ``None`` for devices in hosts of their own (the ``hosts`` option)."""
    if o.hosts:
        return None
    return DevicePlan(
        names=(o.names[0], o.names[1]),
        mode=o.mode,
        vnet_hdr=o.offload,
        v4=o.ipv4 or (None, None),
        v6=o.ipv6 or (None, None),
        macs=_macs(o.mode, index),
        mtu=o.mtu,
        table=o.table,
        txqueuelen=o.txqueuelen,
        no_ipv6=o.ipv6 is None,
    )


class TunPair:
    """Two TUN (or TAP) devices in one network namespace, routed through a relay thread.

    Without ``netns`` it creates a fresh namespace and moves the *calling thread* into it
    until :meth:`close`; with ``netns`` (used by :class:`TunPairFactory`) it joins that one.
    """

    def __init__(
        self,
        options: PairOptions | None = None,
        *,
        netns: NetNamespace | None = None,
        _keeper: Keeper | None = None,
        _random_seed: int | None = None,
        _hosts: tuple[Host, Host] | None = None,
        _built: BuiltDevices | None = None,
        **kwargs: Any,
    ) -> None:
        if options is not None and kwargs:
            raise TypeError("give either a PairOptions or keyword options, not both")
        self.options = options or PairOptions.from_kwargs(kwargs, source="TunPair()")
        """The pair's options, validated (the marker's, the factory call's or the constructor's)."""
        self._netns = netns
        self._own_netns = netns is None
        self._devices: list[TunDevice] = []
        self._relay: Relay | None = None
        self.steps: list[str] = []
        """The ``ip`` commands the set-up stands for, in order (the routing recipe as a shell would
        run it).
        """
        o = self.options
        self.packets = Capture(
            mode=o.mode,
            max_packets=o.max_packets,
            capture_bytes=o.capture_bytes,
            snaplen=o.snaplen,
            pending=self._quiet_pending,
            configured=self._configured,
            keylog=lambda: self._keylog,
            interfaces=_interface_descriptions(o),
        )
        """Every packet the relay carried, in order (a live :class:`Capture`)."""
        self._stats = Stats(self.packets.lock)
        self._keylog: KeyLog | None = None  # made on first use (keylog, spawn, ssl_context)
        self.a: Endpoint
        """Side a: the first device (``tun0``, ``198.18.0.1``)."""
        self.b: Endpoint
        """Side b: the second device (``tun1``, ``198.18.0.2``)."""
        # The two directions' control side (impairments, rules, offload need), by name.
        self._directions: dict[str, Direction] = {}
        self._random_seed = _random_seed  # a factory shares one across its pairs
        self._peers: list[ScriptedPeer] = []  # every peer scripted so far, open or closed
        # One per device, opened inside the device's namespace (the same one twice when
        # both share the pair's); after close, their last word.
        self._device_counters: list[DeviceCounters] = []
        self._device_drops: list[int] = []
        # A topology's hosts for ends a and b (it owns them), or None: by the hosts option.
        self._given_hosts = _hosts
        # Hosts this pair made (host b in hosts mode): closed with it.
        self._own_hosts: list[Host] = []
        # Resolvers dns() started, newest last: stopped with the pair (or at restore()).
        self._services: list[Any] = []
        # The namespace owner's: ours (made in open()), or the factory's.
        self._keeper = _keeper
        self.test_start = 0
        """Sequence number (``Packet.seq``) of the first packet of the current test:
        ``packets.since(tun_pair.test_start)`` is the test's part. 0 for a pair made for one
        test; module and session pairs move it at the start of each test."""
        self.label: str | None = None
        """A name for reports: a topology's link is ``"client1<->server"``."""
        self._closed = False
        self._executors: list[ThreadPoolExecutor] = []  # executor(): shut down at teardown
        # Devices built ahead of time for this pair's plan, in its namespace (the factory's
        # spare: _kernel/spare.py); adopted by open() instead of building them.
        self._built = _built

    # -- lifecycle -------------------------------------------------------------------------
    def open(self, *, _index: int = 0) -> TunPair:
        """Build the pair (``with TunPair() as pair`` calls this); returns the pair."""
        o = self.options
        try:
            if self._own_netns:
                self._netns = NetNamespace().enter()
                prepare_namespace(self._netns)
                self._keeper = Keeper(self._netns.stat())
            ns = self._netns
            assert ns is not None
            if not ns.is_current():
                raise NamespaceError(
                    "the calling thread is not inside the pair's namespace: open the pair "
                    "from the thread that entered it",
                    netns=ns.path,
                )
            if o.ipv6 is not None and not os.path.isdir("/proc/sys/net/ipv6"):
                raise NamespaceError(
                    "IPv6 is disabled in this kernel (ipv6.disable=1): pass ipv6=None"
                )
            assert self._keeper is not None
            host_a, host_b = self._place(Host("pair", ns, self._keeper, own=False))
            macs = _macs(o.mode, _index)
            v4 = o.ipv4 or (None, None)
            v6 = o.ipv6 or (None, None)
            if host_a is host_b:
                plan = device_plan(o, _index)
                assert plan is not None  # one namespace: not the hosts option
                dev_a, dev_b = self._one_namespace(plan)
            else:
                dev_a, dev_b = self._separate_hosts((host_a, host_b), macs, v4, v6)
            for d in self._devices:
                d.set_offload(o.offload)
            self.packets.t0 = time.monotonic()
            self.packets.wall_t0 = time.time()
            relay = self._relay = Relay(dev_a, dev_b, self.packets, self._stats)
            self.a = Endpoint(
                relay,
                dev_a,
                ip=v4[0],
                ip6=v6[0],
                mtu=o.mtu,
                mac=macs[0],
                side="a",
                host=host_a,
                spawn_env=self._keylog_env,
            )
            self.b = Endpoint(
                relay,
                dev_b,
                ip=v4[1],
                ip6=v6[1],
                mtu=o.mtu,
                mac=macs[1],
                side="b",
                host=host_b,
                spawn_env=self._keylog_env,
            )
            self._directions = {
                d: Direction(
                    d, relay, tap=o.mode == "tap", vnet_len=dev_a.hdr_len, t0=self.packets.t0
                )
                for d in DIRECTIONS
            }
            relay.start()
        except BaseException:
            self._teardown()
            raise
        return self

    def _place(self, here: Host) -> tuple[Host, Host]:
        """The hosts of ends a and b: given (a topology's), or by the ``hosts`` option: b in
        a fresh host of its own and a in the pair's namespace, or both in the pair's."""
        if self._given_hosts is not None:
            return self._given_hosts
        if not self.options.hosts:
            return here, here
        here.name = "a"
        b = Host.new("b", leftovers=self._keeper.leftovers if self._keeper else "warn")
        self._own_hosts.append(b)
        return here, b

    def _one_namespace(self, plan: DevicePlan) -> tuple[TunDevice, TunDevice]:
        """Both devices in the pair's namespace, routed with the seed's recipe: built now,
        or ahead of time for this very plan (the factory's spare)."""
        ns = self._netns
        assert ns is not None
        built, self._built = self._built, None
        if built is None:
            built = _spare.build_devices(plan, ns.write_sysctl)
        self._devices.extend(built.devices)
        self.steps = built.steps
        self._device_counters = [built.counters, built.counters]
        return built.devices

    def _separate_hosts(
        self,
        hosts: tuple[Host, Host],
        macs: tuple[str | None, str | None],
        v4: tuple[str | None, str | None],
        v6: tuple[str | None, str | None],
    ) -> tuple[TunDevice, TunDevice]:
        """Each device made and configured inside its own host: ordinary point-to-point
        addresses and routes, no recipe (docs/internals.md, "Hosts: ordinary point-to-point
        routes"). The relay holds both fds from wherever it runs."""
        o = self.options
        peers = ((0, 1), (1, 0))
        for (me, other), host in zip(peers, hosts, strict=True):

            def make(me: int = me, other: int = other, host: Host = host) -> None:
                dev = TunDevice(o.names[me], mode=o.mode, vnet_hdr=o.offload)
                self._devices.append(dev)
                if o.ipv6 is None and os.path.isdir("/proc/sys/net/ipv6"):
                    host.sysctl(f"net/ipv6/conf/{dev.name}/disable_ipv6", 1)
                side = _routing.Side(
                    dev.name, dev.index, v4[me], v4[other], v6[me], v6[other], macs[me]
                )
                self.steps += [
                    f"[host {host.name}] {step}"
                    for step in _routing.apply_hosts(side, mtu=o.mtu, txqueuelen=o.txqueuelen)
                ]
                self._device_counters.append(DeviceCounters())  # inside this host

            host.run(make)
        return self._devices[0], self._devices[1]

    def close(self, *, drain: bool = True) -> None:
        """Deliver what the relay still holds (up to the ``drain`` option's seconds), stop
        the processes in the namespace (if it is the pair's own), stop the relay, close the
        devices and (if we made it) leave the namespace.

        Raises the first error a hook or the relay hit, after cleaning up; then a
        :class:`LeftoverProcessError` if processes not started by :meth:`spawn` were still
        running and the leftover policy is ``fail``.
        """
        if self._closed:
            return
        self._closed = True
        errors = self._teardown(drain=drain)
        if errors:
            raise errors[0]

    def _teardown(self, *, drain: bool = False) -> list[BaseException]:
        errors: list[BaseException] = []
        if self._built is not None:  # opening failed before it took them
            self._built.close()
            self._built = None
        self._close_executors()
        if drain and self._relay is not None:
            self._settle(self.options.drain)
        leftover: list[BaseException] = []
        for service in reversed(self._services):
            try:
                service.close()
            except BaseException as exc:
                errors.append(exc)
        self._services.clear()
        keepers = [h.stop for h in self._own_hosts]
        if self._own_netns and self._keeper is not None:
            keepers.insert(0, self._keeper.close)
        for stop in keepers:
            try:
                stop()
            except LeftoverProcessError as exc:
                leftover.append(exc)
        for peer in self._peers:
            try:
                peer.close(_pair_closing=True)
            except BaseException as exc:
                errors.append(exc)
        if self._relay is not None:
            self._relay.stop()
            errors.extend(self._relay.take_errors())
        if self._device_counters:
            # The last word, for stats read after close (a failure report); the open files
            # hold the namespaces, so they go before the namespaces do.
            self._device_drops = self._read_device_drops()
            for c in self._device_counters:
                c.close()
            self._device_counters = []
        release_fds(d.detach() for d in reversed(self._devices))
        for host in reversed(self._own_hosts):
            try:
                host.close()
            except BaseException as exc:
                errors.append(exc)
        if self._own_netns and self._netns is not None and self._netns.active:
            self._netns.exit()
        self._close_keylog()
        return errors + leftover

    def _read_device_drops(self) -> list[int]:
        """Each device's ``tx_dropped``; one read per namespace (both devices share one
        but in hosts mode)."""
        read: dict[int, dict[str, int]] = {}
        drops = []
        for c, d in zip(self._device_counters, self._devices, strict=False):
            counts = read.get(id(c))
            if counts is None:
                counts = read[id(c)] = c.tx_dropped()
            drops.append(counts.get(d.name, 0))
        return drops

    def settle(self, timeout: float) -> bool:
        """Wait (up to ``timeout`` s) until no packet is on its way: nothing held in the
        relay and nothing waiting in a device's queue. Teardown does this for the ``drain``
        option's seconds, so the peers get the FINs of connections closed just before it.
        True if the wire emptied (at once if the pair is closed)."""
        if self._closed:
            return True
        return self._settle(timeout)

    def _settle(self, timeout: float) -> bool:
        relay = self._relay
        if relay is None:
            return True
        deadline = time.monotonic() + timeout
        while True:
            if not relay.wait_idle(max(0.0, deadline - time.monotonic())):
                return False
            # The relay holds nothing; a packet may still wait in a device's queue, where a
            # socket closed just before has put its FIN without the relay having looked yet
            # (docs/internals.md, "Daemons: a closed socket's FIN is in the device queue at
            # once"): the relay reads it next, then it is pending until delivered.
            if not self._device_queued() or not relay.alive:
                return not self._device_queued()
            if time.monotonic() >= deadline:
                return False
            time.sleep(_SETTLE_POLL)

    def _device_queued(self) -> bool:
        poller = select.poll()
        for d in self._devices:
            if d.fd is not None:
                poller.register(d.fd, select.POLLIN)
        return bool(poller.poll(0))

    # -- processes ---------------------------------------------------------------------------
    def spawn(
        self,
        args: Sequence[str] | str,
        *,
        ready: object = None,
        timeout: float = 10.0,
        **popen_kwargs: Any,
    ) -> subprocess.Popen[Any]:
        """Start ``args`` inside the pair's namespace, in a session of its own; its Popen.

        ``ready`` waits until: an ``int`` port has a TCP socket listening on it anywhere in
        the namespace; ``("udp", port)`` has a bound UDP socket; a path exists; a callable
        returns true (polled). Ports are read from the namespace's socket tables, never by
        connecting, so waiting adds nothing to the capture. If the process exits first or
        ``timeout`` s pass, it is stopped and :class:`SpawnError` says why, with its exit
        status and the last lines of its output.

        ``popen_kwargs`` go to :class:`subprocess.Popen`. Output not redirected by them goes
        to a file of the pair's (:meth:`output`); stdin is ``/dev/null`` unless given.

        At teardown the process and every process descended from it in the namespace (even
        one that called ``setsid()``) get SIGTERM, then SIGKILL after 2 s.

        The process gets ``SSLKEYLOGFILE`` pointing at :attr:`keylog` (unless ``env`` sets
        it, or the ``keylog`` option is off): TLS clients that honour it (curl, OpenSSL's
        tools, Firefox/NSS) log their secrets there, and the pair's pcapng files open
        decrypted.
        """
        keeper = self._require_keeper()
        self._keylog_env(popen_kwargs)
        return keeper.spawn(
            args, ready=ready, timeout=timeout, run_inside=self._run_inside, **popen_kwargs
        )

    def output(self, proc: subprocess.Popen[Any]) -> str:
        """What a process :meth:`spawn` started wrote to the file it was given ("" if its
        output went elsewhere); readable until the pair closes."""
        return self._require_keeper().output(proc)

    def _require_keeper(self) -> Keeper:
        if self._keeper is None or self._closed:
            raise PairClosedError("the pair is not open: use it between open() and close()")
        return self._keeper

    def _run_inside(self, fn: Callable[[], T]) -> T:
        """``fn()`` with the calling thread inside the pair's namespace: here if it is in
        already, else on a short-lived thread that joins it (what it forks starts there)."""
        return run_in(self._netns, fn)

    # -- threads in the pair's namespace (docs/async.md) ------------------------------------------
    def executor(
        self,
        max_workers: int | None = None,
        *,
        thread_name_prefix: str = "",
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
    ) -> ThreadPoolExecutor:
        """A ``concurrent.futures.ThreadPoolExecutor`` whose workers run inside the pair's
        namespace, whichever thread submits to it; shut down at teardown.

        A thread keeps the network namespace it was started in, so a pool made elsewhere --
        at import time, or by an event loop that outlives the test -- runs its tasks where
        the pair's addresses lead off the machine. This one's workers enter the pair's
        namespace before their first task (as root and rootless). The arguments are
        ``ThreadPoolExecutor``'s. In a coroutine: ``await loop.run_in_executor(pool, fn)``.

        At teardown (the pair's close; for a module or session pair, the end of the test
        that made it) the pool is shut down and its running tasks get a second to finish; a
        worker still busy then is reported as a thread left running in the namespace.
        """
        ns = self._netns
        if self._closed or ns is None or not ns.active:
            raise PairClosedError("tun_pair.executor(): the pair is not open")
        from ._kernel.threads import NamespaceExecutor

        prefix = thread_name_prefix or f"tun_pair.executor-{len(self._executors)}"
        pool = NamespaceExecutor(ns.fd, max_workers, prefix, initializer, initargs)
        self._executors.append(pool)
        return pool

    def _close_executors(self, keep: int = 0, grace: float = 1.0) -> None:
        """Shut down the pools :meth:`executor` made (after the first ``keep``), giving their
        running tasks ``grace`` s in all."""
        pools, self._executors[keep:] = self._executors[keep:], []
        if not pools:
            return
        from ._kernel.threads import join_threads, pool_threads

        for pool in pools:
            pool.shutdown(wait=False)
        join_threads([t for pool in pools for t in pool_threads(pool)], grace)

    # -- TLS and QUIC secrets (the key log) -----------------------------------------------------
    @property
    def keylog(self) -> str | None:
        """Path of the pair's NSS key log file (``SSLKEYLOGFILE``'s format), for TLS and
        QUIC endpoints to write their secrets to; ``None`` with the ``keylog`` option off.

        Processes :meth:`spawn` starts get it as ``SSLKEYLOGFILE``; :meth:`ssl_context`
        gives Python's ``ssl`` contexts that log to it; aioquic takes
        ``QuicConfiguration(secrets_log_file=open(tun_pair.keylog, "a"))``. Whatever it holds
        is embedded in the pair's pcapng files (``packets.to_pcap()``, ``--tunpair-pcap``)
        as a Decryption Secrets Block, so Wireshark and tshark open them decrypted. The file
        lives in a private directory that goes away when the pair closes: the secrets stay
        only in those pcapng files.
        """
        keylog = self._get_keylog()
        return None if keylog is None else keylog.path

    def ssl_context(
        self,
        purpose: ssl.Purpose | None = None,
        *,
        cafile: str | os.PathLike[str] | None = None,
        capath: str | os.PathLike[str] | None = None,
        cadata: str | bytes | None = None,
    ) -> ssl.SSLContext:
        """``ssl.create_default_context(purpose, cafile=..., capath=..., cadata=...)`` whose
        secrets go to :attr:`keylog` (``keylog_filename``): for a client (the default
        purpose, ``ssl.Purpose.SERVER_AUTH``) or a server (``ssl.Purpose.CLIENT_AUTH``)
        in the test, e.g. ``httpx.Client(verify=tun_pair.ssl_context(cafile=cert))``.
        The same for a context of your own: ``ctx.keylog_filename = tun_pair.keylog``.
        With the ``keylog`` option off, a plain default context.
        """
        import ssl

        ctx = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH if purpose is None else purpose,
            cafile=cafile,
            capath=capath,
            cadata=cadata,
        )
        path = self.keylog
        if path is not None:
            ctx.keylog_filename = path
        return ctx

    def _get_keylog(self) -> KeyLog | None:
        if not self.options.keylog:
            return None
        if self._keylog is None:
            if self._closed:
                raise PairClosedError("the pair is closed: its key log is gone")
            from ._packets.keylog import KeyLog

            self._keylog = KeyLog()
        return self._keylog

    def _keylog_env(self, popen_kwargs: dict[str, Any]) -> None:
        """``SSLKEYLOGFILE`` for a process :meth:`spawn` starts, unless ``env`` sets it."""
        env = popen_kwargs.get("env")
        if env is not None and "SSLKEYLOGFILE" in env:
            return
        path = self.keylog
        if path is not None:
            popen_kwargs["env"] = {**(os.environ if env is None else env), "SSLKEYLOGFILE": path}

    def _close_keylog(self) -> None:
        # After the processes and the relay: nothing writes secrets any more. The capture
        # keeps them for files written after the close.
        if self._keylog is not None:
            self._keylog.close()

    # -- one test of a longer-lived pair --------------------------------------------------------
    def checkpoint(self) -> Checkpoint:
        """Remember where the capture is and what is on the wire (hooks, rules,
        impairments): :meth:`restore` undoes what was added after. Module and session pairs
        take one at the start of each test."""
        self._require_relay()
        return Checkpoint(
            start=self.packets.mark(),
            _directions={d: direction.checkpoint() for d, direction in self._directions.items()},
            stats=self.stats,
            _services=len(self._services),
            _hosts={h.name: h.checkpoint() for h in self._own_hosts},
            _sysctls=[(h, h._sysctl_mark()) for h in self._hosts()],
        )

    def _hosts(self) -> list[Host]:
        """End a's host and end b's (one, without hosts mode)."""
        a, b = self.a.host, self.b.host
        return [a] if a is b else [a, b]

    def restore(self, cp: Checkpoint) -> None:
        """Remove the hooks, rules and impairments added since ``cp``; put back those it
        had; stop a resolver started since, and what was started since in a host of the
        pair's own (b in hosts mode; may raise ``LeftoverProcessError`` by the leftover
        policy); put back the sysctls set since with ``tun_pair.a.sysctl()`` /
        ``b.sysctl()``. (A queue comes back fresh, from its settings: what the old one held was
        delivered.)"""
        self._require_relay()
        while len(self._services) > cp._services:
            self._services.pop().close()
        for host, mark in cp._sysctls:
            host._restore_sysctls(mark)
        for host in self._own_hosts:
            host.restore(cp._hosts.get(host.name, (set(), 0)))
        kept = {hook for state in cp._directions.values() for hook in state.hooks}
        for hook in {h for d in self._directions.values() for h in d.hooks} - kept:
            self.remove_hook(hook)
        for d, direction in self._directions.items():
            state = cp._directions.get(d)
            direction.restore(state if state is not None else _NOTHING)
        self._update_offload()

    def __enter__(self) -> TunPair:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- what tests look at --------------------------------------------------------------------
    @property
    def netns_path(self) -> str:
        """``nsenter --net=PATH`` enters the pair's namespace (while the pair is open)."""
        if self._netns is None or not self._netns.active:
            raise PairClosedError("the pair is not open: use it between open() and close()")
        return self._netns.path

    @property
    def stats(self) -> dict[str, dict[str, Any]]:
        """Per direction (never bounded by the capture):

        * ``packets``, ``bytes``: delivered to the other device;
        * ``dropped``: taken off the link by the relay (a hook, a rule, loss, the queue's
          bound or discipline, a failed write, or in flight at close);
        * ``marked``: delivered CE-marked instead of dropped (``ecn=True``);
        * ``queued``: held by the direction's queue now; ``queue_peak``: the most it held;
        * ``device_dropped``: dropped by the kernel *before* the relay read them -- the
          source device's transmit queue (``txqueuelen``) was full.
        """
        stats = self._stats.as_dict()
        relay = self._relay
        drops = self._read_device_drops() if self._device_counters else self._device_drops
        for i, direction in enumerate(DIRECTIONS):
            entry = stats[direction]
            entry["queued"] = relay.queued(direction) if relay is not None else 0
            entry["device_dropped"] = drops[i] if i < len(drops) else 0
            for name, cls in entry.get("classes", {}).items():
                cls["queued"] = relay.queued(direction, name) if relay is not None else 0
        return stats

    @property
    def mode(self) -> str:
        """``"tun"`` or ``"tap"`` (``options.mode``)."""
        return self.options.mode

    @property
    def pending(self) -> int:
        """Packets the relay holds right now (delayed, held for reordering, queued, or
        waiting for a hook): read, not yet written or dropped. 0 when the pair is closed."""
        if self._relay is None or self._closed:
            return 0
        return self._relay.pending()

    @property
    def seed(self) -> int:
        """The seed :meth:`impair` uses when given none.

        The ``seed`` option (marker, ``--tunpair-seed``, ini ``tunpair_seed``) if set; else
        one picked at random the first time it is needed and kept (shared by the pairs of
        one ``tun_pair_factory``, i.e. one per test), so a failure report can state it and
        ``--tunpair-seed`` can replay it.
        """
        if self.options.seed is not None:
            return self.options.seed
        if self._random_seed is None:
            self._random_seed = new_seed()
        return self._random_seed

    def sockets(self, proto: str = "tcp") -> list[SocketInfo]:
        """Every ``proto`` (``"tcp"`` or ``"udp"``) socket in the pair's namespace, as the
        kernel reports it over NETLINK_SOCK_DIAG: the test's own and those of any process
        started in the namespace (a daemon, ``curl``), with ``tcp_info`` for TCP.

        Works from any thread: the netlink socket is created inside the namespace.
        """
        from ._kernel.sockets import PROTOCOLS, dump

        if proto not in PROTOCOLS:
            raise ValueError(f"sockets(proto={proto!r}): use one of {', '.join(PROTOCOLS)}")
        ns = self._netns
        if ns is None or not ns.active or self._closed:
            raise PairClosedError(
                "the pair is not open: sockets() reads its namespace, use it between open() and close()"
            )
        if ns.is_current():
            return dump(proto)
        # The namespace is a property of the thread: ask from a short-lived thread that
        # enters it, leaving the caller where it is (docs/internals.md, "A sock_diag socket
        # dumps its creator's namespace").
        result: list[list[SocketInfo]] = []
        failure: list[BaseException] = []

        def inside() -> None:
            try:
                _linux.setns(ns.fd, _linux.CLONE_NEWNET)
                result.append(dump(proto))
            except BaseException as exc:
                failure.append(exc)

        t = own_thread(inside, "tunpair sockets")
        t.start()
        t.join()
        if failure:
            raise NamespaceError(
                f"reading the sockets of the pair's namespace failed: {failure[0]}", netns=ns.path
            ) from failure[0]
        return result[0]

    def check(self, timeout: float = 3.0) -> None:
        """Raise, in the calling thread, the first error the relay or a hook hit.

        First waits (up to ``timeout`` s) for packets already handed to hooks, so a hook
        failing on the test's last packet fails the test rather than its teardown.
        """
        __tracebackhide__ = True
        if self._relay is not None:
            self._relay.sync(timeout)
            errors = self._relay.take_errors()
            if errors:
                raise errors[0]
        for peer in self._peers:
            peer.check()

    # -- programmable wire ------------------------------------------------------------------------
    def add_hook(self, fn: Callable[[Packet], Any], direction: str | None = None) -> Hook:
        """Run ``fn(packet)`` for each packet the relay carries (``direction``: one or both).

        ``fn`` returns ``None`` (forward unchanged), bytes or a scapy packet (forward that
        instead), or a list/tuple of those (``[]`` drops, two items duplicate). Hooks chain
        in the order added. They run in a worker thread per direction, so a slow hook holds
        up only the packets that go through it; a hook never runs concurrently with itself.
        A hook that raises or returns anything else: that packet is dropped and the error
        is raised in the test thread (:meth:`check`, at the latest :meth:`close`).
        While any hook or impairment is active, offload is off: hooks see wire-sized packets.
        """
        if not callable(fn):
            raise TypeError(f"add_hook() takes a callable, not {type(fn).__name__}")
        _check_direction(direction, "add_hook")
        relay = self._require_relay()
        hook = Hook(fn, direction)
        self._update_offload(busy=True)  # before the hook sees a packet
        relay.add_hook(hook)
        return hook

    def remove_hook(self, handle: Hook) -> None:
        """Stop running the hook ``add_hook`` returned (``ValueError`` if it is not one).

        Packets already handed to the hooks (read before this call) still pass through it,
        in order; later packets do not."""
        relay = self._require_relay()
        if not isinstance(handle, Hook) or not relay.remove_hook(handle):
            raise ValueError(f"{handle!r} is not a hook of this pair (removed already?)")
        self._update_offload()

    def impair(self, *, direction: str | None = None, **params: Any) -> None:
        """netem-like impairments done in the relay, for one direction or both (``None``).

        ``params`` are the fields of ``ImpairmentSpec`` (table in docs/options.md): ``loss``,
        ``delay``, ``jitter``, ``duplicate``, ``reorder``, ``corrupt``, ``rate``, ``trace``,
        the queue's (``limit``, ``queue``, ...), ``seed``, and ``profile``: a named link
        (``"lte"``, ``"dsl"``, ...; docs/profiles.md) whose values for each direction (a->b
        the uplink) the other parameters override; with ``match`` (packet fields as
        ``packets.filter()`` takes them, or a predicate) and ``name``, they make a class:
        only the matching packets get them, on a link of their own (docs/link.md).
        Probabilities are 0.0-1.0 (or ``"10%"``), ``delay``/``jitter`` seconds (or
        ``"20ms"``), ``rate`` bits/s (or ``"10mbit"``). A bad value raises
        :class:`~pytest_tunpair.OptionError`, an unknown name ``TypeError``. Each call
        replaces the settings of the direction(s) it names (a class's, with ``match``);
        ``impair()`` with no arguments turns everything off, classes too.
        A packet held back for reordering when the settings change is released, not lost.
        ``seed=None`` uses :attr:`seed`. Same seed and same packets: same decisions.
        """
        from dataclasses import replace

        from ._link.impair import ImpairmentSpec

        _check_direction(direction, "impair")
        self._require_relay()
        # Everything is checked before anything changes: a bad value leaves the pair as it was.
        # One spec per direction: a profile differs between uplink (a->b) and downlink.
        specs = {d: ImpairmentSpec.from_kwargs(towards=d, **params) for d in _directions(direction)}
        parsed = next(iter(specs.values()))
        random_seed = parsed.seed is None and self.options.seed is None
        seed = parsed.seed if parsed.seed is not None else self.seed
        specs = {d: replace(spec, seed=seed) for d, spec in specs.items()}
        start = time.monotonic()  # a trace's millisecond 0, for the queue and the plot
        for d, spec in specs.items():
            self._directions[d].impair(
                spec, random_seed=random_seed, start=start, clear_classes=not params
            )
        self._update_offload()

    def script(self, side: str = "b") -> ScriptedPeer:
        """Play side ``"a"`` or ``"b"`` from the test: a :class:`ScriptedPeer`.

        From now on, packets the relay reads that are addressed to that side's addresses
        are handed to the peer (recorded with ``action == "scripted"``) instead of being
        written into its device, and ``peer.send()`` writes into the other device as if
        that side had sent them. ``peer.close()``, or leaving ``with tun_pair.script("b")
        as peer:``, restores forwarding. Offload is off while a peer is active.
        """
        from ._peer.peer import ScriptedPeer

        if side not in ("a", "b"):
            raise ValueError(f"script(side={side!r}): use 'a' or 'b'")
        relay = self._require_relay()
        for peer in self._peers:
            if peer.side == side and peer.active:
                raise TunPairError(
                    f"side {side!r} is scripted already: close that peer first (peer.close(), "
                    "or leave its with block)"
                )
        me, other = (self.a, self.b) if side == "a" else (self.b, self.a)
        direction = "a->b" if side == "b" else "b->a"  # the packets towards the scripted side

        class Port:  # the peer's one way to the pair (_peer.peer.PeerPort)
            mode = self.mode
            t0 = self.packets.t0
            wall_t0 = self.packets.wall_t0

            @staticmethod
            def divert(take: Divert | None) -> None:
                relay.set_divert(direction, take)

            write = staticmethod(other.inject)
            write_gso = staticmethod(other.inject_gso)
            closed = staticmethod(self._peer_closed)

        self._update_offload(busy=True)  # before the peer sees a packet
        peer = ScriptedPeer(Port(), side, me, other)
        self._peers.append(peer)
        return peer

    def _peer_closed(self) -> None:
        if not self._closed:
            self._update_offload()

    # -- scenarios: rules on the link ---------------------------------------------------------
    def outage(
        self,
        duration: float | str | None = None,
        *,
        after: float | str = 0.0,
        direction: str | None = None,
    ) -> Outage:
        """Drop every packet of ``direction`` (None: both) that the relay reads from
        ``after`` seconds from now on, for ``duration`` seconds (None: until ended),
        recorded as ``"lost"``.

        Returns the :class:`~pytest_tunpair.Outage`, a context manager that ends
        the outage on exit (``with tun_pair.outage(): ...``), with ``.end()``, its window
        (``start``, ``end_time``, in seconds since the pair came up, as
        ``Packet.arrival``) and ``dropped``. Durations are seconds or strings (``"500ms"``).
        """
        from ._link.rules import Outage, check_duration

        _check_direction(direction, "outage")
        self._prune_rules()
        span = None if duration is None else check_duration("duration", duration, "outage()")
        delay = check_duration("after", after, "outage()")
        self._require_relay()
        start = time.monotonic() - self.packets.t0 + delay
        end = math.inf if span is None else start + span
        outage = Outage(start, end, _directions(direction), self.packets.t0, self._drop_rule)
        self._add_rule(outage, _directions(direction))
        return outage

    def fail(
        self,
        match: Callable[[Packet], Any] | None = None,
        *,
        times: int | None = 1,
        how: str = "drop",
        direction: str | None = "a->b",
        **fields: Any,
    ) -> Fault:
        """A fault rule for retry logic: the first ``times`` packets of ``direction`` that
        match get ``how``.

        ``match`` is a predicate on the :class:`~pytest_tunpair.Packet`, called on the relay
        thread for each packet of ``direction`` (keep it quick: the packet waits); ``fields`` are
        the keyword filters of ``packets.filter`` (``src``, ``dst``, ``proto``, ``sport``,
        ``dport``, ``flags`` in scapy's letters, e.g. ``flags="S"``, ...), each a value or a
        predicate on it; all given must hold. ``how``: ``"drop"`` (recorded ``"dropped"``), ``"reset"``
        (the relay answers the sender with a TCP RST: ``ECONNREFUSED`` on connect,
        ``ECONNRESET`` later; recorded ``"reset"``) or ``"unreachable"`` (an ICMP/ICMPv6
        destination unreachable back to the sender, port unreachable for UDP; recorded
        ``"unreachable"``). A packet no reply may answer (a reset for UDP) is dropped,
        recorded ``"dropped"``. ``times=None`` acts on every matching packet.

        Returns the :class:`~pytest_tunpair.Fault` with ``hits`` and ``remove()``.
        """
        from ._link.rules import Fault, check_fail, field_predicate

        _check_direction(direction, "fail")
        if match is not None and not callable(match):
            raise TypeError(
                f"fail() takes a predicate (packet -> bool) as match, not {type(match).__name__}"
            )
        times, how = check_fail(times, how)
        self._prune_rules()
        predicate = field_predicate(fields, "fail")
        self._require_relay()
        what = " ".join(
            [getattr(match, "__qualname__", repr(match))] if match is not None else []
        ) + "".join(f" {k}={v!r}" for k, v in fields.items())
        dirs = _directions(direction)
        fault = Fault(
            match,
            predicate,
            times=times,
            how=how,
            direction="/".join(dirs),
            what=what.strip() or "every packet",
            on_remove=self._drop_rule,
        )
        self._add_rule(fault, dirs)
        return fault

    def path_mtu(
        self, mtu: int | None, *, icmp: bool = True, direction: str | None = None
    ) -> PathMtu | None:
        """A path MTU of ``mtu`` bytes on ``direction`` (None: both); ``None`` ends it.

        Packets larger than ``mtu`` that may not be fragmented on the way (IPv4 with DF,
        every IPv6 packet) are dropped, recorded ``"too-big"``; with ``icmp=True`` an ICMP
        fragmentation-needed (next-hop MTU ``mtu``) or ICMPv6 packet-too-big goes back to
        the sender, so the kernel's path-MTU discovery shrinks what it sends;
        ``icmp=False`` is a PMTU black hole. IPv4 packets without DF are fragmented to fit
        (the original recorded ``"fragmented"``, the fragments go on). IPv6 needs ``mtu >=
        1280`` (RFC 8200). A new call replaces the path MTU of the direction(s) it names.
        Offload is off while it is set.
        """
        from ._link.rules import PathMtu, check_mtu

        _check_direction(direction, "path_mtu")
        self._require_relay()
        self._prune_rules()
        dirs = _directions(direction)
        if mtu is not None:
            size, icmp = check_mtu(mtu, icmp)
        for d in dirs:
            old = self._directions[d].of_type(PathMtu)
            if old is not None:
                self._drop_rule(old, (d,))
                # It stays on a direction this call does not name.
                old.directions = tuple(x for x in old.directions if x != d)
        if mtu is None:
            return None
        rule = PathMtu(size, icmp=icmp, directions=dirs)
        self._add_rule(rule, dirs)
        return rule

    def nat(
        self,
        *,
        mapping: str = "endpoint-independent",
        filtering: str = "address-and-port-dependent",
        public: str = "198.18.1.1",
        port_range: tuple[int, int] = (1024, 65535),
        timeout: float | str = 120.0,
        tcp_timeout: float | str = 7440.0,
        rebind_every: float | str | None = None,
        rebind_address: bool = False,
    ) -> Nat:
        """Put a NAT on the link, end a inside, end b outside (RFC 4787 behaviours).

        Packets from a's IPv4 address get their source rewritten to ``public`` and a port
        chosen by ``mapping`` (``"endpoint-independent"``, ``"address-dependent"``,
        ``"address-and-port-dependent"``; the inside port is kept when free and in
        ``port_range``); b's answers are translated back if ``filtering`` (same three
        words) lets them in, else dropped (recorded ``"filtered"``), as is anything sent to
        a's address itself. TCP, UDP and ICMP echo are mapped, ICMP errors translated with
        the packet they quote; checksums are updated. Mappings expire after ``timeout``
        idle seconds (TCP: ``tcp_timeout``), refreshed by outbound packets.
        ``rebind_every`` re-maps everything periodically (:meth:`Nat.rebind` by hand),
        moving to the next address of a ``public`` pool (``"198.18.1.0/29"``) too with
        ``rebind_address=True``.

        Each rewritten packet is recorded ``"rewritten"`` (as it came) and followed by its
        translated copy. b's host gets a route to the ``public`` addresses through b's
        device (in hosts mode and not). IPv6 passes untranslated. Offload is off while a
        NAT is on. Returns the :class:`~pytest_tunpair.Nat` (``remove()``, or ``with``).
        """
        import ipaddress

        from ._link.nat import Nat, check_nat

        args = check_nat(
            mapping,
            filtering,
            public,
            port_range,
            timeout,
            tcp_timeout,
            rebind_every,
            rebind_address,
        )
        self._require_relay()
        if self.a.ip is None or self.b.ip is None:
            raise OptionError(
                "ipv4",
                None,
                source="nat()",
                reason="the NAT translates IPv4 (NAT44): open the pair with IPv4 addresses",
            )
        self._prune_rules()
        for direction in self._directions.values():
            if direction.of_type(Nat) is not None:
                raise TunPairError(
                    "a NAT is on the link already: remove() it first (or leave its with block)"
                )
        net = ipaddress.ip_network(str(public), strict=False)
        inside = ipaddress.ip_address(self.a.ip)
        if inside in net or ipaddress.ip_address(self.b.ip) in net:
            raise OptionError(
                "public",
                public,
                source="nat()",
                reason=f"the pool holds an end's own address ({self.a.ip} or {self.b.ip}): "
                "pick other addresses, e.g. '198.18.1.1'",
            )
        b = self.b
        # The outside addresses live behind b's device, as a NAT's public side would.
        route = _routing.Route(str(net), b.name, b.index, via=self.a.ip)
        self.steps += [f"[host {b.host.name}] {s}" for s in b.run(_routing.add_routes, (route,))]
        nat = Nat(
            inside=(self.a.ip,),
            mapping=args["mapping"],
            filtering=args["filtering"],
            public=args["public"],
            port_range=args["port_range"],
            timeout=args["timeout"],
            tcp_timeout=args["tcp_timeout"],
            rebind_every=args["rebind_every"],
            rebind_address=bool(rebind_address),
            start=time.monotonic(),
            on_remove=self._drop_rule,
        )
        self._add_rule(nat, DIRECTIONS)
        return nat

    def dns(
        self,
        records: Mapping[str, str | Sequence[str]] | None = None,
        *,
        fail: str | Mapping[str, str] | None = None,
        ttl: int = 60,
        timeout: int = 1,
        attempts: int = 2,
    ) -> Resolver:
        """A DNS server the test owns, on end b's address (port 53, UDP and TCP, in b's
        host), and a ``/etc/resolv.conf`` naming it for the calling thread and what it
        starts from now on: ``socket.getaddrinfo``, ``dig``, dnspython and c-ares resolve
        through it, across the tunnel (the queries are in the capture). The host's
        ``resolv.conf`` is not touched: the thread gets a mount namespace of its own with
        the file bind-mounted (docs/internals.md, "A mount namespace per thread: the test's
        resolv.conf"), until the pair closes.

        ``records`` maps names to ``"a"``/``"b"`` (that end's addresses: A and AAAA),
        addresses, or lists of them; other names get NXDOMAIN. ``fail`` makes every query
        (a word) or those for some names (``{"api.test": "servfail"}``) fail: ``"timeout"``,
        ``"servfail"``, ``"nxdomain"``, ``"refused"``, ``"truncate"``;
        :meth:`Resolver.fail` adds failures for a number of queries. ``ttl`` is the
        records' TTL; ``timeout`` (whole seconds) and ``attempts`` go to ``resolv.conf``'s
        options (glibc's defaults, 5 and 2, would make a timeout take 10 s). Call it from
        the test's thread; threads and resolvers made before it (a dnspython default
        resolver, a thread pool) keep the host's file.
        """
        from ._kernel.mountns import private_files
        from ._kernel.resolver import Records, Resolver, check_failure, open_sockets

        self._require_relay()
        for what, number, least in (
            ("ttl", ttl, 0),
            ("timeout", timeout, 1),
            ("attempts", attempts, 1),
        ):
            if isinstance(number, bool) or not isinstance(number, int) or number < least:
                raise OptionError(what, number, source="dns()", reason=f"a whole number >= {least}")
        table = Records(records or {}, self._addresses, "dns() records")  # checked first
        failures: list[tuple[str, str | None]] = []
        if isinstance(fail, str):
            failures.append((check_failure(fail, "dns()"), None))
        elif fail is not None:
            failures += [(check_failure(how, "dns()"), key) for key, how in fail.items()]
        if any(isinstance(x, Resolver) for x in self._services):
            raise TunPairError(
                "dns() is running already: change its records or call its fail() instead"
            )
        b = self.b
        listen = [x for x in (b.ip, b.ip6) if x]
        socks = b.run(open_sockets, listen)
        resolver = Resolver(
            table, sockets=socks, address=listen[0], ttl=ttl, expand=self._addresses
        )
        try:
            for how, key in failures:
                resolver.fail(how, name=key)
            files = {
                "/etc/resolv.conf": (
                    "# pytest-tunpair: the test's own resolver (tun_pair.dns()), in a mount\n"
                    "# namespace of the test's thread; the host's file is unchanged.\n"
                    f"nameserver {listen[0]}\n"
                    f"options timeout:{timeout} attempts:{attempts}\n"
                )
            }
            nsswitch = _nsswitch_hosts_dns()
            if nsswitch is not None:
                files["/etc/nsswitch.conf"] = nsswitch
            # glibc asks a running nscd before any NSS module, and nscd resolves on the
            # host's side: an empty file over its socket makes connect() fail, and glibc
            # falls back to the files above.
            if os.path.exists(NSCD_SOCKET):
                files[os.path.realpath(NSCD_SOCKET)] = ""
            resolver._view = private_files(files)
        except BaseException:
            resolver.close()
            raise
        self._services.append(resolver)
        return resolver

    def _addresses(self, value: str | Sequence[str], source: str) -> list[str]:
        """``"a"``/``"b"`` (that end's addresses), an address, or a list of those."""
        import ipaddress

        items = [value] if isinstance(value, str) else list(value)
        out: list[str] = []
        for item in items:
            if item in ("a", "b"):
                end = self.a if item == "a" else self.b
                out += [x for x in (end.ip, end.ip6) if x]
                continue
            try:
                out.append(str(ipaddress.ip_address(str(item))))
            except ValueError:
                raise OptionError(
                    "records", item, source=source, reason="use 'a', 'b', an address or a list"
                ) from None
        return out

    def _add_rule(self, rule: Rule, dirs: tuple[str, ...]) -> None:
        self._update_offload(busy=True)  # wire-sized packets before the rule sees one
        for d in dirs:
            self._directions[d].add_rule(rule)

    def _drop_rule(self, rule: Rule, dirs: tuple[str, ...] = DIRECTIONS) -> None:
        """Take ``rule`` off ``dirs`` (the handles' ``end()``/``remove()``,
        ``path_mtu(None)``)."""
        if self._relay is None or self._closed:
            return
        for d in dirs:
            self._directions[d].remove_rule(rule)
        self._update_offload()

    def _prune_rules(self) -> None:
        """Take spent faults and past outages off the link: they pass everything now, and
        offload can come back on."""
        now = time.monotonic()
        pruned = False
        for direction in self._directions.values():
            for rule in direction.spent_rules(now):
                pruned |= direction.remove_rule(rule)
        if pruned:
            self._update_offload()

    def _update_offload(self, busy: bool = False) -> None:
        """Offload on the devices unless something needs wire-sized packets (``busy``: about
        to). Impairments keep it on: a per-segment link splits GSO super-packets itself
        (reading them is what makes the relay fast); hooks, rules and a scripted peer act
        on packets as a real wire carries them."""
        self._require_relay()
        busy = busy or any(d.needs_segments for d in self._directions.values())
        for dev in self._devices:
            dev.set_offload(self.options.offload and not busy)

    def _pending(self) -> int:
        relay = self._relay
        return 0 if relay is None or self._closed else relay.pending()

    # -- the capture's clock, and what wait_quiet() waits for ----------------------------------
    def now(self) -> float:
        """Seconds since the pair came up, on the clock of ``Packet.time`` and
        ``Packet.arrival``: ``tun_pair.now() - p.time`` is how long ago ``p`` was recorded."""
        return time.monotonic() - self.packets.t0

    def _quiet_pending(self) -> int:
        """What ``packets.wait_quiet()`` counts as still on its way: packets held in the
        relay, and a packet waiting in a device's queue -- a FIN that ``close()`` queued
        just before, which the relay has not read yet (docs/internals.md, "Daemons: a
        closed socket's FIN is in the device queue at once"). With the queues empty, one
        turn of the relay's loop makes sure a packet it was reading is recorded."""
        relay = self._relay
        if relay is None or self._closed:
            return 0
        if self._device_queued():
            return 1 + relay.pending()
        if relay.alive:
            relay.wait_idle(_QUIET_TURN)
        return relay.pending()

    def _configured(self, direction: str) -> Any:
        """What ``packets.plot()`` draws as ``direction``'s configured link."""
        d = self._directions.get(direction)
        return None if d is None else d.configured

    def _require_relay(self) -> Relay:
        if self._relay is None or self._closed:
            raise PairClosedError("the pair is not open: use it between open() and close()")
        return self._relay

    def describe(self, replay: Callable[[int], str] | None = None) -> str:
        """What this pair is, for failure reports: one line for the pair, then one per
        active impairment (with the seed in use) and per direction with hooks.

        ``replay(seed)`` says how the caller's user replays a seed picked at random (the
        plugin names ``--tunpair-seed``, ``tunpair run`` its ``--seed``)."""
        o = self.options
        parts = [
            f"{self.a.name}={self.a.ip or ''}{'/' + self.a.ip6 if self.a.ip6 else ''}",
            f"{self.b.name}={self.b.ip or ''}{'/' + self.b.ip6 if self.b.ip6 else ''}",
        ]
        if self.a.host is self.b.host:
            lines = [f"{o.mode} pair {' <-> '.join(parts)} mtu={o.mtu} table={o.table}"]
        else:
            ha, hb = self.a.host.name, self.b.host.name
            name = f"{self.label} " if self.label else ""
            # A topology's ends have names of their own: say which way a->b goes.
            ways = "" if (ha, hb) == ("a", "b") else f"a->b is {ha}->{hb}, b->a is {hb}->{ha}; "
            lines = [
                f"{o.mode} link {name}{ha}:{parts[0]} <-> {hb}:{parts[1]} mtu={o.mtu} "
                f"({ways}each end its own host)"
            ]
        lines.extend(s.describe() for s in self._services)
        for direction in self._directions.values():
            lines.extend(direction.describe(replay))
        lines.extend(peer.describe() for peer in self._peers)
        now = time.monotonic()
        # A rule on both directions is one handle: listed once, in the order added.
        rules = {id(r): r for d in self._directions.values() for r in d.rules}
        lines.extend(r.describe() for r in rules.values() if r.in_force(now))
        return "\n".join(lines)

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("open" if self._relay else "new")
        return f"<TunPair {self.options.names[0]}<->{self.options.names[1]} {state}>"


@dataclass(frozen=True)
class Checkpoint:
    """What :meth:`TunPair.checkpoint` remembered: where the capture was and the stats then
    (public), and, for :meth:`TunPair.restore`, each direction's hooks, rules and
    impairments, the services and each own host's processes (private: a token)."""

    #: ``Packet.seq`` of the first packet after it.
    start: int
    #: Each direction's state, by name.
    _directions: dict[str, DirectionState]
    #: ``TunPair.stats`` then.
    stats: dict[str, dict[str, int]]
    #: Services (a ``dns()`` resolver) running then.
    _services: int = 0
    #: For each host the pair made (b in hosts mode): ``Host.checkpoint()``.
    _hosts: dict[str, tuple[set[tuple[int, int]], int]] = field(default_factory=dict)
    #: For each host of the pair: how many ``Host.sysctl()`` writes it had made then.
    _sysctls: list[tuple[Host, int]] = field(default_factory=list)


# A direction as a pair made during a test had it before: nothing on it.
_NOTHING = DirectionState(hooks=(), rules=(), spec=None, random_seed=False, engine=None)


#: Where glibc's name-service cache client connects (glibc's nscd/nscd.h, _PATH_NSCDSOCKET).
NSCD_SOCKET = "/var/run/nscd/socket"


def _nsswitch_hosts_dns() -> str | None:
    """``/etc/nsswitch.conf`` with ``hosts: files dns``, when the host's asks someone
    other than the resolver ``resolv.conf`` names (systemd-resolved's ``resolve``, mDNS)
    before ``dns``; ``None`` when it is fine as it is."""
    try:
        with open("/etc/nsswitch.conf") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    changed = False
    for i, line in enumerate(lines):
        words = line.split("#", 1)[0].split()
        if words and words[0] == "hosts:":
            if words[1:] != ["files", "dns"]:
                lines[i] = "hosts: files dns"
                changed = True
    return "\n".join(lines) + "\n" if changed else None


def new_seed() -> int:
    # Not the `random` module: a test that seeds it must not make every run's seed equal.
    return secrets.randbelow(2**31)


def _interface_descriptions(o: PairOptions) -> tuple[str, str]:
    """How pcapng files describe the two directions: ``tun0 198.18.0.1 -> tun1 198.18.0.2``."""
    ends = []
    for i, name in enumerate(o.names):
        addrs = [pair[i] for pair in (o.ipv4, o.ipv6) if pair is not None]
        ends.append(" ".join([name, *addrs]))
    return (f"{ends[0]} -> {ends[1]}", f"{ends[1]} -> {ends[0]}")


def _check_direction(direction: str | None, what: str) -> None:
    if direction is not None and direction not in DIRECTIONS:
        raise OptionError(
            "direction",
            direction,
            source=f"{what}()",
            reason="use 'a->b', 'b->a' or None (both)",
        )


def _directions(direction: str | None) -> tuple[str, ...]:
    return DIRECTIONS if direction is None else (direction,)
