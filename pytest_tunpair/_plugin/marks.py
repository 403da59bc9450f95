"""The markers: ``@pytest.mark.tunpair(**options)`` shapes the pair, ``@pytest.mark.impair
(**parameters)`` impairs it, and each says which one a misplaced keyword belongs to.

``impair`` is the declarative form of ``tun_pair.impair(**parameters)``: each marker is one
such call, made when the pair is set up, from the module's markers down to the test's (a
later call replaces the settings of the direction(s) it names, so the test's own marker wins).
It applies to ``tun_pair``, and to ``tun_pair_module`` from the module's ``pytestmark``.
A marker that could apply to nothing is an error, never ignored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from .._errors import OptionError

if TYPE_CHECKING:
    from .._pair import TunPair

__all__ = [
    "HELP_IMPAIR",
    "Checks",
    "apply_impair",
    "check_impair_target",
    "pair_options",
    "tunpair_help",
]

HELP_IMPAIR = (
    "impair(profile=None, direction=None, **parameters): impair the test's tun_pair as "
    "tun_pair.impair(...) does, at set-up (on a module, in pytestmark: tun_pair_module too) "
    "-- loss, delay, jitter, rate, profile='lte', ... (see docs/options.md)"
)
#: The fixtures an ``impair`` marker on a test (or its class) applies to.
_TARGET = "tun_pair"


def tunpair_help() -> str:
    """The ``tunpair`` marker's line in ``pytest --markers`` (the option names, from the
    schema: built when a run asks for it, not at every configure)."""
    from .._options import PairOptions

    return (
        "tunpair(**options): configure the tun_pair fixture (on a module, in pytestmark: "
        f"tun_pair_module too) -- {', '.join(PairOptions.names_allowed())} "
        "(see docs/options.md; impairments go in @pytest.mark.impair)"
    )


def _kwargs(marker: pytest.Mark, example: str) -> dict[str, Any]:
    if marker.args:
        pytest.fail(
            f"@pytest.mark.{marker.name} takes keyword arguments only, e.g. "
            f"@pytest.mark.{marker.name}({example}); got positional {marker.args!r}",
            pytrace=False,
        )
    return dict(marker.kwargs)


def pair_options(node: pytest.Item | pytest.Collector) -> dict[str, Any]:
    """The closest ``tunpair`` marker's options (``{}`` without one)."""
    marker = node.get_closest_marker("tunpair")
    return {} if marker is None else _kwargs(marker, "mtu=9000")


def misplaced(exc: OptionError) -> str | None:
    """For an unknown pair option that is an impairment parameter (``tunpair(loss=0.1)``),
    the message pointing at ``impair``; else None."""
    from .._link.impair import ImpairmentSpec

    if not exc.unknown or exc.option not in [*ImpairmentSpec.names(), "direction"]:
        return None
    value = f"{exc.option}={exc.value!r}"
    return (
        f"{exc.source}: {exc.option!r} is an impairment, not a pair option: use "
        f"@pytest.mark.impair({value}) on the test, or call tun_pair.impair({value}) in it "
        "(docs/wire.md, 'Impairments')"
    )


def apply_impair(pair: TunPair, node: pytest.Item | pytest.Collector) -> None:
    """Each ``impair`` marker of ``node``, farthest first, as one ``pair.impair()`` call."""
    markers = list(node.iter_markers("impair"))
    for marker in reversed(markers):  # iter_markers gives the closest first
        kwargs = _kwargs(marker, "loss=0.1")
        try:
            pair.impair(**kwargs)
            continue
        except OptionError as exc:
            message = str(exc.with_source("@pytest.mark.impair"))
        except (TypeError, ValueError) as exc:  # an unknown parameter (listing the known
            # ones), a bad direction
            message = f"@pytest.mark.impair: {exc}".replace("impair() got", "got")
        pytest.fail(message, pytrace=False)  # outside the except: no exception chain


def check_impair_target(item: pytest.Item) -> None:
    """Fail a test whose own ``impair`` marker (on it or its class) would impair nothing:
    it does not use ``tun_pair``. (A module's marker may be meant for ``tun_pair_module``.)"""
    own = [
        mark
        for node, mark in item.iter_markers_with_node("impair")
        if not isinstance(node, (pytest.Module, pytest.Package, pytest.Session))
    ]
    if not own or _TARGET in getattr(item, "fixturenames", ()):
        return
    from . import scoped

    others = scoped.uses(item)
    if others:
        hint = (
            f"this test uses {', '.join(others)}: call .impair(...) on its pair in the test, "
            "or, for tun_pair_module, put the marker in the module's pytestmark"
        )
    else:
        hint = "this test uses no tunnel: request the tun_pair fixture"
    pytest.fail(f"@pytest.mark.impair applies to the tun_pair fixture; {hint}", pytrace=False)


class Checks:
    """The setup-time check, as a plain hook implementation: it runs inside every plugin's
    setup wrapper (logging, capture...), whose teardown halves expect their setup halves to
    have run; a failure raised from the plugin's own outermost wrapper would skip them."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        check_impair_target(item)
