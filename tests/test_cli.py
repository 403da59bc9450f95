"""``python -m pytest_tunpair run`` / ``shell``: the command line, as a user runs it.

Every test that builds a pair runs the tool as a child process, with real clients (ping,
tcpdump, nsenter, a shell, tmux for a real terminal) and checks the host afterwards.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_tunpair import Capture, Packet, TunPair
from pytest_tunpair._cli import TracePrinter, main
from pytest_tunpair.plugin import SKIP_REASON, enabled

from .conftest import NSENTER, host_snapshot, need, nsenter_line, tcpdump_read

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 60


@pytest.fixture
def tunnels(request: pytest.FixtureRequest) -> None:
    """Tests that build pairs run under --tunpair only, like the fixtures' tests."""
    if not enabled(request.config):
        pytest.skip(SKIP_REASON)


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # The checkout under test, whatever `pip install -e` points at.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def tunpair(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    # A new session: no controlling terminal, so the tool's behaviour does not depend on
    # whether pytest itself runs in one.
    return subprocess.run(
        [sys.executable, "-m", "pytest_tunpair", *args],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        env=env or _env(),
        timeout=TIMEOUT,
        start_new_session=True,
    )


def trace_lines(text: str) -> list[str]:
    """The packet lines of a trace: `<time> <direction> <action> <summary>`."""
    return [ln for ln in text.splitlines() if re.match(r"^\s*\d+\.\d{6} (a->b|b->a) ", ln)]


# -- run ---------------------------------------------------------------------------------------
def test_run_ping_traces_both_directions_and_writes_a_pcap(tunnels: None, tmp_path: Path) -> None:
    need("ping")
    need("tcpdump")
    pcap = tmp_path / "ping.pcap"
    r = tunpair("run", "--pcap", str(pcap), "--", "ping", "-c", "2", "-i", "0.2", "198.18.0.2")
    assert r.returncode == 0, r.stderr
    assert "2 received" in r.stdout
    lines = trace_lines(r.stderr)
    requests = [ln for ln in lines if "a->b forwarded" in ln and "echo-request" in ln]
    replies = [ln for ln in lines if "b->a forwarded" in ln and "echo-reply" in ln]
    assert len(requests) == 2 and len(replies) == 2, r.stderr
    assert "tunpair: carried a->b 2 packets (168 bytes), b->a 2 packets (168 bytes)" in r.stderr
    assert f"streamed 4 packets to {pcap}" in r.stderr

    read = tcpdump_read(pcap)
    assert read.returncode == 0, read.stderr
    assert "link-type RAW" in read.stderr
    assert read.stdout.count("198.18.0.1 > 198.18.0.2: ICMP echo request") == 2
    assert read.stdout.count("198.18.0.2 > 198.18.0.1: ICMP echo reply") == 2


@pytest.mark.parametrize(
    ("command", "status"),
    [
        ("exit 7", 7),
        ("exit 0", 0),
        ("kill -TERM $$", 128 + signal.SIGTERM),
        ("kill -KILL $$", 128 + signal.SIGKILL),
    ],
)
def test_the_commands_exit_status_passes_through(tunnels: None, command: str, status: int) -> None:
    r = tunpair("run", "--", "sh", "-c", command)
    assert r.returncode == status, r.stderr


def test_a_missing_command_is_127_and_says_so(tunnels: None) -> None:
    r = tunpair("run", "--", "no-such-command-tunpair")
    assert r.returncode == 127
    assert "tunpair: no-such-command-tunpair: command not found" in r.stderr


def test_the_command_runs_inside_the_pairs_namespace(tunnels: None) -> None:
    r = tunpair(
        "run",
        "-q",
        "--",
        "sh",
        "-c",
        'readlink /proc/self/ns/net; echo "$TUNPAIR_A $TUNPAIR_A_IP $TUNPAIR_B_IP6"; ip -o link',
    )
    assert r.returncode == 0, r.stderr
    ns, names, *links = r.stdout.splitlines()
    assert ns != os.readlink("/proc/self/ns/net")
    assert names == "tun0 198.18.0.1 2001:2::2"
    assert [ln.split(":")[1].strip() for ln in links] == ["lo", "tun0", "tun1"]


