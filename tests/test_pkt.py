"""packetdrill scripts as pytest tests: collection, reports, options, and the runner's
pure parts (flags, options, the comparison of packets, time tolerances).

The scripts in tests/packetdrill/ run in every tier as ordinary items of the suite; here
are the things a script cannot say about itself: what a failing script reports, that an
unsupported one fails, which ini keys change what.
"""

from __future__ import annotations

import struct
import textwrap

import pytest

from pytest_tunpair._peer import pkt_run
from pytest_tunpair._peer.pkt_parse import PacketSpec, Script, parse
from pytest_tunpair._peer.pkt_run import (
    PktConfig,
    PktUnsupported,
    Seg,
    compare_segments,
    config_for,
    decode_options,
    encode_options,
    flag_bits,
    flag_text,
    options_length,
    variants,
)
from pytest_tunpair._plugin.options import PKT_IP_VERSIONS
from pytest_tunpair._wire import build, headers

# A passive open whose data segment the kernel ACKs at once (quick-ACK mode): the script's
# ack number on line 12 is one off.
WRONG_ACK = """\
// the kernel ACKs 1001, the script says 1002
    0 socket(..., SOCK_STREAM, IPPROTO_TCP) = 3
   +0 setsockopt(3, SOL_SOCKET, SO_REUSEADDR, [1], 4) = 0
   +0 bind(3, ..., ...) = 0
   +0 listen(3, 1) = 0
   +0 < S 0:0(0) win 32792 <mss 1000,nop,wscale 7>
   +0 > S. 0:0(0) ack 1 <mss 1460,nop,wscale 8>
   +0 < . 1:1(0) ack 1 win 257
   +0 accept(3, ..., ...) = 4
   +0 < P. 1:1001(1000) ack 1 win 257
   +0 > . 1:1(0) ack 1002
"""


def _pkt(pytester: pytest.Pytester, name: str, text: str) -> None:
    pytester.path.joinpath(name).write_text(textwrap.dedent(text))


LATE = """\
    0 socket(..., SOCK_STREAM, IPPROTO_TCP) = 3
    +0 bind(3, ..., ...) = 0
    +0 listen(3, 1) = 0
    +0 < S 0:0(0) win 32792 <mss 1000>
    +.5 > S. 0:0(0) ack 1 <mss 1460>
    """


