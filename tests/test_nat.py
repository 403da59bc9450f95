"""The NAT on real traffic: mapping types told apart by a STUN-like probe, filtering, TCP
through it, rebinding, ICMP errors both ways, timeouts, exhausted ports. Root and
rootless (fixtures only)."""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from scapy.layers.inet import IPerror, UDPerror

from pytest_tunpair import Nat, TunPair

PUB = "198.18.1.1"
R2 = "198.18.0.102"  # a second address of host b
HOSTS = pytest.mark.tunpair(hosts=True, ipv6=None)


def add_second_address(pair: TunPair) -> None:
    """b gets R2 on its device; a routes R2 through its own (both hosts' routes only)."""
    b = pair.b
    b.run(subprocess.run, ["ip", "addr", "add", f"{R2}/32", "dev", b.name], check=True)
    subprocess.run(["ip", "route", "add", R2, "dev", pair.a.name], check=True)


@contextmanager
def stun(
    pair: TunPair, endpoints: list[tuple[str, int]]
) -> Iterator[dict[tuple[str, int], socket.socket]]:
    """UDP servers in host b answering each ``b"probe"`` with the source they saw (the
    sockets are the test's to send from too). A socket the test wants to receive on
    (an ICMP error's ``ECONNREFUSED`` goes to whichever ``recv`` comes first) is taken
    from its server thread with :func:`take` first."""
    socks: dict[tuple[str, int], socket.socket] = {}
    with pair.b.entered():
        for ep in endpoints:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(ep)
            s.settimeout(0.2)
            socks[ep] = s
    stop = threading.Event()

    def serve(s: socket.socket) -> None:
        while not stop.is_set() and s not in _taken:
            try:
                data, src = s.recvfrom(100)
            except TimeoutError:
                continue
            except OSError:
                return
            if data == b"probe":
                s.sendto(f"{src[0]}:{src[1]}".encode(), src)

    threads = {s: threading.Thread(target=serve, args=(s,)) for s in socks.values()}
    for t in threads.values():
        t.start()
    _servers.update(threads)
    try:
        yield socks
    finally:
        stop.set()
        for s, t in threads.items():
            t.join(5)
            _servers.pop(s, None)
            _taken.discard(s)
            s.close()


_servers: dict[socket.socket, threading.Thread] = {}
_taken: set[socket.socket] = set()


def take(s: socket.socket) -> socket.socket:
    """``s``, its :func:`stun` server thread stopped (within its 0.2 s poll)."""
    _taken.add(s)
    _servers[s].join(5)
    return s


def probe(local: socket.socket, server: tuple[str, int]) -> tuple[str, int]:
    local.sendto(b"probe", server)
    data, src = local.recvfrom(100)
    assert src == server
    host, port = data.decode().rsplit(":", 1)
    return host, int(port)


def after(mark: int):  # type: ignore[no-untyped-def]
    """A ``wait_for`` predicate: recorded from ``mark`` (``packets.mark()``) on."""
    return lambda p: p.seq >= mark


def client(port: int = 0) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("198.18.0.1", port))
    s.settimeout(5)
    return s


@HOSTS
@pytest.mark.parametrize(
    ("mapping", "expected"),
    [
        ("endpoint-independent", "EIM"),
        ("address-dependent", "ADM"),
        ("address-and-port-dependent", "APDM"),
    ],
)
def test_stun_like_probe_tells_the_mapping_types_apart(
    tun_pair: TunPair, mapping: str, expected: str
) -> None:
    add_second_address(tun_pair)
    r1 = tun_pair.b.ip
    assert r1 is not None
    tun_pair.nat(mapping=mapping, filtering="endpoint-independent")
    servers = [(r1, 3478), (r1, 3479), (R2, 3478)]
    with stun(tun_pair, servers), client(40001) as one, client(40002) as two:
        seen = [probe(one, s) for s in servers]
        other = probe(two, servers[0])
    # RFC 5780's test, by what the servers saw: same address and port everywhere is
    # endpoint-independent; per remote address, address-dependent; per remote endpoint,
    # address-and-port-dependent.
    assert {host for host, _ in seen} == {PUB}
    if seen[0] == seen[1] == seen[2]:
        found = "EIM"
    elif seen[0] == seen[1]:
        found = "ADM"
    else:
        found = "APDM"
    assert found == expected, seen
    assert seen[0] == (PUB, 40001)  # the port is kept while it is free
    assert other != seen[0]
    assert tun_pair.packets.filter(action="rewritten")


