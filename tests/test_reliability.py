"""Reliability: nothing leaks, interrupts end the run cleanly, hostile input never breaks the relay."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_tunpair import TunPair
from pytest_tunpair._wire.validate import to_bytes, validate_frame

from .conftest import host_snapshot, need


def _ping(pair: TunPair) -> bool:
    need("ping")
    return (
        subprocess.run(["ping", "-c", "1", "-W", "2", pair.b.ip], capture_output=True).returncode
        == 0
    )


# -- no leaks -------------------------------------------------------------------------------

SOAK = """
import json, os, resource, socket, threading
import pytest

N = {n}
marks = {{}}

def _state():
    return {{
        "fds": len(os.listdir("/proc/self/fd")),
        "threads": threading.active_count(),
        "rss_kb": int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]),
    }}

@pytest.mark.parametrize("i", range(N))
def test_udp_exchange(tun_pair, i):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as srv, \\
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as cli:
        srv.bind((tun_pair.b.ip, 0))
        srv.settimeout(5)
        cli.sendto(b"x" * 100, srv.getsockname())
        assert srv.recvfrom(200)[0] == b"x" * 100
    if i == 5:
        marks["early"] = _state()

def test_zz_report():
    marks["late"] = _state()
    with open({out!r}, "w") as f:
        json.dump(marks, f)
"""


@pytest.mark.slow
def test_300_tunnel_tests_leak_nothing(pytester: pytest.Pytester) -> None:
    out = pytester.path / "state.json"
    pytester.makepyfile(SOAK.format(n=300, out=str(out)))
    before = host_snapshot()
    result = pytester.runpytest_subprocess("--tunpair", "-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=301)
    marks = json.loads(out.read_text())
    early, late = marks["early"], marks["late"]
    assert late["fds"] <= early["fds"], marks
    assert late["threads"] <= early["threads"], marks
    assert late["rss_kb"] - early["rss_kb"] < 40 * 1024, marks
    assert host_snapshot() == before


# -- interrupts --------------------------------------------------------------------------------

PUSHER = """
import os, socket, threading, time
import pytest

def test_push(tun_pair):
    srv = socket.socket()
    srv.bind((tun_pair.b.ip, 0))
    srv.listen(1)
    def sink():
        conn, _ = srv.accept()
        while conn.recv(65536):
            pass
    threading.Thread(target=sink, daemon=True).start()
    cli = socket.create_connection(srv.getsockname())
    open({flag!r}, "w").close()
    chunk = b"z" * 65536
    {body}
