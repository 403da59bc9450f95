"""Async tests and threads: awaitable waits, and every thread in the test's namespace.

Real traffic through real pairs, in coroutines run by pytest-asyncio and by anyio (on
asyncio and on trio); inner pytest runs for what only shows across tests (loop scopes,
runners that outlive a test, threads left at teardown) and for the rootless path. A
thread that connects first checks it is inside the test's namespace: outside, the pair's
addresses would lead off the machine.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio
import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.packet import Raw

from pytest_tunpair import (
    BlockingWaitError,
    Capture,
    PacketTimeout,
    ScriptedPeer,
    ScriptedTcp,
    ScriptedUdp,
    TunPair,
    UnexpectedPacket,
)
from pytest_tunpair._kernel.userns import in_initial_user_namespace, thread_can_return

WAIT = 10.0
ROOT = Path(__file__).resolve().parent.parent


def netns() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def wait_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("tunpair-wait")]


async def echo_server(pair: TunPair) -> tuple[asyncio.Server, int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1000):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, pair.b.ip, 0)
    return server, server.sockets[0].getsockname()[1]


# -- awaitable waits over real traffic ----------------------------------------------------------
@pytest.mark.asyncio
async def test_server_and_client_in_one_loop_with_awaited_waits(tun_pair: TunPair) -> None:
    packets = tun_pair.packets
    server, port = await echo_server(tun_pair)
    reader, writer = await asyncio.open_connection(tun_pair.b.ip, port)
    syn, synack, ack = await packets.expect_sequence_async(
        [TCP(dport=port, flags="S"), TCP(sport=port, flags="SA"), TCP(dport=port, flags="A")],
        timeout=WAIT,
    )
    writer.write(b"ping")
    # The server answers from this very loop: only an awaited wait lets it run.
    answer = await packets.wait_for_async(direction="b->a", payload=b"ping", timeout=WAIT)
    assert answer.sport == port and answer.seq > ack.seq > synack.seq > syn.seq
    echoed = await packets.expect_async(
        IP(src=tun_pair.b.ip) / TCP(sport=port) / Raw(b"ping"), after=ack, timeout=WAIT
    )
    assert echoed is answer
    assert await reader.read(4) == b"ping"
    await packets.expect_none_async(TCP(dport=port, flags="R"), during=0.2)
    # The blocking forms found the same packets (run where blocking is fine).
    same = await asyncio.to_thread(packets.wait_for, direction="b->a", payload=b"ping")
    assert same is answer
    writer.close()
    await writer.wait_closed()
    server.close()
    await server.wait_closed()
    await packets.wait_quiet_async(0.1, timeout=WAIT)


@pytest.mark.asyncio
async def test_blocking_forms_on_the_loop_thread_name_the_awaitable_form(
    tun_pair: TunPair,
) -> None:
    packets = tun_pair.packets
    server, port = await echo_server(tun_pair)
    _reader, writer = await asyncio.open_connection(tun_pair.b.ip, port)
    await packets.wait_for_async(flags="SA", timeout=WAIT)  # in the capture already ...
    calls = {
        "wait_for": lambda: packets.wait_for(flags="SA"),  # ... still refused: it may wait
        "expect": lambda: packets.expect(TCP(flags="SA")),
        "expect_none": lambda: packets.expect_none(TCP(flags="R")),
        "expect_sequence": lambda: packets.expect_sequence([TCP(flags="S")]),
        "wait_quiet": lambda: packets.wait_quiet(),
    }
    for name, call in calls.items():
        started = time.monotonic()
        with pytest.raises(BlockingWaitError) as raised:
            call()
        assert time.monotonic() - started < 0.5  # at once, not after the timeout
        message = str(raised.value)
        assert message.startswith(f"packets.{name}() blocks the thread"), message
        assert "runs the asyncio event loop" in message
        assert f"`await packets.{name}_async(...)`" in message
        assert raised.value.use == f"packets.{name}_async"
    # Waiting nothing is no blocking: fine on the loop's thread.
    assert packets.wait_for(flags="SA", timeout=0).flags == "SA"
    writer.close()
    server.close()


@pytest.mark.asyncio
async def test_awaited_failures_are_the_blocking_forms_failures(tun_pair: TunPair) -> None:
    packets = tun_pair.packets
    with pytest.raises(PacketTimeout) as awaited:
        await packets.wait_for_async(dport=9, timeout=0.2)
    with pytest.raises(PacketTimeout) as blocking:
        await asyncio.to_thread(packets.wait_for, dport=9, timeout=0.2)
    assert str(awaited.value) == str(blocking.value)
    assert str(awaited.value).startswith("no packet matched dport=9 within 0.2 s; 0 captured")
    with pytest.raises(PacketTimeout, match=r"expect: no packet matched UDP\(dport=9\)"):
        await packets.expect_async(UDP(dport=9), timeout=0.1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"x", (tun_pair.b.ip, 9))
    with pytest.raises(UnexpectedPacket, match=r"expect_none: packet #\d+ matched UDP"):
        await packets.expect_none_async(UDP(dport=9), during=1.0, after=0.0)
    with pytest.raises(ValueError, match=r"wait_for\(timeout=-1\)"):
        await packets.wait_for_async(timeout=-1)


@pytest.mark.asyncio
async def test_a_cancelled_wait_leaves_no_thread_or_waiter(tun_pair: TunPair) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await tun_pair.packets.wait_for_async(dport=9, timeout=30)
    assert time.monotonic() - started < 5  # not the wait's 30 s
    assert wait_threads() == []
    # The capture still wakes the waits that come after.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        task = asyncio.ensure_future(tun_pair.packets.wait_for_async(dport=9, timeout=WAIT))
        await asyncio.sleep(0)
        s.sendto(b"x", (tun_pair.b.ip, 9))
        assert (await task).dport == 9


@pytest.mark.asyncio
async def test_the_scripted_peer_in_a_coroutine(tun_pair: TunPair) -> None:
    with tun_pair.script("b") as peer:
        client = asyncio.ensure_future(asyncio.open_connection(tun_pair.b.ip, 8080))
        conn = await peer.tcp_accept_async(8080, complete=False, timeout=WAIT)
        assert not conn.established  # SYN-ACK not sent yet: complete_async() sends it
        assert await conn.complete_async(timeout=WAIT) is conn and conn.established
        reader, writer = await client
        writer.write(b"hello")
        assert (await conn.expect_next_async(flags="PA", timeout=WAIT)).payload == b"hello"
        writer.write(b"world")  # sent once the peer's automatic ACK of "hello" is in
        assert (await conn.recv_async(timeout=WAIT)).payload == b"world"
        with pytest.raises(BlockingWaitError, match=r"conn\.recv\(\).*`await conn\.recv_async"):
            conn.recv(timeout=1)
        with pytest.raises(BlockingWaitError, match=r"peer\.expect\(\).*`await peer\.expect_async"):
            peer.expect(TCP(flags="S"), timeout=1)
        conn.send(b"HELLO")
        assert await reader.read(5) == b"HELLO"
        writer.close()
        fin = await conn.expect_async(flags=lambda f: "F" in f, timeout=WAIT)
        assert (await peer.expect_async(TCP(flags="FA"), timeout=WAIT)).seq == fin.seq
        udp = peer.udp(5353)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"query", (tun_pair.b.ip, 5353))
            assert await udp.recv_async(timeout=WAIT) == b"query"


def test_every_wait_has_an_awaitable_form_with_its_parameters() -> None:
    forms = {
        Capture: ("wait_for", "expect", "expect_none", "expect_sequence", "wait_quiet"),
        ScriptedPeer: (
            "wait_for", "expect", "expect_none", "expect_sequence", "tcp_accept", "tcp_connect",
        ),
        ScriptedTcp: ("recv", "expect", "expect_next", "complete"),
        ScriptedUdp: ("recvfrom", "recv"),
    }  # fmt: skip
    for cls, names in forms.items():
        for name in names:
            blocking, awaitable = getattr(cls, name), getattr(cls, f"{name}_async")
            assert inspect.iscoroutinefunction(awaitable), (cls, name)
            assert inspect.signature(awaitable) == inspect.signature(blocking), (cls, name)
            assert awaitable.__name__ == f"{name}_async"


def test_blocking_waits_import_no_event_loop_library() -> None:
    """The loop check looks in sys.modules: a test that never imported asyncio pays nothing."""
    code = (
        "import sys\n"
        "from pytest_tunpair import Capture\n"
        "c = Capture()\n"
        "assert c.wait_new(-1, 0.01) == []\n"
        "try:\n    c.wait_for(timeout=0.01)\nexcept AssertionError:\n    pass\n"
        "print(sorted(m for m in ('asyncio', 'trio', 'anyio', 'sniffio') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# -- anyio, on asyncio and on trio ----------------------------------------------------------------
@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.anyio
async def test_anyio_worker_threads_and_awaited_waits(
    tun_pair: TunPair, anyio_backend: str
) -> None:
    inside = netns()
    assert await anyio.to_thread.run_sync(netns) == inside
    with socket.create_server((tun_pair.b.ip, 0)) as server:
        port = server.getsockname()[1]
        async with await anyio.connect_tcp(tun_pair.b.ip, port) as stream:
            conn, _ = await anyio.to_thread.run_sync(server.accept)
            await stream.send(b"hi")
            sent = await tun_pair.packets.expect_async(TCP(dport=port) / b"hi", timeout=WAIT)
            assert sent.direction == "a->b"
            with pytest.raises(BlockingWaitError, match=f"runs the {anyio_backend} event loop"):
                tun_pair.packets.wait_for(dport=port)
            conn.close()
    started = time.monotonic()
    with anyio.move_on_after(0.2) as scope:
        await tun_pair.packets.wait_for_async(dport=9, timeout=30)
    assert scope.cancelled_caught and time.monotonic() - started < 5
    assert wait_threads() == []


# -- third-party async clients: each with its server in the same loop ----------------------------
@pytest.mark.anyio
async def test_httpx_async_client_and_a_server_in_one_loop(
    tun_pair: TunPair, anyio_backend: str
) -> None:
    """httpx's AsyncClient (httpcore on asyncio, or on trio) against a server task of the
    same loop, with the response awaited in the capture before the client has it."""
    import httpx

    async def serve(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            request = b""
            while b"\r\n\r\n" not in request:
                request += await stream.receive()
            await stream.send(
                b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nhello\n"
            )

    listener = await anyio.create_tcp_listener(local_host=tun_pair.b.ip)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    got: dict[str, httpx.Response] = {}
    done = anyio.Event()

    async def fetch() -> None:
        # trust_env=False: no proxy from the environment, which would lead off the machine.
        async with httpx.AsyncClient(trust_env=False) as client:
            got["response"] = await client.get(f"http://{tun_pair.b.ip}:{port}/async")
        done.set()

    async with listener, anyio.create_task_group() as tasks:
        tasks.start_soon(listener.serve, serve)
        tasks.start_soon(fetch)
        request = await tun_pair.packets.wait_for_async(
            lambda p: p.payload.startswith(b"GET /async HTTP/1.1"), direction="a->b", timeout=WAIT
        )
        answer = await tun_pair.packets.wait_for_async(
            lambda p: p.payload.startswith(b"HTTP/1.1 200 OK"),
            direction="b->a",
            timeout=WAIT,
        )
        with anyio.fail_after(WAIT):
            await done.wait()
        tasks.cancel_scope.cancel()
    assert answer.sport == port and answer.dst == tun_pair.a.ip and answer.seq > request.seq
    assert got["response"].status_code == 200 and got["response"].text == "hello\n"
    assert wait_threads() == []


@pytest.mark.asyncio
async def test_aioquic_client_and_server_in_one_loop(tun_pair: TunPair, tmp_path: Path) -> None:
    """aioquic's server and client in the test's loop: the handshake's datagrams are awaited
    in the capture while both ends run."""
    from aioquic.asyncio import connect, serve
    from aioquic.quic.configuration import QuicConfiguration

    from .h3 import make_certificate

    cert, key = make_certificate(tmp_path, tun_pair.b.ip)
    server_config = QuicConfiguration(is_client=False, alpn_protocols=["tunpair"])
    server_config.load_cert_chain(cert, key)
    server = await serve(tun_pair.b.ip, 4433, configuration=server_config)
    client_config = QuicConfiguration(alpn_protocols=["tunpair"])
    client_config.load_verify_locations(cert)

    async def client() -> None:
        async with connect(tun_pair.b.ip, 4433, configuration=client_config) as connection:
            await connection.ping()

    try:
        pinged = asyncio.ensure_future(client())
        initial = await tun_pair.packets.expect_async(
            IP(src=tun_pair.a.ip) / UDP(dport=4433), timeout=WAIT
        )
        assert len(initial.payload) >= 1200  # a client's Initial is padded (RFC 9000 14.1)
        await tun_pair.packets.expect_async(
            IP(src=tun_pair.b.ip) / UDP(sport=4433), after=initial, timeout=WAIT
        )
        await asyncio.wait_for(pinged, WAIT)
    finally:
        server.close()
    assert wait_threads() == []


# -- threads -------------------------------------------------------------------------------------
def test_executor_workers_live_in_the_pair_namespace(tun_pair: TunPair) -> None:
    pool = tun_pair.executor(max_workers=3, thread_name_prefix="clients")
    with socket.create_server((tun_pair.b.ip, 0)) as server:
        futures = [pool.submit(socket.create_connection, server.getsockname(), WAIT) for _ in "abc"]
        for _ in futures:
            server.accept()[0].close()
        for future in futures:
            assert future.result().getsockname()[0] == tun_pair.a.ip
            future.result().close()
    assert set(pool.map(lambda _: netns(), range(6))) == {netns()}
    names = {t.name for t in threading.enumerate() if t.name.startswith("clients")}
    assert names and len(names) <= 3


# -- inner runs: what shows only across tests, at teardown, or on the rootless path ---------------
CONNECT = """
import asyncio, os, socket, threading, pytest

