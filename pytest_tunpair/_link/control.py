"""The control side of one direction: what the test configured on ``a->b`` (or ``b->a``).

The relay's :class:`~pytest_tunpair._link.link.Link` is a direction's data plane, owned by
the relay thread. A :class:`Direction` is its control plane, owned by the test's side: the
one place that knows the impairment spec in force (with the seed it uses), the engine and
queue built from it, the server a plot draws as the configured link, the rules (outages,
faults, a path MTU) and hooks installed on the link, what the direction needs of the
devices' offload, and how to checkpoint and restore all of it for one test of a longer-lived
pair. ``TunPair`` holds two and delegates; the capture asks them what to draw.

Rules and hooks are read back from the relay (:meth:`Relay.rules`, :meth:`Relay.hooks`):
the link's copy-on-write tuples are their one record, so nothing here can disagree with what
the relay runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..traces import TraceServer
    from .hooks import Hook
    from .impair import ImpairmentEngine, ImpairmentSpec
    from .link import Rule
    from .queue import PacketQueue
    from .relay import Relay

__all__ = ["ClassState", "Direction", "DirectionState"]


@dataclass(frozen=True)
class ClassState:
    """One class of a direction (``impair(match=...)``): its spec (with ``match``, ``name``
    and the seed in use) and the engine handed to the relay."""

    spec: ImpairmentSpec
    random_seed: bool
    engine: ImpairmentEngine | None


@dataclass(frozen=True)
class DirectionState:
    """What :meth:`Direction.checkpoint` remembered: enough to undo a test's changes."""

    hooks: tuple[Hook, ...]
    rules: tuple[Rule, ...]
    spec: ImpairmentSpec | None
    random_seed: bool
    engine: ImpairmentEngine | None
    classes: tuple[tuple[str, ClassState], ...] = ()


