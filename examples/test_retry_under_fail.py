"""A client that retries, tested under fault rules: refused connections and a lost request.

`connect_with_retry()` is the code under test: it reconnects when the server refuses.
`tun_pair.fail()` makes the relay answer the first two SYNs with a TCP RST, as a server
that is not listening yet would; the third attempt gets through. No timing, no luck: the
rule acts on exactly the packets it matches.

Run: pytest --tunpair examples/
"""

import socket
import threading
import time

import pytest


def connect_with_retry(address, *, attempts=5, backoff=0.05):
    """Connect to `address`, retrying refused connections; return (socket, attempts used)."""
    for attempt in range(1, attempts + 1):
        try:
            return socket.create_connection(address, timeout=2), attempt
        except ConnectionRefusedError:
            time.sleep(backoff * attempt)
    raise ConnectionRefusedError(f"{address} refused {attempts} connections")


@pytest.fixture
def echo_server(tun_pair):
    """A TCP server on b that echoes one message per connection."""
    server = socket.create_server((tun_pair.b.ip, 0))
    server.settimeout(5)

    def serve():
        with server:
            conn, _ = server.accept()
            with conn:
                conn.sendall(conn.recv(1024))

    thread = threading.Thread(target=serve)
    thread.start()
    yield server.getsockname()
    thread.join()


def test_client_retries_refused_connections(tun_pair, echo_server):
    refused = tun_pair.fail(times=2, how="reset", flags="S", dport=echo_server[1])

    conn, attempts = connect_with_retry(echo_server)
    with conn:
        conn.sendall(b"hello")
        assert conn.recv(1024) == b"hello"

    assert attempts == 3
    assert refused.hits == 2
    resets = [p for p in tun_pair.packets if p.action == "reset"]
    assert len(resets) == 2  # the two SYNs the relay answered...
    rsts = [p for p in tun_pair.packets if p.action == "injected" and p.direction == "b->a"]
    assert len(rsts) == 2  # ...with one RST each, written back to the client


def test_lost_request_is_sent_again(tun_pair):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind((tun_pair.b.ip, 0))
        lost = tun_pair.fail(proto="udp", dport=server.getsockname()[1])  # how="drop"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.sendto(b"request", server.getsockname())  # dropped by the relay
            server.settimeout(0.2)
            with pytest.raises(TimeoutError):
                server.recvfrom(100)
            client.sendto(b"request", server.getsockname())  # the retry passes
            server.settimeout(5)
            assert server.recvfrom(100)[0] == b"request"
    assert lost.hits == 1
    assert [p.action for p in tun_pair.packets if p.direction == "a->b"] == [
        "dropped",
        "forwarded",
    ]
