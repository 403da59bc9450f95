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
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from ._errors import (
    LeftoverProcessError,
    NamespaceError,
    OptionError,
    PairClosedError,
    TunDeviceError,
    TunPairError,
)
from ._kernel import linux as _linux
from ._kernel import routing as _routing
from ._kernel.device import DeviceCounters, TunDevice
from ._kernel.netns import NetNamespace, Visit
from ._kernel.procs import Keeper
from ._link.relay import Hook, Relay
from ._options import PairOptions
from ._packets.capture import Capture, Stats
from ._packets.packet import Packet
from ._wire.validate import to_bytes, validate_frame

if TYPE_CHECKING:
    from ._kernel.sockets import SocketInfo
    from ._link.impair import ImpairmentEngine, ImpairmentSpec
    from ._link.link import Divert
    from ._link.queue import PacketQueue
    from ._link.rules import Fault, Outage, PathMtu
    from ._peer.peer import ScriptedPeer

T = TypeVar("T")
# How often a draining teardown looks at what the relay still holds.
_DRAIN_POLL = 0.002

__all__ = ["Endpoint", "TunPair", "TunPairFactory"]


def _prepare_namespace(ns: NetNamespace) -> None:
    """Per-namespace settings, done once, inside the namespace (never on the host)."""
    # Step 2 of the recipe removes the addresses from table local, which is also how the
    # kernel answers "is this address mine?" for bind(): without this a server cannot bind
    # to a tunnel address (EADDRNOTAVAIL). Both sysctls are per namespace.
    ns.write_sysctl("net/ipv4/ip_nonlocal_bind", 1)
    if os.path.isdir("/proc/sys/net/ipv6"):
        ns.write_sysctl("net/ipv6/ip_nonlocal_bind", 1)
        # No link-local address on new devices: no router solicitations, MLD or other
        # chatter in the capture (docs/internals.md, "No link-local addresses"), only the
        # test's own traffic.
        # TAP devices too: neighbour discovery still resolves, the kernel sends the NS from
        # the global address of the packet waiting for it. What a TAP capture still shows
        # is each device's MLD report for its solicited-node group (README, "TAP mode").
        ns.write_sysctl("net/ipv6/conf/default/addr_gen_mode", 1)
    _routing.link_up_lo()


