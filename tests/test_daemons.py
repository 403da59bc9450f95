"""Daemons in the namespace: spawn with readiness, nothing left running, drained teardown,
module and session pairs, fixture order. Real daemons (http.server, nginx), real clients
(curl), only to the pair's addresses."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pytest_tunpair import Capture, Packet, SpawnError, TunPair
from pytest_tunpair._kernel.procs import members, parse_ready

from .conftest import host_snapshot, need, run_standalone, tcpdump_read

NGINX = "/usr/sbin/nginx"
PORT = 8080


def curl(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [need("curl"), "-sS", "--max-time", "20", *args, url],
        capture_output=True,
        text=True,
        timeout=60,
    )


def running(pid: int) -> bool:
    """Alive and not a zombie (a zombie has exited; it waits for its parent or init)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def wait_until(cond: object, timeout: float = 10.0) -> None:
    __tracebackhide__ = True
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {cond}"
        time.sleep(0.01)


# -- spawn and readiness ---------------------------------------------------------------------
def test_http_server_spawned_ready_on_its_port_and_fetched_with_curl(
    tun_pair: TunPair, tmp_path: Path
) -> None:
    (tmp_path / "hello.txt").write_text("hello from the namespace\n")
    server = tun_pair.spawn(
        [sys.executable, "-m", "http.server", "--bind", tun_pair.b.ip, str(PORT)],
        ready=PORT,
        cwd=tmp_path,
    )
    # Readiness came from the socket table: nothing crossed the relay to find out.
    assert len(tun_pair.packets) == 0
    assert server.poll() is None
    r = curl(f"http://{tun_pair.b.ip}:{PORT}/hello.txt")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "hello from the namespace\n"
    assert any(p.direction == "a->b" for p in tun_pair.packets)
    # Its log went to the pair's file.
    wait_until(lambda: "GET /hello.txt" in tun_pair.output(server))


NGINX_CONF = """
daemon off;
master_process {master};
{user}
worker_processes 2;
pid {tmp}/nginx.pid;
error_log stderr notice;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen {ip}:{port};
        listen [{ip6}]:{port};
        location / {{ return 200 "nginx in the namespace\\n"; }}
    }}
}}
"""


def nginx_conf(tmp_path: Path, pair: TunPair, port: int = PORT) -> Path:
    if not os.access(NGINX, os.X_OK):
        need(NGINX)
    from pytest_tunpair._kernel.userns import in_initial_user_namespace

    # Workers drop privileges to `nobody` with initgroups(), which a user namespace with
    # setgroups denied refuses: there nginx serves from its master process alone.
    # It also chowns its temp directories to that user, which is not mapped there: keep ours.
    real_root = in_initial_user_namespace() and os.getuid() == 0
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            tmp=tmp_path,
            ip=pair.b.ip,
            ip6=pair.b.ip6,
            port=port,
            master="on" if real_root else "off",
            user="" if real_root else "user root;",
        )
    )
    return conf


def test_nginx_spawned_and_fetched_over_both_families(tun_pair: TunPair, tmp_path: Path) -> None:
    conf = nginx_conf(tmp_path, tun_pair)
    nginx = tun_pair.spawn(
        [NGINX, "-e", "stderr", "-p", str(tmp_path), "-c", str(conf)], ready=PORT
    )
    for url in (f"http://{tun_pair.b.ip}:{PORT}/", f"http://[{tun_pair.b.ip6}]:{PORT}/"):
        r = curl(url)
        assert r.returncode == 0, r.stderr + tun_pair.output(nginx)
        assert r.stdout == "nginx in the namespace\n"


def test_nginx_and_its_workers_are_gone_after_teardown(tmp_path: Path) -> None:
    def run() -> tuple[int, list[int]]:
        with TunPair() as pair:
            conf = nginx_conf(tmp_path, pair)
            nginx = pair.spawn(
                [NGINX, "-e", "stderr", "-p", str(tmp_path), "-c", str(conf)], ready=PORT
            )
            assert curl(f"http://{pair.b.ip}:{PORT}/").returncode == 0
            children = [
                int(line.split()[0])
                for line in subprocess.run(
                    ["ps", "-o", "pid=", "--ppid", str(nginx.pid)], capture_output=True, text=True
                ).stdout.splitlines()
            ]
        return nginx.pid, children

    master, workers = run_standalone(run)
    assert not running(master)
    assert not any(running(pid) for pid in workers)


