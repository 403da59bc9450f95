"""HTTP through the tunnel: a stdlib server bound to b, urllib and curl as clients from a.

Run: pytest --tunpair examples/
"""

import http.server
import shutil
import subprocess
import threading
import urllib.request

import pytest


class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"hello {self.client_address[0]}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tun_pair):
    # Asking for tun_pair first puts this server inside the test's namespace.
    srv = http.server.ThreadingHTTPServer((tun_pair.b.ip, 0), Hello)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join()


def test_urllib_through_the_tunnel(tun_pair, server):
    url = f"http://{tun_pair.b.ip}:{server.server_address[1]}/"
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.read() == f"hello {tun_pair.a.ip}".encode()
    # The request really left tun0 and entered tun1 through the relay:
    assert any(p.direction == "a->b" for p in tun_pair.packets)
    assert any(p.direction == "b->a" for p in tun_pair.packets)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_child_process_inherits_the_namespace(tun_pair, server):
    url = f"http://{tun_pair.b.ip}:{server.server_address[1]}/"
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "5", url], capture_output=True, text=True, check=True
    ).stdout
    assert out == f"hello {tun_pair.a.ip}"
