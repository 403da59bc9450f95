"""Unit tests of the scenario rules (pure: packets made up with scapy, no devices)."""

from __future__ import annotations

import math
import time

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6PacketTooBig, IPv6
from scapy.layers.l2 import Ether

from pytest_tunpair import OptionError, Packet
from pytest_tunpair._link.rules import (
    Fault,
    Outage,
    PathMtu,
    check_fail,
    check_mtu,
    field_predicate,
)

A4, B4 = "198.18.0.1", "198.18.0.2"


def pkt(layer: object, mode: str = "tun") -> Packet:
    return Packet(0.0, "a->b", "forwarded", bytes(layer), 0, mode)  # type: ignore[call-overload]


def test_field_predicate_values_and_predicates() -> None:
    match = field_predicate({"flags": "S", "dport": lambda p: p > 1000}, "fail")
    assert match is not None
    assert match(pkt(IP(src=A4, dst=B4) / TCP(dport=8080, flags="S")))
    assert not match(pkt(IP(src=A4, dst=B4) / TCP(dport=8080, flags="SA")))
    assert not match(pkt(IP(src=A4, dst=B4) / TCP(dport=80, flags="S")))
    assert not match(pkt(IP(src=A4, dst=B4) / UDP(dport=8080)))  # no flags: None fails
    by_address = field_predicate({"dst": "2001:2:0::2"}, "fail")  # compared normalised
    assert by_address is not None
    assert by_address(pkt(IPv6(src="2001:2::1", dst="2001:2::2")))
    with pytest.raises(ValueError, match=r"fail\(dst='nowhere'\): not an IP address"):
        field_predicate({"dst": "nowhere"}, "fail")
    tap = field_predicate({"flags": "AS"}, "fail")  # any order, as scapy writes "SA"
    assert tap is not None and tap(pkt(Ether() / IP(src=A4, dst=B4) / TCP(flags="SA"), "tap"))
    assert field_predicate({}, "fail") is None
    with pytest.raises(TypeError, match=r"dportt.*sport, dport, flags"):
        field_predicate({"dportt": 1}, "fail")


def test_fault_acts_times_then_passes() -> None:
    removed: list[Fault] = []
    fault = Fault(
        None, None, times=2, how="reset", direction="a->b", what="x", on_remove=removed.append
    )
    syn = pkt(IP(src=A4, dst=B4) / TCP(sport=5, dport=6, flags="S", seq=100))
    first = fault.apply(syn, 0.0)
    assert first is not None and first.action == "reset"
    [rst] = first.replies
    assert IP(rst)[TCP].flags == "RA" and IP(rst)[TCP].ack == 101
    assert fault.apply(syn, 0.0) is not None
    assert fault.apply(syn, 0.0) is None
    assert (fault.hits, fault.spent, fault.active) == (2, True, False)
    fault.remove()
    fault.remove()
    assert removed == [fault]


def test_fault_without_a_possible_reply_drops() -> None:
    fault = Fault(None, None, times=None, how="reset", direction="a->b", what="x", on_remove=print)
    verdict = fault.apply(pkt(IP(src=A4, dst=B4) / UDP()), 0.0)
    assert verdict is not None and (verdict.action, tuple(verdict.replies)) == ("dropped", ())
    unreachable = Fault(
        lambda p: p.wire_len > 30, None, times=None, how="unreachable", direction="a->b",
        what="x", on_remove=print,
    )  # fmt: skip
    v = unreachable.apply(pkt(IP(src=A4, dst=B4) / UDP() / b"payload"), 0.0)
    assert v is not None and v.action == "unreachable"
    assert (IP(v.replies[0])[ICMP].type, IP(v.replies[0])[ICMP].code) == (3, 3)
    assert unreachable.apply(pkt(IP(src=A4, dst=B4)), 0.0) is None  # the predicate said no


def test_outage_window_and_end() -> None:
    t0 = time.monotonic()
    ended: list[Outage] = []
    outage = Outage(10.0, 12.0, ("a->b",), t0, ended.append)
    p = pkt(IP())
    assert outage.apply(p, t0 + 9.999) is None
    v = outage.apply(p, t0 + 10.0)
    assert v is not None and v.action == "lost"
    assert outage.apply(p, t0 + 12.0) is None
    assert outage.dropped == 1
    outage.end()  # before it began: the window is empty
    assert outage.end_time < outage.start
    assert outage.apply(p, t0 + 11.0) is None
    assert ended == [outage] and not outage.active
    forever = Outage(0.0, math.inf, ("a->b", "b->a"), t0, ended.append)
    assert "until ended" in forever.describe()
    with forever:
        assert forever.active
    assert not forever.active and forever.end_time < math.inf


def test_path_mtu_verdicts() -> None:
    rule = PathMtu(1280, icmp=True, directions=("a->b",))
    assert rule.apply(pkt(IP(src=A4, dst=B4, flags="DF") / (b"x" * 1000)), 0.0) is None
    big6 = rule.apply(pkt(IPv6(src="2001:2::1", dst="2001:2::2") / (b"x" * 1400)), 0.0)
    assert big6 is not None and big6.action == "too-big"
    assert IPv6(big6.replies[0])[ICMPv6PacketTooBig].mtu == 1280
    frag = rule.apply(pkt(IP(src=A4, dst=B4) / UDP() / (b"x" * 2000)), 0.0)
    assert frag is not None and frag.action == "fragmented" and not frag.replies
    assert [len(f) <= 1280 for f in frag.forward] == [True, True]
    hole = PathMtu(1280, icmp=False, directions=("a->b",))
    v = hole.apply(pkt(IP(src=A4, dst=B4, flags="DF") / (b"x" * 1400)), 0.0)
    assert v is not None and v.action == "too-big" and not v.replies
    assert "(ICMP back to the sender; 1 too big, 1 fragmented)" in rule.describe()


def test_tap_path_mtu_counts_the_ip_packet() -> None:
    rule = PathMtu(1280, icmp=True, directions=("a->b",))
    frame = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(flags="DF")
    assert rule.apply(pkt(frame / (b"x" * 1260), "tap"), 0.0) is None  # 1280 bytes of IP
    v = rule.apply(pkt(frame / (b"x" * 1261), "tap"), 0.0)
    assert v is not None and Ether(v.replies[0]).dst == "02:00:00:00:00:01"


def test_argument_checks() -> None:
    assert check_fail(None, "drop") == (None, "drop")
    with pytest.raises(OptionError, match=r"fail\(\): bad value for how='boom'"):
        check_fail(1, "boom")
    with pytest.raises(OptionError, match="times=0"):
        check_fail(0, "drop")
    assert check_mtu(1280, False) == (1280, False)
    with pytest.raises(OptionError, match="mtu=67"):
        check_mtu(67, True)
    with pytest.raises(OptionError, match="icmp=1"):
        check_mtu(1280, 1)
