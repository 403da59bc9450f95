"""A client with a retry policy, tested against a server that resets its first connection.

`fetch()` is the code under test: it connects, sends a request and reads the answer, and
retries when the server resets the connection. No real server could be made to reset
exactly the first connection, after exactly the first request; a scripted peer
(`tun_pair.script("b")`) plays the server packet by packet and does just that.

Run: pytest --tunpair examples/
"""

import socket
import threading
import time


def fetch(addr, request, *, attempts=3, backoff=0.05):
    """Send `request`, return (answer, attempts it took); retry on a reset connection."""
    for attempt in range(1, attempts + 1):
        try:
            with socket.create_connection(addr, timeout=5) as sock:
                sock.sendall(request)
                answer = sock.recv(4096)
                if answer:
                    return answer, attempt
        except (ConnectionResetError, ConnectionRefusedError):
            pass
        time.sleep(backoff * attempt)
    raise ConnectionError(f"no answer from {addr} after {attempts} attempts")


def test_client_retries_after_a_reset(tun_pair):
    result = {}
    with tun_pair.script("b") as server:
        # The client blocks in connect() and recv(): it runs in a thread (which inherits
        # the pair's namespace), and the test thread plays the server.
        client = threading.Thread(
            target=lambda: result.update(got=fetch((tun_pair.b.ip, 8080), b"GET /\n"))
        )
        client.start()

        first = server.tcp_accept(8080)
        first.recv()  # the request arrived (and was ACKed) ...
        first.rst()  # ... and the server died before answering

        second = server.tcp_accept(8080)  # the client came back
        request = second.recv()
        assert request.payload == b"GET /\n"
        second.send(b"200 OK\n")
        client.join(10)

    assert result["got"] == (b"200 OK\n", 2)
    # Two connections from two different source ports: the retry was a new connection.
    assert first.remote[1] != second.remote[1]