def netns():
    return os.stat("/proc/thread-self/ns/net").st_ino

def connect_from_inside(expected, address):
    # Only from inside the test's namespace: outside, the address leads off the machine.
    if netns() != expected:
        return ("outside", netns())
    with socket.create_connection(address, timeout=10) as client:
        return ("connected", client.getsockname()[0])
"""

LOOP_SCOPES = (
    CONNECT
    + """
async def check(pair):
    with socket.create_server((pair.b.ip, 0)) as server:
        port = server.getsockname()[1]
        got = await asyncio.to_thread(connect_from_inside, netns(), server.getsockname())
        assert got == ("connected", pair.a.ip)
        server.accept()[0].close()
    assert await asyncio.get_running_loop().run_in_executor(None, netns) == netns()
    await pair.packets.wait_for_async(flags="S", dport=port, timeout=5)

@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("i", range(3))
async def test_session_loop(tun_pair, i):
    await check(tun_pair)

@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("i", range(3))
async def test_module_loop(tun_pair, i):
    await check(tun_pair)

@pytest.mark.asyncio
@pytest.mark.parametrize("i", range(3))
async def test_function_loop(tun_pair, i):
    await check(tun_pair)

@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("i", range(2))
async def test_session_loop_on_a_module_pair(tun_pair_module, i):
    await check(tun_pair_module)

