"""TAP mode: the same pair at layer 2 -- Ethernet frames, ARP and neighbour discovery."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from pytest_tunpair import Packet, TunPair
from pytest_tunpair._wire.validate import validate_frame

from .conftest import need, run_standalone, tcp_send, tcpdump_read

tap = pytest.mark.tunpair(mode="tap")

BROADCAST = "ff:ff:ff:ff:ff:ff"


def _ping(*args: str, count: int = 2) -> subprocess.CompletedProcess[str]:
    need("ping")
    return subprocess.run(
        ["ping", "-c", str(count), "-i", "0.2", "-W", "2", *args], capture_output=True, text=True
    )


def _sh(*args: str) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout


def _solicited_node(addr: str) -> str:
    """RFC 4291 2.7.1: ff02::1:ff00:0/104 plus the address's low 24 bits."""
    low = int(ipaddress.IPv6Address(addr)) & 0xFFFFFF
    return str(ipaddress.IPv6Address(int(ipaddress.IPv6Address("ff02::1:ff00:0")) | low))


def _wait_count(pair: TunPair, match: Any, n: int, *, timeout: float = 5.0) -> None:
    """Wait until ``n`` captured packets match.

    The relay records a packet before writing it, so once ping has its answers the capture
    holds them; the wait keeps these tests from depending on that order.
    """
    __tracebackhide__ = True
    seen = 0

    def enough(p: Packet) -> bool:
        nonlocal seen
        seen += bool(match(p))
        return seen >= n

    enough.__name__ = f"{n} x {getattr(match, '__name__', match)}"
    pair.packets.wait_for(enough, timeout=timeout)


def _echo_replies(p: Packet) -> bool:
    from scapy.layers.inet import ICMP
    from scapy.layers.inet6 import ICMPv6EchoReply

    if p.direction != "b->a":
        return False
    return bool(p.haslayer(ICMPv6EchoReply) or (p.haslayer(ICMP) and p.scapy[ICMP].type == 0))


def _rx_packets(dev: str) -> int:
    """What the kernel counted as received on ``dev``: every frame written into a TAP."""
    (info,) = json.loads(_sh("ip", "-s", "-j", "link", "show", "dev", dev))
    return int(info["stats64"]["rx"]["packets"])


# -- the pair ---------------------------------------------------------------------------------


@tap
def test_tap_defaults_names_macs_and_addresses(tun_pair: TunPair) -> None:
    a, b = tun_pair.a, tun_pair.b
    assert tun_pair.mode == a.mode == b.mode == "tap"
    assert (a.name, b.name) == ("tap0", "tap1")
    assert (a.ip, b.ip) == ("198.18.0.1", "198.18.0.2")
    assert (a.ip6, b.ip6) == ("2001:2::1", "2001:2::2")
    assert (a.mac, b.mac) == ("02:74:70:00:00:01", "02:74:70:00:00:02")
    for mac in (a.mac, b.mac):
        assert mac is not None
        first = int(mac.split(":")[0], 16)
        assert first & 0x02 and not first & 0x01  # locally administered, unicast
    # The kernel has them: Ethernet devices carrying exactly these addresses.
    links = {
        m.group(1): m.group(2)
        for m in re.finditer(r"^\d+: (\S+?):.*link/ether (\S+)", _sh("ip", "-o", "link"), re.M)
    }
    assert links == {"tap0": a.mac, "tap1": b.mac}
    assert a.index == socket.if_nametoindex("tap0") and b.index == socket.if_nametoindex("tap1")
    addrs = _sh("ip", "-o", "addr")
    assert "tap0    inet 198.18.0.1 peer 198.18.0.2/32" in addrs
    assert "tap1    inet6 2001:2::2/128" in addrs
    assert "tap0" in repr(a) and a.mac in repr(a)