class Endpoint:
    """One end of the pair (``tun_pair.a`` / ``tun_pair.b``)."""

    def __init__(
        self,
        pair: TunPair,
        device: TunDevice,
        *,
        ip: str | None,
        ip6: str | None,
        mtu: int,
        mac: str | None,
        side: str,
    ) -> None:
        self._pair = pair
        self._device = device
        self.name = device.name
        """The device's name, e.g. ``"tun0"``."""
        self.index = device.index
        """The device's ifindex inside the pair's namespace."""
        self.ip = ip
        """This end's IPv4 address (``"198.18.0.1"`` for a), or ``None`` without IPv4."""
        self.ip6 = ip6
        """This end's IPv6 address (``"2001:2::1"`` for a), or ``None`` without IPv6."""
        self.mtu = mtu
        """The device's MTU."""
        self.mac = mac
        """The TAP device's MAC (``02:74:70:00:<pair>:01``/``:02``, the same on every run); ``None``
        for TUN.
        """
        self._side = side  # "a" or "b": where Relay.write puts what inject() gets

    @property
    def mode(self) -> str:
        """``"tun"`` or ``"tap"``."""
        return self._device.mode

    def inject(self, packet: Any) -> Packet:
        """Write ``packet`` into this device: the kernel receives it on this interface.

        Takes bytes or a scapy packet: an IPv4/IPv6 packet on TUN, an Ethernet frame on
        TAP. Bad input raises ``TypeError``/``ValueError`` and writes nothing.
        """
        data = to_bytes(packet, what=f"{self.name}.inject()")
        validate_frame(data, mode=self.mode, mtu=self.mtu)
        relay = self._pair._relay
        if relay is None or self._device.fd is None:
            raise TunDeviceError(f"{self.name} is closed", device=self.name)
        # The relay records the packet *before* writing it (in one critical section with the
        # write): a write into the device runs the kernel's receive path in this thread, so
        # the kernel's answer (an echo reply, or the ARP request it needs first on TAP) is
        # queued, read and recorded by the relay before os.write() returns.
        try:
            return relay.write(self._side, data)
        except OSError as exc:  # validated, but the device refused it (EIO while down)
            raise TunDeviceError(
                f"{self.name}: writing the injected packet failed: {exc}", device=self.name
            ) from exc

    def __repr__(self) -> str:
        mac = f" mac={self.mac}" if self.mac else ""
        return f"<Endpoint {self.name}{mac} ip={self.ip} ip6={self.ip6} mtu={self.mtu}>"


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
            pending=self._pending,
        )
        """Every packet the relay carried, in order (a live :class:`Capture`)."""
        self._stats = Stats(self.packets.lock)
        self.a: Endpoint
        """Side a: the first device (``tun0``, ``198.18.0.1``)."""
        self.b: Endpoint
        """Side b: the second device (``tun1``, ``198.18.0.2``)."""
        # Active impairments per direction: (spec with the seed in use, seed was random).
        self._impairments: dict[str, tuple[ImpairmentSpec, bool]] = {}
        self._random_seed: int | None = None  # a factory shares one across its pairs
        self._peers: list[ScriptedPeer] = []  # every peer scripted so far, open or closed
        self._device_counters: DeviceCounters | None = None
        self._device_drops: dict[str, int] = {}
        # The engine last asked for per direction (the relay swaps asynchronously).
        self._engines: dict[str, ImpairmentEngine | None] = {"a->b": None, "b->a": None}
        self._keeper: Keeper | None = None  # the namespace owner's (ours, or the factory's)
        self.test_start = 0
        """Sequence number (``Packet.seq``) of the first packet of the current test:
        ``packets.since(tun_pair.test_start)`` is the test's part. 0 for a pair made for one
        test; module and session pairs move it at the start of each test."""
        # Scenario rules installed on the relay (outages, faults, the path MTU), in order.
        self._rules: list[Outage | Fault | PathMtu] = []
        self._path_mtu: PathMtu | None = None
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------
    def open(self, *, _index: int = 0) -> TunPair:
        """Build the pair (``with TunPair() as pair`` calls this); returns the pair."""
        o = self.options
        try:
            if self._own_netns:
                self._netns = NetNamespace().enter()
                _prepare_namespace(self._netns)
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
            vnet = o.offload
            dev_a = TunDevice(o.names[0], mode=o.mode, vnet_hdr=vnet)
            self._devices.append(dev_a)
            dev_b = TunDevice(o.names[1], mode=o.mode, vnet_hdr=vnet)
            self._devices.append(dev_b)
            if o.ipv6 is None and os.path.isdir("/proc/sys/net/ipv6"):
                for d in self._devices:
                    ns.write_sysctl(f"net/ipv6/conf/{d.name}/disable_ipv6", 1)
            macs: tuple[str | None, str | None] = (None, None)
            if o.mode == "tap":
                # Stable, so captures and pcaps compare across runs: 02 = locally
                # administered unicast (never a vendor's), 74:70 = "tp", then pair and side.
                macs = (
                    f"02:74:70:00:{_index & 0xFF:02x}:01",
                    f"02:74:70:00:{_index & 0xFF:02x}:02",
                )
            v4 = o.ipv4 or (None, None)
            v6 = o.ipv6 or (None, None)
            sides = [
                _routing.Side(dev_a.name, dev_a.index, v4[0], v4[1], v6[0], v6[1], macs[0]),
                _routing.Side(dev_b.name, dev_b.index, v4[1], v4[0], v6[1], v6[0], macs[1]),
            ]
            self.steps = _routing.apply_recipe(
                sides, mtu=o.mtu, table=o.table, txqueuelen=o.txqueuelen
            )
            for d in self._devices:
                d.set_offload(o.offload)
            self._device_counters = DeviceCounters()  # opened here, inside the namespace
            self.a = Endpoint(self, dev_a, ip=v4[0], ip6=v6[0], mtu=o.mtu, mac=macs[0], side="a")
            self.b = Endpoint(self, dev_b, ip=v4[1], ip6=v6[1], mtu=o.mtu, mac=macs[1], side="b")
            self.packets.t0 = time.monotonic()
            self.packets.wall_t0 = time.time()
            self._relay = Relay(dev_a, dev_b, self.packets, self._stats)
            self._relay.start()
        except BaseException:
            self._teardown()
            raise
        return self

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
        if drain and self._relay is not None:
            self._drain(self.options.drain)
        leftover: list[BaseException] = []
        if self._own_netns and self._keeper is not None:
            try:
                self._keeper.close()
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
        if self._device_counters is not None:
            # The last word, for stats read after close (a failure report); the open file
            # holds the namespace, so it goes before the namespace does.
            self._device_drops = self._device_counters.tx_dropped()
            self._device_counters.close()
            self._device_counters = None
        for d in reversed(self._devices):
            d.close()
        if self._own_netns and self._netns is not None and self._netns.active:
            self._netns.exit()
        return errors + leftover

    def _drain(self, timeout: float) -> bool:
        """Wait (up to ``timeout`` s) while the relay runs until no packet is on its way:
        the peers get the FINs of connections closed just before teardown. True if it
        emptied."""
        relay = self._relay
        if relay is None:
            return True
        deadline = time.monotonic() + timeout
        while True:
            if not relay.drain(max(0.0, deadline - time.monotonic())):
                return False
            # The relay holds nothing; a packet may still wait in a device's queue, where a
            # socket closed just before has put its FIN without the relay having looked yet
            # (docs/internals.md, "Daemons: a closed socket's FIN is in the device queue at
            # once"): the relay reads it next, then it is pending until delivered.
            if not self._device_queued() or not relay.alive:
                return not self._device_queued()
            if time.monotonic() >= deadline:
                return False
            time.sleep(_DRAIN_POLL)

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
        """
        keeper = self._require_keeper()
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
        return _run_in(self._netns, fn)

    # -- one test of a longer-lived pair --------------------------------------------------------
    def _checkpoint(self) -> _Checkpoint:
        relay = self._require_relay()
        return _Checkpoint(
            start=self.packets.mark(),
            hooks=set(relay.hooks("a->b")) | set(relay.hooks("b->a")),
            rules={d: relay.rules(d) for d in ("a->b", "b->a")},
            engines=dict(self._engines),
            impairments=dict(self._impairments),
            stats=self.stats,
        )

    def _restore(self, cp: _Checkpoint) -> None:
        """Remove the hooks, rules and impairments added since ``cp``; put back those it
        had."""
        relay = self._require_relay()
        for hook in (set(relay.hooks("a->b")) | set(relay.hooks("b->a"))) - cp.hooks:
            self.remove_hook(hook)
        for d in ("a->b", "b->a"):
            for rule in relay.rules(d):
                if rule not in cp.rules.get(d, ()):
                    relay.remove_rule(d, rule)
        # The scenario handles of the rules taken off (outages, faults, the path MTU).
        kept = set(relay.rules("a->b")) | set(relay.rules("b->a"))
        self._rules = [rule for rule in self._rules if rule in kept]
        if self._path_mtu is not None and self._path_mtu not in kept:
            self._path_mtu = None
        for d, engine in cp.engines.items():
            if self._engines[d] is not engine:
                self._engines[d] = engine
                relay.set_engine(d, engine)
        for d in ("a->b", "b->a"):
            before = cp.impairments.get(d)
            if self._impairments.get(d) != before:
                # A fresh queue from the checkpoint's settings: one that was swapped out has
                # been run to its end (it served what it held) and cannot be put back.
                queue = None
                now = time.monotonic()
                if before is not None:
                    spec = before[0]
                    assert spec.seed is not None
                    queue = self._queue(spec, spec.seed * 2 + (d == "b->a"), now)
                    self._set_configured(d, spec, now)
                else:
                    self.packets.configured.pop(d, None)
                relay.set_queue(d, queue)
        self._impairments = dict(cp.impairments)
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
    def stats(self) -> dict[str, dict[str, int]]:
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
        counters = self._device_counters
        drops = counters.tx_dropped() if counters is not None else self._device_drops
        for direction, dev in zip(("a->b", "b->a"), self._devices, strict=False):
            entry = stats[direction]
            entry["queued"] = relay.queued(direction) if relay is not None else 0
            entry["device_dropped"] = drops.get(dev.name, 0)
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
            self._random_seed = _random_seed()
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

        t = threading.Thread(target=inside, name="tunpair sockets", daemon=True)
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
        ``delay``, ``jitter``, ``duplicate``, ``reorder``, ``corrupt``, ``rate``, ``seed``.
        Probabilities are 0.0-1.0 (or ``"10%"``), ``delay``/``jitter`` seconds (or
        ``"20ms"``), ``rate`` bits/s (or ``"10mbit"``). A bad value raises
        :class:`~pytest_tunpair.OptionError`, an unknown name ``TypeError``. Each call
        replaces the settings of the direction(s) it names; ``impair()`` with no arguments
        turns everything off.
        A packet held back for reordering when the settings change is released, not lost.
        ``seed=None`` uses :attr:`seed`. Same seed and same packets: same decisions.
        """
        from dataclasses import replace

        from ._link.impair import ImpairmentEngine, ImpairmentSpec

        _check_direction(direction, "impair")
        relay = self._require_relay()
        # Everything is checked before anything changes: a bad value leaves the pair as it was.
        parsed = ImpairmentSpec.from_kwargs(**params)
        random_seed = parsed.seed is None and self.options.seed is None
        used = parsed.seed if parsed.seed is not None else self.seed
        for d in _directions(direction):
            if parsed.active:
                self._impairments[d] = (replace(parsed, seed=used), random_seed)
            else:
                self._impairments.pop(d, None)
        # The trace's millisecond 0, for the queue's server and for the plot's line.
        start = time.monotonic()
        for d in _directions(direction):
            self._set_configured(d, parsed, start)
        self._update_offload()  # off before the engines see a packet, back on after
        tap = self.options.mode == "tap"
        for d in _directions(direction):
            # Each direction draws from its own stream (2s for a->b, 2s+1 for b->a), so one
            # direction's traffic never shifts the other's decisions, and both replay.
            stream = used * 2 + (d == "b->a")
            engine = None
            if parsed.active and parsed.needs_engine:
                engine = ImpairmentEngine(parsed, stream, tap=tap)
            self._engines[d] = engine
            relay.set_engine(d, engine)
            relay.set_queue(d, self._queue(parsed, stream, start) if parsed.active else None)

    def _set_configured(self, direction: str, spec: ImpairmentSpec, start: float) -> None:
        """What ``packets.plot()`` draws as the configured link of ``direction``."""
        from .traces import TraceServer

        configured = self.packets.configured
        if spec.trace is not None:
            # A server of its own (pure, in the capture's time), never the queue's.
            rel = start - self.packets.t0
            configured[direction] = TraceServer(spec.trace, rel, repeat=spec.trace_repeat)
        elif spec.rate is not None:
            configured[direction] = spec.rate
        else:
            configured.pop(direction, None)

    def _queue(self, spec: ImpairmentSpec, stream: int, start: float) -> PacketQueue | None:
        """The bottleneck of one direction (``None`` if ``spec`` holds no packet).

        ``start`` is when a trace's millisecond 0 is (``time.monotonic()``)."""
        from ._link.queue import LinkQueue, PacketQueue, RateServer, Server

        if not spec.needs_queue:
            return None
        hdr = self._devices[0].hdr_len
        server: Server | None = None
        if spec.trace is not None:
            from .traces import TraceServer

            server = TraceServer(spec.trace, start, repeat=spec.trace_repeat)
        elif spec.rate is not None:
            server = RateServer(spec.rate)
        # PIE's draws come from a stream of their own (a string seed: hashed, not the int
        # the engine uses), so they never echo the engine's loss draws.
        queue = LinkQueue(
            spec.queue_spec(),
            server,
            offset=hdr,
            tap=self.options.mode == "tap",
            delay=spec.delay,
            seed=f"queue-{stream}",
        )
        return PacketQueue(queue, hdr)

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

        Returns the :class:`~pytest_tunpair._rules.Outage`, a context manager that ends
        the outage on exit (``with tun_pair.outage(): ...``), with ``.end()``, its window
        (``start``, ``end_time``, in seconds since the pair came up, as
        ``Packet.arrival``) and ``dropped``. Durations are seconds or strings (``"500ms"``).
        """
        from ._link.rules import Outage, check_duration

        _check_direction(direction, "outage")
        self._prune_rules()
        span = None if duration is None else check_duration("duration", duration, "outage()")
        delay = check_duration("after", after, "outage()")
        relay = self._require_relay()
        start = time.monotonic() - self.packets.t0 + delay
        end = math.inf if span is None else start + span
        outage = Outage(start, end, _directions(direction), self.packets.t0, self._drop_rule)
        self._add_rule(relay, outage, _directions(direction))
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

        ``match`` is a predicate on the :class:`~pytest_tunpair.Packet`; ``fields`` are
        the keyword filters of ``packets.filter`` (``src``, ``dst``, ``proto``, ``sport``,
        ``dport``, ``flags`` in scapy's letters, e.g. ``flags="S"``, ...), each a value or a
        predicate on it; all given must hold. ``how``: ``"drop"`` (recorded ``"dropped"``), ``"reset"``
        (the relay answers the sender with a TCP RST: ``ECONNREFUSED`` on connect,
        ``ECONNRESET`` later; recorded ``"reset"``) or ``"unreachable"`` (an ICMP/ICMPv6
        destination unreachable back to the sender, port unreachable for UDP; recorded
        ``"unreachable"``). A packet no reply may answer (a reset for UDP) is dropped,
        recorded ``"dropped"``. ``times=None`` acts on every matching packet.

        Returns the :class:`~pytest_tunpair._rules.Fault` with ``hits`` and ``remove()``.
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
        relay = self._require_relay()
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
        self._add_rule(relay, fault, dirs)
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
        1280`` (RFC 8200). A new call replaces the previous path MTU. Offload is off while
        it is set.
        """
        from ._link.rules import PathMtu, check_mtu

        _check_direction(direction, "path_mtu")
        relay = self._require_relay()
        self._prune_rules()
        old = self._path_mtu
        if mtu is None:
            if old is not None:
                self._drop_rule(old)
            return None
        size, icmp = check_mtu(mtu, icmp)
        rule = PathMtu(size, icmp=icmp, directions=_directions(direction))
        self._add_rule(relay, rule, rule.directions)
        self._path_mtu = rule
        if old is not None:
            self._drop_rule(old)
        return rule

    def _add_rule(
        self, relay: Relay, rule: Outage | Fault | PathMtu, dirs: tuple[str, ...]
    ) -> None:
        self._update_offload(busy=True)  # wire-sized packets before the rule sees one
        for d in dirs:
            relay.add_rule(d, rule)
        self._rules.append(rule)

    def _drop_rule(self, rule: Outage | Fault | PathMtu) -> None:
        """Take ``rule`` off the link (the handles' ``end()``/``remove()``, ``path_mtu(None)``)."""
        if rule in self._rules:
            self._rules.remove(rule)
        if rule is self._path_mtu:
            self._path_mtu = None
        if self._relay is None or self._closed:
            return
        for d in ("a->b", "b->a"):
            self._relay.remove_rule(d, rule)
        self._update_offload()

    def _prune_rules(self) -> None:
        """Take spent faults and past outages off the link: they pass everything now, and
        offload can come back on."""
        now = time.monotonic()
        for rule in list(self._rules):
            if not rule.in_force(now):
                self._drop_rule(rule)

    def _update_offload(self, busy: bool = False) -> None:
        relay = self._require_relay()
        # needs_segments() covers an active peer (its divert function is set).
        # Delay, jitter, rate and the queue work on GSO super-packets by their wire length
        # (that is how an impaired link reaches gigabit rates); the other impairments act
        # on packets as a real wire carries them.
        busy = (
            busy
            or relay.needs_segments()
            or any(spec.needs_segments for spec, _ in self._impairments.values())
        )
        for d in self._devices:
            d.set_offload(self.options.offload and not busy)

    def _pending(self) -> int:
        relay = self._relay
        return 0 if relay is None or self._closed else relay.pending()

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
        lines = [f"{o.mode} pair {' <-> '.join(parts)} mtu={o.mtu} table={o.table}"]
        for d in ("a->b", "b->a"):
            if d in self._impairments:
                spec, random_seed = self._impairments[d]
                line = f"impair {d}: {spec.describe()}"
                if random_seed:
                    assert spec.seed is not None
                    how = f"; {replay(spec.seed)}" if replay is not None else ""
                    line += f" (picked at random{how})"
                lines.append(line)
        if self._relay is not None:
            for d in ("a->b", "b->a"):
                hooks = self._relay.hooks(d)
                if hooks:
                    lines.append(f"hooks {d}: {', '.join(map(str, hooks))}")
        lines.extend(peer.describe() for peer in self._peers)
        now = time.monotonic()
        lines.extend(rule.describe() for rule in self._rules if rule.in_force(now))
        return "\n".join(lines)

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("open" if self._relay else "new")
        return f"<TunPair {self.options.names[0]}<->{self.options.names[1]} {state}>"


