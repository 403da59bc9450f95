"""Assertions as precise as PTF and packetdrill: fields, expectations, flows, socket state.

Run: pytest --tunpair examples/test_assertions.py
"""

import shutil
import socket
import subprocess
import sys

import pytest
from scapy.layers.inet import IP, TCP, UDP


# --8<-- [start:fields]
def test_fields_and_filters(tun_pair):
    with socket.create_server((tun_pair.b.ip, 0)) as server:
        socket.create_connection(server.getsockname()).close()
        port = server.getsockname()[1]

    syn = tun_pair.packets.wait_for(dport=port, flags="S")  # parsed without scapy
    assert (syn.src, syn.dst, syn.proto, syn.ttl) == (tun_pair.a.ip, tun_pair.b.ip, "tcp", 64)
    replies = tun_pair.packets.filter(TCP, direction="b->a", sport=port)
    assert replies[0].flags == "SA" and replies[0].tcp_ack == syn.tcp_seq + 1
    assert tun_pair.packets.filter(dport=lambda p: p < 1024) == []  # a predicate
    assert TCP in syn and syn[TCP].dport == port  # as on the scapy packet
    # --8<-- [end:fields]


# --8<-- [start:expect]
def test_expect_with_a_template(tun_pair):
    a, b = tun_pair.a.ip, tun_pair.b.ip
    with socket.create_server((b, 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()  # closing a listener with a queued connection resets it
        client.close()
        accepted.close()

    # Only the fields the template sets are compared: any ports, seq, window, TTL.
    syn_ack = tun_pair.packets.expect(IP(src=b, dst=a) / TCP(flags="SA"))
    assert syn_ack.direction == "b->a"
    syn, _, ack = tun_pair.packets.expect_sequence(
        [IP(dst=b) / TCP(flags="S"), IP(dst=a) / TCP(flags="SA"), IP(dst=b) / TCP(flags="A")]
    )
    assert ack.tcp_ack == syn_ack.tcp_seq + 1
    tun_pair.packets.expect_none(TCP(flags="R"), after=syn)  # nobody reset anything
    # --8<-- [end:expect]


# --8<-- [start:expect_none]
def test_a_firewall_hook_drops_what_it_should(tun_pair):
    blocked = 9999
    tun_pair.add_hook(lambda p: [] if p.dport == blocked else None)  # the "firewall"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"let me in", (tun_pair.b.ip, blocked))
        s.sendto(b"fine", (tun_pair.b.ip, blocked + 1))
    # What the relay dropped was never received: expect_none looks at delivered packets.
    tun_pair.packets.expect_none(UDP(dport=blocked), during=0.5, after=0.0)
    tun_pair.packets.expect(UDP(dport=blocked + 1))
    assert tun_pair.packets.filter(dport=blocked, action="dropped")
    # --8<-- [end:expect_none]


@pytest.fixture
def web(tun_pair, tmp_path):
    """``python -m http.server`` in a child process, in the test's namespace."""
    (tmp_path / "index.html").write_bytes(b"<p>hello</p>" * 50_000)
    server = subprocess.Popen(
        [sys.executable, "-u", "-m", "http.server", "0", "--bind", tun_pair.b.ip],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    port = int(server.stdout.readline().split(" port ")[1].split()[0])
    yield port, (tmp_path / "index.html").read_bytes()
    server.kill()
    server.wait()
    server.stdout.close()


# --8<-- [start:flows]
def test_a_download_under_loss(tun_pair, web):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    port, page = web
    tun_pair.impair(loss=0.02)
    url = f"http://{tun_pair.b.ip}:{port}/index.html"
    got = subprocess.run(["curl", "-sS", url], capture_output=True, check=True).stdout
    assert got == page
    tun_pair.packets.wait_quiet()  # the FINs and last ACKs are through

    (flow,) = [f for f in tun_pair.packets.flows() if f.proto == "tcp"]
    assert flow.handshake and flow.fins and not flow.resets
    print(flow, flow.stats)  # <Flow tcp 198.18.0.1:41234 <-> 198.18.0.2:38111, ...>
    assert flow.stream("b->a").endswith(page)  # the HTTP response, reassembled
    # --8<-- [end:flows]


# --8<-- [start:sockets]
def test_what_the_kernel_says_about_the_servers_socket(tun_pair, web):
    import http.client

    port, page = web
    conn = http.client.HTTPConnection(tun_pair.b.ip, port, timeout=10)
    conn.request("GET", "/index.html")
    client = conn.sock.getsockname()
    response = conn.getresponse()  # keep it: it holds the socket open
    assert response.read(1000) == page[:1000]

    # The server's end of the connection, owned by the http.server process.
    (sock,) = [s for s in tun_pair.sockets() if s.remote == client]
    assert sock.local == (tun_pair.b.ip, port)
    assert sock.tcp_info["rtt"] > 0  # microseconds, struct tcp_info's tcpi_rtt
    print(sock, sock.congestion, sock.tcp_info["snd_cwnd"], sock.pids())
    response.close()
    # --8<-- [end:sockets]
