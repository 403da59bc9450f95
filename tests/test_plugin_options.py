"""The plugin's own options (pytester): each one's flag, ini key, precedence and errors.

Each option is read from the command line, else the ini key, else its default; a bad value
stops the run with one message naming where it came from. What each option does is tested
where its feature is (the pcap files in test_report.py, the seed in test_wire.py, ...).
"""

from __future__ import annotations

import importlib.util
from dataclasses import fields

import pytest

from pytest_tunpair._plugin.options import (
    LEFTOVER_POLICIES,
    PCAP_FORMATS,
    USERNS_MODES,
    PluginOptions,
)

# The inner run prints what the plugin resolved, in its report header (collection only).
SHOW = """
import dataclasses
from pytest_tunpair._plugin import keys

def pytest_report_header(config):
    resolved = config.stash[keys.OPTIONS]
    return [f"resolved {f.name}={getattr(resolved, f.name)!r}" for f in dataclasses.fields(resolved)]
"""


def _need_matplotlib() -> None:
    # Looked up, not imported: numpy's extension cannot be imported twice in a process.
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed (extra [plot])")


# conftest.py is imported before the plugin configures: as if matplotlib were not installed.
NO_MATPLOTLIB = "import sys\nsys.modules['matplotlib'] = None\n"


def _resolved(pytester: pytest.Pytester, *args: str) -> dict[str, str]:
    pytester.makeconftest(SHOW)
    result = pytester.runpytest_subprocess("--co", "-p", "no:cacheprovider", *args)
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED, result.stderr.str()
    prefix = "resolved "
    lines = [line[len(prefix) :] for line in result.stdout.lines if line.startswith(prefix)]
    assert lines, result.stdout.str()
    return dict(line.split("=", 1) for line in lines)


DEFAULTS = {
    "tunpair": "False",
    "tunpair_pcap": "None",
    "tunpair_pcap_mode": "'failed'",
    "tunpair_pcap_format": "'pcapng'",
    "tunpair_pcap_live": "None",
    "tunpair_plot": "False",
    "tunpair_seed": "None",
    "tunpair_leftovers": "'warn'",
    "tunpair_no_pkt": "False",
    "tunpair_pkt_ip_versions": "('ipv4', 'ipv4-mapped-ipv6', 'ipv6')",
    "tunpair_pkt_slack_usecs": "0",
    "tunpair_userns": "'auto'",
}


def test_defaults(pytester: pytest.Pytester) -> None:
    assert _resolved(pytester) == DEFAULTS


# Every option differs from its default in the ini file (as root or in the rootless tier's
# user namespace, 'never' finds the privileges it needs).
INI = """[pytest]
tunpair = true
tunpair_pcap = from_ini
tunpair_pcap_mode = all
tunpair_pcap_format = pcap
tunpair_pcap_live = live_ini
tunpair_plot = true
tunpair_seed = 55
tunpair_leftovers = fail
tunpair_no_pkt = true
tunpair_pkt_ip_versions = ipv6,ipv4
tunpair_pkt_slack_usecs = 5000
tunpair_userns = never
"""


def test_ini_keys(pytester: pytest.Pytester) -> None:
    _need_matplotlib()
    pytester.makeini(INI)
    assert _resolved(pytester) == {
        "tunpair": "True",
        "tunpair_pcap": repr(pytester.path / "from_ini"),
        "tunpair_pcap_mode": "'all'",
        "tunpair_pcap_format": "'pcap'",
        "tunpair_pcap_live": repr(pytester.path / "live_ini"),
        "tunpair_plot": "True",
        "tunpair_seed": "55",
        "tunpair_leftovers": "'fail'",
        "tunpair_no_pkt": "True",
        "tunpair_pkt_ip_versions": "('ipv4', 'ipv6')",
        "tunpair_pkt_slack_usecs": "5000",
        "tunpair_userns": "'never'",
    }


