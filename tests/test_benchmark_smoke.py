"""``benchmarks/run.py --quick`` runs end to end and prints its table.

A smoke test: it checks that every section ran and cleaned up after itself, never what the
numbers are (timings belong to the benchmark, not to a test).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_tunpair._kernel.userns import in_initial_user_namespace
from pytest_tunpair.plugin import SKIP_REASON, enabled

from .conftest import host_snapshot, need

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"


def _netns_list() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


# Every section once, quickly: minutes on a busy 2-core machine (the subprocess's own
# timeout is the same).
@pytest.mark.timeout(600)
def test_benchmark_quick_mode_prints_every_row(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    if not enabled(request.config):
        pytest.skip(SKIP_REASON)
    if os.geteuid() != 0 or not in_initial_user_namespace():
        # Its shell-recipe baseline uses `ip netns add`, which mounts under /run/netns.
        pytest.skip("benchmarks/run.py needs real root (not root in a user namespace)")
    for tool in ("iperf3", "ping", "ip"):
        need(tool)
    before = host_snapshot()
    out = tmp_path / "bench.json"
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("section"))
    sections = {line.split()[0] for line in lines[header + 2 :] if line[:1].isalpha()}
    sections.discard("note:")
    assert {"throughput", "overhead", "unused", "latency", "daemons", "timing", "memory"} <= (
        sections
    ), res.stdout
    for row in ("pair.stats a->b", "pair.stats b->a", "shell recipe", "-p no:tunpair", "lo "):
        assert row in res.stdout, res.stdout
    assert "failed" not in res.stdout, res.stdout

    data = json.loads(out.read_text())
    # Every goal row carries a verdict; the heavy-import check is a fact, not a timing.
    goals = [r for r in data["rows"] if r["goal"]]
    assert goals and all(r["ok"] is not None for r in goals)
    assert data["raw"]["unused"]["heavy"] == []
    stats = data["raw"]["throughput_counters"]["stats"]
    assert stats["a->b"]["packets"] > 0 and stats["b->a"]["packets"] > 0

    # Nothing left behind on the host: no named namespace, no link, rule or route.
    assert "tunpair-bench" not in _netns_list()
    assert host_snapshot() == before