@tap
def test_tap_routing_recipe_is_in_place(tun_pair: TunPair) -> None:
    for family in ("-4", "-6"):
        rules = _sh("ip", family, "rule")
        assert "iif tap0 lookup 13" in rules and "iif tap1 lookup 13" in rules
    t13 = _sh("ip", "route", "show", "table", "13")
    assert "local 198.18.0.1 dev tap0" in t13 and "local 198.18.0.2 dev tap1" in t13
    t13v6 = _sh("ip", "-6", "route", "show", "table", "13")
    assert "local 2001:2::1 dev tap0" in t13v6 and "local 2001:2::2 dev tap1" in t13v6
    local = _sh("ip", "route", "show", "table", "local") + _sh(
        "ip", "-6", "route", "show", "table", "local"
    )
    for addr in ("198.18.0.1 ", "198.18.0.2 ", "2001:2::1 ", "2001:2::2 "):
        assert addr not in local


# -- ARP and neighbour discovery --------------------------------------------------------------


@tap
def test_tap_ping_ipv4_resolves_with_arp_through_the_relay(tun_pair: TunPair) -> None:
    from scapy.layers.inet import ICMP
    from scapy.layers.l2 import ARP, Ether

    a, b = tun_pair.a, tun_pair.b
    r = _ping(b.ip or "")
    assert r.returncode == 0, r.stdout + r.stderr
    _wait_count(tun_pair, _echo_replies, 2)

    arps = tun_pair.packets.filter(ARP)
    assert [p.direction for p in arps] == ["a->b", "b->a"], tun_pair.packets.summary()
    request, reply = (p.scapy for p in arps)
    assert request[Ether].dst == BROADCAST and request[Ether].src == a.mac
    assert request[ARP].op == 1 and (request[ARP].psrc, request[ARP].pdst) == (a.ip, b.ip)
    assert request[ARP].hwsrc == a.mac
    assert reply[Ether].dst == a.mac and reply[Ether].src == b.mac
    assert reply[ARP].op == 2 and (reply[ARP].psrc, reply[ARP].hwsrc) == (b.ip, b.mac)

    echoes = tun_pair.packets.filter(ICMP)
    assert [p.direction for p in echoes] == ["a->b", "b->a"] * 2
    assert all(p.seq > arps[1].seq for p in echoes)  # resolution first, then the pings
    for p in echoes:
        src, dst = (a, b) if p.direction == "a->b" else (b, a)
        assert (p.scapy[Ether].src, p.scapy[Ether].dst) == (src.mac, dst.mac)
    assert all(p.action == "forwarded" for p in tun_pair.packets)


@tap
def test_tap_ping_ipv6_resolves_with_nd_from_the_global_address(tun_pair: TunPair) -> None:
    from scapy.layers.inet6 import (
        ICMPv6EchoReply,
        ICMPv6EchoRequest,
        ICMPv6ND_NA,
        ICMPv6ND_NS,
        ICMPv6NDOptDstLLAddr,
        ICMPv6NDOptSrcLLAddr,
        IPv6,
    )
    from scapy.layers.l2 import Ether

    a, b = tun_pair.a, tun_pair.b
    # The namespace gives devices no link-local address (addr_gen_mode=1, to keep the
    # capture quiet): neighbour discovery must work with the global addresses alone.
    for dev in (a.name, b.name):
        assert "scope link" not in _sh("ip", "-6", "addr", "show", "dev", dev)
    r = _ping("-6", b.ip6 or "")
    assert r.returncode == 0, r.stdout + r.stderr
    _wait_count(tun_pair, _echo_replies, 2)

    (ns,) = tun_pair.packets.filter(ICMPv6ND_NS)
    (na,) = tun_pair.packets.filter(ICMPv6ND_NA)
    assert ns.direction == "a->b" and na.direction == "b->a"
    s = ns.scapy
    assert s[IPv6].src == a.ip6 and s[IPv6].dst == _solicited_node(b.ip6 or "")
    assert s[Ether].dst == "33:33:ff:00:00:02" and s[Ether].src == a.mac
    assert s[ICMPv6ND_NS].tgt == b.ip6 and s[ICMPv6NDOptSrcLLAddr].lladdr == a.mac
    n = na.scapy
    assert (n[IPv6].src, n[IPv6].dst) == (b.ip6, a.ip6)
    assert (n[Ether].src, n[Ether].dst) == (b.mac, a.mac)
    assert n[ICMPv6ND_NA].tgt == b.ip6 and n[ICMPv6NDOptDstLLAddr].lladdr == b.mac

    requests = tun_pair.packets.filter(ICMPv6EchoRequest, direction="a->b")
    replies = tun_pair.packets.filter(ICMPv6EchoReply, direction="b->a")
    assert len(requests) == len(replies) == 2
    assert requests[0].seq > na.seq


