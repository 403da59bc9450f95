"""The NAT's pure parts: the mapping table (RFC 4787 behaviours, ports, timeouts, rebinds)
and the rewriting (checksums against scapy's). No kernel, no threads."""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, UDPerror

from pytest_tunpair import OptionError, Packet, TunPairError
from pytest_tunpair._link.nat import Nat, NatTable, check_nat
from pytest_tunpair._wire import headers as _h
from pytest_tunpair._wire import rewrite as _rw

A, PUB, R1, R2 = "10.0.0.1", "198.18.1.1", "198.18.0.2", "198.18.0.102"


def table(
    mapping: str = "endpoint-independent", filtering: str = "endpoint-independent", **kw: object
) -> NatTable:
    args = {
        "public": [PUB],
        "port_range": (1024, 65535),
        "timeout": 120.0,
        "tcp_timeout": 7440.0,
        **kw,
    }
    return NatTable(mapping=mapping, filtering=filtering, **args)  # type: ignore[arg-type]


def outside(t: NatTable, local: int, remote: tuple[str, int], now: float = 0.0) -> tuple[str, int]:
    m = t.outbound("udp", (A, local), remote, now)
    assert m is not None
    return m.outside


@pytest.mark.parametrize(
    ("mapping", "same_addr_other_port", "other_addr"),
    [
        ("endpoint-independent", True, True),
        ("address-dependent", True, False),
        ("address-and-port-dependent", False, False),
    ],
)
def test_mapping_behaviours(mapping: str, same_addr_other_port: bool, other_addr: bool) -> None:
    t = table(mapping)
    first = outside(t, 5000, (R1, 3478))
    assert first == (PUB, 5000)  # the port is preserved when free
    assert (outside(t, 5000, (R1, 3479)) == first) is same_addr_other_port
    assert (outside(t, 5000, (R2, 3478)) == first) is other_addr
    assert outside(t, 5001, (R1, 3478)) != first  # another inside port, another mapping


@pytest.mark.parametrize(
    ("filtering", "same_addr_other_port", "other_addr"),
    [
        ("endpoint-independent", True, True),
        ("address-dependent", True, False),
        ("address-and-port-dependent", False, False),
    ],
)
def test_filtering_behaviours(filtering: str, same_addr_other_port: bool, other_addr: bool) -> None:
    t = table(filtering=filtering)
    out = outside(t, 5000, (R1, 3478))
    assert t.inbound("udp", out, (R1, 3478), 1.0) is not None
    assert (t.inbound("udp", out, (R1, 3479), 1.0) is not None) is same_addr_other_port
    assert (t.inbound("udp", out, (R2, 3478), 1.0) is not None) is other_addr
    assert t.inbound("udp", (PUB, 6000), (R1, 3478), 1.0) is None  # no mapping there
    assert t.inbound("tcp", out, (R1, 3478), 1.0) is None  # per protocol


def test_port_range_and_exhaustion() -> None:
    t = table(port_range=(40000, 40001))
    assert outside(t, 5000, (R1, 1)) == (PUB, 40000)  # outside the range: allocated
    assert outside(t, 40001, (R1, 1)) == (PUB, 40001)  # inside and free: preserved
    assert t.outbound("udp", (A, 5002), (R1, 1), 0.0) is None  # used up
    assert t.outbound("tcp", (A, 5002), (R1, 1), 0.0) is not None  # TCP has its own


def test_timeouts_refreshed_by_outbound_only() -> None:
    t = table(timeout=10.0, tcp_timeout=100.0)
    out = outside(t, 5000, (R1, 1), now=0.0)
    assert t.inbound("udp", out, (R1, 1), 9.0) is not None
    assert t.inbound("udp", out, (R1, 1), 10.5) is None  # inbound did not refresh it
    t2 = table(timeout=10.0)
    outside(t2, 5000, (R1, 1), now=0.0)
    outside(t2, 5000, (R1, 1), now=8.0)  # refresh
    assert t2.inbound("udp", (PUB, 5000), (R1, 1), 17.0) is not None
    m = t.outbound("tcp", (A, 7000), (R1, 80), 0.0)
    assert m is not None and t.inbound("tcp", m.outside, (R1, 80), 50.0) is not None
    assert t.expire(200.0) and not t.mappings()


