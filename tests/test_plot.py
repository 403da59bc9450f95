"""Unit tests of the plot and the mahimahi link log, on packets made up here."""

from __future__ import annotations

import random
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_tunpair._packets import plot as _plot
from pytest_tunpair.traces import TraceServer, constant, load

from .test_traces import depart

# At collection, outside any in-process pytester run: pytester puts sys.modules back after
# each run, and numpy's extension (under matplotlib) cannot be imported twice in a process.
try:
    import matplotlib.figure  # noqa: F401

    HAVE_MATPLOTLIB = True
except ImportError:  # the plot tests skip; the mahimahi log needs no matplotlib
    HAVE_MATPLOTLIB = False
needs_matplotlib = pytest.mark.skipif(
    not HAVE_MATPLOTLIB, reason="matplotlib is not installed (extra [plot])"
)


@dataclass
class P:
    time: float
    arrival: float
    wire_len: int
    direction: str
    action: str


def link_run(seconds: float = 2.0) -> list[P]:
    """1200-byte packets offered at 16 Mbit/s into a 12 Mbit/s trace, a few lost, acks back."""
    server = TraceServer(load(constant(12)), start=0.0)
    rng = random.Random(1)
    packets: list[P] = []
    t = 0.0
    while t < seconds:
        if rng.random() < 0.02:
            packets.append(P(t, t, 1200, "a->b", "lost"))
        else:
            due = depart(server, 1200, t)
            assert due is not None
            packets.append(P(due, t, 1200, "a->b", "delayed"))
            packets.append(P(due + 1e-4, due, 52, "b->a", "forwarded"))
        t += 1200 * 8 / 16e6
    packets.append(P(0.5, 0.5, 40, "b->a", "injected"))
    return sorted(packets, key=lambda p: p.time)


@needs_matplotlib
@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_plot_writes_a_readable_picture(tmp_path: Path, suffix: str) -> None:
    server = TraceServer(load(constant(12)), start=0.0)
    out = _plot.plot(
        link_run(),
        tmp_path / f"link{suffix}",
        configured={"a->b": server.capacity, "b->a": 1e6},
        title="12 Mbit/s trace",
    )
    data = out.read_bytes()
    if suffix == ".png":
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        assert len(data) > 20_000  # two panels with lines and points, not an empty canvas
    else:
        root = ET.fromstring(data)
        assert root.tag.endswith("svg")
        assert b"throughput" in data or b"<path" in data


@needs_matplotlib
def test_plot_one_direction_and_bad_extension(tmp_path: Path) -> None:
    out = _plot.plot(link_run(0.3), tmp_path / "x.PNG", direction="b->a")
    assert out.stat().st_size > 0
    with pytest.raises(ValueError, match=r"\.png or \.svg"):
        _plot.plot(link_run(0.1), tmp_path / "x.pdf")


def test_plot_without_matplotlib_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pytest-tunpair\[plot\]"):
        _plot.plot([], tmp_path / "x.png")


@needs_matplotlib
def test_plot_of_no_packets(tmp_path: Path) -> None:
    assert _plot.plot([], tmp_path / "empty.svg").exists()


def test_mahimahi_log_format(tmp_path: Path) -> None:
    packets = [
        P(0.0115, 0.0101, 1200, "a->b", "delayed"),
        P(0.0203, 0.0203, 100, "a->b", "lost"),
        P(0.0116, 0.0101, 1200, "a->b", "duplicated"),
        P(0.0300, 0.0290, 52, "b->a", "forwarded"),
        P(0.0400, 0.0400, 40, "a->b", "injected"),
    ]
    out = _plot.to_mahimahi_log(packets, tmp_path / "up.log", opportunities=[0.0111, 0.012])
    lines = out.read_text().splitlines()
    assert lines[4] == "# base timestamp: 0"
    assert lines[5:] == [
        "10 + 1200",
        "11 # 1500",
        "11 - 1200 1",
        "11 - 1200 1",
        "12 # 1500",
        "20 + 100",
        "20 d 1 100",
    ]
    no_drops = _plot.to_mahimahi_log(packets, tmp_path / "u2.log", drops=False)
    assert " d " not in no_drops.read_text()
    down = _plot.to_mahimahi_log(packets, tmp_path / "down.log", direction="b->a")
    assert down.read_text().splitlines()[5:] == ["29 + 52", "30 - 52 1"]
