"""``--tunpair-pcap-live=FIFO_OR_DIR``: each test's pairs as pcapng while the tests run.

Into a FIFO: one stream for the run (one pcapng section; two interfaces per pair as pairs
open, described with the test id), for ``wireshark -k -i FIFO``. With no reader when a
pair opens, that pair is not streamed; a reader that goes away ends the stream, and the
next pair opens the FIFO again (a new section for a new reader). Into a directory: a
growing file per pair, named after the test as ``--tunpair-pcap`` names its files, finished
with its secrets in front when the pair closes. Either way the relay and the test never
wait for a reader.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from . import keys
from .report import pcap_stem

if TYPE_CHECKING:
    from .._factory import TunPairFactory
    from .._packets.stream import Follower, Sink
    from .._pair import TunPair

__all__ = ["LiveView", "configure", "terminal_summary", "unconfigure", "watch"]

LIVE: pytest.StashKey[LiveView] = pytest.StashKey()


class LiveView:
    """The run's live streams: followers by pair, and the FIFO's shared sink."""

    def __init__(self, target: Path, fifo: bool) -> None:
        self.target = target
        self.fifo = fifo
        self._sink: Sink | None = None  # the FIFO's, for as long as its reader stays
        self._streams: dict[int, tuple[Follower, Sink | None]] = {}
        self._stems: dict[str, str] = {}
        self.unread: list[str] = []
        """Tests whose pairs were not streamed: no reader had the FIFO open."""
        self.problems: dict[str, str] = {}
        """Where a stream ended early, and why."""
        self.skipped: dict[str, int] = {}
        """Where a stream missed packets the capture let go before it caught up, how many."""

    def opened(self, pair: TunPair, nodeid: str, index: int) -> None:
        """Start streaming ``pair``, the ``index``-th made for ``nodeid``."""
        from .._packets.stream import Follower

        if self.fifo:
            sink = self._fifo_sink(nodeid)
            if sink is None:
                return
            own: Sink | None = None
        else:
            sink = own = self._file_sink(pair, nodeid, index)
            if sink is None:
                return
        follower = Follower(pair.packets, sink, label=nodeid if self.fifo else "")
        self._streams[id(pair)] = (follower.start(), own)

    def _fifo_sink(self, nodeid: str) -> Sink | None:
        if self._sink is not None and self._sink.broken is not None:
            self.problems[str(self.target)] = f"{self._sink.broken} (during {nodeid})"
            self._sink.close()
            self._sink = None
        if self._sink is None:
            from .._packets.stream import Sink, open_fifo

            try:
                fd = open_fifo(str(self.target))
            except OSError:
                self.unread.append(nodeid)
                return None
            self._sink = Sink(fd, name=str(self.target))
        return self._sink

    def _file_sink(self, pair: TunPair, nodeid: str, index: int) -> Sink | None:
        from .._packets.stream import Sink

        # The first pair's file is named as --tunpair-pcap names a test's only pair; later
        # ones (more pairs are not known in advance) get the device names.
        stem = pcap_stem(nodeid or "session", self._stems)
        a, b = pair.options.names
        path = self.target / (f"{stem}.pcapng" if index == 0 else f"{stem}-{a}-{b}.pcapng")
        try:
            self.target.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            self.problems[str(path)] = f"cannot write: {exc.strerror or exc}"
            return None
        return Sink(fd, name=str(path), path=str(path))

    def closed(self, pairs: list[TunPair]) -> None:
        """The pairs are closed: their last packets and secrets, then their files."""
        for pair in pairs:
            entry = self._streams.pop(id(pair), None)
            if entry is None:
                continue
            follower, own = entry
            follower.stop()
            if follower.skipped:
                where = follower.sink.name
                self.skipped[where] = self.skipped.get(where, 0) + follower.skipped
            if own is not None:
                own.close(pair.packets.secrets())
                if own.broken is not None:
                    self.problems[own.name] = own.broken

    def close(self) -> None:
        if self._sink is not None:
            if self._sink.broken is not None:
                self.problems[str(self.target)] = self._sink.broken
            self._sink.close()
            self._sink = None


# -- the hooks' bodies ----------------------------------------------------------------------------
def configure(config: pytest.Config) -> None:
    """Check the target against the run (one FIFO, one writer) and keep the view."""
    options = config.stash[keys.OPTIONS]
    target = options.tunpair_pcap_live
    if target is None or not options.tunpair:
        return
    try:
        fifo = stat.S_ISFIFO(target.stat().st_mode)
    except OSError:
        fifo = False
    if fifo and (getattr(config.option, "numprocesses", None) or hasattr(config, "workerinput")):
        raise pytest.UsageError(
            f"--tunpair-pcap-live: {target} is a FIFO, which takes one writer, and -n runs "
            "several: give a directory (a file per pair) or run without -n"
        )
    if not fifo and options.tunpair_pcap is not None and target == options.tunpair_pcap:
        raise pytest.UsageError(
            f"--tunpair-pcap-live and --tunpair-pcap both name {target}: the failed tests' "
            "files would overwrite the live ones; give two directories"
        )
    config.stash[LIVE] = LiveView(target, fifo)


def watch(config: pytest.Config, factory: TunPairFactory, nodeid: str) -> None:
    """Stream every pair ``factory`` opens from now on."""
    view = config.stash.get(LIVE, None)
    if view is not None:
        factory.on_open = lambda pair: view.opened(pair, nodeid, factory.pairs.index(pair))


def closed(config: pytest.Config, factory: TunPairFactory) -> None:
    view = config.stash.get(LIVE, None)
    if view is not None:
        view.closed(factory.pairs)


def unconfigure(config: pytest.Config) -> None:
    view = config.stash.get(LIVE, None)
    if view is not None:
        view.close()


def terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Tests not streamed for want of a reader, and streams that ended early."""
    view = terminalreporter.config.stash.get(LIVE, None)
    if view is None or not (view.unread or view.problems or view.skipped):
        return
    terminalreporter.section("tunpair: live pcapng", sep="-", yellow=True)
    if view.unread:
        n = len(view.unread)
        terminalreporter.line(
            f"{n} test{'s' if n != 1 else ''} not streamed: no reader had {view.target} open "
            f"when the pair opened (first: {view.unread[0]}); start the reader "
            f"(`wireshark -k -i {view.target}`) before the tests"
        )
    for where, why in view.problems.items():
        terminalreporter.line(f"{where}: the stream ended early: {why}")
    from .._packets.stream import lost_to_bound

    for where, n in view.skipped.items():
        bound = "capture_bytes or max_packets (@pytest.mark.tunpair(capture_bytes=...))"
        terminalreporter.line(f"{where}: {lost_to_bound(n, bound)}")
