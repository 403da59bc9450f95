"""TAP mode: the same tunnel at layer 2 -- Ethernet frames, ARP and neighbour discovery.

Run: pytest --tunpair examples/
"""

import shutil
import socket
import subprocess
import threading

import pytest
from scapy.layers.inet import ICMP, TCP
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6ND_NA, ICMPv6ND_NS
from scapy.layers.l2 import ARP, Ether

# Every test in this module gets a TAP pair: tap0/tap1 with stable MACs, same addresses.
pytestmark = pytest.mark.tunpair(mode="tap")


def ping(*args):
    if shutil.which("ping") is None:
        pytest.skip("ping is not installed")
    subprocess.run(["ping", "-c", "1", "-W", "2", *args], check=True, capture_output=True)


# --8<-- [start:arp]
def test_ping_resolves_b_with_arp_first(tun_pair):
    ping(tun_pair.b.ip)
    # The relay records a frame as it delivers it: wait for the reply rather than assume.
    tun_pair.packets.wait_for(lambda p: p.direction == "b->a" and p.haslayer(ICMP))

    request, reply = (p.scapy[ARP] for p in tun_pair.packets.filter(ARP))
    assert (request.psrc, request.pdst) == (tun_pair.a.ip, tun_pair.b.ip)  # who has b?
    assert (reply.psrc, reply.hwsrc) == (tun_pair.b.ip, tun_pair.b.mac)  # b is at b.mac
    echo = tun_pair.packets.filter(ICMP)[0].scapy
    assert (echo[Ether].src, echo[Ether].dst) == (tun_pair.a.mac, tun_pair.b.mac)
    print(tun_pair.packets.summary())  # pytest -s shows the trace, tcpdump style
    # --8<-- [end:arp]


def test_ping6_resolves_b_with_neighbour_discovery(tun_pair):
    ping("-6", tun_pair.b.ip6)
    tun_pair.packets.wait_for(lambda p: p.haslayer(ICMPv6EchoReply))

    (ns,) = tun_pair.packets.filter(ICMPv6ND_NS)
    (na,) = tun_pair.packets.filter(ICMPv6ND_NA)
    assert ns.direction == "a->b" and ns.scapy[ICMPv6ND_NS].tgt == tun_pair.b.ip6
    assert na.direction == "b->a" and na.scapy[Ether].src == tun_pair.b.mac


def test_tcp_over_tap(tun_pair, tmp_path):
    with socket.create_server((tun_pair.b.ip, 0)) as server:
        clients = []

        def serve():
            conn, peer = server.accept()
            with conn:
                clients.append(peer[0])
                conn.sendall(conn.recv(100)[::-1])

        thread = threading.Thread(target=serve)
        thread.start()
        with socket.create_connection(server.getsockname(), timeout=5) as client:
            client.sendall(b"layer two")
            assert client.recv(100) == b"owt reyal"
        thread.join(5)

    assert clients == [tun_pair.a.ip]  # the server saw a's address
    syn = tun_pair.packets.filter(TCP)[0].scapy
    assert syn[TCP].flags == "S" and syn[Ether].dst == tun_pair.b.mac
    # An Ethernet pcap for Wireshark or `tcpdump -e -r`.
    tun_pair.packets.to_pcap(tmp_path / "tap.pcapng")
