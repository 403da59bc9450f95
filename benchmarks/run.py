#!/usr/bin/env python3
"""pytest-tunpair benchmark: each performance goal next to its baseline, in one run.

    sudo python benchmarks/run.py                 # everything, about a minute
    sudo python benchmarks/run.py --quick         # seconds: smaller samples, same table
    sudo python benchmarks/run.py --only throughput --only latency
    sudo python benchmarks/run.py --json out.json # the raw samples too

Sections (each with its goal; baselines in the same run, on the same machine):

- ``throughput``: iperf3 through a pair (default MTU, capture at its defaults) vs iperf3
  over ``lo``; goal >= 50 % of ``lo``. ``offload=False`` is shown for reference, and the
  relay's own per-direction counters (``pair.stats``) of the default run.
- ``overhead``: an inner pytest run of N tests using ``tun_pair`` vs the same N tests
  without it; goal <= 5 ms per test. Baseline: the seed article's shell recipe
  (``ip netns add`` + the ``ip`` commands + ``ip netns del``) per namespace.
- ``unused``: ``pytest --co`` of a generated project (1000 tests) that never opens a
  tunnel, with the plugin vs ``-p no:tunpair``, median CPU time of the pytest process
  (steadier than wall clock on a shared machine; wall clock is shown too); goal within
  5 %. Also the plugin's own import time, and whether scapy or pyroute2 were imported by
  the time collection finished (they must not be).
- ``latency``: ping RTT through the pair (median) vs ping over ``lo``; goal < 0.5 ms.
- ``daemons``: how late ``spawn(ready=PORT)`` returns after the server's ``listen()``
  (the server stamps CLOCK_MONOTONIC right after it; goal < 60 ms; the poll backs off
  to every 20 ms); and drained teardown: a FIN held by ``delay=200ms`` is delivered,
  so ``close()`` takes about the delay (goal 200-500 ms), and ``drain=0.5`` caps the wait
  under a 2 s delay (goal 0.5-0.8 s).
- ``timing``: delays applied by the relay, configured vs achieved: for ``delay`` = 100 us,
  1 ms, 20 ms (and 1 s without ``--quick``), the departure error of each UDP datagram (its ``sojourn`` -- written
  minus read, on the relay's clock -- minus the delay; median and 99th percentile; goals
  < 100 us and < 1 ms), with the relay thread's CPU time per packet; and ping RTT through
  ``delay="200us"`` each way vs the same pair without delay + 0.4 ms.
- ``link``: the bottleneck queue, configured vs achieved in the same run: ``rate`` (1, 20,
  100 Mbit/s) under a 1.5x UDP overload; the bound (ping RTT through a full
  ``rate="10mbit"`` buffer against ``limit`` x one packet's time); CoDel's queueing delay
  with four Cubic flows against its 5 ms target (drop-tail for reference); and iperf3
  through ``rate``, ``delay`` and a queue (goal >= 1 Gbit/s, the plain pair beside it).
- ``scenarios``: network scenarios, configured against achieved in the same run: the
  rate a constant mahimahi trace (12 and 48 Mbit/s) delivers under a 1.5x UDP overload;
  Gilbert-Elliott burst loss (loss rate and mean burst length against the model's
  ``p / (p + r)`` and ``1 / r``).
- ``hosts``: what hosts mode and the NAT cost (iperf3 TCP a -> b, one namespace vs hosts
  vs hosts + NAT, interleaved; reference, no goal), and the timed features configured
  against achieved: ``nat(rebind_every=0.2s)``'s rebinds (goal within 1), ``nat(timeout=
  0.5s)``'s idle expiry seen by packets b sends every 20 ms (goal: expired within 50 ms
  after), a lookup through ``dns()``, and getaddrinfo's time to fail under
  ``dns(fail="timeout", timeout=1, attempts=1|2)`` (glibc's, shown against 1 s x attempts).
- ``segments``: the per-segment link (the relay splits GSO super-packets before the engine
  and the queue), configured vs achieved in the same run: TCP through ``rate="5gbit"
  delay="1ms"`` (goal >= 1 Gbit/s) and through a constant 5000 Mbit/s trace (goal: at
  least mahimahi's), each with the relay's CPU per GB, beside the plain pair, ``delay``
  alone (super-packets whole) and mahimahi (``mm-delay 1``, ``mm-link`` with the same
  trace, run as its notes say) on the same machine; CoDel's and PIE's queueing delay at
  20 Mbit/s with offload on and off (goal: the same); fq_codel's Jain index and per-flow
  throughput for two Cubic flows whose RTTs are 10x apart (goal >= 0.9; drop-tail
  beside); rate accuracy under TCP for 1, 20, 100 and 1000 Mbit/s (goal within 2%).
- ``memory``: RSS growth of a fresh process while 1 GiB of TCP crosses a pair with the
  default capture settings, vs the documented capture bound (``capture_bytes``).
- ``pcapng``: what a live pcapng stream costs (``tunpair run --pcap -``,
  ``--tunpair-pcap-live``): iperf3 through a pair whose capture is followed into
  ``/dev/null`` vs the same pair unfollowed, interleaved (reference, no goal: the stream
  must never stop the relay, and does not); the same through a per-segment link
  (``rate="1gbit"``, offload on: every segment streamed), configured vs achieved, followed
  and not; and writing the capture of such a run with ``to_pcap()`` as pcapng vs classic
  pcap.
- ``packetdrill``: the scripted peer's pacing and the ``.pkt`` runner's scheduling: the
  kernel's own RTT sample (``tcpi_rtt``) after ``tcp_accept(synack_delay=0.1)``, against
  the same handshake without delay + 100 ms (goal within 1 ms); and how late the runner
  starts the inbound packets, system calls and commands of ``tests/packetdrill/*.pkt``
  (IPv4) against their scheduled times (median and 99th percentile; goal: the 99th
  percentile inside packetdrill's default 4 ms tolerance), with how many scripts pass
  without any slack.
- ``profiles``: each named link profile (``impair(profile=...)``), per direction, configured
  against achieved in the same run: the rate delivered under a 1.5x overload (UDP up to
  50 Mbit/s, TCP above, where the relay's per-packet cost would cap UDP), from the capture's
  delivered wire bytes; and the one-way delay of unloaded UDP datagrams (median of their
  sojourn minus their time on the wire) against the configured delay. Goal: both within 5 %.
- ``import``: what importing the plugin costs a run that never opens a tunnel, in CPU
  instructions (callgrind: steady on a loaded machine, where wall time is not): ``pytest
  --co`` of a generated 500-test project with the plugin against ``-p no:tunpair``, bytecode
  cached, as an installed package has it; goal <= 2 %.
- ``speed``: the relay against mahimahi (``/opt/mahimahi/bin``, run as its notes say) on
  the same machine, interleaved and repeated (``--rounds``, default 3): the RTT the plain
  pair adds (median of 1000 ICMP echoes timed by the kernel, minus ``lo``'s; goal: at most
  ``mm-delay 0``'s); the same through ``delay="20ms"`` each way minus 40 ms (goal <= 0.1
  ms); the relay's CPU seconds per GB of TCP through ``delay="1ms"`` with ``offload=False``
  against ``mm-delay 1``'s (goal: at most mahimahi's); what a test using ``tun_pair`` costs
  over one that does not (median per test; goal <= 2 ms). The import goal is ``import``'s.
  For reference, the RTT while another thread of the process runs Python (the GIL), at the
  default switch interval and at 0.5 ms.
- ``fields``: reading ``Packet.dport`` of 100 000 captured packets (a TCP transfer through
  an ``offload=False`` pair, copied) vs scapy's decode of the same packets, per packet from a
  sample; goal < 0.5 s.
- ``async``: an awaited wait (``expect_async`` in an asyncio loop) from the datagram's send
  to the coroutine's resumption, vs the blocking ``expect`` in a thread (median; goal: at
  most 1 ms more); what a tunnel test's thread bookkeeping costs (binding the pools of one
  event loop, putting them back, the leftover scan; goal < 1 ms per test); the first task
  of ``tun_pair.executor()`` vs a plain ``ThreadPoolExecutor``'s (reference).

Everything runs inside network namespaces this script creates (each ``TunPair`` enters a
fresh anonymous one; ``lo`` baselines run in a pair's namespace too), so nothing touches the
host's network. The shell baseline uses ``ip netns add`` with a name unique to this process
and always deletes it. Subprocesses and namespaces are cleaned up on errors and Ctrl-C.

The script is a measurement, not a test: it exits 0 whatever the numbers say, unless
``--strict`` is given (then 1 when a goal is missed). Timings on a shared machine are noisy;
run it on an idle one for figures worth quoting.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Measure the checkout this script lives in, also in the inner pytest processes.
sys.path.insert(0, REPO)
_ENV = dict(
    os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
)

SECTIONS = (
    "throughput",
    "overhead",
    "unused",
    "latency",
    "daemons",
    "timing",
    "link",
    "memory",
    "fields",
    "scenarios",
    "async",
    "pcapng",
    "packetdrill",
    "segments",
    "profiles",
    "import",
    "hosts",
    "speed",
)
IPERF_PORT = 5201
GIB = 1 << 30
MIB = 1 << 20


# -- cleanup: every process we start is killed, every shell namespace deleted ---------------

_procs: list[subprocess.Popen[Any]] = []
_shell_netns: set[str] = set()


def _terminate(signum: int, frame: object) -> None:
    # SIGTERM takes the same way out as Ctrl-C, so every `finally` and `with` runs.
    raise KeyboardInterrupt(f"signal {signum}")


def _cleanup() -> None:
    for p in _procs:
        if p.poll() is None:
            p.kill()
        with contextlib.suppress(Exception):
            p.wait(5)
    _procs.clear()
    for name in sorted(_shell_netns):
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    _shell_netns.clear()


@contextlib.contextmanager
def popen(cmd: Sequence[str], **kwargs: Any) -> Iterator[subprocess.Popen[str]]:
    """Start a process (in the calling thread's namespace); kill it on the way out."""
    kwargs.setdefault("stdout", subprocess.DEVNULL)
    proc = subprocess.Popen(list(cmd), stderr=subprocess.PIPE, text=True, **kwargs)
    _procs.append(proc)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        if proc.stderr:
            proc.stderr.close()
        _procs.remove(proc)


def run(cmd: Sequence[str], *, timeout: float, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(cmd), capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )


# -- results -----------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table."""

    section: str
    what: str
    measured: str
    baseline: str = ""
    ratio: str = ""
    goal: str = ""
    ok: bool | None = None  # None: no goal (reference figure)


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)

    def add(self, *args: Any, **kwargs: Any) -> None:
        self.rows.append(Row(*args, **kwargs))

    def table(self) -> str:
        head = ("section", "what", "measured", "baseline", "ratio", "goal", "met")
        body = [
            (
                r.section,
                r.what,
                r.measured,
                r.baseline,
                r.ratio,
                r.goal,
                "" if r.ok is None else ("yes" if r.ok else "NO"),
            )
            for r in self.rows
        ]
        widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
        line = "  ".join("-" * w for w in widths)
        out = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)), line]
        out += ["  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)) for b in body]
        return "\n".join(x.rstrip() for x in out)


def med(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def fmt_ms(s: float) -> str:
    return f"{s * 1000:.2f} ms"


# -- helpers that run inside a namespace -------------------------------------------------------


def wait_listen(port: int, timeout: float = 10.0) -> None:
    """Wait until something listens on ``port`` in the calling thread's namespace.

    ``/proc/thread-self/net`` is the calling thread's namespace (``/proc/net`` would be the
    main thread's). No probe connection: iperf3 would take it for a client.
    """
    want = f":{port:04X} "
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name in ("tcp", "tcp6"):
            try:
                with open(f"/proc/thread-self/net/{name}") as f:
                    next(f)
                    for line in f:
                        parts = line.split()
                        if parts[3] == "0A" and (parts[1] + " ").endswith(want):
                            return
            except FileNotFoundError:
                pass
        time.sleep(0.01)
    raise RuntimeError(f"iperf3 server did not listen on port {port} within {timeout} s")


@contextlib.contextmanager
def iperf_server(bind: str) -> Iterator[None]:
    with popen(["iperf3", "-s", "-B", bind, "-p", str(IPERF_PORT)]) as proc:
        wait_listen(IPERF_PORT)
        yield
        if proc.poll() is not None:
            raise RuntimeError(f"iperf3 server exited: {proc.stderr.read() if proc.stderr else ''}")


def iperf_client(host: str, extra: Sequence[str]) -> dict[str, Any]:
    res = run(
        ["iperf3", "-c", host, "-p", str(IPERF_PORT), "-J", *extra],
        timeout=120,
    )
    try:
        data: dict[str, Any] = json.loads(res.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"iperf3 failed: {res.stdout[-500:]} {res.stderr[-500:]}") from None
    if "error" in data:
        raise RuntimeError(f"iperf3: {data['error']}")
    return data


def gbits(data: dict[str, Any]) -> float:
    return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9


def relay_tids() -> list[int]:
    """The relay threads of this process, by their kernel name (the relay thread is not a
    ``threading.Thread``: ``threading.enumerate()`` does not list it)."""
    from pytest_tunpair._link.relay import RELAY_COMM

    tids = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() == RELAY_COMM:
                    tids.append(int(tid))
        except FileNotFoundError:
            continue
    return tids


def relay_thread_cpu() -> tuple[float, float] | None:
    """(user, system) CPU seconds of the relay thread(s) of this process so far."""
    tick = os.sysconf("SC_CLK_TCK")
    user = system = 0.0
    found = False
    for tid in relay_tids():
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        user += int(fields[11]) / tick
        system += int(fields[12]) / tick
        found = True
    return (user, system) if found else None


def relay_thread_ns() -> int | None:
    """Nanoseconds the relay thread(s) of this process ran on a CPU so far (schedstat: ns,
    where ``stat``'s clock ticks are 10 ms)."""
    total = None
    for tid in relay_tids():
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                total = (total or 0) + int(f.read().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            continue
    return total


def ping_rtts(host: str, count: int) -> list[float]:
    # -i 0.01 (below 0.2 s) needs root, which this script has anyway.
    res = run(["ping", "-n", "-c", str(count), "-i", "0.01", "-W", "2", host], timeout=60)
    rtts = [float(m) / 1000 for m in re.findall(r"time=([\d.]+) ms", res.stdout)]
    if not rtts:
        raise RuntimeError(f"ping {host} got no reply: {res.stdout[-300:]} {res.stderr[-300:]}")
    return rtts


# -- sections ----------------------------------------------------------------------------------


def bench_throughput(rep: Report, a: argparse.Namespace) -> None:
    from pytest_tunpair import TunPair

    secs = 1 if a.quick else 3
    rounds = a.rounds or (1 if a.quick else 3)
    samples: dict[str, list[float]] = {"lo": [], "pair": [], "offload=False": [], "snaplen": []}
    stats_by_round: list[tuple[float, dict[str, Any]]] = []
    cpu: list[float] = []
    extra = ["-t", str(secs)]
    for _ in range(rounds):
        # Interleaved, so that a burst of load from elsewhere hits all three alike.
        with TunPair() as idle:  # only for its namespace: lo is up in there
            with iperf_server("127.0.0.1"):
                samples["lo"].append(gbits(iperf_client("127.0.0.1", extra)))
            idle.check()
        with TunPair() as pair:
            with iperf_server(pair.b.ip or ""):
                c0, w0 = relay_thread_cpu(), time.monotonic()
                g = gbits(iperf_client(pair.b.ip or "", extra))
                c1, w1 = relay_thread_cpu(), time.monotonic()
            pair.check()
            samples["pair"].append(g)
            if c0 and c1:
                cpu.append((c1[0] + c1[1] - c0[0] - c0[1]) / (w1 - w0))
            cap = pair.packets
            stats_by_round.append(
                (
                    g,
                    {
                        "stats": pair.stats,
                        "kept": len(cap),
                        "kept_bytes": cap.nbytes,
                        "evicted": cap.evicted,
                        "gso": sum(
                            1 for p in cap if (i := p.gso) is not None and i.is_super_packet
                        ),
                    },
                )
            )
        with TunPair(offload=False) as slow:
            with iperf_server(slow.b.ip or ""):
                samples["offload=False"].append(gbits(iperf_client(slow.b.ip or "", extra)))
            slow.check()
        if not a.quick:
            with TunPair(snaplen=128) as heads:
                with iperf_server(heads.b.ip or ""):
                    samples["snaplen"].append(gbits(iperf_client(heads.b.ip or "", extra)))
                heads.check()
    lo, pair_g, off = (med(samples[k]) for k in ("lo", "pair", "offload=False"))
    rep.raw["throughput"] = samples
    rep.add(
        "throughput",
        f"iperf3 TCP {secs} s, MTU 1500, capture on (x{rounds})",
        f"{pair_g:.2f} Gbit/s",
        f"lo {lo:.2f} Gbit/s",
        f"{pair_g / lo:.2f}",
        ">= 0.50",
        pair_g / lo >= 0.5,
    )
    rep.add(
        "throughput",
        "  same with offload=False (reference)",
        f"{off:.2f} Gbit/s",
        f"lo {lo:.2f} Gbit/s",
        f"{off / lo:.2f}",
    )
    if samples["snaplen"]:
        snap = med(samples["snaplen"])
        rep.add(
            "throughput",
            "  same with snaplen=128 (reference)",
            f"{snap:.2f} Gbit/s",
            f"lo {lo:.2f} Gbit/s",
            f"{snap / lo:.2f}",
        )
    if cpu:
        rep.add(
            "throughput", "  relay thread CPU during the run", f"{med(cpu) * 100:.0f} % of a core"
        )
    # The counters of the median round.
    _g, info = sorted(stats_by_round, key=lambda x: x[0])[len(stats_by_round) // 2]
    for d, c in info["stats"].items():
        avg = c["bytes"] / c["packets"] if c["packets"] else 0
        rep.add(
            "throughput",
            f"  pair.stats {d}",
            f"{c['packets']} pkts, {c['bytes'] / MIB:.0f} MiB, {avg:.0f} B/pkt, "
            f"{c['dropped']} dropped",
        )
    rep.add(
        "throughput",
        "  capture at the end",
        f"{info['kept']} pkts kept ({info['gso']} GSO), {info['kept_bytes'] / MIB:.1f} MiB, "
        f"{info['evicted']} evicted",
    )
    rep.raw["throughput_counters"] = info


INNER_CONFTEST = """
import json, os, sys, time
_T = {}
_START = time.perf_counter()

def pytest_runtest_logreport(report):
    _T.setdefault(report.nodeid, {})[report.when] = report.duration

def pytest_sessionfinish(session):
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("scapy", "pyroute2"))
    with open(os.environ["TUNPAIR_BENCH_OUT"], "w") as f:
        json.dump({
            "durations": _T,
            "heavy": heavy,
            "plugin": session.config.pluginmanager.hasplugin("tunpair")
                      or session.config.pluginmanager.hasplugin("pytest_tunpair.plugin"),
            "session": time.perf_counter() - _START,
        }, f)
"""


def plugin_args() -> tuple[list[str], list[str]]:
    """pytest args that load / block the plugin, whether or not its entry point is installed."""
    from importlib.metadata import entry_points

    if any(ep.name == "tunpair" for ep in entry_points(group="pytest11")):
        return [], ["-p", "no:tunpair"]
    return ["-p", "pytest_tunpair.plugin"], []


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def inner_pytest(project: str, args: Sequence[str]) -> tuple[float, float, dict[str, Any]]:
    """Run pytest in ``project``; return wall time, CPU time and what its conftest reported.

    CPU time (user + system of the finished child) moves much less than wall time when other
    processes compete for the machine.
    """
    out = os.path.join(project, "result.json")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(out)
    env = dict(_ENV, TUNPAIR_BENCH_OUT=out)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    c0, t0 = _children_cpu(), time.perf_counter()
    res = run(cmd, timeout=600, cwd=project, env=env)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - c0
    if res.returncode != 0:
        raise RuntimeError(
            f"inner pytest {args} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
        )
    with open(out) as f:
        return wall, cpu, json.load(f)


SHELL_RECIPE = [
    # The seed article's steps, one `ip` command each, in a named namespace.
    "link set lo up",
    "tuntap add dev tun0 mode tun",
    "tuntap add dev tun1 mode tun",
    "addr add 198.18.0.1 peer 198.18.0.2 dev tun0",
    "addr add 198.18.0.2 peer 198.18.0.1 dev tun1",
    "link set tun0 up",
    "link set tun1 up",
    "route del local 198.18.0.1 dev tun0 table local",
    "route del local 198.18.0.2 dev tun1 table local",
    "route add local 198.18.0.1 dev tun0 table 13",
    "route add local 198.18.0.2 dev tun1 table 13",
    "rule add iif tun0 lookup 13",
    "rule add iif tun1 lookup 13",
]


def shell_recipe_once(name: str) -> float:
    t0 = time.perf_counter()
    _shell_netns.add(name)
    try:
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
        for step in SHELL_RECIPE:
            subprocess.run(["ip", "-n", name, *step.split()], check=True, capture_output=True)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
        _shell_netns.discard(name)
    return time.perf_counter() - t0


def bench_overhead(rep: Report, a: argparse.Namespace) -> None:
    from pytest_tunpair import TunPair

    n = a.tests or (10 if a.quick else 200)
    load, _block = plugin_args()
    with tempfile.TemporaryDirectory(prefix="tunpair-bench-") as project:
        with open(os.path.join(project, "conftest.py"), "w") as f:
            f.write(INNER_CONFTEST)
        for name, sig in (("with", "tun_pair, i"), ("without", "i")):
            with open(os.path.join(project, f"test_{name}.py"), "w") as f:
                f.write(
                    textwrap.dedent(f"""
                    import pytest

                    @pytest.mark.parametrize("i", range({n}))
                    def test_{name}({sig}):
                        assert i >= 0
                    """)
                )
        common = ["--tunpair", *load]
        wall_w, _cpu, res_w = inner_pytest(project, [*common, "test_with.py"])
        wall_wo, _cpu, res_wo = inner_pytest(project, [*common, "test_without.py"])
    per_w = med([sum(d.values()) for d in res_w["durations"].values()])
    per_wo = med([sum(d.values()) for d in res_wo["durations"].values()])
    phases = {
        side: {
            when: med([d.get(when, 0.0) for d in res["durations"].values()])
            for when in ("setup", "call", "teardown")
        }
        for side, res in (("with", res_w), ("without", res_wo))
    }
    overhead = per_w - per_wo
    by_wall = (wall_w - wall_wo) / n

    k = 2 if a.quick else 20
    shell = []
    for i in range(k):
        shell.append(shell_recipe_once(f"tunpair-bench-{os.getpid()}-{i}"))
    shell_med = med(shell)

    direct = []
    for _ in range(5 if a.quick else 50):
        t0 = time.perf_counter()
        with TunPair():
            pass
        direct.append(time.perf_counter() - t0)

    rep.raw["overhead"] = {
        "n": n,
        "per_test_with": per_w,
        "per_test_without": per_wo,
        "phases": phases,
        "wall_with": wall_w,
        "wall_without": wall_wo,
        "shell": shell,
        "tunpair_open_close": direct,
    }
    rep.add(
        "overhead",
        f"per test, tun_pair vs none (median of {n})",
        f"+{fmt_ms(overhead)}",
        f"shell recipe {fmt_ms(shell_med)}",
        f"{overhead / shell_med:.2f}",
        "<= 5 ms",
        overhead <= 0.005,
    )
    first = sum(next(iter(res_w["durations"].values())).values())
    rep.add(
        "overhead",
        "  from wall clock: difference / N",
        f"+{fmt_ms(by_wall)}",
        f"incl. first test {fmt_ms(first)} (imports)",
    )
    pw, pwo = phases["with"], phases["without"]
    rep.add(
        "overhead",
        "  setup / call / teardown medians",
        " / ".join(f"{pw[w] * 1000:.2f}" for w in ("setup", "call", "teardown")) + " ms",
        "without: " + " / ".join(f"{pwo[w] * 1000:.2f}" for w in ("setup", "call", "teardown")),
    )
    rep.add(
        "overhead",
        f"  TunPair() open+close, no pytest (x{len(direct)})",
        fmt_ms(med(direct)),
        f"shell recipe {fmt_ms(shell_med)} (x{k})",
        f"{med(direct) / shell_med:.2f}",
    )


def bench_unused(rep: Report, a: argparse.Namespace) -> None:
    files, per_file = (10, 20) if a.quick else (50, 20)
    rounds = 1 if a.quick else 7
    load, block = plugin_args()
    runs: dict[str, dict[str, list[float]]] = {
        "with": {"wall": [], "cpu": []},
        "without": {"wall": [], "cpu": []},
    }
    res_with: dict[str, Any] = {}
    res_without: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tunpair-bench-") as project:
        with open(os.path.join(project, "conftest.py"), "w") as f:
            f.write(INNER_CONFTEST)
        for i in range(files):
            with open(os.path.join(project, f"test_mod{i}.py"), "w") as f:
                f.write("import pytest\n\n")
                for j in range(per_file):
                    f.write(f"def test_{j}():\n    assert {j} >= 0\n\n")
        # A warm-up run fills the page cache.
        inner_pytest(project, ["--co", *load])
        for _ in range(rounds):  # alternating, so that load from elsewhere hits both alike
            wall, cpu, res_with = inner_pytest(project, ["--co", *load])
            runs["with"]["wall"].append(wall)
            runs["with"]["cpu"].append(cpu)
            wall, cpu, res_without = inner_pytest(project, ["--co", *block])
            runs["without"]["wall"].append(wall)
            runs["without"]["cpu"].append(cpu)

    def paired(kind: str) -> float:
        # Median of the per-round ratios: each pair of runs shares the machine's state.
        return med(
            [w / wo for w, wo in zip(runs["with"][kind], runs["without"][kind], strict=True)]
        )

    c_with, c_without = med(runs["with"]["cpu"]), med(runs["without"]["cpu"])
    w_with, w_without = med(runs["with"]["wall"]), med(runs["without"]["wall"])
    t_without = w_without
    rep.raw["unused"] = {**runs, "heavy": res_with["heavy"]}
    rep.add(
        "unused",
        f"pytest --co, {files * per_file} tests, CPU time (x{rounds})",
        f"{c_with:.3f} s",
        f"-p no:tunpair {c_without:.3f} s",
        f"{paired('cpu'):.3f}",
        "<= 1.05",
        paired("cpu") <= 1.05,
    )
    rep.add(
        "unused",
        "  same, wall clock",
        f"{w_with:.3f} s",
        f"-p no:tunpair {w_without:.3f} s",
        f"{paired('wall'):.3f}",
    )
    # The plugin's own import, after pytest's, in a fresh interpreter each time.
    probe = (
        "import time, pytest; t = time.perf_counter(); import pytest_tunpair.plugin; "
        "print(time.perf_counter() - t)"
    )
    imports = []
    for _ in range(3 if a.quick else 7):
        res = run([sys.executable, "-c", probe], timeout=60, env=_ENV)
        if res.returncode == 0:
            imports.append(float(res.stdout.split()[-1]))
    rep.raw["unused"]["plugin_import"] = imports
    if imports:
        rep.add(
            "unused",
            "  import pytest_tunpair.plugin, after pytest",
            fmt_ms(med(imports)),
            f"of {t_without:.3f} s",
            f"{med(imports) / t_without:.3f}",
        )
    heavy = res_with["heavy"]
    rep.add(
        "unused",
        "  scapy/pyroute2 imported at plugin load",
        ", ".join(heavy[:3]) + (" ..." if len(heavy) > 3 else "") if heavy else "none",
        "",
        "",
        "none",
        not heavy,
    )
    if not res_with["plugin"] or res_without["plugin"]:
        rep.notes.append(
            f"unused: plugin loaded with={res_with['plugin']} without={res_without['plugin']} "
            "(expected True/False): the comparison may not measure the plugin"
        )


def bench_latency(rep: Report, a: argparse.Namespace) -> None:
    from pytest_tunpair import TunPair

    count = 10 if a.quick else 200
    with TunPair() as pair:
        lo = ping_rtts("127.0.0.1", count)
        tun = ping_rtts(pair.b.ip or "", count)
        pair.check()
    rep.raw["latency"] = {"lo": lo, "pair": tun}
    rep.add(
        "latency",
        f"ping RTT through the pair (median of {len(tun)})",
        fmt_ms(med(tun)),
        f"lo {fmt_ms(med(lo))}",
        f"{med(tun) / med(lo):.1f}",
        "< 0.5 ms",
        med(tun) < 0.0005,
    )


_STAMPING_SERVER = """
import socket, sys, time
s = socket.create_server((sys.argv[1], int(sys.argv[2])))
with open(sys.argv[3], "w") as f:
    f.write(repr(time.monotonic()))  # CLOCK_MONOTONIC: the same clock in every process
conn, _ = s.accept()
while conn.recv(65536):
    pass
time.sleep(60)
"""


def _fin_teardown(delay: str, drain: float, port: int) -> tuple[float, bool]:
    """close() time of a pair whose client's FIN waits in ``delay``; whether it arrived."""
    import socket

    from pytest_tunpair import TunPair

    with tempfile.TemporaryDirectory() as tmp:
        stamp = os.path.join(tmp, "stamp")
        pair = TunPair(drain=drain).open()
        try:
            pair.spawn(
                [sys.executable, "-c", _STAMPING_SERVER, pair.b.ip or "", str(port), stamp],
                ready=port,
            )
            with socket.create_connection((pair.b.ip, port), timeout=10) as client:
                client.sendall(b"x")
                pair.packets.wait_for(lambda p: p.direction == "b->a" and p.seq > 2, timeout=5)
                pair.impair(delay=delay)
            started = time.monotonic()
        finally:
            pair.close()
        took = time.monotonic() - started
        from scapy.layers.inet import TCP

        fin = any(
            p.direction == "a->b" and p.action != "dropped" and p.scapy[TCP].flags.F
            for p in pair.packets
            if p.haslayer(TCP)
        )
        return took, fin


def bench_daemons(rep: Report, a: argparse.Namespace) -> None:
    from pytest_tunpair import TunPair

    n = 5 if a.quick else 30
    lags = []
    with TunPair() as pair, tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            stamp = os.path.join(tmp, f"stamp{i}")
            port = 9000 + i
            proc = pair.spawn(
                [sys.executable, "-c", _STAMPING_SERVER, pair.b.ip or "", str(port), stamp],
                ready=port,
            )
            returned = time.monotonic()
            with open(stamp) as f:
                lags.append(returned - float(f.read()))
            proc.kill()
            proc.wait()
    rep.raw["daemons"] = {"ready_lag": lags}
    rep.add(
        "daemons",
        f"spawn(ready=PORT) returns after listen() (median of {n})",
        fmt_ms(med(lags)),
        f"max {fmt_ms(max(lags))}",
        "",
        "< 60 ms",
        med(lags) < 0.060,
    )
    took, fin = _fin_teardown("200ms", 1.0, 7001)
    rep.raw["daemons"]["drain_200ms"] = took
    rep.add(
        "daemons",
        "teardown, FIN delayed 200 ms (drain=1.0)",
        f"{took * 1000:.0f} ms" + ("" if fin else ", FIN NOT delivered"),
        "delay 200 ms",
        f"{took / 0.2:.2f}",
        "200-500 ms, FIN delivered",
        fin and 0.19 <= took <= 0.5,
    )
    took, _fin = _fin_teardown("2s", 0.5, 7002)
    rep.raw["daemons"]["drain_cap"] = took
    rep.add(
        "daemons",
        "teardown, FIN delayed 2 s (drain=0.5)",
        f"{took * 1000:.0f} ms",
        "drain 500 ms",
        f"{took / 0.5:.2f}",
        "500-800 ms",
        0.49 <= took <= 0.8,
    )


def pct(xs: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``xs``, nearest rank."""
    ys = sorted(xs)
    return ys[min(len(ys) - 1, max(0, round(q * (len(ys) - 1))))] if ys else float("nan")


def fmt_us(s: float) -> str:
    return f"{s * 1e6:.0f} us"


def _departures(pair: Any, delay: float, count: int, gap: float) -> tuple[list[float], float]:
    """Send ``count`` datagrams a->b, ``gap`` s apart, through ``delay``; return each one's
    departure error (sojourn - delay) and the relay thread's CPU seconds per datagram."""
    import socket

    pair.impair(delay=delay, direction="a->b")
    pair.packets.clear()
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx,
    ):
        # Room for every datagram: they are read after the last one was sent.
        rx.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), 8 << 20)
        rx.bind((pair.b.ip, 0))
        rx.settimeout(5 + delay)
        tx.bind((pair.a.ip, 0))
        c0 = relay_thread_ns()
        for i in range(count):
            tx.sendto(i.to_bytes(4, "big"), rx.getsockname())
            time.sleep(gap)
        for _ in range(count):
            rx.recv(100)
        c1 = relay_thread_ns()
    pair.impair(direction="a->b")
    errors = [p.sojourn - delay for p in pair.packets if p.direction == "a->b"]
    cpu = (c1 - c0) / 1e9 / count if c0 is not None and c1 is not None else float("nan")
    return errors, cpu


def bench_timing(rep: Report, a: argparse.Namespace) -> None:
    from pytest_tunpair import TunPair

    count = 100 if a.quick else 1000
    raw: dict[str, Any] = {}
    with TunPair(ipv6=None) as pair:
        # The same datagrams without delay: the fast path's CPU per packet, for comparison.
        _, cpu0 = _departures(pair, 0.0, count, 0.002)
        rep.add("timing", "  relay CPU per datagram, no delay (fast path)", f"{cpu0 * 1e6:.1f} us")
        delays = [("100us", 100e-6), ("1ms", 1e-3), ("20ms", 20e-3)]
        if not a.quick:
            delays.append(("1s", 1.0))
        for label, delay in delays:
            errors, cpu = _departures(pair, delay, count, 0.002)
            raw[label] = errors
            p50, p99 = med(errors), pct(errors, 0.99)
            rep.add(
                "timing",
                f"departure error, delay={label} ({len(errors)} UDP datagrams)",
                f"median {fmt_us(p50)}, p99 {fmt_us(p99)}",
                f"scheduled: arrival + {label}",
                "",
                "< 100 us, < 1 ms",
                p50 < 100e-6 and p99 < 1e-3 and min(errors) > -1e-6,
            )
            rep.add("timing", f"  relay CPU per datagram, delay={label}", f"{cpu * 1e6:.1f} us")
        pings = 10 if a.quick else 100
        base = ping_rtts(pair.b.ip or "", pings)
        pair.impair(delay="200us")
        slow = ping_rtts(pair.b.ip or "", pings)
        pair.impair()
        pair.check()
    raw["ping"] = {"baseline": base, "delay200us": slow}
    rep.raw["timing"] = raw
    want = med(base) + 0.0004
    rep.add(
        "timing",
        f'ping RTT through delay="200us" each way (median of {len(slow)})',
        fmt_ms(med(slow)),
        f"no delay {fmt_ms(med(base))} + 0.40 ms",
        f"{(med(slow) - med(base)) * 1e3:+.2f} ms",
        "+0.40 ms +- 0.2",
        abs(med(slow) - want) < 0.0002,
    )


# -- link: the bottleneck queue, configured vs achieved ----------------------------------------

UDP_SIZE = 1400  # datagram payload; 1428 bytes on the wire (IPv4 + UDP headers)


def udp_overload_args(host: str, rate_bps: float, seconds: float) -> list[str]:
    """iperf3 (C, steady at any rate this machine carries) sending paced UDP to ``host``."""
    return [
        "iperf3", "-c", host, "-p", str(IPERF_PORT), "-u", "-b", f"{rate_bps:.0f}",
        "-l", str(UDP_SIZE), "-t", f"{seconds:g}", "-J",
    ]  # fmt: skip


def achieved_rate(pair: Any, skip: float, min_len: int = 0) -> float:
    """Bits/s the a->b link delivered, from the capture: the wire bytes written between the
    first and last delivery after ``skip`` seconds of the run (the queue is full by then).
    ``min_len``: count only packets at least this long (a TCP transfer's data segments:
    the ACKs and the control connection's last packets come after the queue has drained
    and would stretch the interval)."""
    out = [
        p
        for p in pair.packets
        if p.direction == "a->b" and p.action == "delayed" and p.wire_len >= min_len
    ]
    t_first = out[0].time + skip
    steady = [p for p in out if p.time >= t_first]
    if len(steady) < 3:
        raise RuntimeError(f"only {len(steady)} packets delivered: cannot measure a rate")
    bits = sum(p.wire_len for p in steady[1:]) * 8  # the first one's last bit opens it
    return bits / (steady[-1].time - steady[0].time)


def bench_link(rep: Report, a: argparse.Namespace) -> None:
    from pytest_tunpair import TunPair

    secs = 1.5 if a.quick else 4.0
    raw: dict[str, Any] = {}
    # Rate: UDP at 1.5x the configured rate, so the wire is never idle; the achieved rate
    # is what the relay wrote, per second, once the queue is full.
    for label, rate in (("1mbit", 1e6), ("20mbit", 20e6), ("100mbit", 100e6)):
        with TunPair(ipv6=None) as pair, iperf_server(pair.b.ip or ""):
            pair.impair(rate=label, direction="a->b")
            run(udp_overload_args(pair.b.ip or "", rate * 1.5, max(secs, 2.0)), timeout=60)
            got = achieved_rate(pair, 0.5)
            pair.check()
        raw[f"rate {label}"] = got
        rep.add(
            "link",
            f"rate={label}: delivered under 1.5x UDP overload",
            f"{got / 1e6:.3f} Mbit/s",
            f"configured {rate / 1e6:g} Mbit/s",
            f"{got / rate:.3f}",
            "1.00 +- 0.02",
            abs(got / rate - 1) <= 0.02,
        )
    # The bound: ping through a full buffer waits for the packets ahead of it, which the
    # bound caps at limit x one packet's time on the wire.
    for limit in (50, 200):
        with TunPair(ipv6=None) as pair, iperf_server(pair.b.ip or ""):
            base = med(ping_rtts(pair.b.ip or "", 10))
            pair.impair(rate="10mbit", limit=limit, direction="a->b")
            with popen(udp_overload_args(pair.b.ip or "", 20e6, secs + 2.0)) as flood:
                time.sleep(1.0)
                # Pings that find the buffer full are dropped, as on a real link: only one
                # that arrives just after a departure finds room (seen: 20 of 20 lost at
                # times), so send enough for a median.
                rtts = ping_rtts(pair.b.ip or "", 100 if a.quick else 200)
                flood.wait(60)
            stats = pair.stats["a->b"]
            pair.check()
        want = limit * (UDP_SIZE + 28) * 8 / 10e6 + base
        raw[f"bound {limit}"] = {"rtts": rtts, "base": base, "stats": stats}
        rep.add(
            "link",
            f"ping RTT, 2x UDP overload into rate=10mbit limit={limit} (median of {len(rtts)})",
            fmt_ms(med(rtts)),
            f"limit x packet time + base {fmt_ms(want)}",
            f"{med(rtts) / want:.2f}",
            "0.80 .. 1.10",
            0.8 <= med(rtts) / want <= 1.1,
        )
        rep.add(
            "link",
            f"  queue_peak, dropped (limit={limit})",
            f"{stats['queue_peak']}, {stats['dropped']} of {stats['dropped'] + stats['packets']}",
        )
    # CoDel against TCP filling the link: Cubic flows into 20 Mbit/s. The queueing delay
    # is a packet's sojourn minus its own time on the wire; CoDel aims at 5 ms, drop-tail
    # (1000 packets) is the reference. Wire-sized packets (offload=False) as a 20 Mbit/s
    # link carries them; with offload on, the kernel's GSO super-packets (up to ~9 ms each
    # on this wire) make the queue coarser, shown for reference.
    cases = [
        ("codel", 1, False, {}),
        ("codel", 4, False, {}),
        ("codel", 1, True, {}),
        ("droptail", 1, False, {"limit": 1000}),
    ]
    for queue, flows, offload, extra in cases:
        with TunPair(ipv6=None, offload=offload) as pair:
            pair.impair(rate="20mbit", queue=queue, direction="a->b", **extra)
            with iperf_server(pair.b.ip or ""):
                t_start = time.monotonic() - pair.packets.t0
                args = ["-t", str(secs + 1), "-P", str(flows), "-C", "cubic"]
                iperf_client(pair.b.ip or "", args)
            delays = [
                p.sojourn - p.wire_len * 8 / 20e6
                for p in pair.packets
                if p.direction == "a->b"
                and p.action == "delayed"
                and p.wire_len > 200
                and p.arrival > t_start + 1.0
            ]
            pair.check()
        what = f"{flows} Cubic flow{'s' if flows > 1 else ''}, offload={offload}"
        raw[f"sojourn {queue} {what}"] = delays
        if queue == "droptail":
            rep.add(
                "link",
                f"  queueing delay, {what}, queue=droptail limit=1000 (reference)",
                f"median {fmt_ms(med(delays))}",
            )
            continue
        goal = not offload
        rep.add(
            "link",
            f"{'' if goal else '  '}queueing delay, {what}, rate=20mbit queue=codel",
            f"median {fmt_ms(med(delays))}, p90 {fmt_ms(pct(delays, 0.9))}",
            "target 5.00 ms",
            f"{med(delays) / 0.005:.2f}",
            "<= 3x target" if goal else "",
            med(delays) <= 0.015 if goal else None,
        )
    # The impaired path at full speed: rate, delay and a queue, no hooks (offload stays on,
    # the queue paces GSO super-packets by their wire length).
    samples = []
    plain = []
    for _ in range(1 if a.quick else 3):
        with TunPair() as pair:
            with iperf_server(pair.b.ip or ""):
                plain.append(gbits(iperf_client(pair.b.ip or "", ["-t", str(secs)])))
            pair.impair(rate="5gbit", delay="1ms", limit=5000)
            with iperf_server(pair.b.ip or ""):
                samples.append(gbits(iperf_client(pair.b.ip or "", ["-t", str(secs)])))
            pair.check()
    raw["impaired throughput"] = {"impaired": samples, "plain": plain}
    rep.add(
        "link",
        'iperf3 TCP through rate="5gbit" delay="1ms" limit=5000, MTU 1500',
        f"{med(samples):.2f} Gbit/s",
        f"no impairment {med(plain):.2f} Gbit/s",
        f"{med(samples) / med(plain):.2f}",
        ">= 1 Gbit/s",
        med(samples) >= 1.0,
    )
    rep.raw["link"] = raw


def _numbered_losses(pair: Any, count: int) -> list[bool]:
    """Send ``count`` numbered UDP datagrams a->b; return, per number, whether the relay
    recorded it lost."""
    import socket
    import struct

    pair.packets.clear()
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client,
    ):
        sink.bind((pair.b.ip, 0))
        for i in range(count):
            client.sendto(struct.pack("!I", i) + bytes(60), sink.getsockname())
            if i % 50 == 49:
                time.sleep(0.001)  # the device queue and the relay keep up
        deadline = time.monotonic() + 10
        while sum(p.direction == "a->b" for p in pair.packets) < count:
            if time.monotonic() > deadline:
                raise RuntimeError("the relay did not see every datagram")
            time.sleep(0.01)
    lost = [False] * count
    for p in pair.packets:
        if p.direction == "a->b":
            lost[struct.unpack_from("!I", p.data, 28)[0]] = p.action == "lost"
    return lost


def bench_scenarios(rep: Report, a: argparse.Namespace) -> None:
    """Network scenarios, configured against achieved: trace rates, Gilbert-Elliott."""
    from pytest_tunpair import GilbertElliott, TunPair, traces

    secs = 2.0 if a.quick else 4.0
    raw: dict[str, Any] = {}
    # A mahimahi trace as the link, offered 1.5x its rate: the delivered wire rate once the
    # queue is full, against the trace's (1500 bytes per opportunity).
    for mbit in (12, 48):
        trace = traces.constant(mbit)
        with TunPair(ipv6=None) as pair, iperf_server(pair.b.ip or ""):
            pair.impair(trace=trace, direction="a->b")
            run(udp_overload_args(pair.b.ip or "", mbit * 1.5e6, secs), timeout=60)
            achieved = achieved_rate(pair, 0.5)
            pair.check()
        configured = traces.load(trace).rate
        raw[f"trace {mbit}mbit"] = achieved
        rep.add(
            "scenarios",
            f"trace constant({mbit}): delivered under 1.5x UDP overload",
            f"{achieved / 1e6:.2f} Mbit/s",
            f"trace {configured / 1e6:.2f} Mbit/s",
            f"{achieved / configured:.3f}",
            "within 5%",
            abs(achieved / configured - 1) < 0.05,
        )

    count = 3000 if a.quick else 30000
    model = GilbertElliott(p=0.05, r=0.25)
    with TunPair(ipv6=None) as pair:
        pair.impair(loss=model, seed=1, direction="a->b")
        lost = _numbered_losses(pair, count)
        pair.check()
    bursts: list[int] = []
    length = 0
    for x in [*lost, False]:
        if x:
            length += 1
        elif length:
            bursts.append(length)
            length = 0
    rate = sum(lost) / count
    mean = sum(bursts) / len(bursts) if bursts else 0.0
    raw["gemodel"] = {"lost": sum(lost), "bursts": bursts}
    rep.raw["scenarios"] = raw
    rep.add(
        "scenarios",
        f"Gilbert-Elliott p=5% r=25%: loss rate ({count} UDP datagrams)",
        f"{rate * 100:.2f}%",
        f"model {model.loss_rate * 100:.2f}%",
        f"{rate / model.loss_rate:.2f}",
        "within 15%",
        abs(rate / model.loss_rate - 1) < 0.15,
    )
    rep.add(
        "scenarios",
        f"Gilbert-Elliott p=5% r=25%: mean burst ({len(bursts)} bursts)",
        f"{mean:.2f} packets",
        f"model 1/r = {model.mean_burst:.2f}",
        f"{mean / model.mean_burst:.2f}",
        "within 15%",
        abs(mean / model.mean_burst - 1) < 0.15,
    )


def _hosts_tcp(hosts: bool, nat: bool, secs: float) -> float:
    """iperf3 TCP a -> b (Gbit/s): the server in b's host, the client in a's."""
    from pytest_tunpair import TunPair

    with TunPair(hosts=hosts, ipv6=None) as pair:
        if nat:
            pair.nat()
        b = pair.b.ip or ""
        pair.b.spawn(["iperf3", "-s", "-B", b, "-p", str(IPERF_PORT)], ready=IPERF_PORT)
        g = gbits(iperf_client(b, ["-t", str(secs)]))
        pair.check()
    return g


def bench_hosts(rep: Report, a: argparse.Namespace) -> None:
    """Hosts, NAT and DNS: what each costs (same-run ratios), and rebind_every's period."""
    import socket as _socket

    from pytest_tunpair import TunPair

    secs = 1.0 if a.quick else 3.0
    rounds = 1 if a.quick else 3
    samples: dict[str, list[float]] = {"one namespace": [], "hosts": [], "hosts + nat": []}
    for _ in range(rounds):  # interleaved: load from elsewhere hits all alike
        samples["one namespace"].append(_hosts_tcp(False, False, secs))
        samples["hosts"].append(_hosts_tcp(True, False, secs))
        samples["hosts + nat"].append(_hosts_tcp(True, True, secs))
    base = med(samples["one namespace"])
    rep.raw["hosts"] = dict(samples)
    rep.add("hosts", "TCP a->b, one namespace (offload on)", f"{base:.2f} Gbit/s")
    for name in ("hosts", "hosts + nat"):
        g = med(samples[name])
        note = " (NAT: offload off, every packet parsed and rewritten)" if "nat" in name else ""
        rep.add(
            "hosts",
            f"TCP a->b, {name}{note}",
            f"{g:.2f} Gbit/s",
            f"one namespace {base:.2f}",
            f"{g / base:.2f}",
        )

    # rebind_every: the period configured against the one achieved under steady traffic.
    period = 0.2
    with TunPair(hosts=True, ipv6=None) as pair:
        nat = pair.nat(rebind_every=period)
        b = pair.b.ip or ""
        with _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM) as tx:
            start = time.monotonic()
            end = start + (2.0 if a.quick else 6.0)
            while time.monotonic() < end:
                tx.sendto(b"tick", (b, 9))
                time.sleep(0.005)
            elapsed = time.monotonic() - start
        rebinds = nat.rebinds
        pair.check()
    expected = int(elapsed / period)  # due at start + k * period, k = 1, 2, ...
    rep.add(
        "hosts",
        f"nat(rebind_every={period}s): rebinds in {elapsed:.1f} s of 5 ms traffic",
        f"{rebinds}",
        f"configured {expected}",
        f"{rebinds / max(expected, 1):.3f}",
        "within 1",
        abs(rebinds - expected) <= 1,
    )

    # A lookup through the test's resolver, across the relay (getaddrinfo, A and AAAA).
    def lookups() -> list[float]:
        with TunPair() as pair:
            pair.dns({"api.test": "b"})
            times = []
            for _ in range(50 if a.quick else 300):
                t0 = time.perf_counter()
                _socket.getaddrinfo("api.test", 80, proto=_socket.IPPROTO_TCP)
                times.append(time.perf_counter() - t0)
            pair.check()
        return times

    from pytest_tunpair._kernel.disposable import run_in_disposable_thread
    from pytest_tunpair._kernel.userns import thread_can_return

    times = lookups() if thread_can_return() else run_in_disposable_thread(lookups, name="dns")
    rep.add("hosts", "getaddrinfo through dns() (A + AAAA over the relay)", fmt_ms(med(times)))

    # nat(timeout=): how long an idle mapping lets b in, against the configured timeout.
    # b sends to the mapping every 20 ms (inbound packets never refresh it); the expiry is
    # between the last one let in and the first one filtered, timed from the outbound packet
    # that made it (the relay's clock: the capture's arrival times).
    def expiry(timeout: float) -> tuple[float, float]:
        with TunPair(hosts=True, ipv6=None) as pair:
            pair.nat(timeout=timeout, filtering="endpoint-independent")
            b = pair.b.ip or ""
            with pair.b.entered():
                rx = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
                rx.bind((b, 3478))
            with rx, _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM) as tx:
                rx.settimeout(5)
                tx.sendto(b"map me", (b, 3478))
                _data, mapped = rx.recvfrom(100)
                end = time.monotonic() + timeout * 1.5 + 0.2
                while time.monotonic() < end:
                    rx.sendto(b"in", mapped)
                    time.sleep(0.02)
            made = pair.packets.filter(direction="a->b", action="rewritten")[0].arrival
            inbound = pair.packets.filter(direction="b->a", sport=3478)
            passed = [p.arrival for p in inbound if p.action == "rewritten"]
            filtered = [p.arrival for p in inbound if p.action == "filtered"]
            pair.check()
        return max(passed, default=made) - made, min(filtered, default=float("inf")) - made

    timeout = 0.5
    last_in, first_out = (
        expiry(timeout)
        if thread_can_return()
        else run_in_disposable_thread(lambda: expiry(timeout), name="nat")
    )
    rep.add(
        "hosts",
        f"nat(timeout={timeout}s): idle mapping let b in until / filtered from",
        f"{last_in:.3f} s / {first_out:.3f} s",
        f"configured {timeout}",
        f"{first_out / timeout:.3f}",
        "expires within 50 ms after",
        last_in <= timeout < first_out <= timeout + 0.05,
    )

    # dns(fail="timeout"): getaddrinfo's EAI_AGAIN after resolv.conf's timeout x attempts.
    def timed_out(attempts: int) -> float:
        with TunPair() as pair:
            pair.dns({"api.test": "b"}, fail="timeout", timeout=1, attempts=attempts)
            t0 = time.perf_counter()
            try:
                _socket.getaddrinfo("api.test", 80, proto=_socket.IPPROTO_TCP)
            except _socket.gaierror:
                pass
            took = time.perf_counter() - t0
            pair.check()
        return took

    for attempts in (1, 2):
        took = (
            timed_out(attempts)
            if thread_can_return()
            else run_in_disposable_thread(functools.partial(timed_out, attempts), name="dns")
        )
        rep.add(
            "hosts",
            f'getaddrinfo under dns(fail="timeout", timeout=1, attempts={attempts})',
            f"{took:.3f} s",
            f"configured {attempts}",
            f"{took / attempts:.3f}",
        )


