"""Hosts mode and topologies: each end its own stack, real traffic between them.

Root and rootless: every test here takes the fixtures (the rootless tier runs it on a
thread of its own) or opens its pair with ``run_standalone``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pytest_tunpair import Host, NamespaceError, TunPair, TunPairFactory

from .conftest import host_snapshot, need, run_standalone

HOSTS = pytest.mark.tunpair(hosts=True)


def netns_of(host: Host) -> int:
    return host.run(lambda: os.stat("/proc/thread-self/ns/net").st_ino)


def links_of(host: Host) -> list[str]:
    out = host.run(subprocess.run, ["ip", "-o", "link"], capture_output=True, text=True)
    return [line.split(":")[1].strip().split("@")[0] for line in out.stdout.splitlines()]


@HOSTS
def test_each_end_in_a_namespace_of_its_own(tun_pair: TunPair) -> None:
    a, b = tun_pair.a, tun_pair.b
    # The test's thread is in host a: the pair's namespace.
    assert netns_of(a.host) == os.stat("/proc/thread-self/ns/net").st_ino
    assert netns_of(a.host) != netns_of(b.host)
    assert links_of(b.host) == ["lo", b.name]
    assert b.name not in links_of(a.host)
    # Ordinary routes: no rule, no table 13, the peer's address not local here.
    rules = subprocess.run(["ip", "rule"], capture_output=True, text=True).stdout
    assert "lookup 13" not in rules
    route = subprocess.run(["ip", "route", "get", b.ip], capture_output=True, text=True).stdout
    assert f"dev {a.name}" in route and "local" not in route
    for dst in (b.ip, b.ip6):
        r = subprocess.run(["ping", "-c1", "-W3", dst], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    echo = tun_pair.packets.filter(proto="icmp", direction="a->b")
    assert [p.dst for p in echo] == [b.ip]
    assert any(p.dst == b.ip6 for p in tun_pair.packets if p.direction == "a->b")


@HOSTS
def test_sysctls_differ_per_host_and_tcp_uses_each_hosts(tun_pair: TunPair) -> None:
    a, b = tun_pair.a, tun_pair.b
    default = a.sysctl("net.ipv4.tcp_congestion_control")
    other = "reno" if default != "reno" else "bbr"
    assert b.sysctl("net.ipv4.tcp_congestion_control", other) == other
    assert a.sysctl("net.ipv4.tcp_congestion_control") == default
    assert b.sysctl("net/ipv4/tcp_congestion_control") == other
    # Misuse, each said with what to do.
    with pytest.raises(NamespaceError, match=r"refused the value.*available here: .*reno"):
        b.sysctl("net.ipv4.tcp_congestion_control", "no-such-algorithm")
    available = Path("/proc/sys/net/ipv4/tcp_available_congestion_control").read_text().split()
    allowed = Path("/proc/sys/net/ipv4/tcp_allowed_congestion_control").read_text().split()
    for restricted in set(available) - set(allowed):  # cubic on this machine (bbr its default)
        with pytest.raises(NamespaceError, match="tcp_allowed_congestion_control may be picked"):
            b.sysctl("net.ipv4.tcp_congestion_control", restricted)
    with pytest.raises(NamespaceError, match="no such sysctl"):
        b.sysctl("net.ipv4.no_such_knob", 1)
    with pytest.raises(ValueError, match=r"only net\.\* sysctls"):
        b.sysctl("kernel.hostname", "b")
    with b.entered():
        server = socket.create_server((b.ip, 5001))
    with server:
        client = socket.create_connection((b.ip, 5001), timeout=5)
        conn, _ = server.accept()
        with client, conn:
            client.sendall(b"x" * 10000)
            assert conn.recv(10000)
            port = client.getsockname()[1]
            mine = [s for s in a.sockets() if s.local == (a.ip, port)]
            theirs = [s for s in b.sockets() if s.remote == (a.ip, port)]
            assert [s.congestion for s in mine] == [default]
            assert [s.congestion for s in theirs] == [other]


@HOSTS
def test_daemon_spawned_in_b_is_seen_by_bs_sockets_only(tun_pair: TunPair, tmp_path: Path) -> None:
    (tmp_path / "hi.txt").write_text("from host b\n")
    b = tun_pair.b
    server = b.spawn(
        [sys.executable, "-m", "http.server", "--bind", b.ip, "8080"], ready=8080, cwd=tmp_path
    )
    listening = [s.local for s in b.sockets() if s.state == "LISTEN"]
    assert (b.ip, 8080) in listening
    assert not [s for s in tun_pair.a.sockets() if s.state == "LISTEN"]
    assert not [s for s in tun_pair.sockets() if s.state == "LISTEN"]  # the pair's: host a
    r = subprocess.run(
        [need("curl"), "-sS", "--max-time", "10", f"http://{b.ip}:8080/hi.txt"],
        capture_output=True,
        text=True,
    )
    assert r.stdout == "from host b\n", r.stderr
    assert server.poll() is None
    # The server's process is in host b's namespace, not the test's.
    ns = os.stat(f"/proc/{server.pid}/ns/net").st_ino
    assert ns == netns_of(b.host) != os.stat("/proc/thread-self/ns/net").st_ino


@HOSTS
def test_run_and_entered_reach_the_host_and_come_back(tun_pair: TunPair) -> None:
    here = os.stat("/proc/thread-self/ns/net").st_ino
    b = tun_pair.b
    assert b.run(lambda x, y=0: x + y, 2, y=3) == 5
    with pytest.raises(ZeroDivisionError):
        b.run(lambda: 1 / 0)
    with b.entered() as host:
        assert host is b.host
        assert os.stat("/proc/thread-self/ns/net").st_ino == netns_of(b.host)
        with socket.socket() as s:
            s.bind((b.ip, 0))  # b's own address is local there
    assert os.stat("/proc/thread-self/ns/net").st_ino == here


@HOSTS
def test_nsenter_by_pid_and_path(tun_pair: TunPair) -> None:
    b = tun_pair.b
    for how in (["-t", str(b.pid), "-n"], [f"--net={b.ns_path}"]):
        r = subprocess.run(
            [need("nsenter"), *how, "ip", "-o", "addr", "show", b.name],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stderr
        assert b.ip in r.stdout


@HOSTS
def test_capture_impair_rules_and_peer_work_between_hosts(tun_pair: TunPair) -> None:
    a, b = tun_pair.a, tun_pair.b
    tun_pair.impair(delay="30ms", direction="a->b")
    start = time.monotonic()
    r = subprocess.run(["ping", "-c1", "-W3", b.ip], capture_output=True, text=True)
    assert r.returncode == 0
    assert time.monotonic() - start >= 0.03
    tun_pair.impair()
    fault = tun_pair.fail(dport=9, how="reset")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((b.ip, 9), timeout=5)
    assert fault.hits == 1
    assert tun_pair.packets.filter(action="reset")
    with tun_pair.script("b") as peer:
        udp = peer.udp(7000)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(5)
            s.sendto(b"ping", (b.ip, 7000))
            data, (src, sport) = udp.recvfrom(timeout=5)
            assert (data, src) == (b"ping", a.ip)
            udp.send(b"pong", to_port=sport)
            assert s.recvfrom(100)[0] == b"pong"


@pytest.mark.tunpair(hosts=True, mode="tap")
def test_tap_hosts(tun_pair: TunPair) -> None:
    for dst in (tun_pair.b.ip, tun_pair.b.ip6):
        r = subprocess.run(["ping", "-c1", "-W3", dst], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout
    assert tun_pair.packets.filter(proto="icmp")


def test_teardown_leaves_nothing_on_the_host() -> None:
    before = host_snapshot()
    cc = Path("/proc/sys/net/ipv4/tcp_congestion_control")
    host_cc = cc.read_text()
    seen: dict[str, object] = {}

    def body() -> None:
        with TunPair(hosts=True) as pair:
            proc = pair.b.spawn([sys.executable, "-c", "import time; time.sleep(60)"])
            seen["pid"] = proc.pid
            seen["ns"] = pair.b.ns_path
            seen["holder"] = pair.b.pid
            # What a hosts test changes lives in the pair's hosts: b's sysctl, the NAT's
            # route in b, a's route to b.
            pair.b.sysctl("net.ipv4.tcp_congestion_control", "reno")
            pair.nat()
            r = subprocess.run(["ping", "-c1", "-W3", pair.b.ip], capture_output=True)
            assert r.returncode == 0
            assert pair.packets.filter(action="rewritten", proto="icmp")
        threading.Thread(target=lambda: None).start()

    run_standalone(body)
    assert cc.read_text() == host_cc
    for key in ("pid", "holder"):
        assert (
            not Path(f"/proc/{seen[key]}").exists()
            or "Z" in Path(f"/proc/{seen[key]}/stat").read_text().rsplit(")", 1)[1].split()[0]
        )
    assert host_snapshot() == before


# -- topologies --------------------------------------------------------------------------------
def _udp_ttl_probe(host: Host, dst: str, port: int, ttl: int) -> None:
    def send() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
            s.sendto(b"probe", (dst, port))

    host.run(send)


def test_chain_router_decrements_ttl_and_sends_time_exceeded(
    tun_pair_factory: TunPairFactory,
) -> None:
    topo = tun_pair_factory.chain()
    client, server = topo["client"], topo["server"]
    first, second = topo.link("client", "router"), topo.link("router", "server")
    dst = topo.address("server")
    router_ip = first.b.ip  # the router's end of the first link
    with server.entered():
        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sink.bind((dst, 4000))
        sink.settimeout(5)
    with sink:
        _udp_ttl_probe(client, dst, 4000, ttl=5)
        data, (src, _port) = sink.recvfrom(100)
        assert (data, src) == (b"probe", first.a.ip)
        # Seen on each link: TTL 5 on the first, 4 behind the router.
        assert [p.ttl for p in first.packets.filter(proto="udp")] == [5]
        assert [p.ttl for p in second.packets.filter(proto="udp")] == [4]
        _udp_ttl_probe(client, dst, 4000, ttl=1)
        exceeded = first.packets.wait_for(proto="icmp", icmp_type=11, direction="b->a", timeout=5)
        assert exceeded.src == router_ip and exceeded.dst == first.a.ip
        # The expired probe never reached the second link.
        assert len(second.packets.filter(proto="udp")) == 1
    # IPv6 the same: the hop limit drops by one, and the router says time exceeded.
    dst6 = topo.address("server", 6)

    def send6(hops: int) -> None:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, hops)
            s.sendto(b"probe", (dst6, 4000))

    client.run(send6, 5)
    behind = second.packets.wait_for(proto="udp", dst=dst6, timeout=5)
    assert behind.ttl == 4
    client.run(send6, 1)
    exceeded6 = first.packets.wait_for(proto="icmpv6", icmp_type=3, direction="b->a", timeout=5)
    assert exceeded6.src == first.b.ip6 and exceeded6.dst == first.a.ip6
    assert "client<->router" in first.describe() and "a->b is client->router" in first.describe()


def test_star_of_three_clients_each_on_its_own_link(tun_pair_factory: TunPairFactory) -> None:
    topo = tun_pair_factory.star(3)
    server = topo["server"]
    topo.link("client2", "server").impair(delay="40ms")
    addr = topo.address("server")
    with server.entered():
        listener = socket.create_server((addr, 7000))
    results: dict[str, float] = {}

    def accept_all() -> None:
        for _ in range(3):
            conn, _peer = listener.accept()
            with conn:
                conn.sendall(conn.recv(100).upper())

    t = threading.Thread(target=accept_all)
    t.start()
    with listener:
        for i in (1, 2, 3):
            name = f"client{i}"

            def ask(name: str = name) -> str:
                start = time.monotonic()
                with socket.create_connection((addr, 7000), timeout=5) as c:
                    c.sendall(name.encode())
                    reply = c.recv(100).decode()
                results[name] = time.monotonic() - start
                return reply

            assert topo[name].run(ask) == name.upper()
        t.join(10)
    for i in (1, 2, 3):
        link = topo.link(f"client{i}", "server")
        sources = {p.src for p in link.packets.filter(proto="tcp", direction="a->b")}
        assert sources == {link.a.ip}  # each link carried its own client only
    assert results["client2"] >= 0.08  # 40 ms on each of two packets' way at least
    delayed = topo.link("client2", "server").packets.filter(direction="a->b")
    assert delayed and min(p.sojourn for p in delayed) >= 0.04
    # client1's link is not delayed: said by its configuration, not by a time that a busy
    # machine could stretch past 40 ms.
    assert "delay" not in topo.link("client1", "server").describe()
    assert "delay=40ms" in topo.link("client2", "server").describe()
    assert [p.label for p in tun_pair_factory.pairs] == [
        "client1<->server",
        "client2<->server",
        "client3<->server",
    ]


# -- a module's pair in hosts mode ------------------------------------------------------------
MODULE_HOSTS = """
import os, socket, sys, pytest