def test_failures_name_the_script_line_and_what_went_wrong(pytester: pytest.Pytester) -> None:
    # One run, one script per way to fail: each reports its line, and a packet the
    # expected and actual packets with the fields that differ, and the trace.
    _pkt(pytester, "wrong_ack.pkt", WRONG_ACK)
    _pkt(
        pytester,
        "gre.pkt",
        "0 socket(..., SOCK_STREAM, IPPROTO_TCP) = 3\n+0 < gre: S 0:0(0) win 1\n",
    )
    _pkt(pytester, "capset.pkt", "0 cap_set(CAP_EFFECTIVE, CAP_NET_ADMIN, CAP_CLEAR) = 0\n")
    _pkt(pytester, "wire.pkt", "--wire_client\n0 socket(..., SOCK_STREAM, IPPROTO_TCP) = 3\n")
    _pkt(pytester, "typo.pkt", "0 socket(..., SOCK_STREAM, IPPROTO_TCP) = 3\n+0 > S. 0:0(0) ack\n")
    # A bad option value: an item that fails, not a traceback, and not a file left with no
    # item at all (a version no variant matches).
    _pkt(pytester, "v7.pkt", "--ip_version=ipv7\n0 socket(..., SOCK_STREAM, IPPROTO_TCP) = 3\n")
    _pkt(
        pytester, "pct.pkt", "--tolerance_percent=a\n0 socket(..., SOCK_STREAM, IPPROTO_TCP) = 3\n"
    )
    # The SYN-ACK goes at once; the script says 0.5 s later: packetdrill's 62.5 ms of
    # tolerance, even with 0.1 s of slack, refuse it (test_slack_widens_the_timing_tolerance).
    _pkt(pytester, "late.pkt", LATE)
    _pkt(
        pytester,
        "code.pkt",
        """\
        `sysctl -q net.ipv4.tcp_timestamps=0`
        0 socket(..., SOCK_STREAM, IPPROTO_TCP) = 3
        +0 %{ assert tcpi_state == TCP_ESTABLISHED, tcpi_state }%
        """,
    )
    _pkt(pytester, "cmd.pkt", "0 socket(..., SOCK_STREAM, IPPROTO_TCP) = 3\n+0 `exit 3`\n")
    # /proc/sys is read-only in a command's mount namespace, but for /proc/sys/net (the
    # pair's namespace's): a command cannot change the host's sysctls. (Were it writable,
    # this one would write the host name as it is.)
    _pkt(pytester, "host.pkt", "0 `cat /proc/sys/kernel/hostname > /proc/sys/kernel/hostname`\n")
    result = pytester.runpytest_subprocess(
        "--tunpair",
        "-p",
        "no:cacheprovider",
        "-o",
        "tunpair_pkt_ip_versions=ipv4",
        "-o",
        "tunpair_pkt_slack_usecs=100000",  # a busy machine runs the script late
    )
    result.assert_outcomes(failed=11)
    result.stdout.fnmatch_lines(
        [
            "wrong_ack.pkt:11: live packet field tcp_ack_seq: expected: 1002 (0x3ea) vs "
            "actual: 1001 (0x3e9)",
            "  script line:   +0 > . 1:1(0) ack 1002",
            "  script packet: * . 1:1(0) ack 1002",
            "  actual packet: * . 1:1(0) ack 1001 win * (in the trace: #* at *)",
            "*Captured packets call*",
            "scripted peer on tun1 (active):*",
            "*192.168.0.1:http_alt > 192.0.2.1:* A*",
        ]
    )
    result.stdout.fnmatch_lines_random(
        [
            "gre.pkt:2: unsupported: GRE encapsulation",
            "capset.pkt:1: unsupported: the system call cap_set()",
            "wire.pkt:1: unsupported: the option --wire_client",
            "typo.pkt:2: syntax error: expected the ack number, got the end of the file",
            "v7.pkt:1: unsupported: --ip_version=ipv7 (use ipv4, ipv4-mapped-ipv6, ipv6)",
            "pct.pkt:1: unsupported: --tolerance_percent=a (not a number)",
            "late.pkt:5: timing error: expected outbound packet at * sec but happened at *",
            "code.pkt:3: error in Python code: AssertionError: 7 (TCP_ESTABLISHED=1, tcpi_state=7)",
            "cmd.pkt:2: error executing command `exit 3`: exit status 3",
            "host.pkt:1: error executing command*Read-only file system*",
            "FAILED wrong_ack.pkt::ipv4 - wrong_ack.pkt:11: live packet field tcp_ack_seq*",
        ]
    )


def test_slack_widens_the_timing_tolerance(pytester: pytest.Pytester) -> None:
    _pkt(pytester, "late.pkt", LATE)
    slack = pytester.runpytest_subprocess(
        "--tunpair",
        "-p",
        "no:cacheprovider",
        "-o",
        "tunpair_pkt_ip_versions=ipv4",
        "--tunpair-pkt-slack-usecs=600000",
    )
    slack.assert_outcomes(passed=1)


def test_variants_options_and_opt_out(pytester: pytest.Pytester) -> None:
    ok = "0 socket(..., SOCK_STREAM, IPPROTO_TCP) = 3\n"
    _pkt(pytester, "all.pkt", ok)
    _pkt(pytester, "only_v6.pkt", "--ip_version=ipv6\n" + ok)
    _pkt(pytester, "mtu-v4.pkt", ok)  # run_all.py: *v4.pkt runs over IPv4 only
    collect = ("--collect-only", "-q", "-p", "no:cacheprovider")
    every = pytester.runpytest_subprocess("--tunpair", *collect)
    every.stdout.fnmatch_lines(
        [
            "all.pkt::ipv4",
            "all.pkt::ipv4-mapped-ipv6",
            "all.pkt::ipv6",
            "mtu-v4.pkt::ipv4",
            "mtu-v4.pkt::ipv4-mapped-ipv6",
            "only_v6.pkt::ipv6",
            "6 tests collected*",
        ]
    )
    some = pytester.runpytest_subprocess(
        "--tunpair", *collect, "-o", "tunpair_pkt_ip_versions=ipv6, ipv4"
    )
    some.stdout.fnmatch_lines(["4 tests collected*"])
    off = pytester.runpytest_subprocess("--tunpair", *collect, "--tunpair-no-pkt")
    assert off.ret == pytest.ExitCode.NO_TESTS_COLLECTED
    # (tests/test_plugin_options.py: the options' flags, ini keys and bad values.)


