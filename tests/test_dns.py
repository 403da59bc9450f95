"""The test's own resolver: getaddrinfo, dig, dnspython, c-ares and child processes resolve
through it, across the tunnel; each failure mode; the host's files untouched. Root and
rootless."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pytest_tunpair import TunPair

from .conftest import host_snapshot, need, run_standalone

RESOLV = Path("/etc/resolv.conf")


def resolve(name: str) -> list[str]:
    return sorted({ai[4][0] for ai in socket.getaddrinfo(name, 80, proto=socket.IPPROTO_TCP)})


@pytest.mark.parametrize("hosts", [False, True], ids=["one-namespace", "hosts"])
def test_getaddrinfo_through_the_tests_resolver(tun_pair_factory, hosts: bool) -> None:  # type: ignore[no-untyped-def]
    pair: TunPair = tun_pair_factory(hosts=hosts)
    resolver = pair.dns({"api.test": "b", "v6.test": "2001:2::99", "two.test": ["198.18.0.9", "a"]})
    assert resolve("api.test") == sorted([pair.b.ip, pair.b.ip6])
    assert resolve("v6.test") == ["2001:2::99"]
    assert resolve("two.test") == sorted(["198.18.0.9", pair.a.ip, pair.a.ip6])
    with pytest.raises(socket.gaierror) as info:
        socket.getaddrinfo("nowhere.test", 80)
    assert info.value.errno == socket.EAI_NONAME
    asked = resolver.asked("api.test")
    assert {q.type for q in asked} == {"A", "AAAA"} and {q.client[0] for q in asked} == {pair.a.ip}
    # The queries crossed the tunnel: in the capture, a->b to port 53.
    queries = pair.packets.filter(direction="a->b", proto="udp", dport=53)
    assert len(queries) == len(resolver.queries)
    assert "dns at" in pair.describe()


@pytest.mark.parametrize(
    ("how", "errno"),
    [
        ("nxdomain", socket.EAI_NONAME),
        ("servfail", socket.EAI_AGAIN),
        ("refused", socket.EAI_AGAIN),
        ("timeout", socket.EAI_AGAIN),
    ],
)
def test_each_failure_mode(tun_pair: TunPair, how: str, errno: int) -> None:
    resolver = tun_pair.dns({"api.test": "b", "ok.test": "b"}, fail={"api.test": how}, attempts=1)
    start = time.monotonic()
    with pytest.raises(socket.gaierror) as info:
        socket.getaddrinfo("api.test", 80)
    assert info.value.errno == errno
    assert {q.outcome for q in resolver.asked("api.test")} == {how}
    if how == "timeout":
        assert time.monotonic() - start >= 1.0  # resolv.conf's timeout:1, one attempt
    assert resolve("ok.test")  # the failure was api.test's alone


def test_truncated_answers_fall_back_to_tcp(tun_pair: TunPair) -> None:
    resolver = tun_pair.dns({"api.test": "b"}, fail="truncate")
    assert resolve("api.test") == sorted([tun_pair.b.ip, tun_pair.b.ip6])
    outcomes = {(q.transport, q.outcome) for q in resolver.queries}
    assert outcomes == {("udp", "truncated"), ("tcp", "answered")}
    assert tun_pair.packets.filter(direction="a->b", proto="tcp", dport=53, flags="S")


def test_servfail_for_some_queries_then_success(tun_pair: TunPair) -> None:
    resolver = tun_pair.dns({"api.test": "b"})
    resolver.fail("servfail", name="api.test", times=4)  # A and AAAA, two attempts each
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo("api.test", 80)
    assert resolve("api.test")
    assert [q.outcome for q in resolver.asked("api.test")][:4] == ["servfail"] * 4
    resolver.fail("timeout")
    resolver.fail(None)  # cleared again
    resolver.records["late.test"] = ["198.18.0.77"]
    assert resolve("late.test") == ["198.18.0.77"]
    # What dns() takes, the table takes, however the name is written; a bad value is
    # refused here, not later in the server's thread (which would stop answering).
    resolver.records["Later.Test."] = "b"
    assert resolve("later.test") == sorted([tun_pair.b.ip, tun_pair.b.ip6])
    from pytest_tunpair import OptionError

    with pytest.raises(OptionError, match=r"resolver.records\['x.test'\].*use 'a', 'b'"):
        resolver.records["x.test"] = "c"
    assert resolve("later.test")  # still serving


@pytest.fixture(scope="module")
def cares_shutdown_thread() -> None:
    """pycares destroys channels on a thread of its own, started when the first channel
    closes and kept for the process's life. Started here, before the test's tunnel, it runs
    outside any test's namespace; one started during the test would keep the namespace
    alive, and the plugin reports it as a thread the test left running."""
    import pycares

    pycares.Channel().close()


@pytest.mark.usefixtures("cares_shutdown_thread")
def test_dig_dnspython_cares_and_children_use_it(tun_pair: TunPair) -> None:
    import dns.resolver
    import pycares

    resolver = tun_pair.dns({"api.test": "b"}, ttl=7)
    b = tun_pair.b.ip
    dig = subprocess.run(
        [need("dig"), "+noall", "+answer", "+tries=1", "api.test", "A"],
        capture_output=True,
        text=True,
    )
    assert dig.stdout.split() == ["api.test.", "7", "IN", "A", b], dig.stdout + dig.stderr
    answer = dns.resolver.Resolver().resolve("api.test", "A")  # reads resolv.conf now
    assert [r.address for r in answer] == [b] and answer.rrset is not None
    assert answer.rrset.ttl == 7
    child = subprocess.run(
        [sys.executable, "-c", "import socket; print(socket.gethostbyname('api.test'))"],
        capture_output=True,
        text=True,
    )
    assert child.stdout.strip() == b, child.stderr
    got: list[object] = []
    channel = pycares.Channel()  # reads resolv.conf now, as c-ares does at init
    channel.getaddrinfo(
        "api.test",
        None,
        family=socket.AF_INET,
        callback=lambda result, error: got.append((result, error)),
    )
    channel.wait(5)
    ((result, error),) = got
    assert error is None, error
    assert [bytes(n.addr[0]).decode() for n in result.nodes] == [b]  # type: ignore[attr-defined]
    # Four clients, four A queries, each across the tunnel.
    assert len(tun_pair.packets.filter(direction="a->b", dport=53)) == len(resolver.queries) == 4


@pytest.mark.tunpair(hosts=True)
def test_spawned_process_in_host_b_resolves_too(tun_pair: TunPair) -> None:
    tun_pair.dns({"api.test": "a"})
    proc = tun_pair.b.spawn(
        [sys.executable, "-c", "import socket; print(socket.gethostbyname('api.test'))"],
    )
    proc.wait(10)
    assert tun_pair.b.output(proc).strip() == tun_pair.a.ip


def test_host_files_untouched_and_given_back() -> None:
    host_view = RESOLV.read_text()
    before = host_snapshot()
    seen: dict[str, str] = {}
    go = threading.Event()
    done = threading.Event()

    def outsider() -> None:
        go.wait(30)
        seen["other thread"] = RESOLV.read_text()
        done.set()

    t = threading.Thread(target=outsider)
    t.start()  # before dns(): its view is the host's

    def body() -> None:
        with TunPair() as pair:
            pair.dns({"api.test": "b"})
            seen["test thread"] = RESOLV.read_text()
            go.set()
            done.wait(30)
            assert resolve("api.test")
        seen["after"] = RESOLV.read_text()

    run_standalone(body)
    t.join(30)
    assert "nameserver 198.18.0.2" in seen["test thread"]
    assert seen["other thread"] == host_view
    assert RESOLV.read_text() == host_view
    if seen["after"] != host_view:
        # The rootless tier: the disposable thread that opened the pair could not go back.
        from pytest_tunpair._kernel.userns import thread_can_return

        assert not thread_can_return()
    assert host_snapshot() == before


def test_second_dns_call_is_refused(tun_pair: TunPair) -> None:
    from pytest_tunpair import OptionError, TunPairError

    resolver = tun_pair.dns({})
    with pytest.raises(TunPairError, match="running already"):
        tun_pair.dns({})
    with pytest.raises(OptionError, match="fail"):
        tun_pair.dns({}, fail="sometimes")
    with pytest.raises(OptionError, match="times"):
        resolver.fail("servfail", times="3")  # type: ignore[arg-type]
    with pytest.raises(OptionError, match=r"ttl.*>= 0"):
        tun_pair.dns({}, ttl=-1)


def test_a_missing_file_is_named_not_created() -> None:
    """dns() covers the machine's resolv.conf with the test's own; where there is none (a
    container without one, a dangling symlink to systemd-resolved's) it says so, and
    creates nothing."""
    from pytest_tunpair import NamespaceError
    from pytest_tunpair._kernel.mountns import private_files

    missing = Path("/etc/tunpair-no-such-file.conf")
    mnt = Path("/proc/thread-self/ns/mnt")

    def body() -> None:
        here = mnt.stat().st_ino
        with pytest.raises(NamespaceError, match="no such file on this machine"):
            private_files({str(missing): "nameserver 198.18.0.2\n"})
        assert mnt.stat().st_ino == here or not _can_return()

    run_standalone(body)
    assert not missing.exists()


def _can_return() -> bool:
    from pytest_tunpair._kernel.userns import thread_can_return

    return thread_can_return()


NSCD_RUN = """
import json, os, socket, subprocess, sys, threading
from pytest_tunpair import TunPair

os.makedirs("/run/nscd")
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind("/run/nscd/socket")
srv.listen()
hits = []

def fake_nscd():  # counts glibc's connections, answers none (glibc falls back)
    while True:
        conn, _ = srv.accept()
        hits.append(1)
        conn.close()

def lookup(name):
    # A fresh process each time: glibc stops asking an nscd that failed it, for a while.
    code = f"import socket; print(socket.getaddrinfo({name!r}, 80)[0][4][0])"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip()

threading.Thread(target=fake_nscd, daemon=True).start()
lookup("localhost")
before = len(hits)
with TunPair(ipv6=None) as pair:
    pair.dns({"api.test": "b"})
    addr = lookup("api.test")
    during = len(hits) - before
    print(json.dumps({"before": before, "during": during, "addr": addr, "b": pair.b.ip}))
"""


def test_a_running_nscd_is_bypassed() -> None:
    """glibc asks nscd first, and nscd resolves on the host's side: dns() hides its socket
    from the test. Played in a private mount namespace with a tmpfs /run, where a fake
    nscd listens (the machine's /run is not touched)."""
    import json
    import os

    from pytest_tunpair._kernel.userns import in_initial_user_namespace

    if os.geteuid() != 0 or not in_initial_user_namespace():
        pytest.skip("mounting a tmpfs over /run for the fake nscd needs real root")
    script = 'mount -t tmpfs tunpair-nscd /run && exec "$0" -c "$1"'
    r = subprocess.run(
        [need("unshare"), "-m", "--propagation", "private", "sh", "-c", script,
         sys.executable, NSCD_RUN],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads(r.stdout.splitlines()[-1])
    assert got["before"] > 0  # glibc does ask a running nscd ...
    assert got["during"] == 0  # ... but not under dns()
    assert got["addr"] == got["b"]
    assert not Path("/run/nscd").exists()  # the machine's /run never saw it
