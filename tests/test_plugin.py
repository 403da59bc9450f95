"""What the plugin does to a pytest run (pytester), and that the host is left untouched."""

from __future__ import annotations

import sys

import pytest

from .conftest import host_snapshot, need

INNER = """
import subprocess

def test_uses_pair(tun_pair):
    assert subprocess.run(["ping", "-c", "1", "-W", "2", tun_pair.b.ip]).returncode == 0

def test_plain():
    pass
"""


def test_skipped_without_the_flag(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(INNER)
    result = pytester.runpytest_subprocess("-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*--tunpair*"])


def test_factory_skipped_without_the_flag(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_f(tun_pair_factory):\n    pass\n")
    result = pytester.runpytest_subprocess("-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*--tunpair*"])


def test_enabled_by_flag(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(INNER)
    pytester.runpytest_subprocess("--tunpair").assert_outcomes(passed=2)


def test_enabled_by_ini_key(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\ntunpair = true\n")
    pytester.makepyfile(INNER)
    pytester.runpytest_subprocess().assert_outcomes(passed=2)


def test_marker_is_registered(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.tunpair(**options)*"])


@pytest.mark.parametrize(
    ("marker", "expect"),
    [
        ("mtu='big'", "*@pytest.mark.tunpair: bad value for mtu='big'*"),
        ("colour='red'", "*@pytest.mark.tunpair: unknown option 'colour'*"),
        ("ipv4=('198.18.0.1',)", "*bad value for ipv4=*give two addresses*"),
        ("ipv4=None, ipv6=None", "*leave the pair without addresses*"),
        ("names=('tun0', 'tun0')", "*different names*"),
        ("table=255", "*tables 253 (default), 254 (main) and 255 (local) are taken*"),
        ("mode='tin'", "*mode='tin'*use 'tun'*"),
    ],
)
def test_bad_marker_option_fails_with_a_clear_message(
    pytester: pytest.Pytester, marker: str, expect: str
) -> None:
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.tunpair({marker})
        def test_it(tun_pair):
            pass
        """
    )
    # -rN: pytest's own short summary repeats the message in full where it thinks it runs on
    # CI (CI=true), as CI does; the plugin's output is what must say it once.
    result = pytester.runpytest_subprocess("--tunpair", "-rN")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([expect])
    result.stdout.no_fnmatch_line("*Traceback*")
    # Said once: no chained "During handling of the above exception" repeating it.
    result.stdout.no_fnmatch_line("*During handling*")
    assert sum("@pytest.mark.tunpair: " in line for line in result.stdout.lines) == 1


def test_thread_returns_to_its_namespace_and_host_is_untouched(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import os, subprocess

        START = os.stat("/proc/thread-self/ns/net").st_ino
        seen = {}

        def test_inside(tun_pair):
            seen["inside"] = os.stat("/proc/thread-self/ns/net").st_ino
            assert seen["inside"] != START

        def test_failing(tun_pair):
            subprocess.run(["ping", "-c", "1", "-W", "1", tun_pair.b.ip])
            assert False, "deliberate"

        def test_raising(tun_pair_factory):
            tun_pair_factory()
            tun_pair_factory(mode="tap")
            raise RuntimeError("deliberate")

        def test_back_home():
            assert os.stat("/proc/thread-self/ns/net").st_ino == START
        """
    )
    before = host_snapshot()
    result = pytester.runpytest_subprocess("--tunpair")
    result.assert_outcomes(passed=2, failed=2)
    assert host_snapshot() == before


def test_standalone_use_needs_no_pytest(pytester: pytest.Pytester) -> None:
    from pytest_tunpair._kernel.userns import thread_can_return

    script = pytester.makepyfile(
        """
        import subprocess, sys
        from pytest_tunpair import TunPair

        with TunPair() as pair:
            subprocess.run(["ping", "-c", "1", "-W", "2", pair.b.ip], check=True)
            n = len(pair.packets)
        print("PACKETS", n)
        print("PYTEST LOADED", "pytest" in sys.modules)
        """
    )
    # In the rootless tier a script's main thread could not come back from the pair's
    # namespace, and TunPair refuses; the fix its message names is `unshare -Urn`.
    wrap = [] if thread_can_return() else [need("unshare"), "-Urn"]
    result = pytester.run(*wrap, sys.executable, str(script))
    assert result.ret == 0, result.stderr.str()
    # Two packets (the echo and its reply), and the pair never needed pytest.
    result.stdout.fnmatch_lines(["PACKETS 2", "PYTEST LOADED False"])


def test_plugin_import_does_not_load_scapy_or_pyroute2(pytester: pytest.Pytester) -> None:
    result = pytester.run(
        sys.executable,
        "-c",
        "import sys, pytest_tunpair.plugin; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('scapy', 'pyroute2')))",
    )
    result.stdout.fnmatch_lines(["[[][]]"])


def test_the_command_line_tool_does_not_load_pytest(pytester: pytest.Pytester) -> None:
    # `tunpair run` shares the report's helpers (_plugin/report.py), which import pytest's
    # side only when a hook runs.
    result = pytester.run(
        sys.executable, "-c", "import sys, pytest_tunpair._cli; print('pytest' in sys.modules)"
    )
    result.stdout.fnmatch_lines(["False"])