@dataclass(frozen=True)
class _Checkpoint:
    """A pair's state at the start of one test (module and session pairs)."""

    start: int
    hooks: set[Hook]
    rules: dict[str, tuple[Any, ...]]
    engines: dict[str, ImpairmentEngine | None]
    impairments: dict[str, tuple[ImpairmentSpec, bool]]
    stats: dict[str, dict[str, int]]


def _run_in(ns: NetNamespace | None, fn: Callable[[], T]) -> T:
    """``fn()`` with the calling thread inside ``ns``: here if it is in already, else on a
    short-lived thread that joins it (so what ``fn`` forks starts in the namespace)."""
    if ns is None or not ns.active:
        raise NamespaceError("the pair is not open")
    if ns.is_current():
        return fn()
    from ._kernel.disposable import run_in_disposable_thread

    def joined() -> T:
        visit = ns.join()
        try:
            return fn()
        finally:
            visit.leave()

    return run_in_disposable_thread(joined, name="tunpair-spawn")


def _random_seed() -> int:
    # Not the `random` module: a test that seeds it must not make every run's seed equal.
    return secrets.randbelow(2**31)


def _check_direction(direction: str | None, what: str) -> None:
    if direction not in (None, "a->b", "b->a"):
        raise OptionError(
            "direction",
            direction,
            source=f"{what}()",
            reason="use 'a->b', 'b->a' or None (both)",
        )