def test_no_ipv6(tunnels: None) -> None:
    need("ping")
    r = tunpair(
        "run",
        "--no-ipv6",
        "--",
        "sh",
        "-c",
        'ip -o addr show dev tun0; ip -o addr show dev tun1; echo "v6=[$TUNPAIR_B_IP6]"; '
        "ping -c 1 -W 2 198.18.0.2 >/dev/null",
    )
    assert r.returncode == 0, r.stderr
    assert "inet 198.18.0.1" in r.stdout and "inet 198.18.0.2" in r.stdout
    assert "inet6" not in r.stdout
    assert "v6=[]" in r.stdout
    assert "tun0=198.18.0.1 <-> tun1=198.18.0.2" in r.stderr
    assert any("echo-reply" in ln for ln in trace_lines(r.stderr))


def test_tap_mode(tunnels: None) -> None:
    need("ping")
    r = tunpair(
        "run", "--mode", "tap", "--mtu", "1400", "--", "ping", "-c", "1", "-W", "2", "198.18.0.2"
    )
    assert r.returncode == 0, r.stderr
    assert "tap pair tap0=" in r.stderr and "mtu=1400" in r.stderr
    lines = trace_lines(r.stderr)
    assert any("a->b" in ln and "Ether / IP / ICMP" in ln and "echo-request" in ln for ln in lines)
    assert any("b->a" in ln and "Ether / IP / ICMP" in ln and "echo-reply" in ln for ln in lines)


def test_names_addresses_and_table(tunnels: None) -> None:
    r = tunpair(
        "run",
        "-q",
        "--names",
        "left",
        "right",
        "--ipv4",
        "10.9.0.1",
        "10.9.0.2",
        "--no-ipv6",
        "--table",
        "77",
        "--",
        "sh",
        "-c",
        "ip rule; ip route show table 77; ping -c 1 -W 2 10.9.0.2 >/dev/null",
    )
    assert r.returncode == 0, r.stderr
    assert "iif left lookup 77" in r.stdout and "iif right lookup 77" in r.stdout
    assert "local 10.9.0.1 dev left" in r.stdout and "local 10.9.0.2 dev right" in r.stdout


def test_quiet_prints_no_trace(tunnels: None) -> None:
    need("ping")
    r = tunpair("run", "--quiet", "--", "ping", "-c", "1", "-W", "2", "198.18.0.2")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""


def test_trace_file_takes_the_trace_off_stderr(tunnels: None, tmp_path: Path) -> None:
    need("ping")
    trace = tmp_path / "trace.txt"
    r = tunpair("run", "--log", str(trace), "--", "ping", "-c", "1", "-W", "2", "198.18.0.2")
    assert r.returncode == 0, r.stderr
    assert trace_lines(r.stderr) == []
    lines = trace_lines(trace.read_text())
    assert [ln.split()[1:3] for ln in lines] == [["a->b", "forwarded"], ["b->a", "forwarded"]]


# -- impairments ---------------------------------------------------------------------------------
def test_loss_makes_ping_fail_and_the_trace_says_lost(tunnels: None) -> None:
    need("ping")
    r = tunpair(
        "run", "--loss", "1", "--seed", "1", "--", "ping", "-c", "2", "-W", "1", "198.18.0.2"
    )
    assert r.returncode == 1, r.stderr  # ping: no reply
    assert "tunpair: impair a->b: loss=100% seed=1\n" in r.stderr
    assert "tunpair: impair b->a: loss=100% seed=1\n" in r.stderr
    lines = trace_lines(r.stderr)
    assert len(lines) == 2 and all(" a->b lost " in ln and "echo-request" in ln for ln in lines)
    assert "a->b 0 packets (0 bytes, 2 not delivered)" in r.stderr