@tap
def test_tap_unsolicited_traffic_is_only_mld_reports(tun_pair: TunPair) -> None:
    """What a TAP capture holds that the test did not cause: MLDv2 reports, nothing else.

    Each device joins its address's solicited-node group (neighbour discovery needs it)
    and the kernel announces that; without a link-local address it does so from ``::``.
    No router solicitations, no DAD.
    """
    from scapy.layers.inet6 import ICMPv6MLReport2, IPv6
    from scapy.layers.l2 import Ether

    def report_on(direction: str) -> Any:
        def match(p: Packet) -> bool:
            return p.direction == direction and p.haslayer(ICMPv6MLReport2)

        return match

    tun_pair.packets.wait_for(report_on("a->b"), timeout=5)
    tun_pair.packets.wait_for(report_on("b->a"), timeout=5)
    for p in tun_pair.packets:
        s = p.scapy
        assert s.haslayer(ICMPv6MLReport2), p.summary()
        side = tun_pair.a if p.direction == "a->b" else tun_pair.b
        assert (s[Ether].src, s[Ether].dst) == (side.mac, "33:33:00:00:00:16")
        assert (s[IPv6].src, s[IPv6].dst) == ("::", "ff02::16")
        groups = {r.dst for r in s[ICMPv6MLReport2].records}
        assert groups == {_solicited_node(side.ip6 or "")}


@pytest.mark.tunpair(mode="tap", ipv6=None)
def test_tap_without_ipv6_the_capture_is_arp_and_the_tests_traffic(tun_pair: TunPair) -> None:
    from scapy.layers.inet import ICMP
    from scapy.layers.l2 import ARP

    r = _ping(tun_pair.b.ip or "")
    assert r.returncode == 0, r.stdout + r.stderr
    _wait_count(tun_pair, _echo_replies, 2)
    kinds = ["arp" if p.haslayer(ARP) else "icmp" if p.haslayer(ICMP) else p.summary()
             for p in tun_pair.packets]  # fmt: skip
    assert kinds == ["arp", "arp", "icmp", "icmp", "icmp", "icmp"]


# -- real clients ---------------------------------------------------------------------------


@tap
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_tap_tcp_server_sees_a(tun_pair: TunPair, family: str) -> None:
    from scapy.layers.inet import TCP
    from scapy.layers.l2 import Ether

    fam = socket.AF_INET if family == "ipv4" else socket.AF_INET6
    a_addr = tun_pair.a.ip if family == "ipv4" else tun_pair.a.ip6
    b_addr = tun_pair.b.ip if family == "ipv4" else tun_pair.b.ip6
    seen: list[str] = []
    with socket.socket(fam, socket.SOCK_STREAM) as server:
        server.bind((b_addr, 0))
        server.listen(1)
        server.settimeout(10)

        def serve() -> None:
            conn, peer = server.accept()
            with conn:
                seen.append(peer[0])
                conn.sendall(conn.recv(100).upper())

        t = threading.Thread(target=serve)
        t.start()
        with socket.create_connection(server.getsockname()[:2], timeout=10) as client:
            client.sendall(b"hello tap")
            assert client.recv(100) == b"HELLO TAP"
        t.join(10)
    assert seen == [a_addr]
    syn = tun_pair.packets.filter(TCP, direction="a->b")[0].scapy
    assert syn[TCP].flags == "S" and syn[Ether].src == tun_pair.a.mac


