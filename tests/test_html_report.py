"""pytest-html: a failing tunnel test's row gets its packet trace (and a pair's images)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from pytest_tunpair._plugin.report import html_extras

from .test_report import INNER

pytest.importorskip("pytest_html")


def test_a_failing_tunnel_test_gets_its_trace_as_an_html_extra(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess(
        "--tunpair", "-p", "no:cacheprovider", "--html=out/report.html"
    )
    result.assert_outcomes(passed=1, failed=2)
    assets = Path(pytester.path, "out", "assets")
    traces = [p.read_text() for p in assets.iterdir() if "echo-request" in p.read_text()]
    # One: test_fails's. The passing tunnel test and the failing plain test get none.
    assert len(traces) == 1, sorted(p.name for p in assets.iterdir())
    (trace,) = traces
    assert trace.startswith("tun pair tun0=198.18.0.1")
    assert "a->b forwarded" in trace and "b->a forwarded" in trace and "echo-reply" in trace
    page = Path(pytester.path, "out", "report.html").read_text()
    assert "Captured packets" in page  # the extra's name, shown as the link in the row


def test_a_failing_tunnel_test_gets_its_plot_as_an_html_extra(pytester: pytest.Pytester) -> None:
    pytest.importorskip("matplotlib")
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess(
        "--tunpair",
        "-p",
        "no:cacheprovider",
        "--tunpair-pcap=out/pcaps",
        "--tunpair-plot",
        "--html=out/report.html",
    )
    result.assert_outcomes(passed=1, failed=2)
    pngs = sorted(Path(pytester.path, "out", "assets").glob("*.png"))
    assert len(pngs) == 1, pngs  # test_fails's plot; nothing for the others
    written = Path(pytester.path, "out", "pcaps", "test_inner.py_test_fails.png")
    assert pngs[0].read_bytes() == written.read_bytes()
    assert pngs[0].read_bytes().startswith(b"\x89PNG")


class _Pair:
    """What the report needs of a pair (no kernel: only the report's part is under test)."""

    def __init__(self, packets: object) -> None:
        self.packets = packets
        self.stats = {"a->b": {"packets": 0, "bytes": 0}, "b->a": {"packets": 0, "bytes": 0}}

    def describe(self, replay: object = None) -> str:
        return "tun pair (test double)"


def test_images_become_png_extras_and_missing_ones_are_skipped(tmp_path: Path) -> None:
    from pytest_tunpair import Capture

    plot = tmp_path / "run.png"
    plot.write_bytes(b"\x89PNG fake")
    extras = html_extras([_Pair(Capture())], images=[plot, tmp_path / "gone.png"])  # type: ignore[list-item]
    (trace, image) = extras
    assert trace["format_type"] == "text" and trace["name"] == "Captured packets"
    assert trace["content"].startswith("tun pair (test double)")
    assert image["format_type"] == "image" and image["name"] == "run.png"
    assert base64.b64decode(image["content"]) == b"\x89PNG fake"
