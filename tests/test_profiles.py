"""Named link profiles: per direction, documented with a source, overridable keyword by
keyword, on real traffic and from the command line."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import pytest

from pytest_tunpair import Packet, TunPair
from pytest_tunpair._link.impair import ImpairmentSpec
from pytest_tunpair._link.profiles import PROFILES

from .test_cli import tunnels, tunpair

__all__ = ["tunnels"]  # the fixture, imported for the command-line test

DOCS = Path(__file__).resolve().parent.parent / "docs"
REQUIRED = {"3g", "lte", "5g", "satellite", "dsl", "cable", "wifi", "wifi-congested"}


def test_the_profiles_the_contract_names_exist() -> None:
    assert REQUIRED | {"intercontinental"} <= set(PROFILES)


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_each_profile_is_a_valid_spec_per_direction(name: str) -> None:
    up = ImpairmentSpec.from_kwargs(profile=name, towards="a->b")
    down = ImpairmentSpec.from_kwargs(profile=name, towards="b->a")
    for spec in (up, down):
        assert spec.profile == name and spec.rate and spec.delay > 0
        # The bound holds every packet in flight over the delay, and a buffer on top.
        assert spec.limit * 1500 * 8 >= spec.rate * (spec.delay + spec.jitter)
    # Access links are asymmetric the way the sources say: the downlink is never slower.
    assert down.rate >= up.rate  # type: ignore[operator]


def test_each_profile_is_documented_with_its_source() -> None:
    page = (DOCS / "profiles.md").read_text()
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `([a-z0-9-]+)` \|.*$", page, re.M)}
    assert set(rows) == set(PROFILES), "one row per profile in docs/profiles.md"
    for name, row in rows.items():
        assert "](" in row or "ours" in row, f"{name}: no source in {row!r}"


def test_the_docs_table_is_generated_from_the_profiles() -> None:
    from pytest_tunpair._option_tables import rewrite

    page = (DOCS / "profiles.md").read_text()
    assert "<!-- profiles:start -->" in page
    assert rewrite(page) == page, (
        "run: python -m pytest_tunpair._option_tables docs/options.md docs/profiles.md"
    )


def test_a_keyword_overrides_the_profiles_value() -> None:
    plain = ImpairmentSpec.from_kwargs(profile="wifi-congested")
    over = ImpairmentSpec.from_kwargs(profile="wifi-congested", loss=0, delay="2ms")
    assert plain.loss == 0.01 and over.loss == 0.0
    assert over.delay == 0.002 and over.rate == plain.rate and over.jitter == plain.jitter
    assert over.describe().startswith("profile=wifi-congested ")


def _send(
    pair: TunPair, src: str, dst: str, count: int, size: int, gap: float = 0.0
) -> tuple[int, list[Packet]]:
    """``count`` datagrams ``gap`` s apart; once the relay recorded all of them (whatever it
    did: jitter reorders), returns the port and the sojourn of each delivered one."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind((dst, 0))
    port = rx.getsockname()[1]
    with rx, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        tx.bind((src, 0))
        for i in range(count):
            tx.sendto(i.to_bytes(4, "big") * (size // 4), rx.getsockname())
            if gap:
                time.sleep(gap)  # pacing the sender, not waiting for a result
        deadline = time.monotonic() + 5
        while len(pair.packets.filter(dport=port)) < count:
            last = pair.packets.last_seq
            pair.packets.wait_for(
                lambda p, last=last: p.seq > last, timeout=deadline - time.monotonic()
            )
    got = [p for p in pair.packets.filter(dport=port) if p.action != "lost"]
    return port, got


def test_profile_and_override_on_real_traffic(tun_pair: TunPair) -> None:
    """satellite's uplink rate (3 Mbit/s) paces the datagrams; its 300 ms delay is
    replaced by the 5 ms given, in both directions."""
    tun_pair.impair(profile="satellite", delay="5ms")
    _port, up = _send(tun_pair, tun_pair.a.ip, tun_pair.b.ip, 10, 1000)
    wire = 1028 * 8 / 3e6  # one datagram on the 3 Mbit/s uplink, 2.7 ms
    assert len(up) == 10
    assert 0.005 <= min(p.sojourn for p in up) < 0.2  # the delay given, not the 0.3 s
    # At 3 Mbit/s the last leaves no sooner than ten times on the wire (and the delay)
    # after the first arrived: a packet is never written early.
    assert up[-1].time - up[0].arrival >= 10 * wire + 0.005 - 1e-4
    _port, back = _send(tun_pair, tun_pair.b.ip, tun_pair.a.ip, 1, 100)
    assert 0.005 <= back[0].sojourn < 0.2


def test_loss_override_on_real_traffic(tun_pair: TunPair) -> None:
    """wifi-congested loses 1 %; with loss=0 beside it, nothing is lost, and the rest of
    the profile (its 20 +- 15 ms delay) still applies."""
    tun_pair.impair(profile="wifi-congested", seed=11, direction="a->b")
    _port, kept = _send(tun_pair, tun_pair.a.ip, tun_pair.b.ip, 300, 100)
    assert len(kept) < 300, "seed 11 loses some of 300 at 1 %: the profile's loss is on"
    tun_pair.impair(profile="wifi-congested", loss=0, seed=11, direction="a->b")
    # 1 ms apart, so that they do not queue behind each other (each is 65 us on the wire).
    _port, kept = _send(tun_pair, tun_pair.a.ip, tun_pair.b.ip, 300, 100, gap=0.001)
    assert len(kept) == 300
    sojourns = sorted(p.sojourn for p in kept)
    assert sojourns[0] >= 0.005 - 1e-4  # 20 ms +- 15 ms: never below 5 ms
    assert 0.015 <= sojourns[150] <= 0.030  # the median near 20 ms


def test_profile_on_the_command_line(tunnels: None) -> None:
    r = tunpair("run", "--profile", "lte", "--loss", "0", "--seed", "1", "--", "true")
    assert r.returncode == 0, r.stderr
    assert "impair a->b: profile=lte delay=35ms rate=12mbit" in r.stderr
    bad = tunpair("run", "--profile", "4g", "--", "true")
    assert bad.returncode == 2
    assert "argument --profile: bad value '4g': use one of 3g, lte, 5g" in bad.stderr