def test_without_seed_the_banner_says_how_to_replay(tunnels: None) -> None:
    r = tunpair("run", "--loss", "0.5", "--", "true")
    assert r.returncode == 0, r.stderr
    match = re.search(
        r"impair a->b: loss=50% seed=(\d+) \(picked at random; replay with --seed (\d+)\)", r.stderr
    )
    assert match and match.group(1) == match.group(2), r.stderr


def test_delay_in_one_direction(tunnels: None) -> None:
    need("ping")
    r = tunpair(
        "run",
        "--delay",
        "100ms",
        "--direction",
        "a->b",
        "--",
        "ping",
        "-c",
        "2",
        "-i",
        "0.2",
        "198.18.0.2",
    )
    assert r.returncode == 0, r.stderr
    rtts = [float(x) for x in re.findall(r"time=([\d.]+) ms", r.stdout)]
    assert len(rtts) == 2 and min(rtts) >= 100  # a lower bound: the delay cannot be skipped
    assert "impair a->b: delay=100ms" in r.stderr and "impair b->a" not in r.stderr
    lines = trace_lines(r.stderr)
    assert {tuple(ln.split()[1:3]) for ln in lines} == {("a->b", "delayed"), ("b->a", "forwarded")}


def test_a_class_impairs_only_what_it_matches(tunnels: None) -> None:
    need("ping")
    r = tunpair(
        "run", "--class", "pings:proto=icmp:loss=100%", "--seed", "1", "--direction", "a->b",
        "--", "ping", "-c", "1", "-W", "1", "198.18.0.2",
    )  # fmt: skip
    assert r.returncode == 1, r.stderr  # the class loses the echo request
    assert "impair a->b class 'pings' (match proto=icmp): loss=100% seed=1" in r.stderr
    assert "impair b->a" not in r.stderr
    lines = trace_lines(r.stderr)
    assert len(lines) == 1 and " a->b lost " in lines[0]


# -- usage errors ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mtu", "big"], "argument --mtu: bad value 'big': use a whole number from 68"),
        (["--mtu", "1000"], "argument --mtu: bad value '1000': IPv6 needs an MTU of at"),
        (["--mode", "tup"], "argument --mode: bad value 'tup': use 'tun' (raw IP) or"),
        (
            ["--ipv4", "198.18.0.1", "nope"],
            "argument --ipv4: bad value '198.18.0.1 nope': 'nope' is not an IPv4",
        ),
        (["--names", "a", "a"], "argument --names: bad value 'a a': the two"),
        (["--table", "255"], "argument --table: bad value '255': tables 253 (default)"),
        (["--no-ipv4", "--no-ipv6"], "--no-ipv4 and --no-ipv6 leave the pair without addresses"),
        (["--ipv4", "1.1.1.1", "1.1.1.2", "--no-ipv4"], "not allowed with argument --ipv4"),
        (["--loss", "2"], "argument --loss: bad value '2': loss is a probability"),
        (["--delay", "soon"], "argument --delay: bad value 'soon': delay is a duration"),
        (["--rate", "fast"], "argument --rate: bad value 'fast': rate is in bits per second"),
        (["--delay", "20"], "argument --delay: bad value '20': add a unit (20ms, 20s)"),
        (["--jitter", "0.5"], "argument --jitter: bad value '0.5': add a unit (20ms, 20s)"),
        (["--direction", "a->b"], "argument --direction: nothing to impair"),
        (["--class", "x:dport=53"], "argument --class: bad value 'x:dport=53': write NAME:"),
        (["--class", "x:dprot=53:loss=1%"], "'dprot' is not a packet field; the fields are"),
        (["--class", "x:dport=53:los=1%"], "'los=1%': give PARAM=VALUE with a PARAM among"),
        (["--class", "x:dport=53:loss=2"], "loss is a probability"),
        (["--queue", "codel", "--flows", "64"], "argument --flows: bad value '64': flows does "),
        (["--ecn"], "argument --ecn: bad value: ecn does nothing on a droptail queue: set the"),
        (["--class", "x:dport=53:quantum=300"], "quantum does nothing on a droptail queue"),
        (["--pcap", "/nonexistent-dir/x.pcap"], "argument --pcap: cannot write"),
        (["--pcap-format", "pcap"], "argument --pcap-format: no capture file to write it to"),
        (["--pcap", "-", "--pcap-format", "pcap"], "'-' streams pcapng; drop --pcap-format"),
    ],
)
def test_bad_options_are_usage_errors(args: list[str], message: str) -> None:
    before = host_snapshot()
    r = tunpair("run", *args, "--", "true")
    assert r.returncode == 2
    assert r.stderr.startswith("usage: python -m pytest_tunpair run [options] -- COMMAND")
    assert message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert host_snapshot() == before