@tap
def test_tap_pcap_is_ethernet_and_shows_arp_and_nd(tun_pair: TunPair, tmp_path: Any) -> None:
    need("tcpdump")
    assert _ping(tun_pair.b.ip or "", count=1).returncode == 0
    assert _ping("-6", tun_pair.b.ip6 or "", count=1).returncode == 0
    _wait_count(tun_pair, _echo_replies, 2)
    path = tun_pair.packets.to_pcap(tmp_path / "tap.pcap")
    r = tcpdump_read(path, "-e")
    assert r.returncode == 0, r.stderr
    assert "link-type EN10MB (Ethernet)" in r.stderr
    out = r.stdout
    assert "02:74:70:00:00:01 > ff:ff:ff:ff:ff:ff, ethertype ARP" in out
    assert "Request who-has 198.18.0.2 tell 198.18.0.1" in out
    assert "Reply 198.18.0.2 is-at 02:74:70:00:00:02" in out
    assert "2001:2::1 > ff02::1:ff00:2: ICMP6, neighbor solicitation, who has 2001:2::2" in out
    assert "2001:2::2 > 2001:2::1: ICMP6, neighbor advertisement, tgt is 2001:2::2" in out
    assert "198.18.0.2 > 198.18.0.1: ICMP echo reply" in out


# -- inject -------------------------------------------------------------------------------------


@pytest.mark.tunpair(mode="tap", ipv6=None)  # a quiet wire: only what the injection causes
def test_tap_injected_echo_request_is_answered_by_the_kernel(tun_pair: TunPair) -> None:
    from scapy.layers.inet import ICMP, IP
    from scapy.layers.l2 import ARP, Ether

    a, b = tun_pair.a, tun_pair.b
    frame = Ether(src=a.mac, dst=b.mac) / IP(src=a.ip, dst=b.ip) / ICMP(id=0x7470, seq=1)
    injected = b.inject(frame / b"through tap1")
    assert (injected.action, injected.direction) == ("injected", "a->b")
    assert injected.scapy[Ether].dst == b.mac

    def is_reply(p: Packet) -> bool:
        return p.direction == "b->a" and p.haslayer(ICMP) and p.scapy[ICMP].type == 0

    reply = tun_pair.packets.wait_for(is_reply, timeout=5).scapy
    assert (reply[IP].src, reply[IP].dst) == (b.ip, a.ip)
    assert (reply[ICMP].id, reply[ICMP].seq) == (0x7470, 1)
    assert bytes(reply[ICMP].payload) == b"through tap1"
    assert (reply[Ether].src, reply[Ether].dst) == (b.mac, a.mac)
    # To answer, b first resolved a's address: ARP b->a, answered by a's kernel. Both come
    # after the injected frame in the capture, which records in the order things happened.
    arp = tun_pair.packets.filter(ARP)
    assert [(p.direction, p.scapy[ARP].op) for p in arp] == [("b->a", 1), ("a->b", 2)]
    assert tun_pair.packets[0] is injected
    assert all(p.seq > injected.seq for p in tun_pair.packets if p is not injected)


@tap
def test_tap_injected_icmpv6_echo_is_answered_after_nd(tun_pair: TunPair) -> None:
    from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, ICMPv6ND_NS, IPv6
    from scapy.layers.l2 import Ether

    a, b = tun_pair.a, tun_pair.b
    b.inject(
        Ether(src=a.mac, dst=b.mac) / IPv6(src=a.ip6, dst=b.ip6) / ICMPv6EchoRequest(id=7, seq=3)
    )
    reply = tun_pair.packets.wait_for(lambda p: p.haslayer(ICMPv6EchoReply), timeout=5)
    assert reply.direction == "b->a"
    assert (reply.scapy[IPv6].src, reply.scapy[IPv6].dst) == (b.ip6, a.ip6)
    # b resolved a by ND from its own global address, the other way round this time.
    ns = tun_pair.packets.filter(ICMPv6ND_NS, direction="b->a")[0].scapy
    assert ns[IPv6].src == b.ip6 and ns[ICMPv6ND_NS].tgt == a.ip6


