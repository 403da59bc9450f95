"""The programmable wire: inject packets, hook (drop, rewrite) them, impair the link.

Run: pytest --tunpair examples/
"""

import shutil
import socket
import subprocess

import pytest
from scapy.layers.inet import ICMP, IP, UDP


def ping(ip, *args):
    if shutil.which("ping") is None:
        pytest.skip("ping is not installed")
    return subprocess.run(["ping", "-c", "1", "-W", "1", *args, ip], capture_output=True)


# --8<-- [start:inject]
def test_inject_as_if_from_a(tun_pair):
    # Written into b: the kernel receives it on tun1 as if it had crossed the tunnel.
    tun_pair.b.inject(IP(src=tun_pair.a.ip, dst=tun_pair.b.ip) / ICMP())
    reply = tun_pair.packets.wait_for(lambda p: p.direction == "b->a" and p.haslayer(ICMP))
    assert reply.scapy[ICMP].type == 0  # echo-reply, back through the relay


# --8<-- [end:inject]


# --8<-- [start:hooks]
def drop_icmp(packet):  # a Packet: .data, .scapy, .direction, .haslayer()
    return [] if packet.haslayer(ICMP) else None  # [] drops it, None passes it on


def test_a_hook_drops_icmp(tun_pair):
    handle = tun_pair.add_hook(drop_icmp, direction="a->b")  # or "b->a", None for both
    assert ping(tun_pair.b.ip).returncode != 0  # the echo request never arrives
    assert [p.action for p in tun_pair.packets.filter(ICMP)] == ["dropped"]
    tun_pair.remove_hook(handle)
    assert ping(tun_pair.b.ip).returncode == 0


# --8<-- [end:hooks]


# --8<-- [start:rewrite]
def test_a_hook_rewrites_a_datagram(tun_pair):
    def shout(packet):
        if not packet.haslayer(UDP):
            return None
        pkt = packet.scapy.copy()
        pkt[UDP].payload = type(pkt[UDP].payload)(bytes(pkt[UDP].payload).upper())
        del pkt[IP].len, pkt[IP].chksum, pkt[UDP].len, pkt[UDP].chksum  # scapy recomputes
        return pkt

    tun_pair.add_hook(shout)
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx,
    ):
        rx.bind((tun_pair.b.ip, 0))
        rx.settimeout(5)
        tx.sendto(b"hello", rx.getsockname())
        assert rx.recv(100) == b"HELLO"
    assert tun_pair.packets.filter(UDP)[0].action == "modified"


# --8<-- [end:rewrite]


# --8<-- [start:impair]
def test_impaired_link(tun_pair):
    tun_pair.impair(delay="30ms", direction="a->b")  # one direction; "b->a" stays fast
    slow = ping(tun_pair.b.ip)
    assert slow.returncode == 0 and "time=" in slow.stdout.decode()
    request = tun_pair.packets.filter(ICMP, direction="a->b")[0]
    assert request.action == "delayed"

    tun_pair.impair(loss=1.0, seed=1234)  # both directions; everything is lost
    assert ping(tun_pair.b.ip).returncode != 0
    tun_pair.impair()  # all off
    assert ping(tun_pair.b.ip).returncode == 0


# --8<-- [end:impair]
