#!/usr/bin/env python3
"""Conformance of pytest-tunpair's packetdrill runner: run packetdrill's own scripts,
unchanged, and count passed / failed / unsupported per directory and ``--ip_version``.

    sudo python benchmarks/pkt_conformance.py SCRIPTS_DIR [SCRIPTS_DIR ...]
    sudo python benchmarks/pkt_conformance.py ~/src/packetdrill/gtests/net/tcp \\
        ~/src/linux/tools/testing/selftests/net/packetdrill --json out.json --markdown out.md

Each directory is searched for ``*.pkt`` (as packetdrill's run_all.py does) and each script
runs in the variants run_all.py gives it (``ipv4``, ``ipv4-mapped-ipv6``, ``ipv6``; a
``*v4.pkt`` over IPv4 only, a ``*v6.pkt`` over IPv6 only; ``--ip-version`` to pick), each
in a process of its own (a timeout, and a crash, stay with one script), with a fresh pair
whose b side is the scripted peer -- what ``pytest --tunpair`` does with a ``.pkt`` file.

An outcome is ``passed``, ``failed`` (the kernel did not do what the script says, or a
timing check missed: the reason is kept), ``unsupported`` (syntax this runner refuses,
with the line) or ``error`` (a crash of the runner itself, or a timeout: a bug to report).
``--slack-usecs`` widens every tolerance as the ini key ``tunpair_pkt_slack_usecs`` does;
the figures in docs/packetdrill.md say which they used and how loaded the machine was.

The baseline: ``--packetdrill PATH`` also runs each script with a packetdrill binary (built
from google/packetdrill) in a fresh network namespace (``unshare -n``) with the arguments
run_all.py gives that variant, right before this runner's run of it. Some scripts fail on
any given kernel (timers, new features, changed defaults); what matters is where the two
disagree, which the table counts: the same outcome, and for a failure the same line.

The scripts are not part of this project (google/packetdrill's are GPLv2, the Linux
kernel's GPL-2.0): point it at checkouts of them.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
VARIANTS = ("ipv4", "ipv4-mapped-ipv6", "ipv6")


def run_one(path: str, variant: str, slack: int) -> dict[str, Any]:
    """One script in one variant, in this process: its outcome and the reason."""
    from pytest_tunpair import TunPair
    from pytest_tunpair._peer.pkt_parse import PktSyntaxError
    from pytest_tunpair._peer.pkt_run import (
        PktFailure,
        PktUnsupported,
        Runner,
        load,
        pair_options,
    )

    text = Path(path).read_text(errors="replace")
    started = time.monotonic()
    try:
        script, config = load(text, variant, path, slack_usecs=slack)
    except (PktUnsupported, PktSyntaxError) as exc:
        return {"outcome": "unsupported", "reason": str(exc), "seconds": 0.0}
    # Commands run from the script's directory (packetdrill runs there), as pytest does.
    os.chdir(os.path.dirname(os.path.abspath(path)))
    with TunPair(**pair_options(config)) as pair:
        peer = pair.script("b")
        runner = Runner(
            script,
            config,
            peer,
            path=os.path.basename(path),
            lines=text.splitlines(),
            netns_path=pair.netns_path,
        )
        try:
            runner.run()
        except PktUnsupported as exc:
            outcome, reason = "unsupported", str(exc)
        except PktFailure as exc:
            outcome, reason = "failed", f"{exc.path}:{exc.line}: {exc.reason}"
        else:
            outcome, reason = "passed", ""
        late = [t for what, t in runner.timing if what != "outbound packet"]
    return {
        "outcome": outcome,
        "reason": reason,
        "seconds": round(time.monotonic() - started, 3),
        "late_max": round(max(late, default=0.0), 6),
    }


#: run_all.py's per-variant arguments (and ksft_runner.sh's defines).
PD_ARGS = {
    "ipv4": "--ip_version=ipv4 --local_ip=192.168.0.1 --gateway_ip=192.168.0.1 "
    "--netmask_ip=255.255.0.0 --remote_ip=192.0.2.1 -D TFO_COOKIE=3021b9d889017eeb "
    "-D CMSG_LEVEL_IP=SOL_IP -D CMSG_TYPE_RECVERR=IP_RECVERR -D CODE=host_unreachable",
    "ipv4-mapped-ipv6": "--ip_version=ipv4-mapped-ipv6 --local_ip=192.168.0.1 "
    "--gateway_ip=192.168.0.1 --netmask_ip=255.255.0.0 --remote_ip=192.0.2.1 "
    "-D TFO_COOKIE=3021b9d889017eeb -D CMSG_LEVEL_IP=SOL_IPV6 "
    "-D CMSG_TYPE_RECVERR=IPV6_RECVERR -D CODE=host_unreachable",
    "ipv6": "--ip_version=ipv6 --mtu=1520 --local_ip=fd3d:0a0b:17d6::1 "
    "--gateway_ip=fd3d:0a0b:17d6:8888::1 --remote_ip=fd3d:fa7b:d17d::1 "
    "-D TFO_COOKIE=c1d1e9742a47a9bc -D CMSG_LEVEL_IP=SOL_IPV6 "
    "-D CMSG_TYPE_RECVERR=IPV6_RECVERR",
}


def run_packetdrill(binary: str, path: Path, variant: str, timeout: float) -> dict[str, Any]:
    """The same script with packetdrill itself, in a namespace of its own."""
    inner = f"ip link set lo up; exec {binary} {PD_ARGS[variant]} {path.name}"
    cmd = ["unshare", "-n", "sh", "-c", inner]
    started = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=path.parent, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"outcome": "error", "reason": f"timed out after {timeout:.0f} s"}
    seconds = round(time.monotonic() - started, 3)
    if done.returncode == 0:
        return {"outcome": "passed", "reason": "", "seconds": seconds}
    lines = [x for x in (done.stderr + done.stdout).splitlines() if path.name + ":" in x]
    reason = lines[0] if lines else (done.stderr.strip().splitlines() or ["?"])[-1]
    return {"outcome": "failed", "reason": reason, "seconds": seconds}


def scripts_of(root: Path) -> list[Path]:
    return sorted(root.rglob("*.pkt")) if root.is_dir() else [root]


def variants_of(path: Path, wanted: list[str]) -> list[str]:
    from pytest_tunpair._peer.pkt_parse import PktSyntaxError, read_options

    try:
        own = [v for n, v, _ in read_options(path.read_text(errors="replace")) if n == "ip_version"]
    except PktSyntaxError:
        own = []
    if own:
        return [v for v in own if v in wanted] or own[:1]
    if path.name.endswith("v6.pkt"):
        return [v for v in wanted if v == "ipv6"]
    if path.name.endswith("v4.pkt"):
        return [v for v in wanted if v != "ipv6"]
    return list(wanted)


def child(path: Path, variant: str, slack: int, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--one", str(path), variant, str(slack)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {
            "outcome": "error",
            "reason": f"timed out after {timeout:.0f} s",
            "seconds": timeout,
        }
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return dict(json.loads(line))
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"outcome": "error", "reason": f"exit {done.returncode}: {tail[0]}", "seconds": 0.0}


def directory_of(path: Path, roots: list[Path]) -> str:
    for root in roots:
        if root in path.parents:
            rel = path.parent.relative_to(root)
            return f"{root.name}/{rel}" if str(rel) != "." else root.name
    return str(path.parent)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("roots", nargs="*", type=Path, help="directories of .pkt scripts")
    p.add_argument("--ip-version", action="append", choices=VARIANTS, help="repeatable")
    p.add_argument("--slack-usecs", type=int, default=0, help="tunpair_pkt_slack_usecs")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds per script")
    p.add_argument("--json", type=Path, help="write every outcome to this file")
    p.add_argument("--markdown", type=Path, help="write the per-directory table here")
    p.add_argument(
        "--failed-in",
        type=Path,
        metavar="JSON",
        help="run only what failed in this earlier --json output (e.g. again with slack)",
    )
    p.add_argument(
        "--packetdrill",
        metavar="PATH",
        help="also run each script with this packetdrill binary, as the baseline",
    )
    p.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(run_one(a.one[0], a.one[1], int(a.one[2]))))
        return 0
    if os.geteuid() != 0:
        print("pkt_conformance.py needs root (network namespaces, TUN devices)")
        return 2
    if not a.roots and not a.failed_in:
        p.error("give one or more directories of .pkt scripts")
    wanted = a.ip_version or list(VARIANTS)
    roots = [r.resolve() for r in a.roots]
    runs: list[tuple[Path, str, str]] = []  # (script, variant, directory)
    for root in roots:
        for path in scripts_of(root):
            runs += [(path, v, directory_of(path, roots)) for v in variants_of(path, wanted)]
    if a.failed_in:
        earlier = json.loads(a.failed_in.read_text())
        runs = [
            (Path(r["path"]), r["variant"], r["directory"])
            for r in earlier
            if r["outcome"] == "failed" and r["variant"] in wanted
        ]
    started, load = time.monotonic(), os.getloadavg()[0]
    results: list[dict[str, Any]] = []
    for path, variant, directory in runs:
        if a.packetdrill:
            base = run_packetdrill(os.path.abspath(a.packetdrill), path, variant, a.timeout)
        res = child(path, variant, a.slack_usecs, a.timeout)
        res.update(path=str(path), directory=directory, variant=variant)
        if a.packetdrill:
            res["packetdrill"] = base
        results.append(res)
        theirs = f"(packetdrill: {base['outcome']}) " if a.packetdrill else ""
        print(f"{res['outcome']:<12} {variant:<17} {path.name} {theirs} {res['reason'][:120]}")
    table = summary(results)
    print()
    print(table)
    print(
        f"\n{len(results)} runs in {time.monotonic() - started:.0f} s; load average "
        f"{load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; slack "
        f"{a.slack_usecs} us"
    )
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    if a.markdown:
        a.markdown.write_text(table + "\n")
    return 0


def failed_line(reason: str) -> str | None:
    """The line number a failure names (``script.pkt:12: ...``)."""
    found = re.search(r"\.pkt:(\d+):", reason)
    return found.group(1) if found else None


def same_outcome(r: dict[str, Any]) -> bool:
    """This runner and packetdrill agree: both passed, or both failed at the same line."""
    theirs = r["packetdrill"]
    if theirs["outcome"] != r["outcome"]:
        return False
    return r["outcome"] != "failed" or failed_line(r["reason"]) == failed_line(theirs["reason"])


def summary(results: list[dict[str, Any]]) -> str:
    """A markdown table: per directory and variant, passed / failed / unsupported / error."""
    counts: dict[tuple[str, str], collections.Counter[str]] = collections.defaultdict(
        collections.Counter
    )
    folders: dict[str, set[str]] = collections.defaultdict(set)
    for r in results:
        folders[r["directory"].split("/")[0]].add(r["directory"])
    for r in results:
        counts[(r["directory"], r["variant"])][r["outcome"]] += 1
        root = r["directory"].split("/")[0]
        if len(folders[root]) > 1:  # a total per checkout, when it has subdirectories
            counts[(root + " (all)", r["variant"])][r["outcome"]] += 1
    baseline = any("packetdrill" in r for r in results)
    for r in results:
        if baseline and "packetdrill" in r:
            theirs = r["packetdrill"]["outcome"]
            key = (r["directory"], r["variant"])
            counts[key]["pd_" + theirs] += 1
            counts[key]["agree" if same_outcome(r) else "disagree"] += 1
    head = "| directory | variant | passed | failed | unsupported | error |"
    rule = "| --- | --- | ---: | ---: | ---: | ---: |"
    if baseline:
        head += " packetdrill passed | same outcome and line |"
        rule += " ---: | ---: |"
    lines = [head, rule]
    for (directory, variant), c in sorted(counts.items()):
        row = (
            f"| {directory} | {variant} | {c['passed']} | {c['failed']} | "
            f"{c['unsupported']} | {c['error']} |"
        )
        if baseline:
            row += f" {c['pd_passed']} | {c['agree']} of {c['agree'] + c['disagree']} |"
        lines.append(row)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