@tap
def test_tap_frame_to_another_mac_is_ignored_by_the_kernel(tun_pair: TunPair) -> None:
    """Like a real NIC, the device drops unicast frames for other MACs (PACKET_OTHERHOST)."""
    from scapy.layers.inet import ICMP, IP
    from scapy.layers.l2 import Ether

    a, b = tun_pair.a, tun_pair.b
    for seq, dst in ((1, "02:74:70:00:00:99"), (2, b.mac)):
        b.inject(Ether(src=a.mac, dst=dst) / IP(src=a.ip, dst=b.ip) / ICMP(id=9, seq=seq))

    def is_reply(p: Packet) -> bool:
        return p.direction == "b->a" and p.haslayer(ICMP) and p.scapy[ICMP].type == 0

    assert tun_pair.packets.wait_for(is_reply, timeout=5).scapy[ICMP].seq == 2
    assert [p.scapy[ICMP].seq for p in tun_pair.packets if is_reply(p)] == [2]


@pytest.mark.tunpair(mode="tap", ipv6=None)  # no MLD reports: nothing else reaches b
def test_tap_bad_injections_change_nothing(tun_pair: TunPair) -> None:
    from scapy.layers.inet import ICMP, IP
    from scapy.layers.l2 import Ether

    a, b = tun_pair.a, tun_pair.b
    assert _ping(b.ip or "", count=1).returncode == 0
    _wait_count(tun_pair, _echo_replies, 1)
    captured, rx = len(tun_pair.packets), _rx_packets(b.name)
    header = Ether(src=a.mac, dst=b.mac) / IP(src=a.ip, dst=b.ip) / ICMP(id=5, seq=1)
    with pytest.raises(ValueError, match="shorter than an Ethernet header"):
        b.inject(bytes(header)[:13])
    too_big = header / (b"x" * (1500 - 28 + 1))  # IP packet of 1501 bytes
    with pytest.raises(ValueError, match="1501-byte payload is larger than the MTU"):
        b.inject(too_big)
    with pytest.raises(TypeError, match="bytes or a scapy packet"):
        b.inject("not a frame")
    assert len(tun_pair.packets) == captured
    assert _rx_packets(b.name) == rx  # the kernel received nothing

    # The MTU counts the payload, not the Ethernet header: a full 1514-byte frame is fine,
    # and the kernel answers it.
    full = header / (b"y" * (1500 - 28))
    assert len(full) == 1514
    b.inject(full)
    reply = tun_pair.packets.wait_for(
        lambda p: p.direction == "b->a" and p.haslayer(ICMP) and p.scapy[ICMP].id == 5,
        timeout=5,
    )
    assert len(reply.data) == 1514
    # The relay still carries traffic.
    assert _ping(b.ip or "", count=1).returncode == 0


def test_validate_frame_counts_the_payload_after_vlan_tags() -> None:
    dot1q = bytes(12) + b"\x81\x00\x00\x05" + b"\x08\x00"
    validate_frame(dot1q + bytes(1500), mode="tap", mtu=1500)
    with pytest.raises(ValueError, match="1501-byte payload"):
        validate_frame(dot1q + bytes(1501), mode="tap", mtu=1500)
    validate_frame(bytes(14), mode="tap", mtu=1500)  # a bare header is a frame
    with pytest.raises(ValueError, match="0 bytes is shorter"):
        validate_frame(b"", mode="tap", mtu=1500)


# -- VLAN tags: the relay reads past them ------------------------------------------------------------