def test_asyncio_run_in_a_plain_test(tun_pair):
    asyncio.run(check(tun_pair))
"""
)

ANYIO_RUNNER = (
    CONNECT
    + """
import anyio

@pytest.fixture(scope="module", params=BACKENDS)
def anyio_backend(request):
    return request.param

@pytest.fixture(scope="module")
async def keeps_the_runner(anyio_backend):
    yield  # anyio's runner -- its loop, its worker threads -- lives for the module

@pytest.mark.anyio
@pytest.mark.parametrize("i", range(3))
async def test_to_thread(tun_pair, keeps_the_runner, i):
    with socket.create_server((tun_pair.b.ip, 0)) as server:
        got = await anyio.to_thread.run_sync(connect_from_inside, netns(), server.getsockname())
        assert got == ("connected", tun_pair.a.ip)
        server.accept()[0].close()
"""
)

THREADS = """
import os, queue, threading, pytest
from concurrent.futures import ThreadPoolExecutor

def netns():
    return os.stat("/proc/thread-self/ns/net").st_ino

IMPORT_POOL = ThreadPoolExecutor(1, thread_name_prefix="import-pool")
IMPORT_POOL.submit(netns).result()  # its worker starts now, on the host's network

JOBS = queue.Queue()
def serve():
    while True:
        fn, box = JOBS.get()
        box.put(fn())
