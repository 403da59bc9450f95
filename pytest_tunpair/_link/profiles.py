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

__all__ = ["PROFILES", "Profile", "ProfileKind", "markdown_table", "profile_values"]

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
    source: str
    """Where the rate, delay and loss come from (Markdown, for docs/profiles.md)."""

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
            source='WebPageTest\'s "Mobile 3G" connectivity profile: 1.6 Mbit/s / 768 kbit/s, 300 ms RTT, no loss ([connectivity.ini.sample](https://github.com/catchpoint/WebPageTest/blob/master/www/settings/connectivity.ini.sample))',
        ),
        Profile(
            "lte",
            "LTE",
            up=Link(12e6, 0.035, _CELLULAR_BUFFER),
            down=Link(12e6, 0.035, _CELLULAR_BUFFER),
            source="WebPageTest's \"LTE\" connection (webpagetest.org's list): 12 Mbit/s / 12 Mbit/s, 70 ms RTT, no loss ([WebPageTest](https://www.webpagetest.org/))",
        ),
        Profile(
            "5g",
            "5G (dense urban)",
            up=Link(50e6, 0.015, _CELLULAR_BUFFER),
            down=Link(300e6, 0.015, _CELLULAR_BUFFER),
            source="3GPP TR 38.913's dense-urban eMBB user-experienced data rates, 300 Mbit/s down, 50 Mbit/s up ([TR 38.913](https://portal.3gpp.org/desktopmodules/Specifications/SpecificationDetails.aspx?specificationId=2996)); RTT ours: its 4 ms radio target plus a path to a server in the region, 30 ms",
        ),
        Profile(
            "satellite",
            "Geostationary satellite",
            up=Link(3e6, 0.300, 0.5),
            down=Link(25e6, 0.300, 0.5),
            source="GEO round trip about 600 ms as the FCC's [Measuring Broadband America](https://www.fcc.gov/general/measuring-broadband-america) reports measure it for satellite service; 25 Mbit/s / 3 Mbit/s: the advertised tier of a consumer GEO service (HughesNet Gen5); no loss (ours)",
        ),
        Profile(
            "dsl",
            "DSL",
            up=Link(384e3, 0.025, _WIRED_BUFFER),
            down=Link(1.5e6, 0.025, _WIRED_BUFFER),
            source='WebPageTest\'s "DSL" profile: 1.5 Mbit/s / 384 kbit/s, 50 ms RTT, no loss ([connectivity.ini.sample](https://github.com/catchpoint/WebPageTest/blob/master/www/settings/connectivity.ini.sample))',
        ),
        Profile(
            "cable",
            "Cable",
            up=Link(1e6, 0.014, _WIRED_BUFFER),
            down=Link(5e6, 0.014, _WIRED_BUFFER),
            source='WebPageTest\'s "Cable" profile: 5 Mbit/s / 1 Mbit/s, 28 ms RTT, no loss ([connectivity.ini.sample](https://github.com/catchpoint/WebPageTest/blob/master/www/settings/connectivity.ini.sample))',
        ),
        Profile(
            "wifi",
            "Wi-Fi, good",
            up=Link(15 * _MIBIT, 0.001, 0.05),
            down=Link(30 * _MIBIT, 0.001, 0.05),
            source='Firefox DevTools\' "Wi-Fi" throttling preset: 30 Mibit/s / 15 Mibit/s, 2 ms latency ([Firefox throttling](https://firefox-source-docs.mozilla.org/devtools-user/network_monitor/throttling/))',
        ),
        Profile(
            "wifi-congested",
            "Wi-Fi, congested",
            up=Link(15 * _MIBIT, 0.020, 0.1, jitter=0.015, loss=0.01),
            down=Link(30 * _MIBIT, 0.020, 0.1, jitter=0.015, loss=0.01),
            source='Rates as `wifi`; delay after Pei et al., "WiFi can be the weakest link of round trip network latency in the wild" (IEEE INFOCOM 2016): over half of TCP packets saw more than 20 ms on the Wi-Fi hop, 10 % more than 100 ms; jitter and 1 % loss ours',
        ),
        Profile(
            "intercontinental",
            "Intercontinental path (Europe - North America)",
            up=Link(100e6, 0.0375, _WIRED_BUFFER, jitter=0.001),
            down=Link(100e6, 0.0375, _WIRED_BUFFER, jitter=0.001),
            source="Europe - North America (London - New York): 5,570 km of great circle is 28 ms one way for light in fibre; carriers' routes give about 70-75 ms RTT ([WonderNetwork's ping statistics](https://wondernetwork.com/pings)); rate, jitter ours",
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


def _cell(link: Link) -> str:
    from .._schema import Duration, Rate

    parts = [Rate().format(link.rate), Duration().format(link.delay)]
    if link.jitter:
        parts.append(f"+- {Duration().format(link.jitter)}")
    if link.loss:
        parts.append(f"loss {link.loss * 100:g} %")
    parts.append(f"limit {link.values()['limit']}")
    return ", ".join(parts)


def markdown_table() -> str:
    """docs/profiles.md's table: each profile's two directions and its source."""
    rows = [
        "| profile | uplink, a->b | downlink, b->a | RTT | source |",
        "|---|---|---|---|---|",
    ]
    for p in PROFILES.values():
        rtt = (p.up.delay + p.down.delay) * 1e3
        rows.append(
            f"| `{p.name}` | {_cell(p.up)} | {_cell(p.down)} | {rtt:g} ms | {p.title}: {p.source} |"
        )
    return "\n".join(rows) + "\n"


def profile_values(name: str, direction: str) -> dict[str, Any]:
    """The ``impair()`` parameters of profile ``name`` (already checked) for ``direction``."""
    return PROFILES[name].link(direction).values()