# include/uapi/linux/if_ether.h, include/linux/socket.h, include/uapi/linux/if_packet.h
ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_AUXDATA = 8
PACKET_OUTGOING = 4
TP_STATUS_VLAN_VALID = 1 << 4
# struct tpacket_auxdata: tp_status, tp_len, tp_snaplen, tp_mac, tp_net, tp_vlan_tci, tp_vlan_tpid
TPACKET_AUXDATA = struct.Struct("=IIIHHHH")


class DeviceSocket:
    """A packet socket on one of the pair's devices, in the pair's namespace.

    What a VLAN device would send is sent here, out of the TAP device, so the relay reads
    it as the kernel's own; what the kernel receives on the device is seen here too, with
    the VLAN tag it took off into the packet's metadata (docs/internals.md, "VLAN tags on
    a TAP device without VLAN devices").
    """

    def __init__(self, device: str) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind((device, 0))
        self.sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)

    def send(self, frame: Any) -> None:
        self.sock.send(bytes(frame))

    def received(
        self, match: Callable[[Any], bool], timeout: float = 5.0
    ) -> tuple[Any, int | None]:
        """The first frame the kernel received that ``match`` (given the scapy decode)
        accepts, with the VLAN ID it was tagged with (``None``: untagged)."""
        from scapy.layers.l2 import Ether

        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data, ancillary, _flags, addr = self.sock.recvmsg(
                    65535, socket.CMSG_SPACE(TPACKET_AUXDATA.size)
                )
            except TimeoutError:
                break
            if addr[2] == PACKET_OUTGOING:
                continue
            vlan = None
            for level, kind, cdata in ancillary:
                if level == SOL_PACKET and kind == PACKET_AUXDATA:
                    status, *_, tci, _tpid = TPACKET_AUXDATA.unpack_from(cdata)
                    if status & TP_STATUS_VLAN_VALID:
                        vlan = tci & 0x0FFF
            frame = Ether(data)
            if match(frame):
                return frame, vlan
        raise AssertionError(f"the kernel received no matching frame within {timeout} s")

    def __enter__(self) -> DeviceSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


@pytest.mark.tunpair(mode="tap", ipv6=None)
def test_a_vlan_tagged_syn_is_reset_on_its_vlan(tun_pair: TunPair) -> None:
    # In 0.2 fail(how="reset") answered a tagged SYN with nothing (dropped it silently).
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Dot1Q, Ether

    a, b = tun_pair.a, tun_pair.b
    fault = tun_pair.fail(how="reset", dport=4444, direction="a->b")
    syn = (
        Ether(src=a.mac, dst=b.mac)
        / Dot1Q(vlan=7)
        / IP(src=a.ip, dst=b.ip)
        / TCP(sport=1111, dport=4444, flags="S", seq=1000)
    )
    with DeviceSocket(a.name) as dev:
        dev.send(syn)
        reset, vlan = dev.received(lambda f: TCP in f and f[TCP].dport == 1111)
    # The kernel got the RST on VLAN 7, from b to a, acknowledging the SYN.
    assert vlan == 7
    assert (reset[Ether].src, reset[Ether].dst) == (b.mac, a.mac)
    assert (reset[IP].src, reset[IP].dst, reset[TCP].sport) == (b.ip, a.ip, 4444)
    assert (str(reset[TCP].flags), reset[TCP].ack) == ("RA", 1001)
    # The capture: the SYN answered ("reset"), the RST written back with the tag kept.
    [answered] = [p for p in tun_pair.packets if p.action == "reset"]
    assert (answered.direction, answered.dport, answered.flags) == ("a->b", 4444, "S")
    [written] = [p for p in tun_pair.packets if p.action == "injected"]
    assert written.direction == "b->a" and written.scapy[Dot1Q].vlan == 7
    assert (written.sport, written.dport, written.flags) == (4444, 1111, "RA")
    assert fault.hits == 1