@HOSTS
@pytest.mark.parametrize(
    ("filtering", "from_other_port", "from_other_address"),
    [
        ("endpoint-independent", True, True),
        ("address-dependent", True, False),
        ("address-and-port-dependent", False, False),
    ],
)
def test_filtering_on_real_traffic(
    tun_pair: TunPair, filtering: str, from_other_port: bool, from_other_address: bool
) -> None:
    add_second_address(tun_pair)
    r1 = tun_pair.b.ip
    assert r1 is not None
    nat = tun_pair.nat(filtering=filtering)
    servers = [(r1, 3478), (r1, 3479), (R2, 3478)]
    with stun(tun_pair, servers) as socks, client() as c:
        mapped = probe(c, servers[0])
        for ep, allowed in ((servers[1], from_other_port), (servers[2], from_other_address)):
            mark = tun_pair.packets.mark()
            socks[ep].sendto(b"unsolicited", mapped)
            pkt = tun_pair.packets.wait_for(
                after(mark), direction="b->a", src=ep[0], sport=ep[1], timeout=5
            )
            assert pkt.action == ("rewritten" if allowed else "filtered"), pkt
            if allowed:
                assert c.recvfrom(100) == (b"unsolicited", ep)
    assert nat.filtered == (not from_other_port) + (not from_other_address)


@pytest.mark.parametrize(
    ("hosts", "mode"),
    [(False, "tun"), (True, "tun"), (True, "tap")],
    ids=["one-namespace", "hosts", "hosts-tap"],
)
def test_tcp_connection_through_the_nat_survives(tun_pair_factory, hosts: bool, mode: str) -> None:  # type: ignore[no-untyped-def]
    pair: TunPair = tun_pair_factory(hosts=hosts, mode=mode, ipv6=None)
    nat = pair.nat(mapping="address-and-port-dependent")
    b_ip = pair.b.ip
    payload = bytes(range(256)) * 4096  # 1 MiB
    got = bytearray()
    with pair.b.entered():
        server = socket.create_server((b_ip, 5002))
    server.settimeout(10)
    peers: list[tuple[str, int]] = []

    def serve() -> None:
        conn, peer = server.accept()
        peers.append(peer)
        with conn:
            conn.settimeout(10)
            while chunk := conn.recv(1 << 16):
                got.extend(chunk)
            conn.sendall(b"done")

    t = threading.Thread(target=serve)
    t.start()
    with server, socket.create_connection((b_ip, 5002), timeout=10) as c:
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        assert c.recv(10) == b"done"
        t.join(10)
    assert bytes(got) == payload  # checksums right: nothing was dropped for a bad one
    assert peers[0][0] == PUB
    ((m),) = [m for m in nat.mappings if m.proto == "tcp"]
    assert m.outside == peers[0] and m.inside[0] == pair.a.ip
    rewritten = pair.packets.filter(action="rewritten", proto="tcp")
    assert rewritten and all(p.src == pair.a.ip or p.dst == PUB for p in rewritten)
    assert not pair.packets.filter(action="dropped")


@HOSTS
def test_rebind_moves_the_mapping_and_strands_the_old_one(tun_pair: TunPair) -> None:
    nat = tun_pair.nat(public="198.18.1.0/29")
    r1 = tun_pair.b.ip
    assert r1 is not None
    with stun(tun_pair, [(r1, 3478)]) as socks, client() as c:
        before = probe(c, (r1, 3478))
        nat.rebind()
        mark = tun_pair.packets.mark()
        socks[(r1, 3478)].sendto(b"late", before)  # to the old mapping
        stray = tun_pair.packets.wait_for(after(mark), direction="b->a", sport=3478, timeout=5)
        assert stray.action == "filtered"
        then = probe(c, (r1, 3478))
        assert then[0] == before[0] and then[1] != before[1]
        nat.rebind(port=False, address=True)
        moved = probe(c, (r1, 3478))
        assert moved == ("198.18.1.2", then[1])
    assert nat.rebinds == 2


@HOSTS
def test_rebind_every(tun_pair: TunPair) -> None:
    nat = tun_pair.nat(rebind_every="200ms")
    r1 = tun_pair.b.ip
    assert r1 is not None
    seen: set[tuple[str, int]] = set()
    with stun(tun_pair, [(r1, 3478)]), client() as c:
        c.settimeout(0.5)
        for _ in range(60):
            try:
                seen.add(probe(c, (r1, 3478)))
            except TimeoutError:
                continue  # an answer sent to a mapping retired meanwhile
            if len(seen) >= 3:
                break
            threading.Event().wait(0.05)
    assert len(seen) >= 3 and nat.rebinds >= 2
    # Periods pass without traffic too: counted, and the mappings they retired gone.
    before = nat.rebinds
    threading.Event().wait(0.45)  # two periods at least (what the test is about)
    assert nat.rebinds >= before + 2 and not nat.mappings


@HOSTS
def test_icmp_errors_are_translated_both_ways(tun_pair: TunPair) -> None:
    tun_pair.nat()
    r1 = tun_pair.b.ip
    assert r1 is not None
    # Inbound: b's port unreachable for a datagram from the NAT reaches the client.
    with client() as c:
        c.connect((r1, 9))
        c.send(b"anyone?")
        with pytest.raises(ConnectionRefusedError):
            c.recv(100)
    err = tun_pair.packets.wait_for(direction="b->a", proto="icmp", action="forwarded", timeout=5)
    assert err.dst == tun_pair.a.ip and err.scapy[IPerror].src == tun_pair.a.ip
    # Outbound: a's port unreachable for a datagram through the mapping reaches b, its
    # quote naming the outside endpoint b sent to.
    with stun(tun_pair, [(r1, 3478)]) as socks:
        with client() as c:
            mapped = probe(c, (r1, 3478))
        server = take(socks[(r1, 3478)])
        server.settimeout(5)
        server.connect(mapped)
        server.send(b"still there?")
        with pytest.raises(ConnectionRefusedError):
            server.recv(100)
    out = tun_pair.packets.wait_for(direction="a->b", proto="icmp", action="forwarded", timeout=5)
    assert out.src == PUB
    assert (out.scapy[IPerror].dst, out.scapy[UDPerror].dport) == mapped