# -- pure parts ---------------------------------------------------------------------------------


def test_the_plugins_table_repeats_the_runners_ip_versions() -> None:
    assert PKT_IP_VERSIONS == pkt_run.IP_VERSIONS


def test_flags_in_packetdrills_letters() -> None:
    assert flag_bits("S.") == (0x12, False)
    assert flag_bits("P.") == (0x18, False)
    assert flag_bits("SEW") == (0x02 | 0x40 | 0x80, False)
    assert flag_bits(".5") == (0x10 | 0x40 | 0x100, True)  # ACE = 5: ECE and AE
    assert flag_text(0x12) == "S." and flag_text(0x10 | 0x40 | 0x100, ace=True) == ".5"
    assert flag_text(0x19 | 0x40) == "FP.E"


@pytest.mark.parametrize(
    "options",
    [
        "<mss 1460,sackOK,TS val 100 ecr 0,nop,wscale 8>",
        "<nop,nop,sack 1001:2001 3001:4001>",
        "<mss 1460,nop,nop,sackOK,FO 3021b9d889017eeb,nop,nop>",
        "<mss 1460,FOEXP 3021b9d889017eeb,nop,nop,nop,nop>",
        "<nop,nop,sackOK,FO,nop,nop>",
        "<ECN e1b 1 ceb 2 e0b 3,nop>",
    ],
)
def test_options_encode_as_packetdrill_writes_them(options: str) -> None:
    """Encoded by the project's builder, read back by its parser and by scapy: the
    script's option list, byte for byte."""
    spec = parse(f"0 < S 0:0(0) win 100 {options}\n").events[0].action
    assert isinstance(spec, PacketSpec) and spec.options is not None
    raw = build.tcp_options(encode_options(spec.options))
    assert len(raw) == options_length(spec.options)  # no padding added: the script pads
    segment = build.tcp(bytes(4), bytes(4), 1, 2, seq=0, ack=0, flags=2, window=100,
                        options=encode_options(spec.options))  # fmt: skip
    packet = build.ip_packet(bytes(4), bytes(4), 6, segment)
    got = headers.tcp_options(packet, headers.parse(packet, 0, "tun"))
    assert decode_options(got) == list(spec.options)


def test_segments_compare_field_by_field() -> None:
    spec = parse("0 > P. 1:1001(1000) ack 1 win 257 <nop,nop,TS val 100 ecr 5>\n").events[0].action
    assert isinstance(spec, PacketSpec)
    script = pkt_run._script_seg(spec)
    same = Seg(0x18, 1, 1000, 1, 257, 0, [("nop", None), ("nop", None), ("TS", (900, 1))], doff=8)
    assert compare_segments(script, same, spec, PktConfig()) == []
    other = Seg(0x10, 1, 1000, 2, 300, 0, [("nop", None), ("nop", None), ("TS", (900, 1))], doff=8)
    assert compare_segments(script, other, spec, PktConfig()) == [
        "tcp_psh: expected: 1 (0x1) vs actual: 0 (0x0)",
        "tcp_ack_seq: expected: 1 (0x1) vs actual: 2 (0x2)",
        "tcp_window: expected: 257 (0x101) vs actual: 300 (0x12c)",
    ]
    # --tcp_ts_tick_usecs checks the TS val, within the tolerance (4 ms of 1 ms ticks).
    ticked = PktConfig(tcp_ts_tick_usecs=1000)
    assert compare_segments(script, same, spec, ticked) == [
        "bad outbound TCP timestamp value: expected: 100 actual: 900"
    ]


