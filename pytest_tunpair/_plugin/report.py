"""What a failing test says about its tunnels: the packet-trace report section, its
pytest-html extras, the pcap files and plots of ``--tunpair-pcap`` / ``--tunpair-plot``, the
terminal summary and the report header.

The first part is plain functions over pairs; the second, the bodies of ``plugin.py``'s
report hooks. pytest is imported by the second only when it runs: ``tunpair run`` shares
:func:`plural` and must not load pytest.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import pytest

    from .._options import PairOptions
    from .._packets.capture import Capture
    from .._pair import TunPair

__all__ = [
    "HTML_TRACE_LINES",
    "SECTION_TRACE_LINES",
    "TestSlice",
    "configure",
    "format_section",
    "header",
    "html_extras",
    "make_report",
    "pairs_of",
    "pcap_note",
    "pcap_paths",
    "pcap_stem",
    "plot_note",
    "plural",
    "section_title",
    "terminal_summary",
    "write_pcaps",
    "write_plots",
]

#: Packet lines per pair in a report section; beyond it the first and the last packets are
#: shown with "… N more" between them (the pcap file, if asked for, has them all).
SECTION_TRACE_LINES = 60
#: The same for the trace attached to pytest-html's report: a page has more room.
HTML_TRACE_LINES = 2000
# File names are limited to 255 bytes; leave room for the pair suffix and ".pcap".
_MAX_STEM = 180
_UNSAFE = r"[^A-Za-z0-9._+-]+"  # compiled on first use (a run without tunnels never does)


class ReportedPair(Protocol):
    """What a report needs from a pair (``TunPair`` has it, open or closed)."""

    @property
    def packets(self) -> Capture: ...

    @property
    def stats(self) -> dict[str, dict[str, Any]]: ...

    def describe(self, replay: Callable[[int], str] | None = None) -> str: ...


class TestSlice:
    """One test's part of a pair that outlives it (module and session pairs): the packets
    from ``start`` (a ``Packet.seq``) on and the counts since ``stats``."""

    def __init__(self, pair: TunPair, start: int, stats: Mapping[str, Mapping[str, int]]) -> None:
        self.pair = pair
        self.start = start
        self._stats0 = stats

    @property
    def packets(self) -> Capture:
        return self.pair.packets.view(self.start)

    @property
    def stats(self) -> dict[str, dict[str, Any]]:
        now = self.pair.stats
        return {d: _since(counts, self._stats0.get(d, {})) for d, counts in now.items()}

    @property
    def options(self) -> PairOptions:
        return self.pair.options

    def describe(self, replay: Callable[[int], str] | None = None) -> str:
        return self.pair.describe(replay)

    @property
    def quiet(self) -> bool:
        """Nothing crossed the pair while the test ran: its trace would say nothing."""
        return len(self.packets) == 0 and not any(
            counts.get("packets") or counts.get("dropped") for counts in self.stats.values()
        )


# -- the report section --------------------------------------------------------------------
def section_title(when: str) -> str:
    """Named like pytest's "Captured log call", for the same reader."""
    return f"Captured packets {when}"