@pytest.mark.tunpair(mode="tap", ipv6=None)
def test_path_mtu_measures_the_ip_packet_behind_the_vlan_tags(tun_pair: TunPair) -> None:
    # In 0.2 path_mtu() took any TAP frame's IP packet to start 14 bytes in.
    from scapy.layers.inet import ICMP, IP, UDP
    from scapy.layers.l2 import Dot1AD, Dot1Q, Ether

    a, b = tun_pair.a, tun_pair.b
    pmtu = tun_pair.path_mtu(1400, direction="a->b")

    def datagram(ip_len: int, *tags: Any, dport: int) -> Any:
        frame = Ether(src=a.mac, dst=b.mac)
        for tag in tags:
            frame = frame / tag
        ip = IP(src=a.ip, dst=b.ip, flags="DF") / UDP(sport=5000, dport=dport)
        return frame / ip / bytes(ip_len - 28)

    with DeviceSocket(a.name) as dev:
        dev.send(datagram(1400, Dot1Q(vlan=7), dport=1))  # fits: 1418 bytes on the wire
        dev.send(datagram(1400, Dot1AD(vlan=3), Dot1Q(vlan=7), dport=2))  # QinQ: 1422
        dev.send(datagram(1401, Dot1Q(vlan=7), dport=3))  # one byte too many
        error, vlan = dev.received(lambda f: ICMP in f and f[ICMP].type == 3)
    # The sender got "fragmentation needed, next hop MTU 1400" on its VLAN.
    assert vlan == 7 and (error[ICMP].code, error[ICMP].nexthopmtu) == (4, 1400)
    _wait_count(tun_pair, lambda p: p.action == "forwarded" and p.direction == "a->b", 2)
    by_port = {p.dport: p for p in tun_pair.packets if p.direction == "a->b"}
    assert (by_port[1].action, by_port[1].wire_len) == ("forwarded", 1418)
    assert (by_port[2].action, by_port[2].wire_len) == ("forwarded", 1422)
    assert by_port[3].action == "too-big"
    [written] = [p for p in tun_pair.packets if p.action == "injected"]
    assert written.direction == "b->a" and written.scapy[Dot1Q].vlan == 7
    assert pmtu is not None and (pmtu.too_big, pmtu.fragmented) == (1, 0)


# -- hooks ----------------------------------------------------------------------------------------


@tap
def test_tap_drop_hook_blocks_ping_and_removing_it_restores_it(tun_pair: TunPair) -> None:
    from scapy.layers.inet import ICMP
    from scapy.layers.l2 import ARP

    def drop_echo(p: Packet) -> list[bytes] | None:
        return [] if p.haslayer(ICMP) else None

    hook = tun_pair.add_hook(drop_echo, direction="a->b")
    assert _ping("-W", "1", tun_pair.b.ip or "", count=1).returncode != 0
    echo = tun_pair.packets.filter(ICMP)
    assert [(p.direction, p.action) for p in echo] == [("a->b", "dropped")]
    # The hook saw Ethernet frames and let ARP through.
    assert [p.action for p in tun_pair.packets.filter(ARP)] == ["forwarded", "forwarded"]

    tun_pair.remove_hook(hook)
    tun_pair.packets.clear()
    assert _ping(tun_pair.b.ip or "", count=1).returncode == 0
    _wait_count(tun_pair, _echo_replies, 1)
    assert [p.direction for p in tun_pair.packets.filter(ICMP)] == ["a->b", "b->a"]


@tap
def test_tap_modify_hook_rewrites_a_udp_payload(tun_pair: TunPair) -> None:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    def shout(p: Packet) -> Any:
        if not p.haslayer(UDP):
            return None
        frame = p.scapy.copy()
        frame[UDP].remove_payload()
        frame = frame / bytes(p.scapy[UDP].payload).upper()
        del frame[IP].len, frame[IP].chksum, frame[UDP].len, frame[UDP].chksum
        return frame  # a scapy Ether frame

    tun_pair.add_hook(shout, direction="a->b")
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client,
    ):
        server.bind((tun_pair.b.ip, 0))
        server.settimeout(5)
        client.sendto(b"quiet please", server.getsockname())
        data, peer = server.recvfrom(100)
    assert (data, peer[0]) == (b"QUIET PLEASE", tun_pair.a.ip)
    modified = tun_pair.packets.wait_for(lambda p: p.action == "modified", timeout=5)
    assert modified.scapy[Ether].dst == tun_pair.b.mac


