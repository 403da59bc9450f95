"""``tunpair run`` with network scenarios: --gemodel, --outage, --path-mtu, --plot, --trace."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .conftest import need
from .test_cli import trace_lines, tunnels, tunpair

__all__ = ["tunnels"]  # the fixture, imported for these tests


def test_outage_drops_the_pings_inside_it(tunnels: None) -> None:
    need("ping")
    r = tunpair(
        "run", "--outage", "10s", "--", "ping", "-c", "2", "-i", "0.2", "-W", "1", "198.18.0.2"
    )
    assert r.returncode == 1, r.stderr  # no reply
    assert "outage a->b/b->a: from " in r.stderr
    assert {ln.split()[1:3][1] for ln in trace_lines(r.stderr)} == {"lost"}


def test_outage_takes_python_order_and_the_old_one_with_a_warning(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--outage DURATION[,after=AFTER]`` reads as ``outage(duration, after=...)``; 0.2's
    ``AFTER,DURATION`` still works and says how to write it now."""
    from pytest_tunpair._cli import build_parser, make_plan

    def outages(*values: str) -> list[tuple[float, float]]:
        argv = ["run"] + [arg for v in values for arg in ("--outage", v)] + ["--", "true"]
        return make_plan(build_parser("tunpair").parse_args(argv)).outages

    assert outages("500ms", "500ms,after=2s") == [(0.0, 0.5), (2.0, 0.5)]
    assert capsys.readouterr().err == ""
    assert outages("2s,500ms") == [(2.0, 0.5)]  # (after, duration), as before
    err = capsys.readouterr().err
    assert "AFTER,DURATION is deprecated" in err and "--outage 500ms,after=2s" in err


def test_path_mtu_answers_big_pings(tunnels: None) -> None:
    need("ping")
    r = tunpair(
        "run", "--path-mtu", "1000", "--", "ping", "-c", "1", "-M", "do", "-s", "1200",
        "-W", "1", "198.18.0.2",
    )  # fmt: skip
    assert r.returncode != 0
    assert "path_mtu a->b/b->a: 1000" in r.stderr
    assert "mtu = 1000" in r.stdout + r.stderr  # ping reports the ICMP's next-hop MTU
    actions = [ln.split()[2] for ln in trace_lines(r.stderr)]
    assert actions[:2] == ["too-big", "injected"]


def test_gemodel_and_plot(tunnels: None, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    need("ping")
    plot = tmp_path / "run.png"
    r = tunpair(
        "run", "--gemodel", "30%,50%", "--seed", "3", "--plot", str(plot), "--",
        "ping", "-c", "20", "-i", "0.01", "-W", "1", "198.18.0.2",
    )  # fmt: skip
    assert "impair a->b: loss=GilbertElliott(p=0.3, r=0.5) seed=3" in r.stderr, r.stderr
    assert " lost " in r.stderr
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_trace_and_rate_are_a_usage_error(tmp_path: Path) -> None:
    trace = tmp_path / "t.up"
    trace.write_text("1\n")
    r = tunpair("run", "--trace", str(trace), "--rate", "1mbit", "--", "true")
    assert r.returncode == 2
    assert "argument --trace: bad value" in r.stderr and "give rate or trace, not both" in r.stderr


def test_trace_file_paces_the_link(tunnels: None, tmp_path: Path) -> None:
    need("ping")
    trace = tmp_path / "slow.up"
    trace.write_text("100\n")  # one opportunity every 100 ms
    r = tunpair(
        "run", "--trace", str(trace), "--direction", "a->b", "--",
        "ping", "-c", "3", "-i", "0.05", "-W", "2", "198.18.0.2",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "impair a->b: trace=slow.up (1 opportunities over 100 ms, mean 120kbit)" in r.stderr
    rtts = [float(x) for x in re.findall(r"time=([\d.]+) ms", r.stdout)]
    # Each request waits for the next 100 ms opportunity (a busy machine adds its lateness).
    assert len(rtts) == 3 and sum(rtts) > 30, rtts


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gemodel", "0.1"], "argument --gemodel: bad value '0.1': give p,r"),
        (["--gemodel", "1%,2"], "argument --gemodel: bad value '1%,2': use a probability"),
        (["--gemodel", "1%,2%", "--loss", "1%"], "give --loss or --gemodel, not both"),
        (["--outage", "2s,1s,3s"], "argument --outage: bad value '2s,1s,3s': give DURATION"),
        (["--outage", "1s,after=2"], "argument --outage: bad value '1s,after=2': after: add a"),
        (["--outage", "2"], "argument --outage: bad value '2': duration: add a unit"),
        (["--path-mtu", "20"], "argument --path-mtu: bad value '20': use a whole number from 68"),
        (["--plot", "x.pdf"], "argument --plot: 'x.pdf' must end in .png or .svg"),
        (["--trace", "/nonexistent.up"], "argument --trace: bad value '/nonexistent.up': cannot"),
        (["--trace", "/proc/self/status"], "line 1: 'Name:"),
    ],
)
def test_bad_scenario_options_are_usage_errors(args: list[str], message: str) -> None:
    r = tunpair("run", *args, "--", "true")
    assert r.returncode == 2
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


# -- the plugin's --tunpair-plot ---------------------------------------------------------------
INNER_FAILS = """
import subprocess


def test_fails(tun_pair):
    tun_pair.fail(how="unreachable", times=None, proto="icmp")
    subprocess.run(["ping", "-c", "2", "-i", "0.2", "-W", "1", tun_pair.b.ip], capture_output=True)
    assert False
"""


def test_plot_next_to_each_pcap(pytester: pytest.Pytester) -> None:
    pytest.importorskip("matplotlib")
    pytester.makepyfile(test_inner=INNER_FAILS)
    result = pytester.runpytest_subprocess(
        "--tunpair", "-p", "no:cacheprovider", "--tunpair-pcap=out", "--tunpair-plot"
    )
    result.assert_outcomes(failed=1)
    png = pytester.path / "out" / "test_inner.py_test_fails.png"
    assert png.read_bytes().startswith(b"\x89PNG")
    result.stdout.fnmatch_lines(["fail a->b: unreachable proto='icmp' (2 hits)", f"plot: {png}"])


def test_plot_from_the_ini_file(pytester: pytest.Pytester) -> None:
    pytest.importorskip("matplotlib")
    pytester.makepyfile(test_inner=INNER_FAILS)
    pytester.makeini("[pytest]\ntunpair_pcap = out\ntunpair_plot = true\n")
    result = pytester.runpytest_subprocess("--tunpair", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    assert (pytester.path / "out" / "test_inner.py_test_fails.png").exists()
