"""pytest-html: a failing tunnel test's row gets its packet trace (and a pair's images)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from pytest_tunpair._report import html_extras

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


class _PairWithImages:
    """What a pair that draws plots offers the report (no kernel: only the report's part)."""

    def __init__(self, packets: object) -> None:
        self.packets = packets
        self.stats = {"a->b": {"packets": 0, "bytes": 0}, "b->a": {"packets": 0, "bytes": 0}}

    def describe(self, replay: object = None) -> str:
        return "tun pair (test double)"

    def report_images(self) -> list[tuple[str, bytes]]:
        return [("queue", b"\x89PNG fake")]


def test_a_pairs_images_become_png_extras() -> None:
    from pytest_tunpair import Capture

    (trace, image) = html_extras([_PairWithImages(Capture())])  # type: ignore[list-item]
    assert trace["format_type"] == "text" and trace["name"] == "Captured packets"
    assert trace["content"].startswith("tun pair (test double)")
    assert image["format_type"] == "image" and image["name"] == "queue"
    assert base64.b64decode(image["content"]) == b"\x89PNG fake"
