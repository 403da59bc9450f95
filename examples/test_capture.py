"""Asserting on the wire: wait for a packet, filter by layer, save a pcap for tcpdump."""

import os
import shutil
import socket
import subprocess

import pytest
from scapy.layers.inet import TCP

# The initial user namespace's inode (fixed by the kernel: PROC_USER_INIT_INO).
ROOT_USERNS = 0xEFFFFFFD


# --8<-- [start:handshake]
def test_handshake(tun_pair, tmp_path):
    with socket.create_server((tun_pair.b.ip, 0)) as server:
        socket.create_connection(server.getsockname()).close()
    syn_ack = tun_pair.packets.wait_for(
        lambda p: TCP in p.scapy and p.scapy[TCP].flags == "SA", timeout=2
    )
    assert syn_ack.direction == "b->a"
    # The client's FIN: the relay carries each direction in order, so SYN and ACK are in.
    tun_pair.packets.wait_for(lambda p: TCP in p.scapy and "F" in p.scapy[TCP].flags)
    assert len(tun_pair.packets.filter(TCP, direction="a->b")) >= 3

    pcap = tun_pair.packets.to_pcap(tmp_path / "handshake.pcapng")  # tcpdump, Wireshark
    # --8<-- [end:handshake]
    if shutil.which("tcpdump") is None:
        pytest.skip("tcpdump is not installed")
    if os.getuid() != 0 or os.stat("/proc/self/ns/user").st_ino == ROOT_USERNS:
        # Real root: tcpdump opens the file, then drops to its own user.
        cmd = ["tcpdump", "-n", "-r", pcap]
    else:
        # Root only inside a user namespace (rootless runs): tcpdump's privilege drop fails
        # there, so run it as an unprivileged uid of a nested user namespace.
        cmd = [
            "unshare",
            "--user",
            "--map-user=65534",
            "--map-group=65534",
            "tcpdump",
            "-n",
            "-r",
            pcap,
        ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "Flags [S.]" in out.stdout  # tcpdump's name for the SYN-ACK