pytestmark = pytest.mark.tunpair(hosts=True, ipv6=None)
HOST_RESOLV = open("/etc/resolv.conf").read()
DEFAULT_CC = open("/proc/sys/net/ipv4/tcp_congestion_control").read().strip()

@pytest.fixture(scope="module")
def echo(tun_pair_module):
    # One daemon in host b for the module: answers each line with the source it saw.
    code = (
        "import socket\\n"
        f"s = socket.create_server(({tun_pair_module.b.ip!r}, 7000))\\n"
        "while True:\\n"
        "    c, peer = s.accept()\\n"
        "    c.recv(100); c.sendall(peer[0].encode()); c.close()\\n"
    )
    tun_pair_module.b.spawn([sys.executable, "-c", code], ready=7000)
    return tun_pair_module.b.ip

def seen_as(server):
    with socket.create_connection((server, 7000), timeout=5) as c:
        c.sendall(b"who am I?\\n")
        return c.recv(100).decode()

def test_1_behind_a_nat(echo, tun_pair_module):
    assert DEFAULT_CC != "reno"
    tun_pair_module.b.sysctl("net.ipv4.tcp_congestion_control", "reno")
    tun_pair_module.b.sysctl("net.ipv4.ip_forward", 1)
    tun_pair_module.b.sysctl("net.ipv4.ip_forward", 0)
    tun_pair_module.b.sysctl("net.ipv4.ip_forward", 1)
    tun_pair_module.nat()
    tun_pair_module.dns({"echo.test": "b"})
    assert seen_as(socket.gethostbyname("echo.test")) == "198.18.1.1"