def test_time_tolerances() -> None:
    config = PktConfig(slack_usecs=1000)
    rt = pkt_run.Runner.__new__(pkt_run.Runner)
    rt.config = config
    # 4 ms, or 12.5 % of the time since the previous event; plus the slack.
    assert rt.tolerance(100_000, 0) == 12_500 + 1000
    assert rt.tolerance(10_000, 0) == 4000 + 1000
    assert rt.check_time("relative", 100_000, None, 0.1134, 0, "x") is None
    assert "tolerance 0.013500" in (rt.check_time("relative", 100_000, None, 0.114, 0, "x") or "")
    assert rt.check_time("relative_range", 100_000, 200_000, 0.15, 0, "x") is None
    assert rt.check_time("any", 0, None, 99.0, 0, "x") is None


def test_configuration_of_a_variant() -> None:
    script = Script(options=[("tolerance_usecs", "10000", 1), ("local_ip", "192.168.0.2", 2)])
    v4 = config_for(script, "ipv4")
    assert (v4.local_ip, v4.remote_ip, v4.mtu, v4.tolerance_usecs) == (
        "192.168.0.2",
        "192.0.2.1",
        1500,
        10000,
    )
    v6 = config_for(Script(), "ipv6", slack_usecs=5)
    assert (v6.remote_ip, v6.mtu, v6.slack_usecs) == ("fd3d:fa7b:d17d::1", 1520, 5)
    assert v6.defines["TFO_COOKIE"] == "c1d1e9742a47a9bc"
    assert variants(Script(options=[("ip_version", "ipv6", 1)])) == ["ipv6"]
    assert variants(Script()) == list(PKT_IP_VERSIONS)
    with pytest.raises(PktUnsupported, match=r"x\.pkt:3: unsupported: the option --so_filename"):
        config_for(Script(options=[("so_filename", "a.so", 3)]), "ipv4", "x.pkt")
    # An IPv4 script's addresses over IPv6: the variant's, as run_all.py's command line
    # overrides them (google/packetdrill's fastopen/server/opt34/*.pkt set --local_ip).
    v4_script = Script(options=[("local_ip", "192.168.0.2", 1), ("netmask_ip", "255.0.0.0", 2)])
    assert config_for(v4_script, "ipv6").local_ip == "fd3d:a0b:17d6::1"
    assert config_for(v4_script, "ipv4").netmask_ip == "255.0.0.0"
    with pytest.raises(PktUnsupported, match=r"x\.pkt:4: unsupported: --remote_ip=h \(not an"):
        config_for(Script(options=[("remote_ip", "h", 4)]), "ipv4", "x.pkt")


@pytest.mark.parametrize("option", ["non_fatal", "speed", "dry_run", "wire_server"])
def test_options_that_would_do_nothing_make_the_script_unsupported(option: str) -> None:
    with pytest.raises(PktUnsupported, match=rf"x\.pkt:1: unsupported: the option --{option}"):
        config_for(Script(options=[(option, "packet", 1)]), "ipv4", "x.pkt")
    quiet = Script(options=[("verbose", "", 1), ("netmask_ip", "255.255.0.0", 2)])
    assert config_for(quiet, "ipv4").remote_ip == "192.0.2.1"


def test_scm_timestamping_is_compared_with_the_script_time() -> None:
    from types import SimpleNamespace

    from pytest_tunpair._peer.pkt_syscalls import SyscallFailed

    rt = SimpleNamespace(_start_wall=1000.0, config=PktConfig())
    at = (1000 * 1_000_000 + 10_000) * 1000  # 10 ms after script time 0, in ns
    live = struct.pack("=qq", at // 10**9, at % 10**9) + bytes(32)
    body = {"_struct": "scm_timestamping", "scm_sec": 0, "scm_nsec": 12_000_000}
    pkt_run._check_timestamp(rt, body, live, 0)  # type: ignore[arg-type]
    body["scm_nsec"] = 20_000_000
    with pytest.raises(SyscallFailed, match=r"Bad timestamp 0 in scm_timestamping 0: .*\(20000\)"):
        pkt_run._check_timestamp(rt, body, live, 0)  # type: ignore[arg-type]
    pkt_run._check_timestamp(rt, {**body, "scm_nsec": 0}, live, 0)  # type: ignore[arg-type]