threading.Thread(target=serve, name="host-thread", daemon=True).start()
def on_host_thread(fn):
    box = queue.Queue()
    JOBS.put((fn, box))
    return box.get(timeout=10)

RELEASE = threading.Event()

def test_a_pool_started_at_import(tun_pair):
    assert IMPORT_POOL.submit(netns).result() != netns()  # and a warning says so

def test_executor_used_from_a_host_thread(tun_pair):
    pool = tun_pair.executor()
    assert on_host_thread(netns) != netns()
    assert on_host_thread(lambda: pool.submit(netns).result()) == netns()

def test_leaves_a_thread(tun_pair):
    threading.Thread(target=RELEASE.wait, name="left-behind").start()

def test_leaves_an_executor_task(tun_pair):
    tun_pair.executor().submit(RELEASE.wait)

def test_stops_its_thread(tun_pair):
    stop = threading.Event()
    threading.Thread(target=stop.wait, name="stopped-in-time").start()
    stop.set()  # not joined: it ends during the teardown's grace

def test_zz_release():
    RELEASE.set()
"""

SCOPED = """
import threading, pytest

RELEASE = threading.Event()

@pytest.fixture(scope="module")
def server(tun_pair_module):
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, name="module-server")
    t.start()
    yield
    stop.set()
    t.join()

