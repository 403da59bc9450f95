"""Failure reports: the packet-trace section and ``--tunpair-pcap`` (pytester, real runs)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pytest_tunpair import TunPair
from pytest_tunpair._plugin.report import format_section, pcap_paths, pcap_stem, section_title

from .conftest import need, run_standalone, tcpdump_read

# Inner tests: a ping through the pair, then pass or fail.
INNER = """
import subprocess

import pytest


def ping(ip, count=1):
    subprocess.run(["ping", "-c", str(count), "-i", "0.2", "-W", "2", ip],
                   check=True, capture_output=True)


def test_passes(tun_pair):
    ping(tun_pair.b.ip)


def test_fails(tun_pair):
    ping(tun_pair.b.ip)
    assert tun_pair.stats["a->b"]["packets"] == 99, "wrong on purpose"


def test_plain_fails():
    assert False
"""


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("--tunpair", "-p", "no:cacheprovider", *args)


def _sections(result: pytest.RunResult) -> list[str]:
    return [line for line in result.outlines if "Captured packets" in line]


# -- the report section ---------------------------------------------------------------------
def test_a_failing_test_shows_its_packet_trace(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inner=INNER)
    result = _run(pytester, "-rA")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*_ test_fails _*",
            "*AssertionError: wrong on purpose*",
            "*- Captured packets call -*",
            "tun pair tun0=198.18.0.1/2001:2::1 <-> tun1=198.18.0.2/2001:2::2 mtu=1500 table=13",
            "relay carried a->b 1 packet 84 bytes, b->a 1 packet 84 bytes; 2 packets kept",
            "*0.* a->b forwarded  IP / ICMP 198.18.0.1 > 198.18.0.2 echo-request 0 / Raw, length 84",
            "*0.* b->a forwarded  IP / ICMP 198.18.0.2 > 198.18.0.1 echo-reply 0 / Raw, length 84",
        ]
    )
    # Only the failing tunnel test has one: not the passing one (-rA shows passes' sections
    # too), not the failing test without a tunnel.
    assert len(_sections(result)) == 1


def test_setup_and_teardown_failures_show_the_trace(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_inner=INNER
        + """

@pytest.fixture
def broken_setup(tun_pair):
    ping(tun_pair.b.ip)
    raise RuntimeError("setup broke")


@pytest.fixture
def broken_teardown(tun_pair):
    yield
    ping(tun_pair.b.ip, 2)
    raise RuntimeError("teardown broke")


def test_setup(broken_setup):
    pass


def test_teardown(broken_teardown):
    pass
"""
    )
    result = _run(pytester, "-k", "setup or teardown")
    result.assert_outcomes(passed=1, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at setup of test_setup*",
            "*RuntimeError: setup broke*",
            "*- Captured packets setup -*",
            "tun pair tun0=*",
            "relay carried a->b 1 packet 84 bytes*",
            "*ERROR at teardown of test_teardown*",
            "*RuntimeError: teardown broke*",
            "*- Captured packets teardown -*",
            "tun pair tun0=*",
            # The pairs are closed by now; their captures are still there.
            "relay carried a->b 2 packets 168 bytes*; 4 packets kept",
        ]
    )


def test_the_trace_is_reported_once_per_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_inner=INNER
        + """

@pytest.fixture
def broken_teardown(tun_pair):
    yield
    raise RuntimeError("teardown broke too")


def test_call_and_teardown(broken_teardown, tun_pair):
    ping(tun_pair.b.ip)
    assert False, "call broke"
"""
    )
    result = _run(pytester, "-k", "call_and_teardown")
    result.assert_outcomes(failed=1, errors=1)
    assert _sections(result) == [_sections(result)[0]]
    assert "Captured packets call" in _sections(result)[0]


def test_xfail_and_skip_add_nothing(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_inner=INNER
        + """

@pytest.mark.xfail(reason="known")
def test_xfail(tun_pair):
    ping(tun_pair.b.ip)
    assert False


def test_skip(tun_pair):
    ping(tun_pair.b.ip)
    pytest.skip("not today")
