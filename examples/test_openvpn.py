"""A VPN between two hosts: OpenVPN over UDP with a static key, each end in a network
namespace of its own, the encrypted datagrams crossing the pair's relay (where they can be
captured, delayed or lost). This kernel has neither WireGuard nor ESP, so OpenVPN (a
userspace VPN on a TUN device of its own) is the VPN that runs here.

Run: pytest --tunpair examples/test_openvpn.py (needs the openvpn package)
"""

import shutil
import subprocess
import time

import pytest

pytestmark = pytest.mark.skipif(shutil.which("openvpn") is None, reason="openvpn is not installed")

VPN_A, VPN_B = "198.19.0.2", "198.19.0.1"  # inside the VPN: also a benchmarking range


def openvpn(key, *args):
    return [
        "openvpn", "--dev", "vpn0", "--dev-type", "tun", "--secret", str(key),
        "--cipher", "AES-256-CBC", "--auth", "SHA256", "--proto", "udp", "--port", "1194",
        "--ping", "1", "--verb", "3", *args,
    ]  # fmt: skip


def wait_for_line(pair, proc, text, timeout=30):
    deadline = time.monotonic() + timeout
    while text not in pair.output(proc):
        assert proc.poll() is None, pair.output(proc)
        assert time.monotonic() < deadline, pair.output(proc)
        time.sleep(0.05)


# --8<-- [start:openvpn]
@pytest.mark.tunpair(hosts=True, ipv6=None)
def test_ping_through_openvpn_between_two_hosts(tun_pair, tmp_path):
    key = tmp_path / "static.key"
    subprocess.run(["openvpn", "--genkey", "secret", str(key)], check=True)
    a, b = tun_pair.a, tun_pair.b
    b.spawn(
        openvpn(key, "--local", b.ip, "--ifconfig", VPN_B, VPN_A),
        ready=("udp", 1194),  # its socket is bound in host b
    )
    client = a.spawn(openvpn(key, "--remote", b.ip, "--ifconfig", VPN_A, VPN_B))
    wait_for_line(a, client, "Initialization Sequence Completed")

    mark = tun_pair.packets.mark()
    tun_pair.impair(delay="20ms")  # the underlay is slow: the VPN is too
    r = subprocess.run(
        ["ping", "-c", "3", "-i", "0.2", "-W", "5", VPN_B], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout
    # What crossed the relay is OpenVPN's UDP between the hosts, never the ICMP inside.
    assert not tun_pair.packets.filter(proto="icmp")
    carried = tun_pair.packets.filter(proto="udp", dport=1194, direction="a->b")
    assert carried and {p.src for p in carried} == {a.ip}
    slow = [p for p in carried if p.seq >= mark]
    assert slow and min(p.sojourn for p in slow) >= 0.02


# --8<-- [end:openvpn]