def test_one(tun_pair_module, server):
    threading.Thread(target=RELEASE.wait, name="left-by-one").start()

def test_two(tun_pair_module, server):
    RELEASE.set()
"""


def _real_root() -> bool:
    return os.geteuid() == 0 and in_initial_user_namespace()


USERNS = [
    "auto",
    pytest.param(
        "always",
        marks=pytest.mark.skipif(not _real_root(), reason="--tunpair-userns=always as root"),
    ),
]


def inner(pytester: pytest.Pytester, *args: str, **sources: str) -> pytest.RunResult:
    pytester.makepyfile(**sources)
    return pytester.runpytest_subprocess(
        "--tunpair", "-p", "no:cacheprovider", "-o", "asyncio_default_fixture_loop_scope=function",
        *args,
    )  # fmt: skip


def runs_on_own_threads(userns: str) -> bool:
    """The inner run's tunnel tests run on threads of their own (rootless)."""
    return userns == "always" or not thread_can_return()


@pytest.mark.parametrize("userns", USERNS)
def test_across_tests_loops_runners_pools_and_leftovers(
    pytester: pytest.Pytester, userns: str
) -> None:
    """What only shows across the tests of a run: pytest-asyncio's loop scopes and anyio's
    runner reach each test's own pair; a pool from import time warns; threads left running
    are reported, each by the test that left it."""
    # A trio run belongs to the thread that started it, and rootless each tunnel test runs
    # on a thread of its own: trio's runner cannot span tests there (docs/async.md says so).
    backends = ["asyncio"] if runs_on_own_threads(userns) else ["asyncio", "trio"]
    result = inner(
        pytester,
        f"--tunpair-userns={userns}",
        test_loops=LOOP_SCOPES,
        test_runner=ANYIO_RUNNER.replace("BACKENDS", repr(backends)),
        test_threads=THREADS,
        test_scoped=SCOPED,
    )
    result.assert_outcomes(passed=12 + 3 * len(backends) + 6 + 2, warnings=4)
    result.stdout.fnmatch_lines_random(
        [
            "*ThreadNamespaceWarning: netns was submitted to the thread pool 'import-pool', "
            "first started at *test_threads.py:8 in <module>, whose worker threads (1 of 1) "
            "live in another network namespace than this test's*tun_pair.executor()*",
            "*LeftoverThreadWarning: 1 thread started in the tunnel namespace during the test "
            "still running at its end: 'left-behind' (tid *, started at *test_threads.py:* in "
            "test_leaves_a_thread)*",
            "*LeftoverThreadWarning: 1 thread * 'tun_pair.executor-0_0' (tid *, started at "
            "*test_threads.py:* in test_leaves_an_executor_task)*",
            "*test_scoped.py:14: LeftoverThreadWarning: *'left-by-one'*",
        ]
    )
    for quiet in ("stopped-in-time", "host-thread", "module-server"):
        result.stdout.no_fnmatch_line(f"*{quiet}*")