"""
    )
    result = _run(pytester, "-rA", "-k", "xfail or skip")
    result.assert_outcomes(xfailed=1, skipped=1)
    assert _sections(result) == []


def test_a_big_trace_is_capped(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_inner="""
        import socket

        def test_flood(tun_pair):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind((tun_pair.a.ip, 0))
                for i in range(300):
                    s.sendto(b"%d" % i, (tun_pair.b.ip, 9))
            tun_pair.packets.wait_for(lambda p: p.seq >= 299, timeout=10)
            assert False
        """
    )
    result = _run(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.re_match_lines([r"… \d+ more$"])
    start = result.outlines.index(
        next(line for line in result.outlines if "Captured packets" in line)
    )
    packet_lines = [
        line for line in result.outlines[start:] if " forwarded " in line and "->" in line
    ]
    assert len(packet_lines) == 60


def test_every_pair_of_the_test_gets_a_header(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_inner="""
        import subprocess

        def test_two(tun_pair, tun_pair_factory):
            second = tun_pair_factory(ipv6=None, mtu=1400)
            subprocess.run(["ping", "-c", "1", "-W", "2", second.b.ip], check=True)
            assert False
        """
    )
    result = _run(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*- Captured packets call -*",
            "tun pair tun0=198.18.0.1/2001:2::1 <-> tun1=198.18.0.2/2001:2::2 mtu=1500 table=13",
            "relay carried a->b 0 packets 0 bytes, b->a 0 packets 0 bytes; 0 packets kept",
            "(no packets)",
            "",
            "tun pair tun2=198.18.0.3 <-> tun3=198.18.0.4 mtu=1400 table=13",
            "relay carried a->b 1 packet 84 bytes, b->a 1 packet 84 bytes; 2 packets kept",
            "*echo-request*",
        ]
    )


# -- pcap files -----------------------------------------------------------------------------
def _pcaps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.pcap*")) if directory.exists() else []


def test_pcap_written_for_failed_tests_only_and_named_in_the_report(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_inner=INNER)
    result = _run(pytester, "--tunpair-pcap=pcaps")
    result.assert_outcomes(passed=1, failed=2)
    directory = pytester.path / "pcaps"
    assert _pcaps(directory) == ["test_inner.py_test_fails.pcapng"]
    result.stdout.fnmatch_lines(
        [
            "*- Captured packets call -*",
            "tun pair tun0=*",
            "relay carried*",
            f"pcap: {directory}/test_inner.py_test_fails.pcapng",
        ]
    )
    out = tcpdump_read(directory / "test_inner.py_test_fails.pcapng")
    assert out.returncode == 0, out.stderr
    assert "link-type RAW" in out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2
    assert "IP 198.18.0.1 > 198.18.0.2: ICMP echo request" in lines[0]
    assert "IP 198.18.0.2 > 198.18.0.1: ICMP echo reply" in lines[1]


def test_pcap_mode_all_writes_every_tunnel_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inner=INNER)
    directory = pytester.path / "out" / "nested"
    result = _run(pytester, f"--tunpair-pcap={directory}", "--tunpair-pcap-mode=all")
    result.assert_outcomes(passed=1, failed=2)
    assert _pcaps(directory) == [
        "test_inner.py_test_fails.pcapng",
        "test_inner.py_test_passes.pcapng",
    ]


def test_pcap_holds_teardown_traffic_and_one_file_per_pair(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_inner="""
        import subprocess

        import pytest

        def ping(ip):
            subprocess.run(["ping", "-c", "1", "-W", "2", ip], check=True, capture_output=True)

        @pytest.fixture
        def pings_at_teardown(tun_pair):
            yield
            ping(tun_pair.b.ip)

        @pytest.mark.parametrize("case", ["a/b c"])
        def test_two(pings_at_teardown, tun_pair, tun_pair_factory, case):
            second = tun_pair_factory()
            ping(second.b.ip)
            assert False
        """
    )
    result = _run(pytester, "--tunpair-pcap=pcaps")
    result.assert_outcomes(failed=1)
    directory = pytester.path / "pcaps"
    stem = "test_inner.py_test_two_a_b_c"
    assert _pcaps(directory) == [f"{stem}-tun0-tun1.pcapng", f"{stem}-tun2-tun3.pcapng"]
    result.stdout.fnmatch_lines([f"pcap: {directory}/{stem}-tun0-tun1.pcapng"])
    result.stdout.fnmatch_lines([f"pcap: {directory}/{stem}-tun2-tun3.pcapng"])
    # The report was written at the failure, before teardown pinged; the file was written
    # again once the test was over.
    first = tcpdump_read(directory / f"{stem}-tun0-tun1.pcapng")
    assert first.returncode == 0, first.stderr
    assert len(first.stdout.splitlines()) == 2 and "echo reply" in first.stdout


def test_a_pcap_that_cannot_be_written_is_reported(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inner=INNER)
    (pytester.path / "afile").write_text("not a directory")
    result = _run(pytester, "--tunpair-pcap=afile/pcaps", "--tunpair-pcap-mode=all")
    result.assert_outcomes(passed=1, failed=2)  # the tests' own outcomes are untouched
    result.stdout.fnmatch_lines(
        [
            "*- Captured packets call -*",
            "pcap: could not write */afile/pcaps/test_inner.py_test_fails.pcapng: *Not a directory*",
            "*- tunpair: pcap files not written -*",
            "test_inner.py::test_passes: pcap: could not write *test_passes.pcapng*",
        ]
    )


def test_ini_keys_and_command_line_precedence(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inner=INNER)
    pytester.makeini("[pytest]\ntunpair_pcap = from_ini\ntunpair_pcap_mode = all\n")
    _run(pytester).assert_outcomes(passed=1, failed=2)
    assert len(_pcaps(pytester.path / "from_ini")) == 2
    # Command line over ini: another directory, failed tests only.
    _run(pytester, "--tunpair-pcap=from_cli", "--tunpair-pcap-mode=failed").assert_outcomes(
        passed=1, failed=2
    )
    assert _pcaps(pytester.path / "from_cli") == ["test_inner.py_test_fails.pcapng"]


def test_ini_directory_is_relative_to_the_ini_file(pytester: pytest.Pytester) -> None:
    sub = pytester.mkdir("sub")
    (sub / "test_inner.py").write_text(INNER)
    (sub / "pytest.ini").write_text("[pytest]\ntunpair_pcap = pcaps\n")
    # Started from the parent directory: the ini's "pcaps" still means sub/pcaps.
    result = _run(pytester, "-c", "sub/pytest.ini", "sub")
    result.assert_outcomes(passed=1, failed=2)
    assert _pcaps(sub / "pcaps") == ["test_inner.py_test_fails.pcapng"]
    assert not (pytester.path / "pcaps").exists()


@pytest.mark.parametrize(
    ("args", "ini", "expect"),
    [
        (
            ["--tunpair-pcap-mode=sometimes"],
            "",
            "*--tunpair-pcap-mode: bad value 'sometimes': use 'failed'*or 'all'*",
        ),
        (
            [],
            "tunpair_pcap_mode = never\n",
            "*ini key tunpair_pcap_mode in *tox.ini: bad value 'never': use 'failed'*",
        ),
        (
            ["--tunpair-pcap=afile"],
            "",
            "*--tunpair-pcap: bad value 'afile': */afile exists and is not a directory*",
        ),
        (
            ["--tunpair-pcap="],
            "",
            "*--tunpair-pcap: bad value '': give the directory*",
        ),
    ],
    ids=["mode-cli", "mode-ini", "dir-is-a-file", "dir-empty"],
)
def test_bad_pcap_options_are_usage_errors(
    pytester: pytest.Pytester, args: list[str], ini: str, expect: str
) -> None:
    pytester.makepyfile(test_inner=INNER)
    (pytester.path / "afile").write_text("not a directory")
    pytester.makeini("[pytest]\n" + ini)  # a tox.ini
    result = _run(pytester, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([expect])


def test_options_are_in_the_tunpair_group(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--help")
    result.stdout.fnmatch_lines(
        [
            "pytest-tunpair*",
            "*--tunpair-pcap=DIR*",
            "*--tunpair-pcap-mode={failed,all}*",
        ]
    )
    result.stdout.fnmatch_lines(["*tunpair_pcap (string):*", "*tunpair_pcap_mode (string):*"])


# -- the pure parts -------------------------------------------------------------------------
def test_pcap_stem_sanitises_test_ids() -> None:
    assert pcap_stem("tests/test_x.py::test_y[1-a]") == "tests_test_x.py_test_y_1-a"
    assert pcap_stem("t.py::C::test[ü/../x y]") == "t.py_C_test_.._x_y"
    long_id = "t.py::test[" + "x" * 400 + "]"
    stem = pcap_stem(long_id)
    assert len(stem) <= 180 and stem != pcap_stem(long_id + "y")
    taken: dict[str, str] = {}
    one = pcap_stem("t.py::test[a b]", taken)
    two = pcap_stem("t.py::test[a/b]", taken)
    assert one == "t.py_test_a_b" and two.startswith("t.py_test_a_b-") and one != two
    assert pcap_stem("t.py::test[a b]", taken) == one  # the same test keeps its name


def test_pcap_paths_suffix_only_for_several_pairs() -> None:
    d = Path("/x")
    assert pcap_paths(d, "s", [("tun0", "tun1")]) == [d / "s.pcapng"]
    assert pcap_paths(d, "s", [("tun0", "tun1"), ("tun2", "tun3")]) == [
        d / "s-tun0-tun1.pcapng",
        d / "s-tun2-tun3.pcapng",
    ]


def test_format_section_of_a_real_pair() -> None:
    need("ping")

    def ping_once() -> TunPair:
        with TunPair(ipv6=None) as pair:
            subprocess.run(
                ["ping", "-c", "1", "-W", "2", pair.b.ip], check=True, capture_output=True
            )
        return pair

    pair = run_standalone(ping_once)
    text = format_section([pair], ["pcap: /x.pcapng"], limit=1)
    lines = text.splitlines()
    assert lines[0] == pair.describe()
    assert (
        lines[1] == "relay carried a->b 1 packet 84 bytes, b->a 1 packet 84 bytes; 2 packets kept"
    )
    assert lines[2] == "pcap: /x.pcapng"
    assert lines[3] == "… 1 more" and "echo-reply" in lines[4]
    assert section_title("call") == "Captured packets call"
