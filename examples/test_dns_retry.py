"""A retrying HTTP client under DNS failure: the test's own resolver answers SERVFAIL for a
while, then the name resolves; the client retries until it does. Nothing on the host
changes: the resolver runs in the pair's host b, and only the test's thread (and what it
starts) sees a resolv.conf naming it.

Run: pytest --tunpair examples/test_dns_retry.py
"""

import socket
import sys
import time
import urllib.error
import urllib.request

import pytest


def get_with_retries(url, attempts=5, backoff=0.1):
    """The code under test: retry on name-resolution and connection errors."""
    for attempt in range(1, attempts + 1):
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read(), attempt
        except urllib.error.URLError as exc:
            if attempt == attempts:
                raise
            print(f"attempt {attempt}: {exc.reason}")
            time.sleep(backoff * attempt)
    raise AssertionError("unreachable")


# --8<-- [start:dns]
@pytest.mark.tunpair(hosts=True)
def test_client_retries_through_servfail(tun_pair, tmp_path):
    (tmp_path / "status").write_text("ok\n")
    tun_pair.b.spawn(
        [sys.executable, "-m", "http.server", "--bind", tun_pair.b.ip, "8080"],
        ready=8080,
        cwd=tmp_path,
    )
    resolver = tun_pair.dns({"api.test": "b"})
    # The first lookup's queries (A and AAAA, two attempts each) get SERVFAIL.
    resolver.fail("servfail", name="api.test", times=4)

    body, attempts = get_with_retries("http://api.test:8080/status")

    assert (body, attempts) == (b"ok\n", 2)
    outcomes = [q.outcome for q in resolver.asked("api.test")]
    assert outcomes[:4] == ["servfail"] * 4 and "answered" in outcomes[4:]
    # The lookups crossed the tunnel to the resolver in host b, like the HTTP request.
    assert tun_pair.packets.filter(direction="a->b", dport=53)
    assert tun_pair.packets.filter(direction="a->b", dport=8080, flags="S")
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo("elsewhere.test", 80)  # not in the records: NXDOMAIN


# --8<-- [end:dns]
