"""A download over a recorded-style cellular link: fast, then slow, then a dropout.

The link is a mahimahi delivery trace (one line per 1500-byte delivery opportunity, in ms).
Real traces from mahimahi's repository (traces/*.down) load the same way:
`tun_pair.impair(trace="Verizon-LTE-short.down", direction="b->a")`.

Run: pytest --tunpair examples/
"""

import socket
import threading
import time

# Imported here, at collection, for packets.plot() below: numpy's OpenBLAS starts worker
# threads when it loads, and threads started inside the test's namespace are reported as
# left running at its end.
import matplotlib.figure  # noqa: F401

from pytest_tunpair import traces


def cellular_trace():
    """2 opportunities per ms for 1 s (24 Mbit/s), then one every 4 ms for 1 s (3 Mbit/s),
    then nothing for 500 ms: 2.5 s, repeating."""
    fast = [ms for ms in range(1, 1001) for _ in range(2)]
    slow = list(range(1004, 2001, 4))
    return [*fast, *slow, 2500]


def download(server_ip, seconds):
    """b serves an endless stream, a reads it for `seconds`; return bytes per 100 ms."""
    server = socket.create_server((server_ip, 0))
    stop = threading.Event()

    def serve():
        conn, _ = server.accept()
        with conn:
            chunk = b"x" * 65536
            try:
                while not stop.is_set():
                    conn.sendall(chunk)
            except OSError:
                pass

    thread = threading.Thread(target=serve)
    thread.start()
    bins = [0] * int(seconds * 10)
    with socket.create_connection(server.getsockname()[:2], timeout=5) as client:
        start = time.monotonic()
        while (now := time.monotonic() - start) < seconds:
            data = client.recv(1 << 16)
            bins[min(len(bins) - 1, int(now * 10))] += len(data)
        stop.set()
    thread.join()
    server.close()
    return bins


def test_download_follows_the_trace(tun_pair, tmp_path):
    trace = cellular_trace()
    traces.save(trace, tmp_path / "cellular.down")  # a file mm-link would read as well
    tun_pair.impair(trace=tmp_path / "cellular.down", direction="b->a")
    t0 = time.monotonic() - tun_pair.packets.t0  # the trace's millisecond 0, roughly

    download(tun_pair.b.ip, 2.5)

    def mbit(start, end):
        """What the link delivered b->a between two times of the trace, in Mbit/s."""
        sent = sum(
            p.wire_len
            for p in tun_pair.packets
            if p.direction == "b->a" and p.action == "delayed" and start <= p.time - t0 < end
        )
        return sent * 8 / (end - start) / 1e6

    assert 20 < mbit(0.2, 1.0) < 26  # the fast second, once TCP has ramped up
    assert 2 < mbit(1.2, 2.0) < 4.5  # the slow second
    assert mbit(2.02, 2.48) == 0  # the dropout: nothing at all
    tun_pair.packets.plot(tmp_path / "cellular.png")  # throughput and queueing, per direction
