"""The markers: ``@pytest.mark.impair`` impairs the pair, an unknown marker fails under
``--strict-markers``, and a keyword given to the wrong marker names the right one."""

from __future__ import annotations

import re

import pytest

from pytest_tunpair import TunPair

ROOT_INI = "[pytest]\naddopts = --strict-markers\n"


def test_both_markers_are_registered(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--markers")
    result.stdout.fnmatch_lines(
        ["@pytest.mark.tunpair(**options)*", "@pytest.mark.impair(profile=None, direction=None*"]
    )


def test_impair_marker_impairs_the_pair(pytester: pytest.Pytester) -> None:
    """Declared on the module and on the test: applied module first, so the test's own
    marker wins for the direction it names; real traffic shows it."""
    pytester.makeini(ROOT_INI)
    pytester.makepyfile(
        """
        import socket, pytest

        pytestmark = pytest.mark.impair(delay="30ms")

        @pytest.mark.impair(loss=1.0, direction="b->a", seed=3)
        def test_it(tun_pair):
            assert "impair a->b: delay=30ms" in tun_pair.describe()
            assert "impair b->a: loss=100% seed=3" in tun_pair.describe()
            rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            rx.bind((tun_pair.b.ip, 0))
            rx.settimeout(2)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
                tx.sendto(b"x", rx.getsockname())
            assert rx.recv(10) == b"x"
            (p,) = tun_pair.packets.filter(direction="a->b")
            assert p.action == "delayed" and p.sojourn >= 0.03

        def test_module_marker_alone(tun_pair):
            assert "impair b->a: delay=30ms" in tun_pair.describe()
        """
    )
    pytester.runpytest_subprocess("--tunpair").assert_outcomes(passed=2)


def test_unknown_marker_fails_with_strict_markers(pytester: pytest.Pytester) -> None:
    """The project's own configuration is strict: a misspelt marker stops the run."""
    pytester.makeini(ROOT_INI)
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.impiar(loss=0.1)
        def test_it(tun_pair):
            pass
        """
    )
    result = pytester.runpytest_subprocess("--tunpair")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*'impiar' not found in `markers` configuration option*"])


def test_the_projects_own_runs_are_strict() -> None:
    import tomllib
    from pathlib import Path

    config = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    assert "--strict-markers" in config["tool"]["pytest"]["ini_options"]["addopts"]


@pytest.mark.parametrize(
    ("marker", "expect"),
    [
        (
            "tunpair(loss=0.1)",
            "@pytest.mark.tunpair: 'loss' is an impairment, not a pair option: use "
            "@pytest.mark.impair(loss=0.1) on the test, or call tun_pair.impair(loss=0.1) "
            "in it*",
        ),
        ("impair(mtu=9000)", "@pytest.mark.impair: got unexpected keyword argument(s) 'mtu'*"),
        ("impair(loss=2)", "@pytest.mark.impair: bad value for loss=2: loss is a probability*"),
        ("impair(profile='4g')", "*profile='4g': use one of 3g, lte, 5g, *"),
        ("impair(0.1)", "@pytest.mark.impair takes keyword arguments only*"),
    ],
)
def test_a_keyword_on_the_wrong_marker_names_the_right_api(
    pytester: pytest.Pytester, marker: str, expect: str
) -> None:
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.{marker}
        def test_it(tun_pair):
            pass
        """
    )
    result = pytester.runpytest_subprocess("--tunpair", "-rN")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([expect])
    result.stdout.no_fnmatch_line("*Traceback*")


def test_an_impair_marker_that_would_impair_nothing_fails(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        pytestmark = pytest.mark.impair(delay="1ms")  # the module's: for its pairs

        @pytest.mark.impair(loss=0.1)
        def test_no_pair():
            pass

        @pytest.mark.impair(loss=0.1)
        def test_factory_only(tun_pair_factory):
            pass

        def test_plain():
            pass
        """
    )
    result = pytester.runpytest_subprocess("--tunpair", "-rN")
    result.assert_outcomes(passed=1, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*@pytest.mark.impair applies to the tun_pair fixture; this test uses no tunnel:*",
            "*@pytest.mark.impair applies to the tun_pair fixture; this test uses "
            "tun_pair_factory: call .impair(...) on its pair*",
        ]
    )


def test_factory_and_standalone_errors_point_at_impair() -> None:
    with pytest.raises(Exception, match=re.escape("are set with pair.impair(...)")):
        TunPair(loss=0.1)
