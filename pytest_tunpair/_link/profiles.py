"""Named link profiles: ``impair(profile="lte")`` sets a whole access link at once.

Each profile gives, per direction, the ``impair()`` parameters of that link: rate, one-way
delay, jitter, loss and the queue (``limit``). Side ``a`` is the user's device (the client:
a phone, a home computer) and side ``b`` the Internet (the server), so ``a->b`` is the
**uplink** and ``b->a`` the **downlink**. A round-trip time from a source is split evenly
over the two directions. Every figure's source is in ``docs/profiles.md``; a profile is a
starting point, and any parameter given next to it wins (``impair(profile="lte", loss=0)``).

The queue: a direction holds at most ``limit`` packets, counting those propagating (netem's
definition, see ``docs/link.md``), so each limit is the packets in flight at the rate over
the delay plus a buffer of ``BUFFER`` seconds at the rate, never fewer than
``MIN_LIMIT``.

Pure data and arithmetic: no I/O, importable anywhere above the base layer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .._schema import Kind

__all__ = ["PROFILES", "Profile", "ProfileKind", "profile_values"]

#: Bits of a full-sized packet (1500 bytes), the unit a buffer is counted in.
_PACKET_BITS = 1500 * 8
MIN_LIMIT = 10


@dataclass(frozen=True)
class Link:
    """One direction of a profile."""

    rate: float
    """bits/s"""
    delay: float
    """one-way, seconds"""
    buffer: float
    """seconds of queue at the rate, on top of the packets in flight"""
    jitter: float = 0.0
    loss: float = 0.0

    def values(self) -> dict[str, Any]:
        in_flight = self.rate * (self.delay + self.jitter + self.buffer) / _PACKET_BITS
        return {
            "rate": self.rate,
            "delay": self.delay,
            "jitter": self.jitter,
            "loss": self.loss,
            "limit": max(MIN_LIMIT, math.ceil(in_flight)),
        }


@dataclass(frozen=True)
class Profile:
    """A named access link: ``up`` is ``a->b``, ``down`` is ``b->a``."""

    name: str
    title: str
    up: Link
    down: Link

    def link(self, direction: str) -> Link:
        return self.up if direction == "a->b" else self.down


_MIBIT = 1024 * 1024  # Firefox's presets count in binary units
_CELLULAR_BUFFER = 0.5  # cellular networks buffer deeply (docs/profiles.md)
_WIRED_BUFFER = 0.2

PROFILES: Mapping[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            "3g",
            "Mobile 3G",
            up=Link(768e3, 0.150, _CELLULAR_BUFFER),
            down=Link(1.6e6, 0.150, _CELLULAR_BUFFER),
        ),
        Profile(
            "lte",
            "LTE",
            up=Link(12e6, 0.035, _CELLULAR_BUFFER),
            down=Link(12e6, 0.035, _CELLULAR_BUFFER),
        ),
        Profile(
            "5g",
            "5G (mid-band)",
            up=Link(20e6, 0.015, _CELLULAR_BUFFER),
            down=Link(200e6, 0.015, _CELLULAR_BUFFER),
        ),
        Profile(
            "satellite",
            "Geostationary satellite",
            up=Link(3e6, 0.300, 0.5),
            down=Link(25e6, 0.300, 0.5),
        ),
        Profile(
            "dsl",
            "DSL",
            up=Link(384e3, 0.025, _WIRED_BUFFER),
            down=Link(1.5e6, 0.025, _WIRED_BUFFER),
        ),
        Profile(
            "cable",
            "Cable",
            up=Link(1e6, 0.014, _WIRED_BUFFER),
            down=Link(5e6, 0.014, _WIRED_BUFFER),
        ),
        Profile(
            "wifi",
            "Wi-Fi, good",
            up=Link(15 * _MIBIT, 0.001, 0.05),
            down=Link(30 * _MIBIT, 0.001, 0.05),
        ),
        Profile(
            "wifi-congested",
            "Wi-Fi, congested",
            up=Link(15 * _MIBIT, 0.020, 0.1, jitter=0.015, loss=0.01),
            down=Link(30 * _MIBIT, 0.020, 0.1, jitter=0.015, loss=0.01),
        ),
        Profile(
            "intercontinental",
            "Intercontinental path (Europe - North America)",
            up=Link(100e6, 0.0375, _WIRED_BUFFER, jitter=0.001),
            down=Link(100e6, 0.0375, _WIRED_BUFFER, jitter=0.001),
        ),
    )
}


class ProfileKind(Kind):
    """A profile name, or None."""

    metavar = "NAME"

    @property
    def allowed(self) -> str:  # type: ignore[override]
        return "one of " + ", ".join(repr(name) for name in PROFILES) + "; or None"

    def check(self, value: object) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str) or value.lower() not in PROFILES:
            raise self.refuse(f"use one of {', '.join(PROFILES)} (docs/profiles.md)")
        return value.lower()

    def format(self, value: Any) -> str:
        return "None" if value is None else str(value)


def profile_values(name: str, direction: str) -> dict[str, Any]:
    """The ``impair()`` parameters of profile ``name`` (already checked) for ``direction``."""
    return PROFILES[name].link(direction).values()