def plural(n: int, word: str) -> str:
    """``1 packet``, ``2 packets``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}{'es' if word.endswith('s') else 's'}"


def _header(pair: ReportedPair, replay: Callable[[int], str] | None) -> str:
    try:
        return pair.describe(replay)
    except Exception as exc:  # a report must never hide the test's own failure
        return f"{pair!r} (describe() failed: {type(exc).__name__}: {exc})"


def _since(now: Mapping[str, Any], then: Mapping[str, Any]) -> dict[str, Any]:
    """Counts ``now`` minus ``then``, key by key; nested (a direction's ``classes``) too."""
    return {
        k: _since(v, then.get(k, {})) if isinstance(v, Mapping) else v - then.get(k, 0)
        for k, v in now.items()
    }


def _counts(stats: Mapping[str, Mapping[str, int]]) -> str:
    parts = []
    for direction, c in stats.items():
        text = f"{direction} {plural(c.get('packets', 0), 'packet')} {c.get('bytes', 0)} bytes"
        notes = []
        if c.get("dropped"):
            notes.append(f"{c['dropped']} dropped")
        if c.get("marked"):
            notes.append(f"{c['marked']} ECN-marked")
        if c.get("device_dropped"):
            # Offered load that never reached the relay: the sender outran it.
            notes.append(f"{c['device_dropped']} dropped by the device before the relay read them")
        if notes:
            text += f" ({', '.join(notes)})"
        parts.append(text)
    return ", ".join(parts)


def format_section(
    pairs: Sequence[ReportedPair],
    notes: Sequence[str | None] = (),
    *,
    limit: int = SECTION_TRACE_LINES,
    replay: Callable[[int], str] | None = None,
) -> str:
    """The text of the report section: for each pair a header (``describe(replay)``), what
    the relay carried, an optional note (the pcap file) and the capped trace."""
    blocks = []
    for i, pair in enumerate(pairs):
        capture = pair.packets
        lines = [_header(pair, replay)]
        lines.append(f"relay carried {_counts(pair.stats)}; {plural(len(capture), 'packet')} kept")
        note = notes[i] if i < len(notes) else None
        if note:
            lines.append(note)
        lines.append(capture.summary(limit=limit))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def html_extras(
    pairs: Sequence[ReportedPair],
    notes: Sequence[str | None] = (),
    *,
    replay: Callable[[int], str] | None = None,
    images: Sequence[Path] = (),
) -> list[dict[str, Any]]:
    """pytest-html extras for a failing test's row: the packet trace as text, then each PNG
    in ``images`` (the plots ``--tunpair-plot`` wrote; missing files are skipped, a report
    never fails over them). Only called when pytest-html is active, so importing it here is
    safe."""
    from pytest_html import extras

    items: list[dict[str, Any]] = [
        extras.text(
            format_section(pairs, notes, limit=HTML_TRACE_LINES, replay=replay),
            name="Captured packets",
        )
    ]
    for path in images:
        try:
            png = path.read_bytes()
        except OSError:
            continue
        items.append(extras.png(base64.b64encode(png).decode("ascii"), name=path.name))
    return items


# -- pcap files ------------------------------------------------------------------------------
def pcap_stem(nodeid: str, taken: MutableMapping[str, str] | None = None) -> str:
    """A file name stem for a test id: ``tests/test_x.py::test_y[1]`` ->
    ``tests_test_x.py_test_y_1``.

    Long ids are cut and end in a digest of the whole id. ``taken`` (stem -> test id, kept
    for the session) makes two ids that clean up to the same stem get different ones.
    """
    stem = re.sub(_UNSAFE, "_", nodeid).strip("._") or "test"
    digest = hashlib.sha1(nodeid.encode()).hexdigest()[:10]
    if len(stem) > _MAX_STEM:
        stem = f"{stem[: _MAX_STEM - 11]}-{digest}"
    if taken is not None:
        owner = taken.setdefault(stem, nodeid)
        if owner != nodeid:
            stem = f"{stem[: _MAX_STEM - 11]}-{digest}"
            taken.setdefault(stem, nodeid)
    return stem


def pcap_paths(
    directory: Path, stem: str, pair_names: Sequence[tuple[str, str]], format: str = "pcapng"
) -> list[Path]:
    """One file per pair: ``STEM.pcapng`` for one pair, ``STEM-tun0-tun1.pcapng``... for
    more (``.pcap`` for ``format="pcap"``)."""
    if len(pair_names) == 1:
        return [directory / f"{stem}.{format}"]
    return [
        directory / f"{stem}-{re.sub(_UNSAFE, '_', a)}-{re.sub(_UNSAFE, '_', b)}.{format}"
        for a, b in pair_names
    ]


def write_pcaps(
    pairs: Sequence[ReportedPair], paths: Sequence[Path], format: str = "pcapng"
) -> list[tuple[Path, OSError | None]]:
    """Write each pair's capture (pcapng with the pair's secrets, or classic pcap); a file
    that cannot be written comes back with its error, never raised: the test's own failure
    comes first."""
    results: list[tuple[Path, OSError | None]] = []
    for pair, path in zip(pairs, paths, strict=True):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            pair.packets.to_pcap(path, format=format)
        except OSError as exc:
            results.append((path, exc))
        else:
            results.append((path, None))
    return results


def write_plots(
    pairs: Sequence[ReportedPair], paths: Sequence[Path]
) -> list[tuple[Path, Exception | None]]:
    """Next to each pcap file, a PNG of the pair's throughput and sojourn
    (``--tunpair-plot``); errors come back, never raised, as for :func:`write_pcaps`."""
    results: list[tuple[Path, Exception | None]] = []
    for pair, pcap in zip(pairs, paths, strict=True):
        path = pcap.with_suffix(".png")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            pair.packets.plot(path)
        except Exception as exc:  # a plot must never hide the test's own failure
            results.append((path, exc))
        else:
            results.append((path, None))
    return results


def plot_note(path: Path, error: Exception | None) -> str:
    """The report section's line about one plot file."""
    if error is None:
        return f"plot: {path}"
    return f"plot: could not write {path}: {error}"


def pcap_note(path: Path, error: OSError | None) -> str:
    """The report section's line about one pcap file."""
    if error is None:
        return f"pcap: {path}"
    return f"pcap: could not write {path}: {error}"


# -- the report hooks' bodies ----------------------------------------------------------------
def configure(config: pytest.Config) -> None:
    from . import keys

    config.stash[keys.PCAP_STEMS] = {}
    config.stash[keys.PCAP_ERRORS] = {}
    if config.stash[keys.OPTIONS].tunpair_plot:
        preload_plotting()


def preload_plotting() -> None:
    """Import matplotlib (and numpy) now, outside any test's namespace: numpy's OpenBLAS
    starts its worker threads when it loads, and threads started inside a test's namespace
    keep it alive (and are reported as the test's leftovers). Without matplotlib, the plot
    says so when it is drawn."""
    from .._packets import plot as _plot

    try:
        _plot.load_matplotlib()
    except ImportError:
        pass


def header(config: pytest.Config, how: str) -> list[str]:
    """``pytest_report_header``: how tunnels run (``how``) and the versions that matter."""
    from importlib.metadata import PackageNotFoundError, version

    versions = []
    for dist in ("pyroute2", "scapy"):  # metadata only: importing them costs seconds
        try:
            versions.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            versions.append(f"{dist} not installed")
    from .._kernel.spare import describe as spares
    from .._link.core import describe

    return [f"tunpair: {how}; {', '.join(versions)}; {describe()}; {spares()}"]


def pairs_of(item: pytest.Item) -> list[TunPair]:
    """The pairs the test can reach: its factory's, or its module's or session's."""
    from . import keys

    factory = item.stash.get(keys.FACTORY, None)
    if factory is not None:
        return factory.pairs
    scoped = item.stash.get(keys.CHECKPOINT, None)
    return scoped[0].pairs if scoped is not None else []


def _reported(item: pytest.Item) -> list[TunPair | TestSlice]:
    """What the test's reports show: its pairs, or its part of a module or session pair."""
    from . import keys

    scoped = item.stash.get(keys.CHECKPOINT, None)
    if keys.FACTORY in item.stash or scoped is None:
        return list(pairs_of(item))
    # A module's or the session's pair the test only joined (an autouse fixture's, say),
    # and over which nothing crossed during it, has nothing to say about its failure. A
    # pair of the test's own is always shown: "nothing crossed" is then the news.
    slices = [TestSlice(*entry) for entry in scoped[0].slices(scoped[1])]
    return [s for s in slices if not s.quiet]


def make_report(item: pytest.Item, report: pytest.TestReport) -> None:
    """``pytest_runtest_makereport`` on the final report: at the test's first failure the
    packet-trace section (and pytest-html's extras); the pcap files when asked for."""
    from . import keys

    pairs = _reported(item)
    if not pairs:
        return
    options = item.config.stash[keys.OPTIONS]
    first_failure = report.failed and not item.stash.get(keys.REPORTED, False)
    notes: list[str] = []
    if options.tunpair_pcap is not None and (
        first_failure
        or (
            report.when == "teardown"
            and (options.tunpair_pcap_mode == "all" or keys.PCAP_FILES in item.stash)
        )
    ):
        notes = _write_files(item, pairs, options.tunpair_pcap)
    if not first_failure:
        return
    # Once per test: a teardown error after a failed call would only repeat it.
    item.stash[keys.REPORTED] = True
    report.sections.append(
        (section_title(report.when), format_section(pairs, notes, replay=_replay_hint))
    )
    if item.config.pluginmanager.hasplugin("html"):
        # pytest-html shows a report's ``extras`` in the test's row.
        plots = [p.with_suffix(".png") for p in item.stash.get(keys.PCAP_FILES, [])]
        images = plots if options.tunpair_plot else []
        extras = html_extras(pairs, notes, replay=_replay_hint, images=images)
        extras = [*getattr(report, "extras", []), *extras]
        setattr(report, "extras", extras)  # noqa: B010 (TestReport declares no such field)


def _file_names(pair: TunPair | TestSlice) -> tuple[str, str]:
    """What a pair's pcap file is named after: its devices, each after its host for a
    topology's link (``client1-tun0``, ``server-tun1``): device names are unique in a
    test, host names say which link it is."""
    a, b = pair.options.names
    label = getattr(pair, "label", None)
    if not label:
        return a, b
    ha, hb = label.split("<->")
    return f"{ha}-{a}", f"{hb}-{b}"


def _replay_hint(seed: int) -> str:
    return f"replay with --tunpair-seed={seed}"


def _write_files(item: pytest.Item, pairs: list[TunPair | TestSlice], directory: Path) -> list[str]:
    # Written at the first failure (so the report can name the files) and again when the
    # test is over, pairs closed, so the files hold teardown's traffic too.
    from . import keys

    config = item.config
    fmt = config.stash[keys.OPTIONS].tunpair_pcap_format
    paths = item.stash.get(keys.PCAP_FILES, None)
    if paths is None:
        stem = pcap_stem(item.nodeid, config.stash[keys.PCAP_STEMS])
        names = [_file_names(pair) for pair in pairs]
        paths = item.stash[keys.PCAP_FILES] = pcap_paths(directory, stem, names, fmt)
    errors = config.stash[keys.PCAP_ERRORS]
    notes = []
    for path, error in write_pcaps(pairs[: len(paths)], paths, fmt):
        notes.append(pcap_note(path, error))
        if error is not None:
            errors[str(path)] = f"{item.nodeid}: {notes[-1]}"
    if config.stash[keys.OPTIONS].tunpair_plot:
        # One note per pair: the plot's line goes under its pcap's.
        for i, (path, problem) in enumerate(write_plots(pairs[: len(paths)], paths)):
            note = plot_note(path, problem)
            notes[i] += "\n" + note
            if problem is not None:
                errors[str(path)] = f"{item.nodeid}: {note}"
    return notes


def terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The files that could not be written: a passing test's (``--tunpair-pcap-mode=all``)
    has no report to name a failure in."""
    from . import keys

    errors = terminalreporter.config.stash.get(keys.PCAP_ERRORS, {})
    if errors:
        terminalreporter.section("tunpair: pcap files not written", sep="-", yellow=True)
        for line in errors.values():
            terminalreporter.line(line)