def test_rebind_changes_port_or_address() -> None:
    t = table(public=["198.18.1.1", "198.18.1.2"])
    first = outside(t, 5000, (R1, 1))
    t.rebind(port=True)
    second = outside(t, 5000, (R1, 1))
    assert second[0] == first[0] and second[1] != first[1]
    assert t.inbound("udp", first, (R1, 1), 0.0) is None  # the old mapping is gone
    t.rebind(port=False, address=True)
    third = outside(t, 5000, (R1, 1))
    assert third == ("198.18.1.2", second[1])
    t.rebind(port=True, address=True)
    fourth = outside(t, 5000, (R1, 1))
    assert fourth[0] == "198.18.1.1" and fourth[1] != third[1]


def test_check_nat_messages() -> None:
    with pytest.raises(OptionError, match=r"mapping.*use one of endpoint-independent"):
        check_nat("full-cone", "endpoint-independent", PUB, (1, 2), 1, 1, None)
    with pytest.raises(OptionError, match="IPv4 only"):
        check_nat("endpoint-independent", "endpoint-independent", "2001:2::9", (1, 2), 1, 1, None)
    with pytest.raises(OptionError, match="port_range"):
        check_nat("endpoint-independent", "endpoint-independent", PUB, (9, 2), 1, 1, None)
    with pytest.raises(OptionError, match="rebind_every"):
        check_nat("endpoint-independent", "endpoint-independent", PUB, (1, 2), 1, 1, 0)
    # The classic names point at RFC 4787's pair.
    with pytest.raises(OptionError, match=r"symmetric NAT is nat\(mapping='address-and-port"):
        check_nat("symmetric", "endpoint-independent", PUB, (1, 2), 1, 1, None)
    # rebind_address that could do nothing is refused, saying what would do something.
    with pytest.raises(OptionError, match=r"rebind_address.*give rebind_every"):
        check_nat("endpoint-independent", "endpoint-independent", PUB, (1, 2), 1, 1, None, True)
    with pytest.raises(OptionError, match=r"rebind_address.*one address.*give a pool"):
        check_nat("endpoint-independent", "endpoint-independent", PUB, (1, 2), 1, 1, 3, True)
    pool = check_nat(
        "endpoint-independent", "address-dependent", "198.18.1.0/30", (1, 2), "2s", 1, "3s"
    )
    assert pool["public"] == ["198.18.1.1", "198.18.1.2"] and pool["timeout"] == 2.0


# -- rewriting ------------------------------------------------------------------------------------
def _checked(raw: bytes) -> IP:
    """scapy's view with every checksum recomputed, to compare with what we wrote."""
    pkt = IP(raw)
    fresh = pkt.copy()
    del fresh.chksum
    for layer in (TCP, UDP, ICMP):
        if fresh.haslayer(layer):
            del fresh[layer].chksum
    return IP(bytes(fresh))


@pytest.mark.parametrize(
    "pkt",
    [
        IP(src=A, dst=R1) / TCP(sport=5000, dport=80, flags="S", seq=7) / b"hello",
        IP(src=A, dst=R1) / UDP(sport=5000, dport=53) / (b"q" * 33),
        IP(src=A, dst=R1) / ICMP(type=8, id=0x1234, seq=1) / b"ping",
    ],
    ids=["tcp", "udp", "icmp-echo"],
)
def test_translate_keeps_checksums_right(pkt: IP) -> None:
    raw = bytes(pkt)
    f = _h.parse(raw, 0, "tun")
    new = _rw.translate(raw, f, 0, bytes([198, 18, 1, 1]), 40000)
    got = IP(new)
    assert got.src == PUB
    if got.haslayer(ICMP):
        assert got[ICMP].id == 40000
    else:
        assert got.sport == 40000
    want = _checked(new)
    assert got.chksum == want.chksum
    layer = TCP if got.haslayer(TCP) else UDP if got.haslayer(UDP) else ICMP
    assert got[layer].chksum == want[layer].chksum
    back = _rw.translate(
        new,
        _h.parse(new, 0, "tun"),
        0,
        bytes([10, 0, 0, 1]),
        pkt.payload.sport if not pkt.haslayer(ICMP) else 0x1234,
    )
    assert back == raw  # and back again, bit for bit