def test_2_the_nat_went_with_the_test(echo, tun_pair_module):
    # So did the sysctl: b is back at the kernel's default.
    assert tun_pair_module.b.sysctl("net.ipv4.tcp_congestion_control") == DEFAULT_CC
    assert tun_pair_module.b.sysctl("net.ipv4.ip_forward") == "0"
    assert seen_as(echo) == tun_pair_module.a.ip
    assert "nat" not in tun_pair_module.describe()
    # The resolver went with the test too, and the thread sees the host's file again.
    assert "dns at" not in tun_pair_module.describe()
    assert open("/etc/resolv.conf").read() == HOST_RESOLV
    assert tun_pair_module.nat()  # a new one may go on
    assert seen_as(echo) == "198.18.1.1"
    # The test's thread is in host a, the daemon (still the module's) in host b.
    assert os.stat("/proc/thread-self/ns/net").st_ino != os.stat(
        f"/proc/{tun_pair_module.b.pid}/ns/net").st_ino
"""


def test_module_pair_in_hosts_mode_gives_back_nat_and_dns(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(MODULE_HOSTS)
    result = pytester.runpytest_subprocess("--tunpair", "-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=2)


def test_topology_misuse_is_refused_before_anything_is_made(
    tun_pair_factory: TunPairFactory,
) -> None:
    from pytest_tunpair import OptionError, TunPairError

    refused = [
        (lambda: tun_pair_factory.topology([]), "at least one"),
        (lambda: tun_pair_factory.topology([("x", "x")]), "two different hosts"),
        (lambda: tun_pair_factory.topology([("x", "y"), ("y", "x")]), "once"),
        (lambda: tun_pair_factory.topology([("x y", "z")]), "host names are words"),
        (lambda: tun_pair_factory.topology([("x", "y")], routers=["r"]), "not a host"),
        (lambda: tun_pair_factory.topology([("x", "y")], hosts=True), "hosts already"),
        (lambda: tun_pair_factory.star(0), "from 1 to 60"),
        (lambda: tun_pair_factory.chain("x"), "at least two"),
    ]
    for make, reason in refused:
        with pytest.raises(OptionError, match=reason):
            make()
    assert not tun_pair_factory.pairs and not tun_pair_factory.topologies
    topo = tun_pair_factory.topology([("x", "y")])
    with pytest.raises(TunPairError, match="no link between 'x' and 'z': links are x<->y"):
        topo.link("x", "z")
    with pytest.raises(KeyError, match="no host 'z' here: x, y"):
        topo["z"]


STAR_FAILS = """
import socket

def test_star(tun_pair_factory):
    star = tun_pair_factory.star(2)
    server = star.address("server")
    star["client2"].run(
        lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", (server, 9))
    )
    star.link("client2", "server").packets.wait_for(proto="udp", timeout=5)
    assert False, "deliberate"
"""


def test_failure_report_and_pcaps_name_each_link_after_its_hosts(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(STAR_FAILS)
    result = pytester.runpytest_subprocess(
        "--tunpair", "-p", "no:cacheprovider", f"--tunpair-pcap={pytester.path / 'pcaps'}"
    )
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    for i in (1, 2):
        assert f"link client{i}<->server client{i}:" in out
        assert f"a->b is client{i}->server" in out
    files = sorted(p.name for p in (pytester.path / "pcaps").iterdir())
    assert len(files) == 2, files
    assert all(n.endswith(".pcapng") for n in files)
    assert "-client1-tun0-server-tun1." in files[0] and "-client2-" in files[1], files
    assert "udp" in out.split("link client2<->server")[1].lower()