# -- offload ---------------------------------------------------------------------------------


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "no-offload"])
def test_tap_one_mib_tcp_transfer_arrives_intact(tun_pair_factory: Any, offload: bool) -> None:
    from scapy.layers.inet import TCP

    pair: TunPair = tun_pair_factory(mode="tap", offload=offload)
    payload = os.urandom(1 << 20)
    received = tcp_send(pair.b.ip, payload, timeout=10)
    assert bytes(received) == payload
    # b's FIN follows everything a sent, and the relay records in order.
    pair.packets.wait_for(
        lambda p: p.direction == "b->a" and p.haslayer(TCP) and "F" in p.scapy[TCP].flags,
        timeout=5,
    )
    a_to_b = [p for p in pair.packets if p.direction == "a->b"]
    assert sum(len(p.data) for p in a_to_b) > len(payload)
    if offload:
        # TSO reached the TAP: super-frames far above MTU + Ethernet header crossed whole.
        supers = [p for p in a_to_b if p.gso is not None and p.gso.is_super_packet]
        assert supers and max(len(p.data) for p in supers) > 1514
        assert supers[0].gso is not None and supers[0].gso.type == "tcpv4"
    else:
        assert all(p.gso is None and len(p.data) <= 1514 for p in pair.packets)


# -- more pairs ----------------------------------------------------------------------------------


def test_factory_makes_tap_pairs(tun_pair_factory: Any) -> None:
    from scapy.layers.l2 import ARP

    first: TunPair = tun_pair_factory(mode="tap")
    second: TunPair = tun_pair_factory(mode="tap")
    assert (first.a.name, first.b.name, second.a.name, second.b.name) == (
        "tap0",
        "tap1",
        "tap2",
        "tap3",
    )
    assert (second.a.ip, second.b.ip) == ("198.18.0.3", "198.18.0.4")
    assert (second.a.mac, second.b.mac) == ("02:74:70:00:01:01", "02:74:70:00:01:02")
    for pair in (first, second):
        assert _ping(pair.b.ip or "", count=1).returncode == 0
        assert _ping("-6", pair.b.ip6 or "", count=1).returncode == 0
        request = pair.packets.filter(ARP)[0].scapy[ARP]
        assert (request.hwsrc, request.pdst) == (pair.a.mac, pair.b.ip)


def test_tun_and_tap_pairs_side_by_side(tun_pair: TunPair, tun_pair_factory: Any) -> None:
    from scapy.layers.l2 import ARP

    l2: TunPair = tun_pair_factory(mode="tap")
    assert tun_pair.mode == "tun" and tun_pair.a.mac is None
    assert (l2.a.name, l2.b.name) == ("tap2", "tap3")
    assert l2.a.mac == "02:74:70:00:01:01"
    assert _ping(tun_pair.b.ip or "", count=1).returncode == 0
    assert _ping(l2.b.ip or "", count=1).returncode == 0
    assert not any(p.data[:1] == b"\xff" for p in tun_pair.packets)  # TUN: raw IP, no Ethernet
    assert len(l2.packets.filter(ARP)) == 2


def test_standalone_tap_pair() -> None:
    def body() -> None:
        with TunPair(mode="tap", ipv6=None) as pair:
            assert pair.a.mac == "02:74:70:00:00:01"
            assert _ping(pair.b.ip or "", count=1).returncode == 0
            assert pair.packets[0].scapy.summary().startswith("Ether / ARP who has 198.18.0.2")

    run_standalone(body)