def test_ready_on_udp_port_path_and_callable(tun_pair: TunPair, tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import socket, sys, time
        s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET,
                          socket.SOCK_DGRAM)
        time.sleep(0.2)  # not at once: readiness has to wait for it
        s.bind((sys.argv[1], 5353))
        open(sys.argv[2], "w").close()
        while True:
            data, peer = s.recvfrom(100)
            s.sendto(data.upper(), peer)
        """
    )
    flag = tmp_path / "bound"
    started = time.monotonic()
    tun_pair.spawn([sys.executable, "-c", code, tun_pair.b.ip6, str(flag)], ready=("udp", 5353))
    assert time.monotonic() - started >= 0.2
    assert flag.exists()  # bound before the flag file: the UDP wait really waited
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.settimeout(10)
        s.sendto(b"ping", (tun_pair.b.ip6, 5353))
        assert s.recv(100) == b"PING"

    other = tmp_path / "other"
    tun_pair.spawn(["sh", "-c", f"sleep 0.1; touch {other}; exec sleep 60"], ready=other)
    assert other.exists()
    calls = []
    tun_pair.spawn(["sleep", "60"], ready=lambda: calls.append(1) or len(calls) >= 3)
    assert len(calls) == 3


def test_process_that_exits_first_raises_spawn_error_with_its_output(tun_pair: TunPair) -> None:
    with pytest.raises(SpawnError) as info:
        tun_pair.spawn(
            ["sh", "-c", "echo starting; echo 'bind: address in use' >&2; exit 3"], ready=PORT
        )
    err = info.value
    assert err.returncode == 3
    assert err.command[0] == "sh"
    text = str(err)
    assert "exited with status 3 before a TCP socket listening on port 8080" in text
    assert "starting" in text and "bind: address in use" in text
    assert err.output.splitlines() == ["starting", "bind: address in use"]


def test_process_not_ready_in_time_is_stopped_and_raises(tun_pair: TunPair) -> None:
    started = time.monotonic()
    with pytest.raises(SpawnError, match=r"not ready within 0.5 s.*port 9999") as info:
        tun_pair.spawn(["sh", "-c", "echo waiting; exec sleep 60"], ready=9999, timeout=0.5)
    assert time.monotonic() - started < 5
    assert info.value.returncode == -signal.SIGTERM  # stopped, not left running
    assert "waiting" in str(info.value)


def test_bad_ready_values_fail_before_anything_starts(tun_pair: TunPair) -> None:
    for bad in (True, ("sctp", 1), 70000, 3.5):
        with pytest.raises((TypeError, ValueError), match=r"spawn\(ready="):
            tun_pair.spawn(["sleep", "60"], ready=bad)
    assert members(os.stat(tun_pair.netns_path)) == {}  # nothing was started


# -- nothing left running ------------------------------------------------------------------------
SETSID_SERVER = """
import os, socket, sys, time
if os.fork() == 0:
    os.setsid()  # like sshd's per-connection children: out of the parent's session and group
    with open(sys.argv[2] + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(sys.argv[2] + ".tmp", sys.argv[2])
    while True:
        time.sleep(1)
while not os.path.exists(sys.argv[2]):  # listen (be ready) once the child has its session
    time.sleep(0.01)
s = socket.create_server((sys.argv[1], 2222))
while True:
    time.sleep(1)
"""


def test_spawned_server_and_its_setsid_child_are_gone_after_teardown(tmp_path: Path) -> None:
    pidfile = tmp_path / "child"

    def run() -> tuple[int, int]:
        with TunPair() as pair:
            server = pair.spawn(
                [sys.executable, "-c", SETSID_SERVER, pair.b.ip, str(pidfile)], ready=2222
            )
            child = int(pidfile.read_text())
            assert running(child)
            # A session of its own: killing the server's process group would miss it.
            assert os.getsid(child) == child != os.getsid(server.pid)
        return server.pid, child

    server, child = run_standalone(run)
    assert not running(server)
    assert not running(child)


def test_a_process_ignoring_sigterm_is_killed_after_the_grace_period(tmp_path: Path) -> None:
    def run() -> tuple[int, float]:
        with TunPair() as pair:
            proc = pair.spawn(
                ["sh", "-c", f"trap '' TERM; touch {tmp_path}/up; while :; do sleep 0.1; done"],
                ready=tmp_path / "up",
            )
            started = time.monotonic()
        return proc.pid, time.monotonic() - started

    pid, took = run_standalone(run)
    assert not running(pid)
    assert 1.5 < took < 15  # SIGTERM ignored: SIGKILL after 2 s


def test_host_processes_are_never_touched() -> None:
    host = subprocess.Popen(["sleep", "60"])  # started here, on the host network
    try:

        def run() -> None:
            with TunPair() as pair:
                pair.spawn(["sleep", "60"])
                subprocess.Popen(["sleep", "61"])  # a leftover, inside

        with pytest.warns(UserWarning, match=r"stopped 1 process .*\(sleep 61\)"):
            run_standalone(run)
        assert host.poll() is None
    finally:
        host.kill()
        host.wait()


LEFTOVER_TEST = """
import subprocess, sys, time
from pathlib import Path

def test_leaves_one_behind(tun_pair, tmp_path):
    proc = subprocess.Popen(["sleep", "300"])
    with open("pid", "w") as f:
        f.write(str(proc.pid))
    # Until sleep runs: in the middle of its exec, /proc/PID/cmdline is empty and the
    # teardown's message would name it by its command, [sleep].
    while not Path(f"/proc/{proc.pid}/cmdline").read_bytes().startswith(b"sleep"):
        time.sleep(0.01)

def test_spawned_ones_are_quiet(tun_pair):
    # A child in a session of its own is still the spawned process's: stopped, not reported.
    tun_pair.spawn(
        ["sh", "-c", "setsid sleep 301 & echo $! > c.tmp && mv c.tmp child; exec sleep 300"],
        ready="child",
    )
"""


@pytest.mark.parametrize("policy", ["warn", "fail", "kill"])
def test_leftover_policies(pytester: pytest.Pytester, policy: str) -> None:
    pytester.makepyfile(LEFTOVER_TEST)
    args = ["--tunpair", "-p", "no:cacheprovider", "-rA"]
    if policy != "warn":  # the default
        args.append(f"--tunpair-leftovers={policy}")
    result = pytester.runpytest_subprocess(*args)
    pid = int((pytester.path / "pid").read_text())
    assert not running(pid)
    assert not running(int((pytester.path / "child").read_text()))
    out = result.stdout.str()
    message = f"stopped 1 process left running in the tunnel namespace: {pid} (sleep 300)"
    if policy == "warn":
        result.assert_outcomes(passed=2, warnings=1)
        # Pointed at the test, not at the plugin's code.
        result.stdout.fnmatch_lines(
            ["*test_leftover_policies.py:*: LeftoverProcessWarning: " + message + "*"]
        )
    elif policy == "fail":
        result.assert_outcomes(passed=2, errors=1)
        result.stdout.fnmatch_lines(
            ["*ERROR at teardown of test_leaves_one_behind*", message + "*"]
        )
        assert "Traceback" not in out and "_procs.py" not in out
        assert "During handling" not in out
    else:
        result.assert_outcomes(passed=2)
        assert "stopped 1 process" not in out
    if policy == "warn":
        assert out.count(message) == 1


def test_leftover_policy_from_ini_and_bad_values(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(LEFTOVER_TEST)
    pytester.makeini("[pytest]\ntunpair_leftovers = fail\n")
    result = pytester.runpytest_subprocess("--tunpair", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, errors=1)
    result = pytester.runpytest_subprocess("--tunpair", "--tunpair-leftovers=maybe")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["ERROR: --tunpair-leftovers: bad value 'maybe': use one of 'kill', 'warn', 'fail'"]
    )
    pytester.makeini("[pytest]\ntunpair_leftovers = often\n")
    result = pytester.runpytest_subprocess("--tunpair")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "ERROR: ini key tunpair_leftovers in *: bad value 'often': "
            "use one of 'kill', 'warn', 'fail'"
        ]
    )


# -- drained teardown ------------------------------------------------------------------------------
FIN_SERVER = """
import select, signal, socket, sys, time
conn = None

def on_term(signum, frame):
    # What the kernel holds for us when teardown stops us: b"" once the client's FIN is in.
    # The relay's write hands the FIN to the kernel, whose receive path may still be in a
    # deferred softirq on a busy machine: half a second for it (a FIN the relay never
    # delivered, with drain=0 and a 2 s delay, does not come in that time).
    conn = srv.accept()[0]  # queued by the kernel already (the handshake is done)
    data = b""
    conn.setblocking(False)
    deadline = time.monotonic() + 0.5
    got = "no fin"
    while True:
        try:
            chunk = conn.recv(1 << 16)
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            select.select([conn], [], [], left)
            continue
        if not chunk:
            got = "fin"
            break
        data += chunk
    with open(sys.argv[2], "w") as f:
        f.write(f"{got} {data.decode()}")
    sys.exit(0)

signal.signal(signal.SIGTERM, on_term)  # before listening: ready means it is in place
srv = socket.create_server((sys.argv[1], 7000))
signal.pause()
"""


@pytest.mark.parametrize(
    ("drain", "delay", "seen"), [(1.0, "200ms", "fin hello"), (0, "2s", "no fin hello")]
)
def test_a_delayed_fin_reaches_the_server_before_teardown(
    tmp_path: Path, drain: float, delay: str, seen: str
) -> None:
    result = tmp_path / "result"

    def run() -> None:
        with TunPair(drain=drain) as pair:
            pair.spawn([sys.executable, "-c", FIN_SERVER, pair.b.ip, str(result)], ready=7000)
            with socket.create_connection((pair.b.ip, 7000), timeout=10) as client:
                client.sendall(b"hello")
                # Wait for the server's ACK of the data (after its SYN-ACK): then only the
                # FIN can be delayed.
                pair.packets.wait_for(lambda p: p.direction == "b->a" and p.seq > 2, timeout=10)
                pair.impair(delay=delay)
            # The FIN now waits in the relay's delay line while the pair closes.

    run_standalone(run)
    assert result.read_text() == seen


# -- module and session pairs ------------------------------------------------------------------
MODULE_SERVER = """
import os, subprocess, sys, pytest

pytestmark = pytest.mark.tunpair(mtu=1400)
HOST = os.stat("/proc/thread-self/ns/net").st_ino

@pytest.fixture(scope="module")
def server(tun_pair_module, tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    (root / "index.html").write_text("served once for the module")
    proc = tun_pair_module.spawn(
        [sys.executable, "-m", "http.server", "--bind", tun_pair_module.b.ip, "8000"],
        ready=8000, cwd=root,
    )
    with open("spawned", "a") as f:
        f.write(f"{proc.pid}\\n")
    yield f"http://{tun_pair_module.b.ip}:8000/"
    assert os.stat("/proc/thread-self/ns/net").st_ino != HOST  # finalizer runs inside too

def fetch(url, port):
    r = subprocess.run(["curl", "-sS", "--local-port", str(port), url],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout

@pytest.mark.parametrize("port", [40001, 40002, 40003])
def test_fetch(server, tun_pair_module, port):
    assert tun_pair_module.options.mtu == 1400
    assert os.stat("/proc/thread-self/ns/net").st_ino != HOST
    tun_pair_module.add_hook(lambda p: None)  # removed at the test's end
    assert tun_pair_module.describe().count("hooks a->b") == 1
    assert fetch(server, port) == "served once for the module"
    mine = tun_pair_module.packets.since(tun_pair_module.test_start)
    assert mine and all(f":{port}" in p.summary() or f"{port} >" in p.summary()
                        or str(port) in p.summary() for p in mine)
    assert False, f"deliberate: show the packets of port {port}"

def test_plain_stays_on_the_host():
    assert os.stat("/proc/thread-self/ns/net").st_ino == HOST
"""


PORTS = {40001, 40002, 40003}


def _check_module_run(result: pytest.RunResult, path: Path, pcaps: Path) -> None:
    __tracebackhide__ = True
    result.assert_outcomes(failed=3, passed=1)
    out = result.stdout.str()
    assert "INTERNALERROR" not in out
    spawned = (path / "spawned").read_text().split()
    assert 1 <= len(spawned) <= 2, spawned  # once per process (xdist: once per worker)
    assert not any(running(int(pid)) for pid in spawned)
    # Each failure report holds that test's packets only.
    for port in PORTS:
        report = re.split(
            r"_ test_fetch\[\d+\] _|short test summary", out.split(f"_ test_fetch[{port}] _")[1]
        )[0]
        assert "Captured packets call" in report, report
        report = report.split("Captured packets call")[1]
        assert f"198.18.0.1:{port} > 198.18.0.2:8000 S" in report, report
        assert not any(re.search(rf":{other}\b", report) for other in PORTS - {port}), report
        # The hook each test adds is gone at its end: one per report, not one per test so far.
        assert report.count("hooks a->b") == 1, report
    files = sorted(pcaps.glob("*.pcapng"))
    assert len(files) == 3, files
    for f in files:
        port = int(f.stem.rsplit("_", 1)[1])
        text = tcpdump_read(f).stdout
        assert f"198.18.0.1.{port} > 198.18.0.2.8000: Flags [S]" in text, text
        # A port as tcpdump writes it ("198.18.0.1.40001 >", "> 198.18.0.1.40001:"), not
        # the same digits in a timestamp ("06:33:34.540002").
        assert not any(re.search(rf"\.{other}[ :]", text) for other in PORTS - {port}), text


@pytest.mark.parametrize("how", ["root", "rootless", "xdist"])
def test_module_server_serves_three_tests_each_report_its_own_packets(
    pytester: pytest.Pytester, how: str
) -> None:
    need("curl")
    pytester.makepyfile(test_mod=MODULE_SERVER)
    pcaps = pytester.path / "pcaps"
    args = ["--tunpair", "-p", "no:cacheprovider", f"--tunpair-pcap={pcaps}"]
    if how == "rootless":
        if os.getuid() != 0:
            pytest.skip("--tunpair-userns=always is tested as root")
        args.append("--tunpair-userns=always")
    if how == "xdist":
        args += ["-n", "2"]
    before = host_snapshot()
    result = pytester.runpytest_subprocess(*args)
    assert host_snapshot() == before
    _check_module_run(result, pytester.path, pcaps)


SESSION_TESTS = {
    "conftest.py": """
import os, sys, pytest

@pytest.fixture(scope="session")
def echo(tun_pair_session):
    code = ("import socket,sys\\n"
            "s=socket.create_server((sys.argv[1], 7))\\n"
            "while True:\\n"
            "    c,_=s.accept(); c.sendall(c.recv(100)); c.close()\\n")
    proc = tun_pair_session.spawn([sys.executable, "-c", code, tun_pair_session.b.ip], ready=7)
    with open("spawned", "a") as f:
        f.write(f"{proc.pid}\\n")
    return (tun_pair_session.b.ip, 7)
""",
    "test_one.py": """
import socket, subprocess

def ask(addr, data=b"hi"):
    with socket.create_connection(addr, timeout=5) as s:
        s.sendall(data)
        return s.recv(100)

def test_impair_and_leave_one_behind(echo, tun_pair_session):
    tun_pair_session.impair(loss=1.0)  # removed at the test's end
    try:
        ask(echo)
    except OSError:
        pass
    else:
        raise AssertionError("loss=1.0 let a connection through")
    subprocess.Popen(["sleep", "300"])  # this test's leftover: warned at its end

def test_works_again(echo, tun_pair_session):
    assert tun_pair_session.describe().count("impair") == 0
    assert ask(echo) == b"hi"

def test_spawns_its_own(echo, tun_pair_session):
    proc = tun_pair_session.spawn(["sleep", "300"])  # this test's: stopped at its end
    with open("own", "w") as f:
        f.write(str(proc.pid))
""",
    "test_two.py": """
import os, socket, pytest

HOST = os.stat("/proc/thread-self/ns/net").st_ino

@pytest.fixture(scope="module")
def client_socket(tun_pair_session):
    # Set up in this module's first test, long after the session pair was made: inside.
    s = socket.socket()
    s.bind((tun_pair_session.a.ip, 0))
    yield s
    s.close()

def test_module_fixture_on_the_session_pair(client_socket, echo):
    client_socket.settimeout(5)
    client_socket.connect(echo)
    client_socket.sendall(b"two")
    assert client_socket.recv(100) == b"two"

@pytest.fixture
def bound_here():
    # Does not request the pair, and comes first in the test's arguments: still inside.
    with socket.create_server(("198.18.0.2", 0)) as s:
        yield s

def test_argument_order_does_not_matter(bound_here, tun_pair_session):
    assert bound_here.getsockname()[0] == tun_pair_session.b.ip

def test_plain():
    assert os.stat("/proc/thread-self/ns/net").st_ino == HOST

def test_what_an_earlier_test_spawned_is_gone(tun_pair_session):
    # Stopped at the end of the test that spawned it, not kept for the session.
    pid = open("own").read()
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        state = "gone"
    assert state in ("gone", "Z"), state

def test_mixing_is_refused(tun_pair, tun_pair_session):
    pass
""",
}


@pytest.mark.parametrize("how", ["root", "rootless"])
def test_session_pair_shared_across_modules(pytester: pytest.Pytester, how: str) -> None:
    pytester.makepyfile(**SESSION_TESTS)
    args = ["--tunpair", "-p", "no:cacheprovider", "-rA"]
    if how == "rootless":
        if os.getuid() != 0:
            pytest.skip("--tunpair-userns=always is tested as root")
        args.append("--tunpair-userns=always")
    before = host_snapshot()
    result = pytester.runpytest_subprocess(*args)
    assert host_snapshot() == before
    result.assert_outcomes(passed=7, errors=1, warnings=1)
    result.stdout.fnmatch_lines(
        [
            "test_mixing_is_refused requests tun_pair_factory and tun_pair_factory_session: "
            "a test runs inside one network namespace*",
            "*LeftoverProcessWarning: stopped 1 process left running in the tunnel "
            "namespace: * (sleep 300)*",
        ]
    )
    spawned = (pytester.path / "spawned").read_text().split()
    assert len(spawned) == 1 and not running(int(spawned[0]))
    assert not running(int((pytester.path / "own").read_text()))


# -- fixture order ---------------------------------------------------------------------------------
@pytest.fixture
def bound_server() -> object:
    """Binds the pair's b address without requesting the pair: needs the namespace first."""
    with socket.create_server(("198.18.0.2", 0)) as s:
        yield s


def test_argument_order_reversed_still_runs_fixtures_inside(
    bound_server: socket.socket, tun_pair: TunPair
) -> None:
    port = bound_server.getsockname()[1]
    with socket.create_connection((tun_pair.b.ip, port), timeout=10):
        conn, _ = bound_server.accept()
        conn.close()
    assert any(p.direction == "a->b" for p in tun_pair.packets)


DYNAMIC = """
import os
START = os.stat("/proc/thread-self/ns/net").st_ino

def test_dynamic(request):
    request.getfixturevalue("tun_pair")

def test_dynamic_module(request):
    request.getfixturevalue("tun_pair_module")

def test_still_home():
    assert os.stat("/proc/thread-self/ns/net").st_ino == START
"""


def test_dynamic_request_works_where_the_thread_can_come_back(pytester: pytest.Pytester) -> None:
    from pytest_tunpair._kernel.userns import thread_can_return

    if not thread_can_return():
        pytest.skip("the main thread could not come back here (rootless tier)")
    pytester.makepyfile(DYNAMIC)
    result = pytester.runpytest_subprocess("--tunpair")
    result.assert_outcomes(passed=3)


def test_dynamic_request_rootless_is_one_line(pytester: pytest.Pytester) -> None:
    from pytest_tunpair._kernel.userns import in_initial_user_namespace, thread_can_return

    if os.getuid() != 0 or (not in_initial_user_namespace() and thread_can_return()):
        # Under `unshare -Urn` the inner run's threads can come back: nothing to refuse.
        pytest.skip("needs a run whose threads cannot come back (--tunpair-userns=always as root)")
    pytester.makepyfile(DYNAMIC)
    result = pytester.runpytest_subprocess("--tunpair", "--tunpair-userns=always")
    result.assert_outcomes(failed=2, passed=1)
    out = result.stdout.str()
    for name in ("tun_pair_factory", "tun_pair_factory_module"):
        result.stdout.fnmatch_lines(
            [f"{name} was requested while the test ran (request.getfixturevalue?): *"]
        )
    assert "pytest_tunpair" not in out and "Traceback" not in out


# -- the pieces, without a kernel ------------------------------------------------------------------
def test_capture_mark_since_and_view() -> None:
    capture = Capture(max_packets=3)
    for i in range(2):
        capture.record(Packet(float(i), "a->b", "forwarded", bytes([0x45, i])))
    mark = capture.mark()
    assert mark == 2
    for i in range(2, 5):
        capture.record(Packet(float(i), "b->a", "forwarded", bytes([0x45, i])))
    assert [p.seq for p in capture.since(mark)] == [2, 3, 4]
    assert [p.seq for p in capture.since(0)] == [2, 3, 4]  # 0 and 1 were evicted (max 3)
    assert capture.since(5) == []
    view = capture.view(3)
    assert [p.seq for p in view] == [3, 4] and view.evicted == 0
    assert capture.view(0).evicted == 2  # the two the bound dropped
    with pytest.raises(TypeError, match="sequence number"):
        capture.since(1.5)  # type: ignore[arg-type]


def test_parse_ready() -> None:
    assert parse_ready(8080).describe() == "a TCP socket listening on port 8080"  # type: ignore[union-attr]
    assert parse_ready(("udp", 53)).kind == "udp"  # type: ignore[union-attr]
    assert parse_ready("/run/x.pid").kind == "path"  # type: ignore[union-attr]
    assert parse_ready(Path("/run/x.pid")).path == "/run/x.pid"  # type: ignore[union-attr]
    assert parse_ready(lambda: True).kind == "call"  # type: ignore[union-attr]
    assert parse_ready(None) is None
    for bad in (True, 0, 65536, ("sctp", 1), ("udp", "53"), 1.5):
        with pytest.raises((TypeError, ValueError), match=r"spawn\(ready="):
            parse_ready(bad)


def test_a_delayed_fin_reaches_the_server_through_the_fixture(pytester: pytest.Pytester) -> None:
    """The same through ``tun_pair``: the fixture's teardown drains before stopping."""
    pytester.makepyfile(
        fin_server=FIN_SERVER,
        test_fin=f"""
        import socket, sys
        SERVER = {str(pytester.path / "fin_server.py")!r}

        def test_close_then_end(tun_pair):
            tun_pair.spawn([sys.executable, SERVER, tun_pair.b.ip, "result"], ready=7000)
            with socket.create_connection((tun_pair.b.ip, 7000), timeout=10) as client:
                client.sendall(b"hello")
                tun_pair.packets.wait_for(lambda p: p.direction == "b->a" and p.seq > 2)
                tun_pair.impair(delay="200ms")
        """,
    )
    result = pytester.runpytest_subprocess("--tunpair", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert (pytester.path / "result").read_text() == "fin hello"