"""


def _wait_for_file(
    path: os.PathLike[str] | str, proc: subprocess.Popen[bytes], timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            out = proc.communicate()[0].decode(errors="replace") if proc.poll() is not None else ""
            raise AssertionError(f"inner run never started pushing traffic:\n{out}")
        time.sleep(0.05)


def test_sigint_during_traffic_ends_the_run_and_leaves_the_host(pytester: pytest.Pytester) -> None:
    flag = pytester.path / "pushing"
    pytester.makepyfile(
        PUSHER.format(flag=str(flag), body="while True:\n        cli.sendall(chunk)")
    )
    before = host_snapshot()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "--tunpair", "-p", "no:cacheprovider", "-q"],
        cwd=pytester.path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_for_file(flag, proc, 60)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert b"KeyboardInterrupt" in out, out.decode(errors="replace")
    # "within a few seconds": generous, this is a liveness check, not a benchmark.
    assert took < 15, took
    assert host_snapshot() == before


def test_pytest_timeout_during_traffic_fails_the_test_and_leaves_the_host(
    pytester: pytest.Pytester,
) -> None:
    pytest.importorskip("pytest_timeout")
    flag = pytester.path / "pushing"
    pytester.makepyfile(
        PUSHER.format(flag=str(flag), body="while True:\n        cli.sendall(chunk)").replace(
            # func_only: the 2 s are the traffic's; opening the pair (setup) takes longer
            # than that on a busy machine, and a timeout there is an error, not a failure.
            "def test_push",
            "@pytest.mark.timeout(2, method='signal', func_only=True)\ndef test_push",
        )
    )
    before = host_snapshot()
    result = pytester.runpytest_subprocess("--tunpair", "-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*Timeout*"])
    assert host_snapshot() == before


# -- hostile input ---------------------------------------------------------------------------------


def _hostile(rng: random.Random) -> bytes:
    n = rng.randint(0, 4000)
    data = bytearray(rng.getrandbits(8) for _ in range(n))
    if n and rng.random() < 0.5:
        data[0] = rng.choice([0x45, 0x46, 0x4F, 0x60, 0x6F])  # plausible IPv4/IPv6 first bytes
        if n >= 4 and data[0] >> 4 == 4 and rng.random() < 0.5:
            data[2:4] = n.to_bytes(2, "big")  # a total length that fits
        if n >= 6 and data[0] >> 4 == 6 and rng.random() < 0.5:
            data[4:6] = max(0, n - 40).to_bytes(2, "big")
    return bytes(data)


def test_thousands_of_random_injections_never_break_the_relay(tun_pair: TunPair) -> None:
    rng = random.Random(20261127)
    outcomes = {"ok": 0, "ValueError": 0, "TypeError": 0}
    for i in range(3000):
        data = _hostile(rng)
        target = tun_pair.a if i % 2 else tun_pair.b
        try:
            target.inject(data)
            outcomes["ok"] += 1
        except (ValueError, TypeError) as exc:
            outcomes[type(exc).__name__] += 1
    for junk in (None, 42, "a string", [1, 2], object()):
        with pytest.raises(TypeError):
            tun_pair.a.inject(junk)
    assert outcomes["ok"] > 0 and outcomes["ValueError"] > 0, outcomes
    assert _ping(tun_pair)
    tun_pair.check()  # nothing went wrong inside the relay


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=4000), st.sampled_from(["tun", "tap"]), st.integers(68, 9000))
def test_validation_only_raises_value_error(data: bytes, mode: str, mtu: int) -> None:
    try:
        validate_frame(data, mode=mode, mtu=mtu)
    except ValueError:
        return
    if mode == "tun":
        assert data and data[0] >> 4 in (4, 6) and len(data) <= mtu


@given(st.one_of(st.integers(), st.text(), st.none(), st.floats(), st.lists(st.integers())))
def test_to_bytes_rejects_non_packets_with_type_error(obj: object) -> None:
    with pytest.raises(TypeError, match="bytes or a scapy packet"):
        to_bytes(obj)


# -- load -------------------------------------------------------------------------------------------


def test_50_concurrent_tcp_echo_connections(tun_pair: TunPair) -> None:
    payloads = [os.urandom(100_000) for _ in range(50)]
    srv = socket.socket()
    srv.bind((tun_pair.b.ip, 0))
    srv.listen(64)
    stop = threading.Event()

    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def acceptor() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            conn.settimeout(30)
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    results: dict[int, bytes] = {}

    def client(i: int) -> None:
        with socket.create_connection(srv.getsockname(), timeout=30) as c:
            sender = threading.Thread(target=c.sendall, args=(payloads[i],))
            sender.start()
            got = bytearray()
            while len(got) < len(payloads[i]):
                chunk = c.recv(65536)
                if not chunk:
                    break
                got.extend(chunk)
            sender.join()
            results[i] = bytes(got)

    acc = threading.Thread(target=acceptor)
    acc.start()
    clients = [threading.Thread(target=client, args=(i,)) for i in range(50)]
    try:
        for t in clients:
            t.start()
        for t in clients:
            t.join(60)
    finally:
        stop.set()
        acc.join()
        srv.close()
    assert sorted(results) == list(range(50))
    assert all(results[i] == payloads[i] for i in range(50))
    assert tun_pair.stats["a->b"]["bytes"] > 50 * 100_000


# -- isolation -------------------------------------------------------------------------------------


def test_namespace_has_no_route_out(tun_pair: TunPair) -> None:
    # `ip route get` asks the kernel's routing decision without sending anything.
    for target in ("192.0.2.1", "10.0.0.1", "8.8.8.8"):
        r = subprocess.run(["ip", "route", "get", target], capture_output=True, text=True)
        assert r.returncode != 0 and "unreachable" in r.stderr.lower(), (target, r.stdout)
    r = subprocess.run(["ip", "-6", "route", "get", "2001:db8::1"], capture_output=True, text=True)
    assert r.returncode != 0 or "unreachable" in r.stdout, r.stdout
    main = (
        subprocess.run(
            ["ip", "route", "show", "table", "main"], capture_output=True, text=True, check=True
        )
        .stdout.strip()
        .splitlines()
    )
    assert sorted(line.split()[0] for line in main) == ["198.18.0.1", "198.18.0.2"]
    assert sorted(n for _, n in socket.if_nameindex()) == ["lo", "tun0", "tun1"]


# -- fault paths -----------------------------------------------------------------------------------


def test_writes_into_a_down_device_count_as_drops(tun_pair: TunPair) -> None:
    subprocess.run(["ip", "link", "set", tun_pair.b.name, "down"], check=True)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _ in range(5):
            s.sendto(b"into the void", (tun_pair.b.ip, 9))
    # The relay marks a packet "dropped" once its write failed, just after recording it:
    # wait on the counter (a condition with a deadline), then look at the capture.
    deadline = time.monotonic() + 10
    while tun_pair.stats["a->b"]["dropped"] < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    dropped = [p for p in tun_pair.packets if p.action == "dropped"]
    assert len(dropped) == 5 and all(p.scapy.dst == tun_pair.b.ip for p in dropped)
    assert tun_pair.stats["a->b"]["dropped"] == 5
    assert tun_pair.stats["a->b"]["packets"] == 0
    tun_pair.check()
