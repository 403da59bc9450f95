"""Pictures and logs of what the relay carried: the view mahimahi's tools give of a link.

:func:`plot` draws, from a list of packets, the throughput of each direction over time
(with the configured rate or trace capacity as a dashed line) above each packet's sojourn
in the relay, drops marked -- mahimahi's ``mm-throughput-graph`` and ``mm-delay-graph`` in
one figure. :func:`to_mahimahi_log` writes mahimahi's link-log format so that its own
tools read the run.

matplotlib is imported only inside :func:`plot`, and only its object-oriented API is used
(``Figure`` plus ``savefig``, no ``pyplot``): no backend is chosen and no global state
changes, so a test process that also uses matplotlib interactively is left alone, and
plotting from a non-main thread is safe.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from .packet import DELIVERED as _DELIVERED

__all__ = ["DELIVERED", "NOT_CARRIED", "load_matplotlib", "plot", "to_mahimahi_log"]

#: Actions of packets that never crossed the link: written by the relay or the test itself
#: (``inject``, replies of fault rules), taken by the scripted peer, or replaced by their
#: fragments (``"fragmented"``: the fragments are recorded on their own).
NOT_CARRIED = frozenset({"injected", "scripted", "fragmented"})
#: Actions of packets the link delivered (a departure); every other carried one is a drop.
DELIVERED = _DELIVERED - NOT_CARRIED

DIRECTION_COLOURS = {"a->b": "tab:blue", "b->a": "tab:orange"}
# Bin widths for the throughput panel, in seconds: the smallest that gives at most
# _MAX_BINS bins, so a 2 s test and a 60 s soak both read well.
_BIN_WIDTHS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_MAX_BINS = 120
_FORMATS = {".png": "png", ".svg": "svg"}

#: A configured link for the dashed line: bits per second, or a function giving the bytes
#: the link could carry in ``[t0, t1)`` (e.g. a trace server's ``capacity``).
Capacity = float | Callable[[float, float], float]


class PacketLike(Protocol):
    """What :func:`plot` and :func:`to_mahimahi_log` read of a packet."""

    @property
    def time(self) -> float: ...
    @property
    def arrival(self) -> float: ...
    @property
    def wire_len(self) -> int: ...
    @property
    def direction(self) -> str: ...
    @property
    def action(self) -> str: ...


def load_matplotlib() -> Any:
    """matplotlib's ``Figure`` (imported on first call), or an ``ImportError`` that says
    how to install it."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            "packets.plot() needs matplotlib: install the extra with "
            "pip install 'pytest-tunpair[plot]' (or pip install matplotlib)"
        ) from exc
    return Figure


def _bin_width(duration: float) -> float:
    for width in _BIN_WIDTHS:
        if duration / width <= _MAX_BINS:
            return width
    return _BIN_WIDTHS[-1]


