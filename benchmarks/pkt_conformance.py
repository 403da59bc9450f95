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

The scripts are not part of this project (google/packetdrill's are GPLv2, the Linux
kernel's GPL-2.0): point it at checkouts of them.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
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
    p.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(run_one(a.one[0], a.one[1], int(a.one[2]))))
        return 0
    if os.geteuid() != 0:
        print("pkt_conformance.py needs root (network namespaces, TUN devices)")
        return 2
    if not a.roots:
        p.error("give one or more directories of .pkt scripts")
    wanted = a.ip_version or list(VARIANTS)
    roots = [r.resolve() for r in a.roots]
    started, load = time.monotonic(), os.getloadavg()[0]
    results: list[dict[str, Any]] = []
    for root in roots:
        for path in scripts_of(root):
            for variant in variants_of(path, wanted):
                res = child(path, variant, a.slack_usecs, a.timeout)
                res.update(path=str(path), directory=directory_of(path, roots), variant=variant)
                results.append(res)
                print(f"{res['outcome']:<12} {variant:<17} {path.name}  {res['reason'][:120]}")
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
    lines = [
        "| directory | variant | passed | failed | unsupported | error |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for (directory, variant), c in sorted(counts.items()):
        lines.append(
            f"| {directory} | {variant} | {c['passed']} | {c['failed']} | "
            f"{c['unsupported']} | {c['error']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