@HOSTS
def test_idle_mapping_expires(tun_pair: TunPair) -> None:
    tun_pair.nat(timeout="1s", filtering="endpoint-independent")
    r1 = tun_pair.b.ip
    assert r1 is not None
    with stun(tun_pair, [(r1, 3478)]) as socks, client() as c:
        mapped = probe(c, (r1, 3478))
        threading.Event().wait(1.2)  # idle past the timeout (what the test is about)
        mark = tun_pair.packets.mark()
        socks[(r1, 3478)].sendto(b"late", mapped)
        late = tun_pair.packets.wait_for(after(mark), direction="b->a", timeout=5)
        assert late.action == "filtered"


@HOSTS
def test_port_range_used_up(tun_pair: TunPair) -> None:
    nat: Nat = tun_pair.nat(port_range=(40000, 40001))
    r1 = tun_pair.b.ip
    assert r1 is not None
    with stun(tun_pair, [(r1, 3478)]), client() as c1, client() as c2, client() as c3:
        assert {probe(c, (r1, 3478))[1] for c in (c1, c2)} == {40000, 40001}
        mark = tun_pair.packets.mark()
        c3.sendto(b"probe", (r1, 3478))
        dropped = tun_pair.packets.wait_for(after(mark), direction="a->b", timeout=5)
        assert dropped.action == "dropped"
    assert nat.exhausted == 1
    assert "40000-40001" in tun_pair.describe()


@HOSTS
def test_quic_survives_a_port_then_an_address_rebind(tun_pair: TunPair, tmp_path: Path) -> None:
    """aioquic's client behind the NAT, its server in host b: a port rebind, then a move
    to the pool's next address; one connection answers throughout, and the server
    validated each new path (RFC 9000 section 9). The example does the port rebind; this
    one runs in the rootless tier too."""
    import asyncio

    from aioquic.asyncio import QuicConnectionProtocol, connect, serve
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.events import StreamDataReceived
    from aioquic.quic.logger import QuicLogger

    from .h3 import make_certificate

    class Upper(QuicConnectionProtocol):
        def quic_event_received(self, event: object) -> None:
            if isinstance(event, StreamDataReceived):
                self._quic.send_stream_data(event.stream_id, event.data.upper(), True)
                self.transmit()

    b_ip = tun_pair.b.ip
    assert b_ip is not None
    nat = tun_pair.nat(public="198.18.1.0/30")  # 198.18.1.1 and .2
    cert, key = make_certificate(tmp_path, b_ip)
    log = QuicLogger()
    config = QuicConfiguration(is_client=False, alpn_protocols=["upper"], quic_logger=log)
    config.load_cert_chain(cert, key)
    listening, stop = threading.Event(), threading.Event()

    def server() -> None:
        async def main() -> None:
            srv = await serve(b_ip, 4433, configuration=config, create_protocol=Upper)
            listening.set()
            while not stop.is_set():
                await asyncio.sleep(0.05)
            srv.close()

        asyncio.run(main())

    thread = threading.Thread(target=tun_pair.b.run, args=(server,))
    thread.start()

    async def client() -> list[bytes]:
        cfg = QuicConfiguration(is_client=True, alpn_protocols=["upper"], cafile=str(cert))
        async with connect(b_ip, 4433, configuration=cfg) as conn:

            async def ask(text: bytes) -> bytes:
                reader, writer = await conn.create_stream()
                writer.write(text)
                writer.write_eof()
                return await asyncio.wait_for(reader.read(), 10)

            answers = [await ask(b"first")]
            nat.rebind()
            answers.append(await ask(b"new port"))
            nat.rebind(port=False, address=True)
            answers.append(await ask(b"new address"))
            return answers

    try:
        assert listening.wait(10)
        assert asyncio.run(client()) == [b"FIRST", b"NEW PORT", b"NEW ADDRESS"]
    finally:
        stop.set()
        thread.join(10)
    paths = [t.after[1] for t in nat.translations if t.direction == "a->b"]
    seen = list(dict.fromkeys(paths))  # the client's outside endpoints, in order
    assert len(seen) == 3, seen
    assert seen[0].split(":")[0] == seen[1].split(":")[0] == "198.18.1.1"
    assert seen[2] == f"198.18.1.2:{seen[1].split(':')[1]}"  # the port kept, the address moved
    sent = [
        frame["frame_type"]
        for trace in log.to_dict()["traces"]
        for event in trace["events"]
        if event["name"].endswith("packet_sent")
        for frame in event["data"].get("frames", [])
    ]
    assert sent.count("path_challenge") >= 2  # one per new path
    assert nat.filtered == len(tun_pair.packets.filter(action="filtered"))
