"""Asserting on the wire: wait for a packet, filter by layer, save a pcap for tcpdump."""

import shutil
import socket
import subprocess

import pytest
from scapy.layers.inet import TCP


def test_handshake(tun_pair, tmp_path):
    with socket.create_server((tun_pair.b.ip, 0)) as server:
        socket.create_connection(server.getsockname()).close()
    syn_ack = tun_pair.packets.wait_for(
        lambda p: TCP in p.scapy and p.scapy[TCP].flags == "SA", timeout=2
    )
    assert syn_ack.direction == "b->a"
    assert len(tun_pair.packets.filter(TCP, direction="a->b")) >= 2

    pcap = tun_pair.packets.to_pcap(tmp_path / "handshake.pcap")
    if shutil.which("tcpdump") is None:
        pytest.skip("tcpdump is not installed")
    out = subprocess.run(["tcpdump", "-n", "-r", pcap], capture_output=True, text=True, check=True)
    assert "Flags [S.]" in out.stdout  # tcpdump's name for the SYN-ACK