def test_flags_beat_ini_keys(pytester: pytest.Pytester) -> None:
    _need_matplotlib()
    # The bool keys off in the ini file, so that their flags have something to beat.
    ini = INI.replace("tunpair = true", "tunpair = false").replace("plot = true", "plot = no")
    ini = ini.replace("no_pkt = true", "no_pkt = false")
    pytester.makeini(ini)
    flags = [
        "--tunpair",
        "--tunpair-pcap=from_cli",
        "--tunpair-pcap-mode=failed",
        "--tunpair-pcap-format=pcapng",
        "--tunpair-pcap-live=live_cli",
        "--tunpair-plot",
        "--tunpair-seed=77",
        "--tunpair-leftovers=kill",
        "--tunpair-no-pkt",
        "--tunpair-pkt-ip-versions=ipv4-mapped-ipv6",
        "--tunpair-pkt-slack-usecs=7",
        "--tunpair-userns=auto",
    ]
    assert _resolved(pytester, *flags) == {
        "tunpair": "True",
        "tunpair_pcap": repr(pytester.path / "from_cli"),
        "tunpair_pcap_mode": "'failed'",
        "tunpair_pcap_format": "'pcapng'",
        "tunpair_pcap_live": repr(pytester.path / "live_cli"),
        "tunpair_plot": "True",
        "tunpair_seed": "77",
        "tunpair_leftovers": "'kill'",
        "tunpair_no_pkt": "True",
        "tunpair_pkt_ip_versions": "('ipv4-mapped-ipv6',)",
        "tunpair_pkt_slack_usecs": "7",
        "tunpair_userns": "'auto'",
    }


def test_an_empty_ini_value_is_the_default(pytester: pytest.Pytester) -> None:
    # The string keys; pytest itself refuses an empty bool.
    keys = [f.name for f in fields(PluginOptions) if f.type != "bool"]
    pytester.makeini("[pytest]\n" + "".join(f"{key} =\n" for key in keys))
    assert _resolved(pytester) == DEFAULTS


def test_a_relative_directory_is_relative_to_where_it_was_given(pytester: pytest.Pytester) -> None:
    sub = pytester.mkdir("sub")
    (sub / "tox.ini").write_text("[pytest]\ntunpair_pcap = pcaps\n")
    (sub / "conftest.py").write_text(SHOW)
    # Started from the parent directory: the ini file's "pcaps" is sub/pcaps, the flag's not.
    ini = _resolved(pytester, "-c", "sub/tox.ini", "sub")
    assert ini["tunpair_pcap"] == repr(sub / "pcaps")
    flag = _resolved(pytester, "-c", "sub/tox.ini", "sub", "--tunpair-pcap=pcaps")
    assert flag["tunpair_pcap"] == repr(pytester.path / "pcaps")


