"""The run's spare namespaces: the next tunnel test's namespace and devices, built while the
current test runs (``_kernel/spare.py``), so that a test's set-up mostly takes them.

Used by the function-scoped ``tun_pair_factory`` (and so ``tun_pair``): for a test that
requests ``tun_pair``, the plan is its marker's options, and the spare comes with the
devices built for them; for one that only makes pairs itself, a spare namespace is used
only while the pool has not built devices yet. The pool is made by the first test that
asks and closed at the end of the run (or of the xdist worker).
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from .._errors import OptionError
from .._kernel.spare import DevicePlan, Spare, SparePool
from .._options import PairOptions
from .._pair import device_plan
from . import keys, marks

__all__ = ["close", "take"]


def take(request: pytest.FixtureRequest, defaults: Mapping[str, object]) -> Spare | None:
    """The spare for ``request``'s test, or ``None`` (it builds its own); the pool starts
    building the next."""
    pool = request.config.stash.get(keys.SPARES, None)
    if pool is None:
        pool = request.config.stash[keys.SPARES] = SparePool()
    return pool.take(_plan(request, defaults))


def _plan(request: pytest.FixtureRequest, defaults: Mapping[str, object]) -> DevicePlan | None:
    """What ``tun_pair`` will ask of the factory for this test (the marker's options over the
    run's defaults), or ``None`` if the test does not request it or its options are wrong
    (``tun_pair`` then says so)."""
    if "tun_pair" not in request.node.fixturenames:
        return None
    try:
        opts = PairOptions.from_kwargs(
            {**defaults, **marks.pair_options(request.node)},
            source="@pytest.mark.tunpair",
            index=0,
        )
    except OptionError:
        return None
    return device_plan(opts, 0)


def close(config: pytest.Config) -> None:
    """Wait for a build under way and drop the spare (the end of the run)."""
    pool = config.stash.get(keys.SPARES, None)
    if pool is not None:
        pool.close()
