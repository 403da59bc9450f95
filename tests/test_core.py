"""The core contract, over real traffic through real devices."""

from __future__ import annotations

import ftplib
import http.server
import json
import os
import socket
import subprocess
import threading
import urllib.request
from collections.abc import Iterator

import pytest

from pytest_tunpair import TunPair

from .conftest import need, need_thread_return, netns_inode, tcp_send

HOST_NETNS = netns_inode()


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"client": self.client_address[0], "path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _V6Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


@pytest.fixture
def http_server(tun_pair: TunPair) -> Iterator[http.server.ThreadingHTTPServer]:
    # Depends on tun_pair, so it is created inside the test's namespace, bound to b.
    srv = http.server.ThreadingHTTPServer((tun_pair.b.ip, 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    t.join()


def _ping(*args: str) -> subprocess.CompletedProcess[str]:
    need("ping")
    return subprocess.run(
        ["ping", "-c", "2", "-i", "0.2", "-W", "2", *args], capture_output=True, text=True
    )


def test_defaults(tun_pair: TunPair) -> None:
    assert (tun_pair.a.name, tun_pair.b.name) == ("tun0", "tun1")
    assert (tun_pair.a.ip, tun_pair.b.ip) == ("198.18.0.1", "198.18.0.2")
    assert (tun_pair.a.ip6, tun_pair.b.ip6) == ("2001:2::1", "2001:2::2")
    assert tun_pair.a.mtu == tun_pair.b.mtu == 1500
    assert tun_pair.a.index == socket.if_nametoindex("tun0")
    assert tun_pair.b.index == socket.if_nametoindex("tun1")
    assert netns_inode() != HOST_NETNS


def test_namespace_holds_only_lo_and_the_pair(tun_pair: TunPair) -> None:
    names = sorted(name for _, name in socket.if_nameindex())
    assert names == ["lo", "tun0", "tun1"]


def test_routing_recipe_is_in_place(tun_pair: TunPair) -> None:
    rules = subprocess.run(["ip", "rule"], capture_output=True, text=True, check=True).stdout
    assert "iif tun0 lookup 13" in rules and "iif tun1 lookup 13" in rules
    rules6 = subprocess.run(["ip", "-6", "rule"], capture_output=True, text=True, check=True).stdout
    assert "iif tun0 lookup 13" in rules6 and "iif tun1 lookup 13" in rules6
    t13 = subprocess.run(
        ["ip", "route", "show", "table", "13"], capture_output=True, text=True, check=True
    ).stdout
    assert "local 198.18.0.1 dev tun0" in t13 and "local 198.18.0.2 dev tun1" in t13
    t13v6 = subprocess.run(
        ["ip", "-6", "route", "show", "table", "13"], capture_output=True, text=True, check=True
    ).stdout
    assert "local 2001:2::1 dev tun0" in t13v6 and "local 2001:2::2 dev tun1" in t13v6
    local = subprocess.run(
        ["ip", "route", "show", "table", "local"], capture_output=True, text=True, check=True
    ).stdout
    local6 = subprocess.run(
        ["ip", "-6", "route", "show", "table", "local"], capture_output=True, text=True, check=True
    ).stdout
    for addr in ("198.18.0.1", "198.18.0.2"):
        assert addr not in local
    for addr in ("2001:2::1", "2001:2::2"):
        assert addr not in local6


def test_ping_ipv4_crosses_the_relay(tun_pair: TunPair) -> None:
    r = _ping(tun_pair.b.ip)
    assert r.returncode == 0, r.stdout + r.stderr
    requests = [p for p in tun_pair.packets if p.direction == "a->b"]
    replies = [p for p in tun_pair.packets if p.direction == "b->a"]
    assert len(requests) == 2 and len(replies) == 2
    assert requests[0].scapy.src == tun_pair.a.ip and requests[0].scapy.dst == tun_pair.b.ip
    assert all(p.action == "forwarded" for p in tun_pair.packets)
    assert tun_pair.stats["a->b"]["packets"] == 2


def test_ping_ipv6_crosses_the_relay(tun_pair: TunPair) -> None:
    r = _ping("-6", tun_pair.b.ip6)
    assert r.returncode == 0, r.stdout + r.stderr
    assert [p.direction for p in tun_pair.packets] == ["a->b", "b->a"] * 2


def test_capture_holds_only_the_tests_traffic(tun_pair: TunPair) -> None:
    r = _ping(tun_pair.b.ip)
    assert r.returncode == 0
    r = _ping("-6", tun_pair.b.ip6)
    assert r.returncode == 0
    from scapy.layers.inet import ICMP
    from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest

    for p in tun_pair.packets:
        s = p.scapy
        assert s.haslayer(ICMP) or s.haslayer(ICMPv6EchoRequest) or s.haslayer(ICMPv6EchoReply), (
            p.summary()
        )
    assert len(tun_pair.packets) == 8


def test_http_with_urllib_server_sees_a(tun_pair: TunPair, http_server) -> None:
    port = http_server.server_address[1]
    with urllib.request.urlopen(f"http://{tun_pair.b.ip}:{port}/hello", timeout=5) as resp:
        body = json.loads(resp.read())
    assert body == {"client": tun_pair.a.ip, "path": "/hello"}
    assert any(p.direction == "a->b" for p in tun_pair.packets)
    assert any(p.direction == "b->a" for p in tun_pair.packets)


def test_http_with_curl_child_process(tun_pair: TunPair, http_server) -> None:
    need("curl")
    port = http_server.server_address[1]
    r = subprocess.run(
        ["curl", "-sS", "--max-time", "5", f"http://{tun_pair.b.ip}:{port}/c"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["client"] == tun_pair.a.ip
    syn = tun_pair.packets.wait_for(lambda p: p.direction == "a->b", timeout=1)
    assert syn.scapy.dport == port


def test_ipv6_tcp_server_sees_a_ip6(tun_pair: TunPair) -> None:
    srv = _V6Server((tun_pair.b.ip6, 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        port = srv.server_address[1]
        with urllib.request.urlopen(f"http://[{tun_pair.b.ip6}]:{port}/v6", timeout=5) as resp:
            body = json.loads(resp.read())
    finally:
        srv.shutdown()
        srv.server_close()
        t.join()
    assert body["client"] == tun_pair.a.ip6
    assert any(p.data[0] >> 4 == 6 and p.direction == "a->b" for p in tun_pair.packets)


def test_server_can_bind_tunnel_addresses(tun_pair: TunPair) -> None:
    for family, addr in (
        (socket.AF_INET, tun_pair.a.ip),
        (socket.AF_INET, tun_pair.b.ip),
        (socket.AF_INET6, tun_pair.a.ip6),
        (socket.AF_INET6, tun_pair.b.ip6),
    ):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((addr, 0))


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_udp_both_ways(tun_pair: TunPair, family: str) -> None:
    fam = socket.AF_INET if family == "ipv4" else socket.AF_INET6
    a_addr = tun_pair.a.ip if family == "ipv4" else tun_pair.a.ip6
    b_addr = tun_pair.b.ip if family == "ipv4" else tun_pair.b.ip6
    with (
        socket.socket(fam, socket.SOCK_DGRAM) as server,
        socket.socket(fam, socket.SOCK_DGRAM) as client,
    ):
        server.bind((b_addr, 0))
        server.settimeout(5)
        client.settimeout(5)
        client.sendto(b"ping", server.getsockname()[:2])
        data, peer = server.recvfrom(100)
        assert data == b"ping" and peer[0] == a_addr
        server.sendto(b"pong", peer)
        data, peer2 = client.recvfrom(100)
        assert data == b"pong" and peer2[0] == b_addr
    dirs = [p.direction for p in tun_pair.packets]
    assert dirs == ["a->b", "b->a"]


def test_one_mib_tcp_transfer_crosses_the_relay(tun_pair: TunPair) -> None:
    payload = os.urandom(1 << 20)
    received = tcp_send(tun_pair.b.ip, payload)
    assert bytes(received) == payload
    # Every byte went through the relay: the a->b byte count holds the payload plus headers.
    assert tun_pair.stats["a->b"]["bytes"] > len(payload)
    carried = sum(len(p.data) for p in tun_pair.packets if p.direction == "a->b")
    assert carried > len(payload)


@pytest.mark.parametrize("passive", [True, False], ids=["passive", "active"])
def test_ftp(tun_pair: TunPair, tmp_path, passive: bool) -> None:
    pyftpdlib = pytest.importorskip("pyftpdlib")  # noqa: F841
    from pyftpdlib.authorizers import DummyAuthorizer
    from pyftpdlib.handlers import FTPHandler
    from pyftpdlib.servers import FTPServer

    (tmp_path / "hello.txt").write_bytes(b"x" * 100_000)
    auth = DummyAuthorizer()
    auth.add_anonymous(str(tmp_path))

    class Handler(FTPHandler):
        authorizer = auth
        permit_foreign_addresses = False

    server = FTPServer((tun_pair.b.ip, 0), Handler)
    t = threading.Thread(target=server.serve_forever, kwargs={"timeout": 0.05}, daemon=True)
    t.start()
    try:
        ftp = ftplib.FTP()
        ftp.connect(tun_pair.b.ip, server.address[1], timeout=10)
        ftp.login()
        ftp.set_pasv(passive)
        chunks: list[bytes] = []
        ftp.retrbinary("RETR hello.txt", chunks.append)
        ftp.quit()
    finally:
        server.close_all()
        t.join(5)
    assert b"".join(chunks) == b"x" * 100_000
    from scapy.layers.inet import TCP

    # Active mode: the server opens the data connection back to a (a SYN b->a).
    syns_from_b = [
        p for p in tun_pair.packets.filter(TCP, direction="b->a") if p.scapy[TCP].flags == "S"
    ]
    assert bool(syns_from_b) is (not passive)


def test_netns_path_accepted_by_nsenter(tun_pair: TunPair) -> None:
    need("nsenter")
    r = subprocess.run(
        ["nsenter", f"--net={tun_pair.netns_path}", "ip", "-o", "link"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "tun0" in r.stdout and "tun1" in r.stdout


@pytest.mark.tunpair(
    mtu=1400, names=("left", "right"), ipv4=("198.18.5.1", "198.18.5.2"), ipv6=None, table=42
)
def test_marker_options(tun_pair: TunPair) -> None:
    assert (tun_pair.a.name, tun_pair.b.name) == ("left", "right")
    assert tun_pair.a.ip6 is None and tun_pair.a.mtu == 1400
    rules = subprocess.run(["ip", "rule"], capture_output=True, text=True, check=True).stdout
    assert "iif left lookup 42" in rules
    assert _ping("-s", "1300", "-M", "do", tun_pair.b.ip).returncode == 0
    assert _ping("-s", "1400", "-M", "do", tun_pair.b.ip).returncode != 0


def test_factory_makes_more_pairs_in_the_same_namespace(
    tun_pair: TunPair, tun_pair_factory
) -> None:
    second = tun_pair_factory()
    assert (second.a.name, second.b.name) == ("tun2", "tun3")
    assert (second.a.ip, second.b.ip) == ("198.18.0.3", "198.18.0.4")
    assert _ping(second.b.ip).returncode == 0
    assert _ping(tun_pair.b.ip).returncode == 0
    assert len(second.packets) == 4 and len(tun_pair.packets) == 4
    assert sorted(n for _, n in socket.if_nameindex()) == ["lo", "tun0", "tun1", "tun2", "tun3"]


def test_standalone_tunpair_without_pytest_fixture() -> None:
    need_thread_return()
    before = netns_inode()
    with TunPair(ipv6=None) as pair:
        assert netns_inode() != before
        assert _ping(pair.b.ip).returncode == 0
    assert netns_inode() == before
