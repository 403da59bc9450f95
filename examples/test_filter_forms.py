"""The matching forms of filter() and wait_for() that docs/assertions.md shows, run for real.

Run: pytest --tunpair examples/
"""

import http.server
import socket
import threading

import pytest
from scapy.layers.inet import TCP


class Ok(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


@pytest.fixture
def web(tun_pair):
    # Port 80 and 53: the test is root in its own namespace (a user namespace's, rootless).
    srv = http.server.ThreadingHTTPServer((tun_pair.b.ip, 80), Ok)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join()


def test_the_documented_forms_match(tun_pair, web):
    with socket.create_connection((tun_pair.b.ip, 80), timeout=5) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
        while conn.recv(4096):
            pass
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as dns:
        dns.sendto(b"a query", (tun_pair.b.ip, 53))  # nothing listens: b answers ICMP
        # --8<-- [start:forms]
        tun_pair.packets.filter(TCP, dport=80, flags="S", direction="a->b")
        tun_pair.packets.wait_for(proto="udp", dport=53, timeout=5)
        tun_pair.packets.wait_for(TCP, payload=lambda b: b.startswith(b"HTTP/1.1 200"))
        # --8<-- [end:forms]
    (syn,) = tun_pair.packets.filter(TCP, dport=80, flags="S", direction="a->b")
    assert syn.dst == tun_pair.b.ip
    assert tun_pair.packets.wait_for(proto="udp", dport=53, timeout=5).direction == "a->b"
    reply = tun_pair.packets.wait_for(TCP, payload=lambda b: b.startswith(b"HTTP/1.1 200"))
    assert reply.direction == "b->a"