class Direction:
    """One direction of a pair as the test configures it (see the module docstring)."""

    def __init__(self, name: str, relay: Relay, *, tap: bool, vnet_len: int, t0: float) -> None:
        #: ``"a->b"`` or ``"b->a"``.
        self.name = name
        self._relay = relay
        self._tap = tap
        self._vnet_len = vnet_len
        self._t0 = t0
        #: The impairments in force, with the seed they use (``None``: none).
        self.spec: ImpairmentSpec | None = None
        #: The seed of :attr:`spec` was picked at random (a report says how to replay it).
        self.random_seed = False
        #: The engine last handed to the relay (which swaps it in asynchronously).
        self.engine: ImpairmentEngine | None = None
        #: What the link is configured to carry, for ``packets.plot()``'s dashed line: a
        #: rate in bits/s, a trace's server (in the capture's time), or ``None``.
        self.configured: float | TraceServer | None = None
        #: The classes (``impair(match=...)``) by name, in the order they are tried.
        self.classes: dict[str, ClassState] = {}

    # -- impairments ---------------------------------------------------------------------
    @property
    def stream(self) -> int:
        """The random stream this direction draws from, given its spec's seed: ``2 * seed``
        for ``a->b``, ``2 * seed + 1`` for ``b->a``, so one direction's traffic never shifts
        the other's decisions, and both replay."""
        assert self.spec is not None and self.spec.seed is not None
        return self.spec.seed * 2 + (self.name == "b->a")

    def impair(
        self,
        spec: ImpairmentSpec | None,
        *,
        random_seed: bool,
        start: float,
        clear_classes: bool = False,
    ) -> None:
        """Put ``spec`` (with its seed set; ``None`` or an inactive spec: no impairment) in
        force from now on: a fresh engine and queue go to the relay, which releases what the
        old ones held. ``start`` (``time.monotonic()``) is a trace's millisecond 0.

        A spec with ``match`` is a class: it replaces the class of its name (an inactive
        one removes it) and leaves the direction's own settings alone. ``clear_classes``
        removes every class too."""
        from .impair import ImpairmentEngine

        if spec is not None and spec.class_name is not None:
            self._impair_class(spec, random_seed, start)
            return
        if clear_classes:
            for name in list(self.classes):
                self._remove_class(name)
        if spec is not None and not spec.active:
            spec = None
        self.spec = spec
        self.random_seed = random_seed and spec is not None
        self._configure(start)
        engine = queue = None
        if spec is not None:
            if spec.needs_engine:
                engine = ImpairmentEngine(spec, self.stream, tap=self._tap)
            queue = self._queue(start)
        self.engine = engine
        self._relay.set_engine(self.name, engine)
        self._relay.set_queue(self.name, queue)
        self._relay.set_split(self.name, spec is not None and spec.per_segment)

    def _configure(self, start: float) -> None:
        from ..traces import TraceServer

        spec = self.spec
        if spec is not None and spec.trace is not None:
            # A server of its own (pure, in the capture's time), never the queue's.
            self.configured = TraceServer(spec.trace, start - self._t0, repeat=spec.trace_repeat)
        elif spec is not None and spec.rate is not None:
            self.configured = spec.rate
        else:
            self.configured = None

    def _class_stream(self, spec: ImpairmentSpec, name: str) -> int:
        """A class's random stream: the direction's, moved by a hash of the class's name,
        so each class draws apart from the others and the same name replays."""
        import zlib

        assert spec.seed is not None
        return spec.seed * 2 + (self.name == "b->a") + (zlib.crc32(name.encode()) + 1 << 33)

    def _impair_class(self, spec: ImpairmentSpec, random_seed: bool, start: float) -> None:
        from .impair import ImpairmentEngine

        name = spec.class_name
        assert name is not None
        if not spec.active:
            self._remove_class(name)
            return
        stream = self._class_stream(spec, name)
        engine = ImpairmentEngine(spec, stream, tap=self._tap) if spec.needs_engine else None
        self.classes[name] = ClassState(spec, random_seed and spec.seed is not None, engine)
        self._install_class(name, spec, engine, start)

    def _install_class(
        self, name: str, spec: ImpairmentSpec, engine: ImpairmentEngine | None, start: float
    ) -> None:
        queue = self._queue(start, spec, self._class_stream(spec, name))
        self._relay.set_class(self.name, name, spec.predicate(), engine, queue, spec.per_segment)

    def _remove_class(self, name: str) -> None:
        if self.classes.pop(name, None) is not None:
            self._relay.remove_class(self.name, name)

    def _queue(
        self, start: float, spec: ImpairmentSpec | None = None, stream: int | None = None
    ) -> PacketQueue | None:
        """The bottleneck of this direction, or of a class (``None`` if the spec holds no
        packet)."""
        from .queue import LinkQueue, PacketQueue, RateServer, Server

        if spec is None:
            spec = self.spec
            stream = self.stream if spec is not None else None
        if spec is None or not spec.needs_queue:
            return None
        server: Server | None = None
        if spec.trace is not None:
            from ..traces import TraceServer

            server = TraceServer(spec.trace, start, repeat=spec.trace_repeat)
        elif spec.rate is not None:
            server = RateServer(spec.rate)
        # PIE's draws come from a stream of their own (a string seed: hashed, not the int
        # the engine uses), so they never echo the engine's loss draws.
        queue = LinkQueue(
            spec.queue_spec(),
            server,
            offset=self._vnet_len,
            tap=self._tap,
            delay=spec.delay,
            seed=f"queue-{stream}",
        )
        return PacketQueue(queue, self._vnet_len)

    # -- rules and hooks (their one record is the relay's link) ----------------------------
    @property
    def rules(self) -> tuple[Rule, ...]:
        """The rules on this direction, in the order they run."""
        return self._relay.rules(self.name)

    @property
    def hooks(self) -> tuple[Hook, ...]:
        """The hooks on this direction, in the order they run."""
        return self._relay.hooks(self.name)

    def add_rule(self, rule: Rule) -> None:
        self._relay.add_rule(self.name, rule)

    def remove_rule(self, rule: Rule) -> bool:
        return self._relay.remove_rule(self.name, rule)

    def spent_rules(self, now: float) -> list[Rule]:
        """Rules that pass everything from ``now`` on (a used-up fault, a past outage)."""
        return [r for r in self.rules if not r.in_force(now)]

    def of_type(self, cls: type[Any]) -> Any:
        """The rule of class ``cls`` on this direction (its path MTU), or ``None``."""
        return next((r for r in self.rules if isinstance(r, cls)), None)

    @property
    def needs_segments(self) -> bool:
        """Something on this direction must see packets as a real wire carries them (a hook,
        a rule, a scripted peer): the pair turns offload off while one does. Impairments
        do not: a per-segment link splits super-packets in the relay."""
        return self._relay.link_needs_segments(self.name)

    # -- one test of a longer-lived pair ---------------------------------------------------
    def checkpoint(self) -> DirectionState:
        return DirectionState(
            self.hooks,
            self.rules,
            self.spec,
            self.random_seed,
            self.engine,
            tuple(self.classes.items()),
        )

    def restore(self, state: DirectionState) -> None:
        """Take off the rules added since ``state`` and put back its impairments. (Hooks
        are the pair's to remove: one hook may serve both directions.)"""
        for rule in self.rules:
            if rule not in state.rules:
                self.remove_rule(rule)
        if self.engine is not state.engine:
            self.engine = state.engine
            self._relay.set_engine(self.name, state.engine)
        if self.spec != state.spec:
            # A fresh queue from the checkpoint's settings: one that was swapped out has
            # been run to its end (it served what it held) and cannot be put back.
            now = time.monotonic()
            self.spec = state.spec
            self._configure(now)
            self._relay.set_queue(self.name, self._queue(now))
            spec = self.spec
            self._relay.set_split(self.name, spec is not None and spec.per_segment)
        self.random_seed = state.random_seed
        kept = dict(state.classes)
        for name in list(self.classes):
            if name not in kept:
                self._remove_class(name)
        if list(self.classes) != list(kept)[: len(self.classes)]:
            # Removed and added again since (a new class goes last): so that the classes
            # are tried in the checkpoint's order again, all of them are put back, with
            # fresh queues.
            for name in list(self.classes):
                self._remove_class(name)
        now = time.monotonic()
        for name, cls in state.classes:
            if self.classes.get(name) != cls:
                # Its engine goes on where it was; its queue comes back fresh.
                self.classes[name] = cls
                self._install_class(name, cls.spec, cls.engine, now)

    # -- reports ----------------------------------------------------------------------------
    def describe(self, replay: Any = None) -> list[str]:
        """Lines for a failure report: the impairment (with the seed in use) and the hooks.
        ``replay(seed)`` says how the caller's user replays a seed picked at random."""
        lines = []
        spec = self.spec
        if spec is not None:
            line = f"impair {self.name}: {spec.describe()}"
            if self.random_seed:
                assert spec.seed is not None
                how = f"; {replay(spec.seed)}" if replay is not None else ""
                line += f" (picked at random{how})"
            lines.append(line)
        for name, cls in self.classes.items():
            match = cls.spec.describe_match()
            line = f"impair {self.name} class {name!r} (match {match}): {cls.spec.describe()}"
            if cls.random_seed:
                assert cls.spec.seed is not None
                how = f"; {replay(cls.spec.seed)}" if replay is not None else ""
                line += f" (picked at random{how})"
            lines.append(line)
        hooks = self.hooks
        if hooks:
            lines.append(f"hooks {self.name}: {', '.join(map(str, hooks))}")
        return lines

    def __repr__(self) -> str:
        what = self.spec.describe() if self.spec is not None else "no impairment"
        classes = f", {len(self.classes)} classes" if self.classes else ""
        return (
            f"<Direction {self.name}: {what}{classes}, {len(self.rules)} rules, "
            f"{len(self.hooks)} hooks>"
        )