# (arguments, ini file, the usage error): one bad value from each source of each option.
BAD = {
    "flag-pcap-file": (
        ["--tunpair-pcap=afile"],
        "",
        "--tunpair-pcap: bad value 'afile': */afile exists and is not a directory; give a "
        "directory (it is created when the first file is written)",
    ),
    "flag-pcap-empty": (
        ["--tunpair-pcap="],
        "",
        "--tunpair-pcap: bad value '': give the directory to write pcap files to",
    ),
    "flag-pcap-mode": (
        ["--tunpair-pcap-mode=sometimes"],
        "",
        "--tunpair-pcap-mode: bad value 'sometimes': use 'failed' (pcap files for failed tests "
        "only) or 'all' (for every test that used a tunnel)",
    ),
    "flag-pcap-format": (
        ["--tunpair-pcap-format=pcap2"],
        "",
        "--tunpair-pcap-format: bad value 'pcap2': use 'pcapng' (directions, the relay's "
        "actions, TLS secrets) or 'pcap' (classic libpcap, packets only)",
    ),
    "flag-pcap-live-file": (
        ["--tunpair-pcap-live=afile"],
        "",
        "--tunpair-pcap-live: bad value 'afile': */afile exists and is neither a FIFO nor a "
        "directory; make a FIFO (mkfifo) for one live stream, or give a directory for a file "
        "per pair",
    ),
    "flag-pcap-live-empty": (
        ["--tunpair-pcap-live= "],
        "",
        "--tunpair-pcap-live: bad value ' ': give a FIFO (mkfifo) for one live stream, or a "
        "directory for a file per pair",
    ),
    "flag-seed": (
        ["--tunpair-seed=abc"],
        "",
        "--tunpair-seed: bad value 'abc': use a whole number >= 0",
    ),
    "flag-seed-negative": (
        ["--tunpair-seed=-1"],
        "",
        "--tunpair-seed: bad value '-1': use a whole number >= 0",
    ),
    "flag-leftovers": (
        ["--tunpair-leftovers=maybe"],
        "",
        "--tunpair-leftovers: bad value 'maybe': use one of 'kill', 'warn', 'fail'",
    ),
    "flag-userns": (
        ["--tunpair-userns=sometimes"],
        "",
        "--tunpair-userns: bad value 'sometimes': use one of 'auto', 'always', 'never'",
    ),
    "ini-tunpair": (
        [],
        "tunpair = maybe",
        "ini key tunpair in */tox.ini: invalid truth value 'maybe'; use true or false",
    ),
    "ini-pcap": (
        [],
        "tunpair_pcap = afile",
        "ini key tunpair_pcap in */tox.ini: bad value 'afile': */afile exists and is not a "
        "directory; *",
    ),
    "ini-pcap-mode": (
        [],
        "tunpair_pcap_mode = never",
        "ini key tunpair_pcap_mode in */tox.ini: bad value 'never': use 'failed' *or 'all' *",
    ),
    "ini-pcap-format": (
        [],
        "tunpair_pcap_format = pcapng2",
        "ini key tunpair_pcap_format in */tox.ini: bad value 'pcapng2': use 'pcapng' *",
    ),
    "ini-pcap-live": (
        [],
        "tunpair_pcap_live = afile",
        "ini key tunpair_pcap_live in */tox.ini: bad value 'afile': */afile exists and is "
        "neither a FIFO nor a directory; *",
    ),
    "ini-plot": (
        [],
        "tunpair_plot = sometimes",
        "ini key tunpair_plot in */tox.ini: invalid truth value 'sometimes'; use true or false",
    ),
    "ini-seed": (
        [],
        "tunpair_seed = 1.5",
        "ini key tunpair_seed in */tox.ini: bad value '1.5': use a whole number >= 0",
    ),
    "ini-leftovers": (
        [],
        "tunpair_leftovers = often",
        "ini key tunpair_leftovers in */tox.ini: bad value 'often': use one of 'kill', 'warn', "
        "'fail'",
    ),
    "ini-userns": (
        [],
        "tunpair_userns = sometimes",
        "ini key tunpair_userns in */tox.ini: bad value 'sometimes': use one of 'auto', "
        "'always', 'never'",
    ),
    "ini-pkt-ip-versions": (
        [],
        "tunpair_pkt_ip_versions = ipv5",
        "ini key tunpair_pkt_ip_versions in */tox.ini: bad value 'ipv5': 'ipv5' is no "
        "--ip_version: use some of ipv4, ipv4-mapped-ipv6, ipv6 (comma-separated)",
    ),
    "ini-pkt-slack": (
        [],
        "tunpair_pkt_slack_usecs = -1",
        "ini key tunpair_pkt_slack_usecs in */tox.ini: bad value '-1': use a whole number >= 0",
    ),
    "override-ini": (
        ["-o", "tunpair_seed=x"],
        "",
        "-o tunpair_seed: bad value 'x': use a whole number >= 0",
    ),
}