def plot(
    packets: Sequence[PacketLike],
    path: str | os.PathLike[str],
    *,
    direction: str | None = None,
    configured: Mapping[str, Capacity] | None = None,
    title: str | None = None,
) -> Path:
    """Write a PNG or SVG (by ``path``'s extension) of ``packets``; return the path.

    Top panel: throughput of each direction (or only ``direction``) in Mbit/s per time
    bin, from the packets the relay delivered, with the offered load (packets read) as a
    thin line and, from ``configured``, the link's configured rate or trace capacity as a
    dashed line. Bottom panel: each packet's sojourn in the relay (``time - arrival``) in
    ms against its arrival time, drops as red crosses. Times are seconds since the pair
    came up.
    """
    target = Path(path)
    fmt = _FORMATS.get(target.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"plot({str(target)!r}): the file name must end in .png or .svg (the format is "
            "taken from the extension)"
        )
    Figure = load_matplotlib()
    directions = [direction] if direction else sorted({p.direction for p in packets})
    carried = [p for p in packets if p.action not in NOT_CARRIED and p.direction in directions]
    configured = configured or {}

    fig = Figure(figsize=(10, 6.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    # From the first packet on: setting up a test often takes longer than its traffic.
    start = min((p.arrival for p in carried), default=0.0)
    end = max((p.time for p in carried), default=start + 1.0)
    end = max(end, start + 1e-3)
    width = _bin_width(end - start)
    # The tolerance: a span of exactly N widths computed in floats can round up to N + 1
    # bins, the last of zero width.
    bins = max(1, math.ceil((end - start) / width - 1e-9))
    edges = [start + i * width for i in range(bins)] + [end]
    centres = [(edges[i] + edges[i + 1]) / 2 for i in range(bins)]
    # Mbit/s per bit counted in each bin (the last bin may be shorter than the others).
    scales = [1e-6 / (edges[i + 1] - edges[i]) for i in range(bins)]

    for d in directions:
        colour = DIRECTION_COLOURS.get(d, "tab:green")
        sent = [0.0] * bins
        offered = [0.0] * bins
        for p in carried:
            if p.direction != d:
                continue
            if p.action in DELIVERED:
                sent[min(bins - 1, int((p.time - start) / width))] += p.wire_len * 8
            if p.action != "duplicated":
                index = int((max(p.arrival, start) - start) / width)
                offered[min(bins - 1, index)] += p.wire_len * 8
        rates = [x * k for x, k in zip(sent, scales, strict=True)]
        top.step(
            edges,
            [*rates, rates[-1]],
            where="post",
            color=colour,
            linewidth=1.8,
            label=f"{d} throughput (mean {sum(sent) / (end - start) / 1e6:.3g} Mbit/s)",
        )
        top.plot(
            centres,
            [x * k for x, k in zip(offered, scales, strict=True)],
            color=colour,
            linewidth=0.8,
            alpha=0.5,
            label=f"{d} offered",
        )
        link = configured.get(d)
        if link is not None:
            if callable(link):
                capacity = [link(edges[i], edges[i + 1]) * 8 * scales[i] for i in range(bins)]
                label = f"{d} trace capacity"
            else:
                capacity = [float(link) / 1e6] * bins
                label = f"{d} configured rate ({float(link) / 1e6:.3g} Mbit/s)"
            top.step(
                edges,
                [*capacity, capacity[-1]],
                where="post",
                color=colour,
                linestyle="--",
                linewidth=1.2,
                label=label,
            )

        delivered = [p for p in carried if p.direction == d and p.action in DELIVERED]
        dropped = [p for p in carried if p.direction == d and p.action not in DELIVERED]
        bottom.scatter(
            [p.arrival for p in delivered],
            [(p.time - p.arrival) * 1e3 for p in delivered],
            s=4,
            color=colour,
            label=f"{d} sojourn ({len(delivered)} packets)",
        )
        if dropped:
            bottom.scatter(
                [p.arrival for p in dropped],
                [max(0.0, p.time - p.arrival) * 1e3 for p in dropped],
                s=22,
                marker="x",
                color="tab:red" if d == "a->b" else "darkred",
                label=f"{d} dropped ({len(dropped)})",
            )

    top.set_ylabel(f"throughput (Mbit/s, {width * 1e3:g} ms bins)")
    top.set_ylim(bottom=0)
    top.grid(alpha=0.3)
    if directions:
        top.legend(loc="upper right", fontsize="small")
    bottom.set_ylabel("sojourn in relay (ms)")
    bottom.set_xlabel("time since the pair came up (s)")
    bottom.set_ylim(bottom=0)
    bottom.set_xlim(start, end)
    bottom.grid(alpha=0.3)
    if directions:
        bottom.legend(loc="upper right", fontsize="small")
    if title:
        fig.suptitle(title)
    fig.savefig(target, format=fmt, dpi=110)
    return target


def to_mahimahi_log(
    packets: Iterable[PacketLike],
    path: str | os.PathLike[str],
    *,
    direction: str = "a->b",
    drops: bool = True,
    opportunities: Iterable[float] = (),
    name: str = "pytest-tunpair",
) -> Path:
    """Write ``direction``'s packets in the link-log format of mahimahi's ``mm-link``
    (src/frontend/link_queue.cc): ``TIME + BYTES`` for each packet read, ``TIME - BYTES
    DELAY`` for each packet delivered (``DELAY`` its sojourn), ``TIME d PACKETS BYTES``
    for each drop and ``TIME # 1500`` for each delivery opportunity of a trace, times in
    integer ms since the pair came up (the header's ``base timestamp`` is 0).

    ``drops=False`` leaves the ``d`` lines out: mahimahi's ``mm-throughput-graph`` stops
    at an event type it does not know, and its version in mahimahi's repository does not
    know ``d`` although ``mm-link`` writes it. ``opportunities`` are the trace's delivery
    times in seconds since the pair came up (they give ``mm-throughput-graph`` its capacity
    line).
    """
    events: list[tuple[int, int, str]] = []
    for p in packets:
        if p.direction != direction or p.action in NOT_CARRIED:
            continue
        # Whole ms, truncated like a clock reading (mahimahi's timestamp()).
        arrived = math.floor(p.arrival * 1e3)
        left = max(arrived, math.floor(p.time * 1e3))
        # The order inside one ms: arrivals first, so a departure never precedes its arrival.
        if p.action != "duplicated":
            events.append((arrived, 0, f"{arrived} + {p.wire_len}"))
        if p.action in DELIVERED:
            events.append((left, 2, f"{left} - {p.wire_len} {left - arrived}"))
        elif drops:
            events.append((left, 2, f"{left} d 1 {p.wire_len}"))
    for t in opportunities:
        ms = math.floor(t * 1e3)
        events.append((ms, 1, f"{ms} # 1500"))
    events.sort(key=lambda e: (e[0], e[1]))
    target = Path(path)
    header = [
        f"# mahimahi mm-link ({name} {direction}) [pytest-tunpair relay] > {target.name}",
        "# command line: pytest-tunpair",
        "# queue: pytest-tunpair relay",
        "# init timestamp: 0",
        "# base timestamp: 0",
    ]
    with target.open("w", encoding="ascii") as out:
        out.write("\n".join(header) + "\n")
        for _, _, line in events:
            out.write(line + "\n")
    return target