def _directions(direction: str | None) -> tuple[str, ...]:
    return ("a->b", "b->a") if direction is None else (direction,)


@dataclass(frozen=True)
class FactoryCheckpoint:
    """What :meth:`TunPairFactory.begin` remembered for one test."""

    pairs: dict[int, _Checkpoint]
    processes: set[tuple[int, int]]
    spawned: int


class TunPairFactory:
    """Makes pairs in one namespace (``tun_pair_factory``); tears all down in reverse order.

    ``open()`` moves the calling thread into a fresh namespace; ``close()`` brings it back.
    """

    def __init__(
        self,
        defaults: Mapping[str, Any] | None = None,
        *,
        source: str = "tun_pair_factory",
        leftovers: str = "warn",
    ) -> None:
        self.defaults = dict(defaults or {})
        """Options every pair of this factory starts from (a call's own options win)."""
        self.source = source
        """How option errors name the caller, e.g. ``"tun_pair_factory"``."""
        self.pairs: list[TunPair] = []
        """The pairs made so far, oldest first."""
        self.netns: NetNamespace | None = None
        """The namespace all its pairs share (``None`` until the first pair or :meth:`open`)."""
        self.keeper: Keeper | None = None
        """Spawns and stops the processes of the namespace (``leftovers``: the policy for
        processes not started by ``spawn``: ``kill``, ``warn`` or ``fail``)."""
        self.leftovers = leftovers
        """What teardown does with processes ``spawn`` did not start: ``kill``, ``warn`` or ``fail``."""
        self.random_seed = _random_seed()
        """The impairment seed its pairs use when none is given (one per test, so one replays all)."""
        self._thread = threading.get_ident()

    def open(self) -> TunPairFactory:
        """Move the calling thread into a fresh namespace for the pairs (the first call does)."""
        ns = NetNamespace().enter()
        try:
            _prepare_namespace(ns)
            self.keeper = Keeper(ns.stat(), leftovers=self.leftovers)
        except BaseException:
            ns.exit()
            raise
        self.netns = ns
        return self

    # -- a namespace that outlives one test (module and session pairs) ------------------------
    def detach(self) -> Visit:
        """Let the namespace outlive the calling thread's stay: :meth:`open` moved this
        thread in, the returned visit's ``leave()`` takes it back, and :meth:`join` lets
        threads in again. :meth:`close` then works from any thread."""
        if self.netns is None:
            raise NamespaceError("the factory has no namespace yet")
        return self.netns.detach()

    def join(self) -> Visit:
        """Move the calling thread into the namespace (after :meth:`detach`)."""
        if self.netns is None or not self.netns.active:
            raise NamespaceError("the factory's namespace is closed")
        return self.netns.join()

    def begin(self) -> FactoryCheckpoint:
        """Start one test: remember each pair's hooks, rules, impairments and where its
        capture is, and who runs in the namespace; :meth:`end` undoes what the test added."""
        for pair in self.pairs:
            pair.test_start = pair.packets.mark()
        assert self.keeper is not None
        return FactoryCheckpoint(
            {id(pair): pair._checkpoint() for pair in self.pairs},
            self.keeper.snapshot(),
            len(self.keeper.spawned),
        )

    def end(self, cp: FactoryCheckpoint) -> None:
        """End the test ``cp`` began: deliver what the relays hold (each pair's ``drain``),
        stop what it spawned (with their descendants), remove its hooks, rules and
        impairments, and stop the other processes it left running (by the leftover policy:
        may raise :class:`LeftoverProcessError`)."""
        for pair in self.pairs:
            pair._drain(pair.options.drain)
        if self.keeper is not None and len(self.keeper.spawned) > cp.spawned:
            self.keeper.stop_family(self.keeper.spawned[cp.spawned :])
        for pair in self.pairs:
            pair_cp = cp.pairs.get(id(pair))
            if pair_cp is not None:
                pair._restore(pair_cp)
            else:  # made during the test: goes back to nothing
                pair._restore(_Checkpoint(0, set(), {}, {"a->b": None, "b->a": None}, {}, {}))
        if self.keeper is not None:
            self.keeper.stop_leftovers(since=cp.processes)

    def slices(
        self, cp: FactoryCheckpoint | None
    ) -> list[tuple[TunPair, int, dict[str, dict[str, int]]]]:
        """Each pair with where the test ``cp`` began: (pair, first seq, stats then)."""
        out: list[tuple[TunPair, int, dict[str, dict[str, int]]]] = []
        for pair in self.pairs:
            pair_cp = None if cp is None else cp.pairs.get(id(pair))
            if pair_cp is None:
                out.append((pair, 0, {}))
            else:
                out.append((pair, pair_cp.start, pair_cp.stats))
        return out

    def __call__(self, **options: Any) -> TunPair:
        return self.make(options, source=self.source)

    def make(self, options: Mapping[str, Any], *, source: str) -> TunPair:
        """``factory(**options)``, with the name option errors give the caller (``source``)."""
        if self.netns is None:
            self.open()
        index = len(self.pairs)
        opts = PairOptions.from_kwargs({**self.defaults, **options}, source=source, index=index)
        pair = TunPair(opts, netns=self.netns)
        pair._keeper = self.keeper
        # One random seed per factory (per test): replaying it with --tunpair-seed then
        # reproduces every pair of the test, not just one.
        pair._random_seed = self.random_seed
        pair.open(_index=index)
        self.pairs.append(pair)
        return pair

    @property
    def netns_path(self) -> str:
        """``nsenter --net=PATH`` enters the pairs' namespace from another shell."""
        if self.netns is None:
            raise NamespaceError("the factory has no namespace yet")
        return self.netns.path

    def spawn(
        self,
        args: Sequence[str] | str,
        *,
        ready: object = None,
        timeout: float = 10.0,
        **popen_kwargs: Any,
    ) -> subprocess.Popen[Any]:
        """:meth:`TunPair.spawn` into the factory's namespace (shared by all its pairs)."""
        if self.netns is None:
            self.open()
        assert self.keeper is not None
        return self.keeper.spawn(
            args, ready=ready, timeout=timeout, run_inside=self._run_inside, **popen_kwargs
        )

    def _run_inside(self, fn: Callable[[], T]) -> T:
        return _run_in(self.netns, fn)

    def close(self) -> None:
        """Deliver what the relays hold (each pair's ``drain``), stop the processes in the
        namespace, close every pair (newest first) and leave the namespace; then raise the
        first error any relay or hook hit, or a :class:`LeftoverProcessError`."""
        errors: list[BaseException] = []
        leftover: list[BaseException] = []
        for pair in self.pairs:
            if not pair._closed:
                pair._drain(pair.options.drain)
        if self.keeper is not None:
            try:
                self.keeper.close()
            except LeftoverProcessError as exc:
                leftover.append(exc)
        for pair in reversed(self.pairs):
            try:
                pair.close(drain=False)
            except BaseException as exc:
                errors.append(exc)
        if self.netns is not None and self.netns.active:
            self.netns.exit()
        errors += leftover
        if errors:
            raise errors[0]

    def __enter__(self) -> TunPairFactory:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()