def test_udp_without_checksum_stays_without() -> None:
    pkt = IP(src=A, dst=R1) / UDP(sport=5000, dport=53, chksum=0) / b"x"
    raw = bytes(pkt)
    new = _rw.translate(raw, _h.parse(raw, 0, "tun"), 0, bytes([198, 18, 1, 1]), 40000)
    assert IP(new)[UDP].chksum == 0


def test_icmp_error_inbound_translated_with_its_quote() -> None:
    # b answers the NATed datagram (PUB:40000 -> R1:53) with port unreachable.
    quote = bytes(IP(src=PUB, dst=R1) / UDP(sport=40000, dport=53) / (b"q" * 20))
    err = bytes(IP(src=R1, dst=PUB) / ICMP(type=3, code=3) / quote)
    f = _h.parse(err, 0, "tun")
    start = _rw.inner_start(err, f)
    assert start == 28
    new = _rw.translate_error(err, f, 1, bytes([10, 0, 0, 1]), start, bytes([10, 0, 0, 1]), 5000)
    got = IP(new)
    assert got.dst == A and got[IPerror].src == A and got[UDPerror].sport == 5000
    want = _checked(new)
    assert got.chksum == want.chksum and got[ICMP].chksum == want[ICMP].chksum
    inner = IP(bytes(got[IPerror]))
    assert inner.chksum == _checked(bytes(inner)).chksum
    assert inner[UDP].chksum == _checked(bytes(inner))[UDP].chksum


def test_nat_rule_records_both_tuples_and_filters() -> None:
    removed: list[Nat] = []
    nat = Nat(
        inside=(A,),
        mapping="endpoint-independent",
        filtering="address-and-port-dependent",
        public=[PUB],
        port_range=(1024, 65535),
        timeout=120.0,
        tcp_timeout=7440.0,
        rebind_every=None,
        rebind_address=False,
        start=0.0,
        on_remove=removed.append,
    )
    out = Packet(0.0, "a->b", "forwarded", bytes(IP(src=A, dst=R1) / UDP(sport=5000, dport=53)))
    verdict = nat.apply(out, 1.0)
    assert verdict is not None and verdict.action == "rewritten"
    assert IP(verdict.forward[0]).src == PUB
    (t,) = nat.translations
    assert t.before == ("udp", f"{A}:5000", f"{R1}:53") and t.after[1] == f"{PUB}:5000"
    reply = Packet(0.0, "b->a", "forwarded", bytes(IP(src=R1, dst=PUB) / UDP(sport=53, dport=5000)))
    verdict = nat.apply(reply, 1.1)
    assert verdict is not None and IP(verdict.forward[0]).dst == A
    stranger = Packet(
        0.0, "b->a", "forwarded", bytes(IP(src=R2, dst=PUB) / UDP(sport=53, dport=5000))
    )
    assert nat.apply(stranger, 1.2) is not None and nat.apply(stranger, 1.2).action == "filtered"  # type: ignore[union-attr]
    direct = Packet(0.0, "b->a", "forwarded", bytes(IP(src=R1, dst=A) / UDP(sport=53, dport=5000)))
    assert nat.apply(direct, 1.3).action == "filtered"  # type: ignore[union-attr]
    v6 = Packet(0.0, "a->b", "forwarded", bytes.fromhex("60000000000011ff") + bytes(32))
    assert nat.apply(v6, 1.4) is None  # NAT44: IPv6 passes
    assert nat.filtered == 3 and nat.rewritten == 2
    nat.remove()
    nat.remove()
    assert removed == [nat]
    with pytest.raises(OptionError, match="pool"):
        nat.rebind(address=True)
    with pytest.raises(TunPairError, match="removed from the link"):
        nat.rebind()