def test_no_subcommand_is_a_usage_error() -> None:
    r = tunpair()
    assert r.returncode == 2
    assert "the following arguments are required: {run,shell}" in r.stderr


# -- shell -----------------------------------------------------------------------------------
def test_shell_reads_commands_from_stdin(tunnels: None) -> None:
    r = tunpair("shell", stdin="ip -o link\nexit 3\n", env=_env(SHELL="/bin/sh"))
    assert r.returncode == 3, r.stderr
    assert ": tun0: " in r.stdout and ": tun1: " in r.stdout
    assert "a: tun0  198.18.0.1 ($TUNPAIR_A_IP)  2001:2::1 ($TUNPAIR_A_IP6)" in r.stderr
    assert re.search(NSENTER, r.stderr), r.stderr
    assert "starting /bin/sh" in r.stderr


def test_run_without_a_command_is_a_shell(tunnels: None) -> None:
    r = tunpair("run", "-q", stdin="echo $TUNPAIR_B_IP\nexit 4\n", env=_env(SHELL="/bin/sh"))
    assert r.returncode == 4, r.stderr
    assert r.stdout == "198.18.0.2\n"
    assert re.search(NSENTER, r.stderr), r.stderr  # the shell's banner survives --quiet


def test_the_nsenter_line_works_from_another_process(tunnels: None) -> None:
    need("nsenter")
    need("ping")
    before = host_snapshot()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest_tunpair", "shell"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(SHELL="/bin/sh"),
        start_new_session=True,
    )
    try:
        assert proc.stderr is not None and proc.stdin is not None
        nsenter = nsenter_line(proc.stderr, TIMEOUT)  # the banner comes before the shell starts
        user = next((arg for arg in nsenter if arg.startswith("--user=")), None)
        own_userns = os.stat("/proc/self/ns/user").st_ino
        if user and os.stat(user.removeprefix("--user=")).st_ino == own_userns:
            # The line is for other terminals, outside the user namespace the tool runs in
            # (test_rootless checks it from there). This test already runs inside it (the
            # rootless tier), where setns() into one's own user namespace is EINVAL: the
            # --net part is what is left to check.
            assert nsenter[1:3] == ["--preserve-credentials", user], nsenter
            nsenter = [nsenter[0], *nsenter[3:]]
        outside = subprocess.run(
            [*nsenter, "ping", "-c", "1", "-W", "2", "198.18.0.2"],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert outside.returncode == 0, outside.stderr
        _out, err = proc.communicate("exit 0\n", timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    # The ping from the other terminal went through this pair's relay.
    assert any("echo-reply" in ln for ln in trace_lines(err)), err
    assert host_snapshot() == before


# -- signals, leftovers, the host --------------------------------------------------------------
def _start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pytest_tunpair", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        start_new_session=True,
    )


def test_sigint_goes_to_the_command_once(tunnels: None) -> None:
    proc = _start(
        "run",
        "-q",
        "--",
        "sh",
        "-c",
        'trap "echo got-int; exit 42" INT; echo ready; while :; do sleep 0.05; done',
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 42, err
    assert out == "got-int\n"


def test_sigint_that_kills_the_command_exits_130(tunnels: None) -> None:
    before = host_snapshot()
    proc = _start("run", "-q", "--", "sh", "-c", "echo ready; exec sleep 60")
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert host_snapshot() == before


def test_processes_left_in_the_namespace_are_stopped(tunnels: None, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    r = tunpair("run", "--", "sh", "-c", f"sleep 300 & echo $! > {pidfile}")
    assert r.returncode == 0, r.stderr
    pid = int(pidfile.read_text())
    # (sh) when the background child had not exec'd sleep yet
    assert re.search(rf"stopped 1 process left in the namespace: {pid} \((sleep|sh)\b", r.stderr)
    # Gone, or a zombie waiting for init to reap it.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        state = "gone"
    assert state in ("gone", "Z")


def test_the_host_is_unchanged_after_runs(tunnels: None) -> None:
    need("ping")
    before = host_snapshot()
    tunpair("run", "--", "ping", "-c", "1", "-W", "1", "198.18.0.2")
    tunpair("run", "--mode", "tap", "--loss", "0.5", "--", "sh", "-c", "exit 9")
    tunpair("run", "--names", "eth0", "eth1", "--", "true")  # host-like names, in the pair's ns
    tunpair("shell", stdin="exit 1\n", env=_env(SHELL="/bin/sh"))
    assert host_snapshot() == before


# -- a real terminal (tmux) --------------------------------------------------------------------
class Tmux:
    def __init__(self, socket: Path) -> None:
        self.base = [need("tmux"), "-S", str(socket)]

    def __call__(self, *args: str) -> str:
        return subprocess.run(
            [*self.base, *args], capture_output=True, text=True, check=True, timeout=TIMEOUT
        ).stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-S", "-200")

    def wait_for(self, pattern: str, timeout: float = TIMEOUT) -> re.Match[str]:
        __tracebackhide__ = True
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.screen())
            if match:
                return match
            if time.monotonic() > deadline:
                pytest.fail(f"{pattern!r} never appeared; the terminal shows:\n{self.screen()}")
            time.sleep(0.05)  # polling the screen: tmux offers nothing to wait on


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    t = Tmux(tmp_path / "tmux.sock")
    env = _env()
    t(
        "new-session",
        "-d",
        "-x",
        "200",
        "-y",
        "50",
        "-e",
        f"PYTHONPATH={env['PYTHONPATH']}",
        "/bin/sh",
    )
    try:
        # Keys sent before the shell's first prompt are echoed by the terminal ahead of it,
        # and the command's output then follows the prompt on one line: wait for the prompt.
        t.wait_for(r"[$#]\s*\Z")
        yield t
    finally:
        t("kill-server")


def test_ctrl_c_in_a_terminal(tunnels: None, tmux: Tmux) -> None:
    before = host_snapshot()
    py = sys.executable
    tmux(
        "send-keys",
        f"{py} -m pytest_tunpair run -q -- sh -c 'echo READY; exec sleep 60'; echo EXIT=$?",
        "Enter",
    )
    tmux.wait_for(r"\nREADY")
    tmux("send-keys", "C-c")
    tmux.wait_for(r"EXIT=130")
    # A command that handles SIGINT itself decides the status, as under a shell; the tty
    # delivered one SIGINT, and tunpair did not add a second.
    tmux(
        "send-keys",
        f"{py} -m pytest_tunpair run -q -- sh -c "
        "'trap \"echo GOT-INT; exit 42\" INT; echo READY2; while :; do sleep 0.05; done'"
        "; echo EXIT=$?",
        "Enter",
    )
    tmux.wait_for(r"\nREADY2")
    tmux("send-keys", "C-c")
    tmux.wait_for(r"EXIT=42")
    assert sum(ln.endswith("GOT-INT") for ln in tmux.screen().splitlines()) == 1  # ^CGOT-INT
    assert host_snapshot() == before


def _wait_for_file(path: Path, pattern: str) -> str:
    __tracebackhide__ = True
    deadline = time.monotonic() + TIMEOUT
    while not re.search(pattern, text := path.read_text()):
        if time.monotonic() > deadline:
            pytest.fail(f"{pattern!r} never appeared in {path}:\n{text}")
        time.sleep(0.05)
    return text


@pytest.mark.parametrize("shell", ["/bin/sh", "/bin/bash"])
def test_interactive_shell_in_a_terminal(
    tunnels: None, tmux: Tmux, tmp_path: Path, shell: str
) -> None:
    """The prompt says where it is, and the live trace goes to a file, not over the prompt."""
    need("ping")
    need(shell)
    home = tmp_path / "home"
    home.mkdir()
    # Debian's ~/.bashrc sets PS1 after the environment is read: the mark must survive it.
    (home / ".bashrc").write_text("PS1='me@box$ '\n")
    tmux(
        "send-keys",
        f"HOME={home} SHELL={shell} {sys.executable} -m pytest_tunpair shell; echo EXIT=$?",
        "Enter",
    )
    trace = Path(tmux.wait_for(r"live trace: tail -f (\S+)").group(1))
    try:
        tmux.wait_for(r"starting " + shell)
        # (capture-pane drops the prompt's trailing space)
        prompt = "(tunpair) me@box$" if shell.endswith("bash") else "(tunpair) $"
        tmux.wait_for(re.escape(prompt) + r"\s*\Z")
        tmux(
            "send-keys", "ping -c 2 -i 0.2 -W 2 $TUNPAIR_B_IP > /dev/null && echo PING-OK", "Enter"
        )
        tmux.wait_for(r"\nPING-OK\n" + re.escape(prompt) + r"\s*\Z")
        _wait_for_file(
            trace, r"b->a forwarded\s+IP / ICMP 198\.18\.0\.2 > 198\.18\.0\.1 echo-reply"
        )
        tmux("send-keys", "echo $TUNPAIR_TRACE", "Enter")
        tmux.wait_for(re.escape(str(trace)) + r"\n")
        assert "forwarded" not in tmux.screen()  # nothing was written over the terminal
        # Traffic while the prompt waits (from a second terminal, or a background job) still
        # goes to the file alone.
        tmux("send-keys", "(sleep 0.5; ping -c 1 -W 2 $TUNPAIR_B_IP > /dev/null) &", "Enter")
        _wait_for_file(trace, r"(?s)(echo-reply.*){3}")
        screen = tmux.screen()
        assert "forwarded" not in screen and screen.rstrip().endswith(prompt), screen
        tmux("send-keys", "exit 6", "Enter")
        tmux.wait_for(r"the trace is in " + re.escape(str(trace)))
        tmux.wait_for(r"EXIT=6")
    finally:
        trace.unlink(missing_ok=True)  # the tool keeps it for the user; the test does not


# -- the entry points and the printer (no tunnel needed) -----------------------------------------
def test_console_script_points_at_main() -> None:
    import pytest_tunpair.__main__ as entry

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["tunpair"] == "pytest_tunpair.__main__:main"
    assert entry.main is main
    assert main(["--version"]) == 0
    assert main(["run", "--mtu", "big", "--", "true"]) == 2
    script = shutil.which("tunpair")
    if script is not None:  # installed (pip install -e): the real script behaves the same
        r = subprocess.run(
            [script, "run", "--mode", "x"], capture_output=True, text=True, env=_env()
        )
        assert r.returncode == 2
        assert r.stderr.startswith("usage: tunpair run")


def _icmp(n: int) -> bytes:
    from scapy.layers.inet import ICMP, IP

    return bytes(IP(src="198.18.0.1", dst="198.18.0.2") / ICMP(seq=n))


def test_printer_prints_everything_then_stops() -> None:
    capture = Capture()
    out = io.StringIO()
    printer = TracePrinter(capture, out, threading.Lock())
    printer.start()
    for n in range(100):
        capture.record(Packet(n / 1000, "a->b", "forwarded", _icmp(n)))
    printer.stop()
    lines = trace_lines(out.getvalue())
    assert len(lines) == 100
    assert lines[0].split()[0] == "0.000000" and lines[-1].split()[0] == "0.099000"
    assert all("ICMP 198.18.0.1 > 198.18.0.2 echo-request" in ln for ln in lines)
    assert not any(t.name == "tunpair-trace" for t in threading.enumerate())


def test_printer_skips_a_backlog_it_cannot_print_live() -> None:
    capture = Capture()
    for n in range(2000):  # recorded before the printer starts: one big backlog
        capture.record(Packet(n / 1000, "b->a", "forwarded", _icmp(n)))
    out = io.StringIO()
    printer = TracePrinter(capture, out, threading.Lock())
    printer.start()
    printer.stop()
    text = out.getvalue()
    assert f"... {2000 - TracePrinter.KEEP} packets not shown: too many to print live" in text
    assert len(trace_lines(text)) == TracePrinter.KEEP
    assert printer.skipped == 2000 - TracePrinter.KEEP


def test_printer_reports_packets_the_capture_evicted() -> None:
    capture = Capture(max_packets=10)
    for n in range(30):
        capture.record(Packet(n / 1000, "a->b", "forwarded", _icmp(n)))
    out = io.StringIO()
    printer = TracePrinter(capture, out, threading.Lock())
    printer.start()
    printer.stop()
    assert out.getvalue().startswith("... 20 packets no longer kept by the capture")
    assert len(trace_lines(out.getvalue())) == 10


def test_wait_new_wakes_on_real_traffic(tun_pair: TunPair) -> None:
    need("ping")
    packets = tun_pair.packets
    assert packets.wait_new(-1, 0) == []
    assert packets.wait_new(-1, 0.05) == []
    got: list[Packet] = []

    def follow() -> None:
        last = -1
        while len(got) < 2:
            new = packets.wait_new(last, TIMEOUT)
            got.extend(new)
            if new:
                last = new[-1].seq

    t = threading.Thread(target=follow)
    t.start()
    subprocess.run(["ping", "-c", "1", "-W", "2", tun_pair.b.ip], check=True, capture_output=True)
    t.join(TIMEOUT)
    assert not t.is_alive()
    assert [p.direction for p in got] == ["a->b", "b->a"]
    assert packets.wait_new(got[0].seq, 0) == [got[1]]


def test_main_leaves_no_thread_or_fd_behind(tunnels: None, tmp_path: Path) -> None:
    need("ping")
    script = """
import os, sys, threading, time
from pytest_tunpair._cli import main
from pytest_tunpair._kernel.userns import thread_can_return

def fds():
    return sorted(os.listdir("/proc/self/fd"))

def netns():
    return os.readlink("/proc/thread-self/ns/net")

host, can_return = netns(), thread_can_return()
main(["run", "-q", "--", "true"])  # the routing module keeps one pyroute2 IPBatch per process
# Where the thread could not come back from the pair's namespace (the rootless tier), the
# first call moved the process into a network namespace of its own, once, to return to.
ns = netns()
print("RESULT", (ns == host) == can_return)
before = fds()
for args in (
    ["run", "--", "ping", "-c", "1", "-W", "2", "198.18.0.2"],
    ["run", "--loss", "1", "--pcap", sys.argv[1], "--", "ping", "-c", "1", "-W", "1", "198.18.0.2"],
    ["run", "-q", "--", "sh", "-c", "sleep 60 & exit 3"],
):
    print("RESULT", main(args), flush=True)
print("RESULT", fds() == before, [t.name for t in threading.enumerate()])
print("RESULT", netns() == ns)
# The relay thread is not a threading.Thread: the kernel's list of the process's threads.
time.sleep(0.05)  # a joined thread may be listed a moment longer (docs/internals.md)
print("RESULT", os.listdir("/proc/self/task") == [str(os.getpid())])
"""
    r = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "leak.pcap")],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=TIMEOUT,
        start_new_session=True,
    )
    results = [
        ln.removeprefix("RESULT ") for ln in r.stdout.splitlines() if ln.startswith("RESULT")
    ]
    assert results == ["True", "0", "1", "3", "True ['MainThread']", "True", "True"], r.stderr
