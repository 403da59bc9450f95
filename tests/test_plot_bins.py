"""A capture spanning a whole number of plot bins draws (float rounding made a last bin of
zero width, and plot() divided by it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_tunpair import Packet
from pytest_tunpair._packets import plot as _plot

# An IPv4 header alone: version 4, IHL 5, total length 20, UDP, 198.18.0.1 -> 198.18.0.2.
IP_HEADER = bytes.fromhex("45000014 00000000 40110000 c6120001 c6120002")


def test_a_span_of_whole_bins_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    # 0.28 s is 56 bins of 5 ms, which 0.28 / 0.005 in floats rounds up to 57.
    packets = [
        Packet(0.0, "a->b", "forwarded", IP_HEADER, arrival=0.0),
        Packet(0.28, "a->b", "forwarded", IP_HEADER, arrival=0.28),
    ]
    out = _plot.plot(packets, tmp_path / "run.png")
    assert Path(out).read_bytes().startswith(b"\x89PNG")