@pytest.mark.parametrize("userns", USERNS)
def test_trio_runner_kept_across_rootless_tests_is_refused_in_one_line(
    pytester: pytest.Pytester, userns: str
) -> None:
    """docs/async.md's note: rootless, each tunnel test runs on a thread of its own, and a
    trio run kept by a module async fixture belongs to the first test's thread: the tests
    after it stop at setup with one line saying what to do, not trio's error deep inside."""
    if not runs_on_own_threads(userns):
        pytest.skip("tunnel tests run on the main thread here: trio's runner spans them")
    # Without hypothesis' plugin: its import at the summary, while trio's abandoned runner
    # is collected, trips a CPython 3.11.2 bug (SystemError: AST constructor recursion
    # depth mismatch), which later 3.11 releases fixed.
    result = inner(
        pytester,
        f"--tunpair-userns={userns}",
        "-p",
        "no:hypothesispytest",
        test_runner=ANYIO_RUNNER.replace("BACKENDS", repr(["trio"])),
    )
    result.assert_outcomes(passed=1, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at setup of test_to_thread[[]trio-1[]]*",
            "test_to_thread[[]trio-1[]]: anyio's trio runner was started on another thread by an "
            "earlier test (a module or session async fixture keeps it)*make the async fixtures "
            "function-scoped for the trio backend*",
        ]
    )


def test_leftover_thread_policy_fail(pytester: pytest.Pytester) -> None:
    result = inner(
        pytester, "--tunpair-leftovers=fail", "-k", "leaves_a_thread or zz", test_threads=THREADS
    )
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaves_a_thread*",
            "*1 thread started in the tunnel namespace during the test still running at its "
            "end: 'left-behind'*--tunpair-leftovers=fail fails the test",
        ]
    )
    assert "Traceback" not in result.stdout.str()


def test_executor_of_a_closed_pair_is_refused() -> None:
    from pytest_tunpair import PairClosedError

    from .conftest import run_standalone

    def body() -> None:
        with TunPair() as pair:
            pool = pair.executor()
            assert pool.submit(netns).result() == netns()  # the pair's: this thread is in it
        with pytest.raises(PairClosedError, match=r"tun_pair\.executor\(\): the pair is not open"):
            pair.executor()
        with pytest.raises(RuntimeError, match="shutdown"):
            pool.submit(netns)

    run_standalone(body)