def _vm(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def memory_child(size: int, offload: bool) -> dict[str, Any]:
    """In a fresh process: RSS growth while ``size`` bytes of TCP cross a default pair."""
    import gc

    from pytest_tunpair import TunPair

    # Warm-up: imports, the routing compiler, the relay's malloc arena -- costs any first
    # pair pays once per process, not per byte carried.
    with TunPair() as warm, iperf_server(warm.b.ip or ""):
        iperf_client(warm.b.ip or "", ["-n", "1M"])
    gc.collect()
    before = _vm("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak RSS, to the current RSS
    with TunPair(offload=offload) as pair:
        with iperf_server(pair.b.ip or ""):
            t0 = time.monotonic()
            g = gbits(iperf_client(pair.b.ip or "", ["-n", str(size)]))
            secs = time.monotonic() - t0
        pair.check()
        during = _vm("VmRSS")
        peak = _vm("VmHWM")
        info = {
            "before": before,
            "during": during,
            "peak": peak,
            "bound": pair.options.capture_bytes,
            "kept": len(pair.packets),
            "kept_bytes": pair.packets.nbytes,
            "stats": pair.stats,
            "gbit": g,
            "secs": secs,
        }
    return info


def bench_memory(rep: Report, a: argparse.Namespace) -> None:
    from pytest_tunpair._options import DEFAULT_CAPTURE_BYTES

    size = a.memory_bytes or (64 * MIB if a.quick else GIB)
    cases = [(True, size)]
    if not a.quick:
        # Wire-sized packets: many more Packet objects per captured byte.
        cases.append((False, min(size, 256 * MIB)))
    for offload, nbytes in cases:
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", str(nbytes)]
        if not offload:
            cmd.append("--no-offload")
        with popen(cmd, stdout=subprocess.PIPE, env=_ENV) as proc:
            out, err = proc.communicate(timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"memory child failed: {err[-2000:]}")
        info = json.loads(out.strip().splitlines()[-1])
        rep.raw.setdefault("memory", []).append(info)
        growth = info["peak"] - info["before"]
        bound = info["bound"]
        label = "" if offload else ", offload=False"
        rep.add(
            "memory",
            f"peak RSS growth, {nbytes / MIB:.0f} MiB TCP{label}",
            f"{growth / MIB:.1f} MiB",
            f"capture_bytes {bound / MIB:.0f} MiB",
            f"{growth / bound:.2f}",
            "<= 1.00",
            growth <= bound,
        )
        rep.add(
            "memory",
            "  capture at the end",
            f"{info['kept']} pkts, {info['kept_bytes'] / MIB:.1f} MiB, at {info['gbit']:.2f} Gbit/s",
        )
    if DEFAULT_CAPTURE_BYTES != rep.raw["memory"][0]["bound"]:
        rep.notes.append("memory: the pair did not use the default capture_bytes")


def bench_fields(rep: Report, a: argparse.Namespace) -> None:
    """Reading a header field of 100 000 captured packets vs scapy's decode of the same."""
    from pytest_tunpair import Packet, TunPair

    total = 100_000
    with TunPair(offload=False) as pair:  # wire-sized packets, as under hooks or loss
        import socket

        with socket.socket() as server:
            server.bind((pair.b.ip or "", 0))
            server.listen(1)

            def sink() -> None:
                conn, _ = server.accept()
                with conn:
                    while conn.recv(1 << 16):
                        pass

            t = threading.Thread(target=sink)
            t.start()
            with socket.create_connection(server.getsockname()) as client:
                client.sendall(os.urandom(4 * MIB))
            t.join(30)
        captured = [(p.direction, p._raw, p._off, p.mode) for p in pair.packets]
        pair.check()
    copies = [captured[i % len(captured)] for i in range(total)]
    # Fresh Packet objects each round: nothing parsed or decoded before the clock starts.
    times = []
    for _ in range(1 if a.quick else 3):
        packets = [Packet(0.0, d, "forwarded", raw, off, mode) for d, raw, off, mode in copies]
        t0 = time.perf_counter()
        ports = sum(1 for p in packets if p.dport is not None)
        times.append(time.perf_counter() - t0)
    assert ports == total, "every packet of a TCP transfer has ports"
    sample = 500 if a.quick else 5000
    packets = [Packet(0.0, d, "forwarded", raw, off, mode) for d, raw, off, mode in copies[:sample]]
    _ = packets[0].scapy  # the first decode imports scapy's layers: not part of the figure
    t0 = time.perf_counter()
    for p in packets[1:]:
        p.scapy.getlayer(1)
    per_packet = (time.perf_counter() - t0) / (sample - 1)
    fields = med(times)
    rep.raw["fields"] = {"fields_s": times, "scapy_per_packet_s": per_packet, "sample": sample}
    rep.add(
        "fields",
        f"Packet.dport of {total:,} captured packets (parsed from the bytes)",
        f"{fields:.3f} s",
        f"scapy decode {per_packet * total:.1f} s (from {sample})",
        f"{fields / (per_packet * total):.3f}",
        "< 0.5 s",
        fields < 0.5,
    )


def bench_async(rep: Report, a: argparse.Namespace) -> None:
    """Awaited waits, a test's thread bookkeeping, and the namespace-bound executor."""
    import asyncio
    import socket
    from concurrent.futures import ThreadPoolExecutor

    from pytest_tunpair import TunPair
    from pytest_tunpair._kernel.pools import PoolGuard
    from pytest_tunpair._kernel.threads import task_ids, threads_in

    rounds = 50 if a.quick else 300
    with TunPair() as pair, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        address = (pair.b.ip or "", 9)

        def send(i: int) -> tuple[float, bytes]:
            payload = b"%d" % i
            t0 = time.perf_counter()
            s.sendto(payload, address)
            return t0, payload

        def one(payload: bytes) -> Callable[[Any], bool]:
            return lambda p: p.payload == payload

        blocking = []
        last = None
        for i in range(rounds):
            t0, payload = send(i)
            last = pair.packets.expect(one(payload), after=last, timeout=5)
            blocking.append(time.perf_counter() - t0)

        async def awaited_rounds() -> list[float]:
            out = []
            after = last
            for i in range(rounds, 2 * rounds):
                t0, payload = send(i)
                after = await pair.packets.expect_async(one(payload), after=after, timeout=5)
                out.append(time.perf_counter() - t0)
            return out

        awaited = asyncio.run(awaited_rounds())

        ns = pair._netns
        assert ns is not None and ns.inode is not None
        loop = asyncio.new_event_loop()
        costs = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            before = task_ids()
            guard = PoolGuard(ns.fd, ns.inode)
            guard.bind([loop])
            guard.release()
            threads_in(ns.inode, besides=before)
            costs.append(time.perf_counter() - t0)
        loop.close()

        def first_task(make: Callable[[], ThreadPoolExecutor]) -> float:
            t0 = time.perf_counter()
            pool = make()
            pool.submit(int).result()
            pool.shutdown()
            return time.perf_counter() - t0

        plain = [first_task(ThreadPoolExecutor) for _ in range(rounds // 5)]
        bound = [first_task(pair.executor) for _ in range(rounds // 5)]
        pair.check()
    rep.raw["async"] = {"blocking_s": blocking, "awaited_s": awaited, "bookkeeping_s": costs}
    extra = med(awaited) - med(blocking)
    rep.add(
        "async",
        f"expect_async() wake-up, send to resumption (median of {rounds})",
        fmt_ms(med(awaited)),
        f"blocking expect() {fmt_ms(med(blocking))}",
        f"{med(awaited) / med(blocking):.2f}",
        "<= blocking + 1 ms",
        extra <= 1e-3,
    )
    rep.add(
        "async",
        "a tunnel test's thread bookkeeping (one loop bound and put back, leftover scan)",
        fmt_ms(med(costs)),
        "",
        "",
        "< 1 ms",
        med(costs) < 1e-3,
    )
    rep.add(
        "async",
        "tun_pair.executor(): create, first task, shut down",
        fmt_ms(med(bound)),
        f"ThreadPoolExecutor {fmt_ms(med(plain))}",
        f"{med(bound) / med(plain):.2f}",
    )


def _thread_ns(name: str) -> int | None:
    """CPU nanoseconds of this process's thread ``name`` so far (schedstat)."""
    for t in threading.enumerate():
        if t.name == name and t.native_id is not None:
            try:
                with open(f"/proc/self/task/{t.native_id}/schedstat") as f:
                    return int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                return None
    return None


def bench_pcapng(rep: Report, a: argparse.Namespace) -> None:
    from pytest_tunpair import TunPair
    from pytest_tunpair._packets.stream import Follower, Sink

    secs = 1 if a.quick else 3
    rounds = a.rounds or (1 if a.quick else 3)
    extra = ["-t", str(secs)]
    plain: list[float] = []
    streamed: list[float] = []
    written: list[int] = []
    cpu: list[float] = []
    last: Any = None
    for _ in range(rounds):
        with TunPair() as pair:
            with iperf_server(pair.b.ip or ""):
                plain.append(gbits(iperf_client(pair.b.ip or "", extra)))
            pair.check()
        with TunPair() as pair:
            sink = Sink(os.open(os.devnull, os.O_WRONLY), name=os.devnull)
            follower = Follower(pair.packets, sink, name="tunpair-pcapng-bench").start()
            with iperf_server(pair.b.ip or ""):
                n0, w0 = _thread_ns("tunpair-pcapng-bench"), time.monotonic()
                streamed.append(gbits(iperf_client(pair.b.ip or "", extra)))
                n1, w1 = _thread_ns("tunpair-pcapng-bench"), time.monotonic()
            pair.check()
        if n0 is not None and n1 is not None:
            cpu.append((n1 - n0) / 1e9 / (w1 - w0))
        follower.stop()
        sink.close()
        written.append(sink.packets)
        last = pair
    ratio = med(streamed) / med(plain)
    rep.raw["pcapng"] = {"plain": plain, "streamed": streamed, "written": written}
    rep.add(
        "pcapng",
        f"iperf3 TCP {secs} s, capture followed live into /dev/null (x{rounds})",
        f"{med(streamed):.2f} Gbit/s",
        f"unfollowed {med(plain):.2f} Gbit/s",
        f"{ratio:.2f}",
    )
    rep.add(
        "pcapng",
        "  packet blocks streamed per run (GSO super-packets count one)",
        f"{int(med(written))}",
    )
    if cpu:
        rep.add(
            "pcapng", "  follower thread CPU during the run", f"{med(cpu) * 100:.1f} % of a core"
        )
    # A per-segment link (offload on and a rate, docs/link.md): the capture holds runs of
    # segments as one entry each, which the follower expands and writes segment by segment.
    rate = 1e9
    seg: dict[bool, list[float]] = {False: [], True: []}
    seg_written: list[int] = []
    seg_skipped: list[int] = []
    for _ in range(rounds):
        for follow in (False, True):
            with TunPair(ipv6=None) as pair:
                pair.impair(rate=rate, direction="a->b")
                if follow:
                    sink = Sink(os.open(os.devnull, os.O_WRONLY), name=os.devnull)
                    follower = Follower(pair.packets, sink, name="tunpair-pcapng-bench").start()
                with iperf_server(pair.b.ip or ""):
                    seg[follow].append(gbits(iperf_client(pair.b.ip or "", extra)))
                pair.check()
            if follow:
                follower.stop()
                sink.close()
                seg_written.append(sink.packets)
                seg_skipped.append(follower.skipped)
    rep.raw["pcapng"]["per segment"] = {
        "plain": seg[False],
        "streamed": seg[True],
        "written": seg_written,
        "skipped": seg_skipped,
    }
    rep.add(
        "pcapng",
        f"iperf3 TCP {secs} s, rate={rate / 1e9:g}gbit (per segment), followed (x{rounds})",
        f"{med(seg[True]):.2f} Gbit/s ({int(med(seg_written))} blocks, "
        f"{int(med(seg_skipped))} let go by the capture first)",
        f"unfollowed {med(seg[False]):.2f}; configured {rate / 1e9:.2f} Gbit/s",
        f"{med(seg[True]) / med(seg[False]):.2f}",
    )
    packets = last.packets
    with tempfile.TemporaryDirectory() as tmp:
        times = {}
        for fmt in ("pcapng", "pcap"):
            t0 = time.perf_counter()
            path = packets.to_pcap(os.path.join(tmp, f"x.{fmt}"), format=fmt)
            times[fmt] = (time.perf_counter() - t0, os.path.getsize(path))
    (ng, ng_size), (pc, _size) = times["pcapng"], times["pcap"]
    rep.add(
        "pcapng",
        f"  to_pcap() of that run's capture ({len(packets)} pkts, {ng_size / MIB:.0f} MiB)",
        f"pcapng {fmt_ms(ng)}",
        f"pcap {fmt_ms(pc)}",
        f"{ng / pc:.2f}",
    )


# -- packetdrill: the scripted peer's pacing, the .pkt runner's scheduling -------------------


def _paced_rtt(delay: float) -> float:
    """tcpi_rtt (seconds) of a client whose SYN the scripted peer answers ``delay`` later."""
    import socket
    import struct

    from pytest_tunpair import TunPair

    with TunPair(ipv6=None) as pair, pair.script("b") as peer, socket.socket() as client:
        client.setblocking(False)
        client.connect_ex((pair.b.ip or "", 8080))
        conn = peer.tcp_accept(8080, synack_delay=delay)
        conn.complete()
        info = client.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        return float(struct.unpack_from("I", info, 68)[0]) / 1e6  # tcpi_rtt, in us


def bench_packetdrill(rep: Report, a: argparse.Namespace) -> None:
    from pytest_tunpair import TunPair
    from pytest_tunpair._peer.pkt_run import PktFailure, Runner, load, pair_options

    n = 3 if a.quick else 10
    rtts = [_paced_rtt(0.1) for _ in range(n)]
    base = [_paced_rtt(0.0) for _ in range(n)]
    rep.add(
        "packetdrill",
        f"tcpi_rtt after tcp_accept(synack_delay=0.1) (median of {n})",
        fmt_ms(med(rtts)),
        f"synack_delay=0: {fmt_ms(med(base))}",
        f"{(med(rtts) - med(base) - 0.1) * 1e3:+.2f} ms",
        "+100 ms +- 1",
        abs(med(rtts) - med(base) - 0.1) < 0.001,
    )
    folder = os.path.join(REPO, "tests", "packetdrill")
    scripts = sorted(f for f in os.listdir(folder) if f.endswith(".pkt"))
    if a.quick:
        scripts = scripts[:4]
    late: list[float] = []
    passed = 0
    ran = 0
    for name in scripts:
        path = os.path.join(folder, name)
        text = open(path).read()
        version = "ipv6" if name.endswith("v6.pkt") else "ipv4"
        script, config = load(text, version, name)
        with TunPair(**pair_options(config)) as pair:
            runner = Runner(
                script,
                config,
                pair.script("b"),
                path=name,
                directory=folder,
                lines=text.splitlines(),
                netns_path=pair.netns_path,
            )
            ran += 1
            try:
                runner.run()
                passed += 1
            except PktFailure:
                pass
            late += [t for what, t in runner.timing if what != "outbound packet"]
    rep.raw["packetdrill"] = {
        "tcpi_rtt_s": rtts,
        "tcpi_rtt_no_delay_s": base,
        "late_s": late,
        "passed": passed,
        "ran": ran,
    }
    rep.add(
        "packetdrill",
        f".pkt events started late ({len(late)} in {ran} scripts, IPv4)",
        f"median {fmt_us(med(late))}, p99 {fmt_us(pct(late, 0.99))}",
        "packetdrill's tolerance 4 ms",
        "",
        "p99 < 4 ms",
        pct(late, 0.99) < 0.004,
    )
    rep.add(
        "packetdrill",
        "  scripts passed with no slack (tunpair_pkt_slack_usecs = 0)",
        f"{passed} of {ran}",
    )


MAHIMAHI = os.environ.get("MAHIMAHI_BIN", "/opt/mahimahi/bin")
MM_PORT = 5301


def mahimahi_tcp(shell: Sequence[str], secs: float) -> tuple[float, float] | None:
    """iperf3 TCP through a mahimahi shell (``mm-delay 1``, ``mm-link UP DOWN``) in a
    fresh network namespace, run as nobody as its notes say (it wants a setuid binary
    run by a non-root user, ip_forward on, and adds NAT rules: all inside the new
    namespace). Returns (Gbit/s, mahimahi's CPU seconds per GB: the namespace's
    processes' CPU minus iperf3's own), or None without mahimahi."""
    if not os.path.exists(os.path.join(MAHIMAHI, shell[0])):
        return None
    inner = f"iperf3 -c $MAHIMAHI_BASE -p {MM_PORT} -t {secs:g} -J"
    cmd = " ".join([os.path.join(MAHIMAHI, shell[0]), *shell[1:], "sh", "-c", repr(inner)])
    script = textwrap.dedent(f"""\
        ip link set lo up
        sysctl -qw net.ipv4.ip_forward=1
        iperf3 -s -p {MM_PORT} >/dev/null 2>&1 &
        server=$!
        for i in $(seq 100); do ss -ltn | grep -q ':{MM_PORT} ' && break; sleep 0.1; done
        setpriv --reuid=65534 --regid=65534 --clear-groups {cmd}
        kill $server
        wait $server
        """)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = run(["unshare", "-n", "--", "sh", "-c", script], timeout=secs + 60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        data = json.loads(res.stdout[res.stdout.index("{") :])
    except ValueError:
        raise RuntimeError(f"mahimahi run failed: {res.stderr[-500:]}") from None
    gb = data["end"]["sum_received"]["bytes"] / 1e9
    total = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    cpu = data["end"]["cpu_utilization_percent"]
    iperf = (cpu["host_total"] + cpu["remote_total"]) / 100 * secs
    return gbits(data), max(0.0, total - iperf) / gb


def pair_tcp(impair: dict[str, Any], secs: float, **options: Any) -> tuple[float, float]:
    """iperf3 TCP a->b through a pair with ``impair`` on a->b: (Gbit/s, relay CPU s/GB,
    from the relay thread's schedstat)."""
    from pytest_tunpair import TunPair

    with TunPair(**options) as pair:
        if impair:
            pair.impair(direction="a->b", **impair)
        with iperf_server(pair.b.ip or ""):
            ns0 = relay_thread_ns()
            data = iperf_client(pair.b.ip or "", ["-t", f"{secs:g}"])
            ns1 = relay_thread_ns()
        pair.check()
    gb = data["end"]["sum_received"]["bytes"] / 1e9
    cpu = (ns1 - ns0) / 1e9 if ns0 is not None and ns1 is not None else float("nan")
    return gbits(data), cpu / gb


def _queueing(queue: str, offload: bool, secs: float) -> list[float]:
    """Sojourn minus own wire time of the a->b data packets of one Cubic flow through
    rate=20mbit and ``queue``, after the first second."""
    from pytest_tunpair import TunPair

    with TunPair(ipv6=None, offload=offload) as pair:
        pair.impair(rate="20mbit", queue=queue, direction="a->b")
        with iperf_server(pair.b.ip or ""):
            t_start = time.monotonic() - pair.packets.t0
            iperf_client(pair.b.ip or "", ["-t", f"{secs + 1:g}", "-C", "cubic"])
        delays = [
            p.sojourn - p.wire_len * 8 / 20e6
            for p in pair.packets
            if p.direction == "a->b"
            and p.action in ("delayed", "marked")
            and p.wire_len > 200
            and p.arrival > t_start + 1.0
        ]
        pair.check()
    return delays


def _two_flows(pair: Any, secs: float) -> list[float]:
    """Two Cubic flows a->b (client ports 40000 and 40001) for ``secs``: Mbit/s each."""
    # One iperf3 server serves one test at a time: two servers, two clients, at once.
    servers = [
        subprocess.Popen(
            ["iperf3", "-s", "-1", "-p", str(IPERF_PORT + 1 + i), "-B", pair.b.ip or ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_ENV,
        )
        for i in range(2)
    ]  # fmt: skip
    try:
        for i in range(2):
            wait_listen(IPERF_PORT + 1 + i)
        clients = [
            subprocess.Popen(
                ["iperf3", "-c", pair.b.ip or "", "-p", str(IPERF_PORT + 1 + i),
                 "-t", f"{secs:g}", "-C", "cubic", "--cport", str(40000 + i), "-J"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_ENV,
            )
            for i in range(2)
        ]  # fmt: skip
        outs = [c.communicate(timeout=secs + 30)[0] for c in clients]
    finally:
        for srv in servers:
            srv.kill()
            srv.wait()
    return [json.loads(o)["end"]["sum_received"]["bits_per_second"] / 1e6 for o in outs]


def bench_segments(rep: Report, a: argparse.Namespace) -> None:
    """The per-segment link: speed beside the plain pair and mahimahi, AQMs with offload
    on and off, fq_codel's fairness, rate accuracy."""
    from pytest_tunpair import TunPair, traces

    secs = 1.0 if a.quick else 4.0
    raw: dict[str, Any] = {}
    trace_file = tempfile.NamedTemporaryFile("w", suffix=".trace", delete=False)
    with trace_file:
        trace_file.write("\n".join(map(str, traces.constant(5000))) + "\n")
    os.chmod(trace_file.name, 0o644)  # mahimahi reads it as nobody
    try:
        cases: list[tuple[str, dict[str, Any], list[str] | None, str]] = [
            ("no impairment", {}, None, ""),
            ('delay="1ms" (super-packets whole)', {"delay": "1ms"}, ["mm-delay", "1"], ""),
            (
                'rate="5gbit" delay="1ms" limit=5000 (per segment)',
                {"rate": "5gbit", "delay": "1ms", "limit": 5000},
                ["mm-delay", "1"],
                ">= 1 Gbit/s",
            ),
            (
                "trace constant(5000) (per segment)",
                {"trace": trace_file.name},
                # "--": mm-link reads options with getopt, which would take sh's "-c".
                ["mm-link", trace_file.name, trace_file.name, "--"],
                ">= mahimahi",
            ),
        ]
        plain = pair_tcp({}, secs)
        for label, impair, mm, goal in cases:
            got = pair_tcp(impair, secs) if impair else plain
            theirs = None
            if mm:
                try:
                    theirs = mahimahi_tcp(mm, secs)
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    rep.notes.append(f"segments: mahimahi ({' '.join(mm[:2])}): {exc}")
            raw[f"speed {label}"] = {"pair": got, "mahimahi": theirs}
            base = f"plain {plain[0]:.2f} Gbit/s, {plain[1]:.2f} s/GB"
            if theirs is not None:
                base += f"; mahimahi {theirs[0]:.2f} Gbit/s, {theirs[1]:.2f} s/GB"
            ok: bool | None = None
            if goal.startswith(">= 1"):
                ok = got[0] >= 1.0
            elif goal and theirs is not None:
                ok = got[0] >= theirs[0]
            rep.add(
                "segments",
                f"iperf3 TCP, {label}",
                f"{got[0]:.2f} Gbit/s, relay {got[1]:.2f} s/GB",
                base,
                f"{got[0] / theirs[0]:.2f}x mm" if theirs else f"{got[0] / plain[0]:.2f}",
                goal,
                ok,
            )
        if not os.path.exists(os.path.join(MAHIMAHI, "mm-delay")):
            rep.notes.append(f"segments: mahimahi not found in {MAHIMAHI} (MAHIMAHI_BIN)")
    finally:
        os.unlink(trace_file.name)

    # AQMs against one Cubic flow at 20 Mbit/s, offload on (the relay splits) and off (the
    # kernel does): the same per-packet queue either way.
    aqms = (("codel", 0.005), ("pie", 0.015))
    for queue, target in aqms[:1] if a.quick else aqms:
        on = _queueing(queue, True, secs + 1)
        off = _queueing(queue, False, secs + 1)
        raw[f"sojourn {queue}"] = {"offload on": on, "offload off": off}
        rep.add(
            "segments",
            f"queueing delay, 1 Cubic flow, rate=20mbit queue={queue}, offload on",
            f"median {fmt_ms(med(on))}, p90 {fmt_ms(pct(on, 0.9))}",
            f"offload off: median {fmt_ms(med(off))}; target {fmt_ms(target)}",
            f"{med(on) / med(off):.2f}",
            "0.67 .. 1.5 (same)",
            0.67 <= med(on) / med(off) <= 1.5,
        )

    # fq_codel: two Cubic flows through one 20 Mbit/s bottleneck, their ACKs back through
    # classes of b->a delayed 2 ms and 20 ms: RTTs 10x apart.
    for queue in ("fq_codel", "droptail"):
        with TunPair(ipv6=None) as pair:
            pair.impair(direction="b->a", delay="2ms", match={"dport": 40000}, name="near")
            pair.impair(direction="b->a", delay="20ms", match={"dport": 40001}, name="far")
            pair.impair(direction="a->b", rate="20mbit", queue=queue, limit=1000)
            mbits = _two_flows(pair, secs + 1)
            pair.check()
        jain = sum(mbits) ** 2 / (2 * sum(x * x for x in mbits))
        raw[f"fairness {queue}"] = mbits
        rep.add(
            "segments",
            f"{queue} rate=20mbit, 2 Cubic flows, RTT 10x apart: Jain index",
            f"{jain:.3f}",
            f"near {mbits[0]:.1f}, far {mbits[1]:.1f} Mbit/s"
            + ("" if queue == "fq_codel" else " (reference: no goal)"),
            "",
            ">= 0.90" if queue == "fq_codel" else "",
            jain >= 0.9 if queue == "fq_codel" else None,
        )

    # Rate accuracy under TCP (offload on: per segment), from the capture.
    rates = (("1mbit", 1e6), ("20mbit", 20e6), ("100mbit", 100e6), ("1gbit", 1e9))
    for label, rate in rates[1::2] if a.quick else rates:
        with TunPair(ipv6=None) as pair, iperf_server(pair.b.ip or ""):
            pair.impair(rate=label, direction="a->b", limit=5000)
            iperf_client(pair.b.ip or "", ["-t", f"{secs + 2:g}", "-C", "cubic"])
            kept = [p.time for p in pair.packets if p.direction == "a->b"]
            # The capture's bound may have kept only the end of a fast run: skip a third.
            got = achieved_rate(pair, (kept[-1] - kept[0]) / 3, min_len=200)
            pair.check()
        raw[f"tcp rate {label}"] = got
        rep.add(
            "segments",
            f"rate={label}: delivered under TCP (per segment)",
            f"{got / 1e6:.3f} Mbit/s",
            f"configured {rate / 1e6:g} Mbit/s",
            f"{got / rate:.3f}",
            "1.00 +- 0.02",
            abs(got / rate - 1) <= 0.02,
        )
    rep.raw["segments"] = raw


# -- profiles: each named link, configured vs achieved -----------------------------------------


def achieved_rate_of(pair: Any, direction: str, skip: float) -> float:
    """Bits/s ``direction`` delivered, from the capture (as :func:`achieved_rate`)."""
    out = [p for p in pair.packets if p.direction == direction and p.action == "delayed"]
    t_first = out[0].time + skip
    steady = [p for p in out if p.time >= t_first]
    if len(steady) < 3:
        raise RuntimeError(f"only {len(steady)} packets delivered: cannot measure a rate")
    bits = sum(p.wire_len for p in steady[1:]) * 8
    return bits / (steady[-1].time - steady[0].time)


def _profile_delay(pair: Any, direction: str, rate: float, count: int) -> list[float]:
    """One-way delay of ``count`` small UDP datagrams sent 20 ms apart (no queue forms):
    sojourn minus their own time on the wire."""
    import socket

    src, dst = (pair.a.ip, pair.b.ip) if direction == "a->b" else (pair.b.ip, pair.a.ip)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
        rx.bind((dst, 0))
        port = rx.getsockname()[1]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            tx.bind((src, 0))
            for _ in range(count):
                tx.sendto(b"p" * 72, (dst, port))
                time.sleep(0.02)
        pair.packets.wait_quiet(idle=0.5, timeout=10)
    return [
        p.sojourn - p.wire_len * 8 / rate
        for p in pair.packets
        if p.direction == direction and p.dport == port and p.action == "delayed"
    ]


def bench_profiles(rep: Report, a: argparse.Namespace) -> None:
    from pytest_tunpair import TunPair
    from pytest_tunpair._link.impair import ImpairmentSpec
    from pytest_tunpair._link.profiles import PROFILES

    secs = 1.5 if a.quick else 3.0
    raw: dict[str, Any] = {}
    for name in PROFILES:
        for direction in ("a->b", "b->a"):
            spec = ImpairmentSpec.from_kwargs(profile=name, towards=direction)
            rate, delay = float(spec.rate or 0), spec.delay
            with TunPair(ipv6=None) as pair, iperf_server(pair.b.ip or ""):
                pair.impair(profile=name, direction=direction, seed=1)
                reverse = ["-R"] if direction == "b->a" else []
                if rate <= 50e6:
                    args = udp_overload_args(pair.b.ip or "", rate * 1.5, max(secs, 2.0))
                    run([*args, *reverse], timeout=120)
                else:
                    iperf_client(pair.b.ip or "", ["-t", str(secs), *reverse])
                got = achieved_rate_of(pair, direction, 0.5)
                pair.check()
            with TunPair(ipv6=None) as pair:
                pair.impair(profile=name, direction=direction, loss=0, seed=1)
                delays = _profile_delay(pair, direction, rate, 10 if a.quick else 25)
                pair.check()
            raw[f"{name} {direction}"] = {"rate": got, "delays": delays}
            link = "uplink" if direction == "a->b" else "downlink"
            rep.add(
                "profiles",
                f"{name} {link} ({direction}): rate delivered under 1.5x overload",
                f"{got / 1e6:.4g} Mbit/s",
                f"configured {rate / 1e6:.4g} Mbit/s",
                f"{got / rate:.3f}",
                "1.00 +- 0.05",
                abs(got / rate - 1) <= 0.05,
            )
            rep.add(
                "profiles",
                f"  {name} {link}: one-way delay, unloaded (median of {len(delays)})",
                fmt_ms(med(delays)),
                f"configured {fmt_ms(delay)}",
                f"{med(delays) / delay:.3f}",
                "1.00 +- 0.05",
                abs(med(delays) / delay - 1) <= 0.05,
            )
    rep.raw["profiles"] = raw


# -- import: what the plugin costs a run without tunnels, in instructions ----------------------


def _instructions(cmd: Sequence[str], cwd: str, env: dict[str, str]) -> int:
    """CPU instructions ``cmd`` executes (callgrind's total ``Ir``), children excluded."""
    with tempfile.NamedTemporaryFile(prefix="tunpair-cg-", suffix=".out") as out:
        res = run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out.name}", *cmd],
            timeout=3600,
            cwd=cwd,
            env=env,
        )
        found = re.search(r"Collected : (\d+)", res.stderr)
        if res.returncode != 0 or found is None:
            raise RuntimeError(f"callgrind failed:\n{res.stderr[-2000:]}")
        return int(found.group(1))


def bench_import(rep: Report, a: argparse.Namespace) -> None:
    load, block = plugin_args()
    tests = 100 if a.quick else 500
    env = dict(_ENV)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # an installed package has its bytecode
    counts: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="tunpair-bench-") as project:
        for i in range(tests // 20):
            with open(os.path.join(project, f"test_mod{i}.py"), "w") as f:
                f.write("import pytest\n\n")
                for j in range(20):
                    f.write(f"def test_{j}():\n    assert {j} >= 0\n\n")
        for label, args in (("with", load), ("without", block)):
            cmd = [sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider", *args]
            run(cmd, timeout=300, cwd=project, env=env)  # writes the bytecode
            counts[label] = _instructions(cmd, project, env)
        probe = "import pytest, pytest_tunpair.plugin"
        counts["plugin import"] = _instructions(
            [sys.executable, "-c", probe], project, env
        ) - _instructions([sys.executable, "-c", "import pytest"], project, env)
    rep.raw["import"] = counts
    ratio = counts["with"] / counts["without"]
    rep.add(
        "import",
        f"pytest --co, {tests} tests, no tunnel: instructions (callgrind)",
        f"{counts['with'] / 1e9:.4g} G",
        f"-p no:tunpair {counts['without'] / 1e9:.4g} G",
        f"{ratio:.4f}",
        "<= 1.02",
        ratio <= 1.02,
    )
    rep.add(
        "import",
        "  import pytest_tunpair.plugin after pytest: instructions",
        f"{counts['plugin import'] / 1e6:.4g} M",
        f"of {counts['without'] / 1e9:.4g} G",
        f"{counts['plugin import'] / counts['without']:.4f}",
    )


# -- speed: the relay beside mahimahi, per-test cost -------------------------------------------


# An ICMP echo client timed by the kernel: the send stamped just before sendto(), the reply
# by SO_TIMESTAMPNS (the moment the kernel received it), so that RTTs of 40 ms keep their
# microseconds (ping prints 3 digits: 40.3 ms) and this script's own wake-up is not in them.
# Argv: HOST COUNT GAP; prints a JSON list of RTTs in seconds. Needs CAP_NET_RAW (root).
PINGER = """
import json, os, select, socket, struct, sys, time
TSNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # include/uapi/asm-generic/socket.h
host, count, gap = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.setsockopt(socket.SOL_SOCKET, TSNS, 1)
ident = os.getpid() & 0xFFFF
p = select.poll()
p.register(s, select.POLLIN)
out = []
for seq in range(count):
    body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + bytes(48)
    c = sum(struct.unpack("!28H", body))
    c = (c >> 16) + (c & 0xFFFF)
    c = ~(c + (c >> 16)) & 0xFFFF
    body = body[:2] + struct.pack("!H", c) + body[4:]
    t0 = time.time_ns()
    s.sendto(body, (host, 0))
    deadline = time.monotonic() + 2
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not p.poll(left * 1000):
            break
        data, anc, _f, _a = s.recvmsg(2048, 64)
        ihl = (data[0] & 15) * 4
        typ, _c, _s, rid, rseq = struct.unpack("!BBHHH", data[ihl : ihl + 8])
        if typ != 0 or rid != ident or rseq != seq:
            continue
        for level, kind, val in anc:
            if level == socket.SOL_SOCKET and kind == TSNS:
                sec, ns = struct.unpack("qq", val[:16])
                out.append((sec * 10**9 + ns - t0) / 1e9)
        break
    time.sleep(gap)
print(json.dumps(out))
"""


def icmp_rtts(host: str, count: int, gap: float = 0.01) -> list[float]:
    """RTTs (seconds) of ``count`` echo requests to ``host``, one at a time, ``gap`` apart,
    from the calling thread's namespace (:data:`PINGER`)."""
    res = run([sys.executable, "-c", PINGER, host, str(count), str(gap)], timeout=count + 60)
    try:
        rtts: list[float] = json.loads(res.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"ICMP echo to {host} failed: {res.stderr[-500:]}") from None
    if len(rtts) < count // 2:
        raise RuntimeError(f"ICMP echo to {host}: {len(rtts)} of {count} answered")
    return rtts


def mahimahi_ping(delay_ms: int, count: int) -> tuple[list[float], list[float]] | None:
    """RTTs (:func:`icmp_rtts`) through ``mm-delay DELAY_MS`` and over ``lo``, in a fresh
    namespace: (through mahimahi, lo), seconds; None without mahimahi.

    The shell runs as nobody, as its notes say, and only waits; the echo requests go from
    the outer namespace (root, raw socket) to the shell's address and its kernel answers:
    the same two crossings of the emulator as a ping from inside."""
    mm = os.path.join(MAHIMAHI, "mm-delay")
    if not os.path.exists(mm):
        return None
    with tempfile.TemporaryDirectory(prefix="tunpair-mm-") as tmp:
        os.chmod(tmp, 0o755)
        flag = os.path.join(tmp, "running")
        open(flag, "w").close()
        pinger = os.path.join(tmp, "pinger.py")
        with open(pinger, "w") as f:
            f.write(PINGER)
        py = f"{sys.executable} {pinger}"
        script = textwrap.dedent(f"""\
            ip link set lo up
            sysctl -qw net.ipv4.ip_forward=1
            {py} 127.0.0.1 {count} 0.01 || exit 1
            setpriv --reuid=65534 --regid=65534 --clear-groups {mm} {delay_ms} \\
                sh -c 'while [ -e {flag} ]; do sleep 0.05; done' &
            shell=$!
            for i in $(seq 400); do
                peer=$(ip -4 -o addr | sed -n 's/.* peer \\([0-9.]*\\)\\/.*/\\1/p' | head -1)
                [ -n "$peer" ] && ping -n -q -c 1 -W 1 $peer >/dev/null 2>&1 && break
                sleep 0.05
            done
            {py} $peer {count} 0.01
            rm -f {flag}
            wait $shell
            """)
        res = run(["unshare", "-n", "--", "sh", "-c", script], timeout=count * 0.2 + 120)
    lists = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("[")]
    if len(lists) != 2 or not lists[0] or not lists[1]:
        raise RuntimeError(f"mahimahi ping failed: {res.stdout[-300:]} {res.stderr[-300:]}")
    return lists[1], lists[0]


def pair_ping(delay: str | None, count: int) -> tuple[list[float], list[float]]:
    """RTTs (:func:`icmp_rtts`) through a default pair (``delay`` each way, or none) and
    over its namespace's ``lo`` just before: (through the pair, lo), seconds."""
    from pytest_tunpair import TunPair

    with TunPair(ipv6=None) as pair:
        if delay:
            pair.impair(delay=delay)
        lo = icmp_rtts("127.0.0.1", count)
        rtts = icmp_rtts(pair.b.ip or "", count)
        pair.check()
    return rtts, lo


def busy_thread_rtts(count: int, interval: float | None) -> list[float]:
    """RTTs (:func:`icmp_rtts`) through a plain pair while another thread of this process
    runs Python without pause, as a test's own server or computation may: the relay thread
    then waits for the GIL at each wake-up (up to the switch interval, 5 ms by default;
    ``interval`` sets it for the measurement)."""
    from pytest_tunpair import TunPair

    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(100))

    old = sys.getswitchinterval()
    spinner = threading.Thread(target=spin, name="bench-spin")
    with TunPair(ipv6=None) as pair:
        spinner.start()
        try:
            if interval is not None:
                sys.setswitchinterval(interval)
            rtts = icmp_rtts(pair.b.ip or "", count)
        finally:
            sys.setswitchinterval(old)
            stop.set()
            spinner.join()
        pair.check()
    return rtts


def tunnel_test_cost(
    n: int, wait: float = 0.0, rounds: int = 1
) -> tuple[list[float], list[float], list[float]]:
    """Inner pytest runs of ``n`` tests using ``tun_pair`` and of ``n`` without, each body
    sleeping ``wait`` s (0: returning at once), one after the other ``rounds`` times (so that
    the machine's slower and faster minutes fall on both alike): per round, the median time
    per test (setup + call + teardown) with, without, and the difference."""
    load, _block = plugin_args()
    with_, without, cost = [], [], []
    with tempfile.TemporaryDirectory(prefix="tunpair-bench-") as project:
        with open(os.path.join(project, "conftest.py"), "w") as f:
            f.write(INNER_CONFTEST)
        for name, sig in (("with", "tun_pair, i"), ("without", "i")):
            with open(os.path.join(project, f"test_{name}.py"), "w") as f:
                f.write(
                    "import time\n\nimport pytest\n\n"
                    f"@pytest.mark.parametrize('i', range({n}))\n"
                    f"def test_{name}({sig}):\n    time.sleep({wait!r})\n    assert i >= 0\n"
                )
        common = ["--tunpair", *load]
        for _ in range(rounds):
            _w, _c, res_w = inner_pytest(project, [*common, "test_with.py"])
            _w, _c, res_wo = inner_pytest(project, [*common, "test_without.py"])
            # The first test pays the imports: not a per-test cost.
            per_w = med([sum(d.values()) for d in list(res_w["durations"].values())[1:]])
            per_wo = med([sum(d.values()) for d in list(res_wo["durations"].values())[1:]])
            with_.append(per_w)
            without.append(per_wo)
            cost.append(per_w - per_wo)
    return with_, without, cost


def bench_speed(rep: Report, a: argparse.Namespace) -> None:
    """The relay's speed goals, each beside mahimahi (or the plain run) in the same run.

    The machine these run on is shared: every row is a difference or ratio of figures taken
    moments apart, and ``--rounds`` repeats the ping and CPU rows (medians over rounds)."""
    count = 50 if a.quick else 1000
    rounds = a.rounds or (1 if a.quick else 3)
    secs = 1.0 if a.quick else 4.0
    raw: dict[str, Any] = {"rounds": []}
    added_pair: list[float] = []
    added_mm: list[float] = []
    err_pair: list[float] = []
    err_mm: list[float] = []
    cpu_pair: list[float] = []
    cpu_mm: list[float] = []
    have_mm = os.path.exists(os.path.join(MAHIMAHI, "mm-delay"))
    for _ in range(rounds):  # interleaved, so that load from elsewhere hits both alike
        r: dict[str, Any] = {}
        rtt, lo = pair_ping(None, count)
        added_pair.append(med(rtt) - med(lo))
        r["pair"] = {"rtt": rtt, "lo": lo}
        slow, lo = pair_ping("20ms", count // 2)
        err_pair.append(med(slow) - 0.040 - med(lo))
        r["pair 20ms"] = {"rtt": slow, "lo": lo}
        cpu_pair.append(pair_tcp({"delay": "1ms"}, secs, offload=False)[1])
        if have_mm:
            got = mahimahi_ping(0, count)
            assert got is not None
            added_mm.append(med(got[0]) - med(got[1]))
            r["mahimahi"] = {"rtt": got[0], "lo": got[1]}
            got = mahimahi_ping(20, count // 2)
            assert got is not None
            err_mm.append(med(got[0]) - 0.040 - med(got[1]))
            r["mahimahi 20"] = {"rtt": got[0], "lo": got[1]}
            mm = mahimahi_tcp(["mm-delay", "1"], secs)
            if mm is not None:
                cpu_mm.append(mm[1])
        raw["rounds"].append(r)
    if not have_mm:
        rep.notes.append(f"speed: mahimahi not found in {MAHIMAHI} (MAHIMAHI_BIN)")

    def each(xs: Sequence[float], scale: float = 1e3, unit: str = "ms") -> str:
        return f"{med(xs) * scale:.3f} {unit}" + (
            f" ({', '.join(f'{x * scale:.3f}' for x in xs)})" if len(xs) > 1 else ""
        )

    rep.add(
        "speed",
        f"ICMP RTT added by the plain pair: median - lo's ({count} pings, x{rounds})",
        each(added_pair),
        f"mm-delay 0: {each(added_mm)}" if added_mm else "",
        f"{med(added_pair) / med(added_mm):.2f}x mm" if added_mm else "",
        "<= mahimahi's",
        med(added_pair) <= med(added_mm) if added_mm else None,
    )
    rep.add(
        "speed",
        f'  same through delay="20ms" each way: median - lo\'s - 40 ms ({count // 2} pings)',
        each(err_pair),
        f"mm-delay 20: {each(err_mm)}" if err_mm else "",
        "",
        "<= 0.1 ms (and mm's)",
        abs(med(err_pair)) <= 0.0001 and (not err_mm or med(err_pair) <= med(err_mm)),
    )
    rep.add(
        "speed",
        f'relay CPU per GB, TCP through delay="1ms", offload=False ({secs:g} s)',
        each(cpu_pair, 1, "s/GB"),
        f"mm-delay 1: {each(cpu_mm, 1, 's/GB')}" if cpu_mm else "",
        f"{med(cpu_pair) / med(cpu_mm):.2f}x mm" if cpu_mm else "",
        "<= mahimahi's",
        med(cpu_pair) <= med(cpu_mm) if cpu_mm else None,
    )
    # Reference, no goal: the GIL handoff when the test process has a busy Python thread.
    few = count // 5
    busy = busy_thread_rtts(few, None)
    busy_fast = busy_thread_rtts(few, 0.0005)
    raw["busy thread"] = {"default": busy, "0.5 ms": busy_fast}
    rep.add(
        "speed",
        f"  ICMP RTT, plain pair, a busy Python thread beside (GIL; {few} pings)",
        f"median {fmt_ms(med(busy))}, p90 {fmt_ms(pct(busy, 0.9))}",
        f"switchinterval 0.5 ms: {fmt_ms(med(busy_fast))}, p90 {fmt_ms(pct(busy_fast, 0.9))}",
        f"{med(busy) / med(busy_fast):.1f}",
    )
    n = a.tests or (20 if a.quick else 200)
    for wait, label in (
        (0.0, f"per-test cost of tun_pair (median of {n}, setup + call + teardown, x{rounds})"),
        # The same tests, each waiting 10 ms as a test waits for its traffic: the next
        # test's namespace and devices are built meanwhile (_kernel/spare.py), where tests
        # that take no time at all leave no CPU for it.
        (0.01, "  same, each test waiting 10 ms (for its traffic)"),
    ):
        per_w, per_wo, costs = tunnel_test_cost(n, wait, rounds)
        raw["per test" + (", 10 ms each" if wait else "")] = {"with": per_w, "without": per_wo}
        rep.add(
            "speed",
            label,
            "+" + each(costs),
            f"with {fmt_ms(med(per_w))}, without {fmt_ms(med(per_wo))}",
            "",
            "<= 2 ms",
            med(costs) <= 0.002,
        )
    rep.raw["speed"] = raw


BENCHES: dict[str, Callable[[Report, argparse.Namespace], None]] = {
    "throughput": bench_throughput,
    "overhead": bench_overhead,
    "unused": bench_unused,
    "latency": bench_latency,
    "daemons": bench_daemons,
    "timing": bench_timing,
    "link": bench_link,
    "memory": bench_memory,
    "fields": bench_fields,
    "scenarios": bench_scenarios,
    "async": bench_async,
    "pcapng": bench_pcapng,
    "packetdrill": bench_packetdrill,
    "segments": bench_segments,
    "profiles": bench_profiles,
    "import": bench_import,
    "speed": bench_speed,
    "hosts": bench_hosts,
}

NEEDS = {
    "throughput": ["iperf3"],
    "overhead": ["ip"],
    "unused": [],
    "latency": ["ping"],
    "daemons": [],
    "timing": ["ping"],
    "link": ["iperf3", "ping"],
    "memory": ["iperf3"],
    "fields": [],
    "scenarios": ["iperf3"],
    "async": [],
    "pcapng": ["iperf3"],
    "packetdrill": [],
    "segments": ["iperf3"],
    "profiles": ["iperf3"],
    "import": ["valgrind"],
    "speed": ["iperf3", "ping"],
    "hosts": ["iperf3"],
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="small samples: seconds instead of a minute"
    )
    p.add_argument(
        "--only", action="append", choices=SECTIONS, help="run only this section (repeatable)"
    )
    p.add_argument("--rounds", type=int, help="throughput rounds (default 3, --quick 1)")
    p.add_argument("--tests", type=int, help="tests per side in the overhead section (default 200)")
    p.add_argument(
        "--memory-bytes", type=int, help="bytes sent in the memory section (default 1 GiB)"
    )
    p.add_argument("--json", metavar="FILE", help="also write the raw samples to FILE")
    p.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    p.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--no-offload", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    if a.memory_child:
        try:
            print(json.dumps(memory_child(a.memory_child, not a.no_offload)))
        finally:
            _cleanup()
        return 0
    if os.geteuid() != 0:
        print("benchmarks/run.py needs root (network namespaces, TUN devices): run it with sudo")
        return 2
    sections = a.only or list(SECTIONS)
    rep = Report()
    started = time.monotonic()
    load = os.getloadavg()[0]
    print(
        f"pytest-tunpair benchmark: {os.cpu_count()} CPUs, Linux {platform.release()}, "
        f"Python {platform.python_version()}, load average {load:.2f} at start"
        + (", --quick" if a.quick else ""),
        flush=True,
    )
    failed = False
    try:
        for name in sections:
            missing = [t for t in NEEDS[name] if shutil.which(t) is None]
            if missing:
                rep.notes.append(f"{name}: skipped, {', '.join(missing)} not installed")
                continue
            t0 = time.monotonic()
            print(f"  {name} ...", end="", flush=True)
            try:
                BENCHES[name](rep, a)
            except KeyboardInterrupt:
                raise
            except Exception as exc:
                failed = True
                rep.notes.append(f"{name}: failed: {type(exc).__name__}: {exc}")
            print(f" {time.monotonic() - t0:.1f} s", flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", flush=True)
        _cleanup()
        return 130
    finally:
        _cleanup()
    print()
    print(rep.table())
    for note in rep.notes:
        print(f"note: {note}")
    print(
        f"\n{time.monotonic() - started:.0f} s in total; "
        f"load average {os.getloadavg()[0]:.2f} at the end "
        "(figures from a busy machine are low: rerun when it is idle)"
    )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {"rows": [r.__dict__ for r in rep.rows], "raw": rep.raw, "notes": rep.notes},
                f,
                indent=1,
            )
    missed = any(r.ok is False for r in rep.rows)
    if failed:
        return 1
    return 1 if (a.strict and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
