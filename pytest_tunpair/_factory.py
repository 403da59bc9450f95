"""``TunPairFactory``: pairs in one namespace, torn down together (``tun_pair_factory``).

The fixtures' machinery, usable without pytest. A factory owns the namespace its pairs
share and the processes started in it; for module and session pairs it also remembers
what each test added (:meth:`TunPairFactory.begin`) and undoes it (:meth:`~TunPairFactory.end`).
"""

from __future__ import annotations

import itertools
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from ._errors import LeftoverProcessError, NamespaceError, OptionError
from ._kernel.netns import NetNamespace, Visit
from ._kernel.spare import Spare

if TYPE_CHECKING:
    from ._kernel.host import Host
from ._kernel.procs import Keeper
from ._options import PairOptions
from ._pair import Checkpoint, TunPair, device_plan, new_seed, prepare_namespace, run_in
from ._topology import Topology

T = TypeVar("T")

__all__ = ["FactoryCheckpoint", "TunPairFactory"]


@dataclass(frozen=True)
class FactoryCheckpoint:
    """What :meth:`TunPairFactory.begin` remembered for one test: a token for
    :meth:`~TunPairFactory.end` and :meth:`~TunPairFactory.slices` (its fields are private)."""

    _pairs: dict[int, Checkpoint]
    _processes: set[tuple[int, int]]
    _spawned: int


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
        self.topologies: list[Topology] = []
        """The topologies made so far (their links are in :attr:`pairs` too)."""
        self.random_seed = new_seed()
        """The impairment seed its pairs use when none is given (one per test, so one replays all)."""
        self._thread = threading.get_ident()
        self._spare: Spare | None = None  # the spare open() entered, with its devices
        self.on_open: Callable[[TunPair], None] | None = None
        """Called with each pair once it is open (the plugin streams it live with
        ``--tunpair-pcap-live``)."""

    def open(self, spare: Spare | None = None) -> TunPairFactory:
        """Move the calling thread into a fresh namespace for the pairs (the first call does):
        a new one, or ``spare``, made ahead of time (``_kernel/spare.py``; the plugin keeps
        one ready) -- whose devices, if it has any, the first pair takes if its options call
        for them (else they go, unused, with the namespace)."""
        if spare is not None:
            fd, spare.fd = spare.fd, -1
            try:
                ns = NetNamespace().enter(fd)
            except BaseException:
                spare.discard()
                raise
        else:
            ns = NetNamespace().enter()
        try:
            if spare is None:
                prepare_namespace(ns)
            born = spare.born if spare is not None else None
            self.keeper = Keeper(ns.stat(), leftovers=self.leftovers, born=born)
        except BaseException:
            if spare is not None:
                spare.discard()
            ns.exit()
            raise
        self.netns = ns
        self._spare = spare
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
            {id(pair): pair.checkpoint() for pair in self.pairs},
            self.keeper.snapshot(),
            len(self.keeper.spawned),
        )

    def end(self, cp: FactoryCheckpoint) -> None:
        """End the test ``cp`` began: deliver what the relays hold (each pair's ``drain``),
        stop what it spawned (with their descendants), remove its hooks, rules and
        impairments, and stop the other processes it left running (by the leftover policy:
        may raise :class:`LeftoverProcessError`)."""
        for pair in self.pairs:
            pair.settle(pair.options.drain)
        if self.keeper is not None and len(self.keeper.spawned) > cp._spawned:
            self.keeper.stop_family(self.keeper.spawned[cp._spawned :])
        for pair in self.pairs:
            pair_cp = cp._pairs.get(id(pair))
            # A pair made during the test goes back to nothing on the wire.
            pair.restore(pair_cp if pair_cp is not None else Checkpoint(0, {}, {}))
        if self.keeper is not None:
            self.keeper.stop_leftovers(since=cp._processes)

    def slices(
        self, cp: FactoryCheckpoint | None
    ) -> list[tuple[TunPair, int, dict[str, dict[str, int]]]]:
        """Each pair with where the test ``cp`` began: (pair, first seq, stats then)."""
        out: list[tuple[TunPair, int, dict[str, dict[str, int]]]] = []
        for pair in self.pairs:
            pair_cp = None if cp is None else cp._pairs.get(id(pair))
            if pair_cp is None:
                out.append((pair, 0, {}))
            else:
                out.append((pair, pair_cp.start, pair_cp.stats))
        return out

    def __call__(self, **options: Any) -> TunPair:
        return self.make(options, source=self.source)

    def make(
        self,
        options: Mapping[str, Any],
        *,
        source: str,
        _hosts: tuple[Host, Host] | None = None,
    ) -> TunPair:
        """``factory(**options)``, with the name option errors give the caller (``source``)."""
        if self.netns is None:
            self.open()
        index = len(self.pairs)
        opts = PairOptions.from_kwargs({**self.defaults, **options}, source=source, index=index)
        built = None
        spare, self._spare = self._spare, None
        if spare is not None and spare.built is not None:
            if index == 0 and _hosts is None and spare.plan == device_plan(opts, index):
                built, spare.built = spare.built, None
            else:
                # Not this pair's: its devices would be in the way (names, addresses).
                spare.discard_devices(delete=True)
        # One random seed per factory (per test): replaying it with --tunpair-seed then
        # reproduces every pair of the test, not just one.
        pair = TunPair(
            opts,
            netns=self.netns,
            _keeper=self.keeper,
            _random_seed=self.random_seed,
            _hosts=_hosts,
            _built=built,
        )
        pair.open(_index=index)
        self.pairs.append(pair)
        if self.on_open is not None:
            self.on_open(pair)
        return pair

    # -- topologies -----------------------------------------------------------------------------
    def topology(
        self,
        links: Sequence[tuple[str, str]],
        *,
        routers: Sequence[str] = (),
        **options: Any,
    ) -> Topology:
        """Hosts joined by links, each link a pair of its own (``options`` are every
        link's, as for ``factory(**options)``): ``topology([("client", "router"),
        ("router", "server")], routers=["router"])``. Every host gets routes to every
        address of the topology; only ``routers`` forward (with the kernel: TTL and ICMP as
        any router). Returns the :class:`~pytest_tunpair.Topology`; its links are also in
        :attr:`pairs`, so reports show each one."""
        if self.netns is None:
            self.open()
        topo = Topology.build(
            self, links, routers=routers, options=options, source=f"{self.source}.topology()"
        )
        self.topologies.append(topo)
        return topo

    def star(
        self, clients: int = 3, *, server: str = "server", client: str = "client", **options: Any
    ) -> Topology:
        """``clients`` hosts (``client1``, ``client2``, ...) each with a link of its own to
        one ``server`` host: ``star(3).link("client2", "server").impair(loss=0.1)``."""
        if isinstance(clients, bool) or not isinstance(clients, int) or not 1 <= clients <= 60:
            raise OptionError(
                "clients", clients, source=f"{self.source}.star()", reason="a number from 1 to 60"
            )
        links = [(f"{client}{i}", server) for i in range(1, clients + 1)]
        return self.topology(links, **options)

    def chain(self, *names: str, **options: Any) -> Topology:
        """Hosts in a line, each forwarding to the next: ``chain()`` is ``client`` --
        ``router`` -- ``server``; ``chain("a", "r1", "r2", "b")`` has two routers (every
        host but the two ends forwards)."""
        hosts = names or ("client", "router", "server")
        if len(hosts) < 2:
            raise OptionError(
                "names", hosts, source=f"{self.source}.chain()", reason="give at least two hosts"
            )
        links = list(itertools.pairwise(hosts))
        return self.topology(links, routers=hosts[1:-1], **options)

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
        return run_in(self.netns, fn)

    def close(self) -> None:
        """Deliver what the relays hold (each pair's ``drain``), stop the processes in the
        namespace, close every pair (newest first) and leave the namespace; then raise the
        first error any relay or hook hit, or a :class:`LeftoverProcessError`."""
        errors: list[BaseException] = []
        leftover: list[BaseException] = []
        spare, self._spare = self._spare, None
        if spare is not None:
            spare.discard()  # devices no pair took
        for pair in self.pairs:
            pair.settle(pair.options.drain)
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
        for topo in reversed(self.topologies):
            try:
                topo.close()  # the hosts, once their links' devices are closed
            except BaseException as exc:
                errors.append(exc)
        if self.netns is not None and self.netns.active:
            self.netns.exit()
        errors += leftover
        if errors:
            raise errors[0]

    def __enter__(self) -> TunPairFactory:
        # ``with TunPairFactory().open(...) as f`` is open already: not a second namespace.
        return self if self.netns is not None else self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()
