"""Whether the relay runs its C core (``_core.c``): built, and not turned off.

The core is an optional extension (setup.py): where it was not built (no C compiler or no
Python headers at install time) or ``TUNPAIR_RELAY=python`` is set, the relay runs its
Python loop for every packet -- same behaviour, more CPU time and latency per packet
(docs/timing.md, "The relay's C core").
"""

from __future__ import annotations

import os
from types import ModuleType

__all__ = ["CORE_ENV", "describe", "load"]

#: ``TUNPAIR_RELAY=python`` keeps the relay in its Python loop even where the core is built:
#: to compare the two, or to rule the core out when hunting a bug.
CORE_ENV = "TUNPAIR_RELAY"


def load() -> ModuleType | None:
    """The core's module, or ``None`` (not built, or turned off by :data:`CORE_ENV`)."""
    if os.environ.get(CORE_ENV, "").lower() == "python":
        return None
    try:
        from . import _core  # type: ignore[attr-defined]
    except ImportError:
        return None
    module: ModuleType = _core
    return module


def describe() -> str:
    """One line for the run's header: which loop the relay runs, and why."""
    if os.environ.get(CORE_ENV, "").lower() == "python":
        return f"relay: Python loop ({CORE_ENV}=python)"
    try:
        from . import _core  # type: ignore[attr-defined]  # noqa: F401
    except ImportError as exc:
        return (
            f"relay: Python loop (its C core was not built: {exc}; reinstall with a C "
            "compiler and Python's headers, e.g. apt-get install gcc python3-dev)"
        )
    return "relay: C core"