@pytest.mark.parametrize(("args", "ini", "expect"), list(BAD.values()), ids=list(BAD))
def test_a_bad_value_is_a_usage_error_naming_its_source(
    pytester: pytest.Pytester, args: list[str], ini: str, expect: str
) -> None:
    pytester.makepyfile("def test_plain():\n    pass\n")
    (pytester.path / "afile").write_text("not a directory")
    pytester.makeini(f"[pytest]\n{ini}\n")  # a tox.ini
    # Without --tunpair too: a bad value never waits for the first tunnel.
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: " + expect])
    assert "Traceback" not in result.stderr.str()


@pytest.mark.parametrize(
    ("args", "ini", "source"),
    [
        (["--tunpair-plot"], "", "--tunpair-plot"),
        ([], "tunpair_plot = true", "ini key tunpair_plot in */tox.ini"),
    ],
    ids=["flag", "ini"],
)
def test_plots_without_matplotlib_are_a_usage_error(
    pytester: pytest.Pytester, args: list[str], ini: str, source: str
) -> None:
    pytester.makeconftest(NO_MATPLOTLIB)
    pytester.makeini(f"[pytest]\n{ini}\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [f"ERROR: {source}: plots need matplotlib: pip install 'pytest-tunpair[[]plot]'"]
    )


@pytest.mark.parametrize(
    ("args", "ini", "source"),
    [
        (["--tunpair-pcap-format=pcap"], "", "--tunpair-pcap-format"),
        (["--tunpair-pcap-mode", "all"], "", "--tunpair-pcap-mode"),
        ([], "tunpair_pcap_format = pcap", "ini key tunpair_pcap_format in */tox.ini"),
    ],
    ids=["format", "mode", "ini"],
)
def test_pcap_options_without_a_pcap_directory_are_a_usage_error(
    pytester: pytest.Pytester, args: list[str], ini: str, source: str
) -> None:
    """They would do nothing: the run stops at once, saying what is missing."""
    pytester.makepyfile("def test_plain():\n    pass\n")
    pytester.makeini(f"[pytest]\n{ini}\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {source}: does nothing without --tunpair-pcap DIR *"])
    # With the directory, or at the default value, the same option is fine.
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--tunpair-pcap-format=pcapng", "--tunpair-pcap-mode=failed"
    )
    assert result.ret == pytest.ExitCode.OK


def test_each_option_has_a_flag_and_an_ini_key_with_one_help_text(
    pytester: pytest.Pytester,
) -> None:
    result = pytester.runpytest_subprocess("--help")
    out = result.stdout.str()
    assert "pytest-tunpair: in-kernel TUN/TAP pair fixtures" in out
    result.stdout.fnmatch_lines(
        [
            "*--tunpair *turn on the tun_pair*",
            "*--tunpair-pcap=DIR*",
            "*--tunpair-pcap-mode={failed,all}*",
            "*--tunpair-pcap-format={pcapng,pcap}*",
            "*--tunpair-pcap-live=FIFO_OR_DIR*",
            "*--tunpair-plot*",
            "*--tunpair-seed=N*",
            "*--tunpair-leftovers={kill,warn,fail}*",
            "*--tunpair-no-pkt*",
            "*--tunpair-pkt-ip-versions=LIST*",
            "*--tunpair-pkt-slack-usecs=N*",
            "*--tunpair-userns={auto,always,never}*",
        ]
    )
    for f in fields(PluginOptions):
        kind = "bool" if f.type == "bool" else "string"
        result.stdout.fnmatch_lines([f"*{f.name} ({kind}):*"])
    # One help text each: the flag's words are the ini key's.
    assert out.count("turn on the tun_pair") == 2


def test_the_choices_are_the_machinerys() -> None:
    """The table names them itself (importing the machinery would load ctypes and secrets
    into every pytest run); they must stay the machinery's."""
    from pytest_tunpair._kernel.procs import LEFTOVER_POLICIES as KEEPER_POLICIES
    from pytest_tunpair._kernel.userns import MODES

    assert LEFTOVER_POLICIES == KEEPER_POLICIES
    assert USERNS_MODES == MODES
    from pytest_tunpair._packets.pcap import FORMATS

    assert PCAP_FORMATS == FORMATS
