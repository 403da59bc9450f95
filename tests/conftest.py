from __future__ import annotations

import os
import shutil
import subprocess

import pytest

pytest_plugins = ["pytester"]


def host_snapshot() -> str:
    """Links, addresses, rules and routes of the namespace the caller is in."""
    out = []
    for cmd in (
        ["ip", "-o", "link"],
        ["ip", "-o", "addr"],
        ["ip", "rule"],
        ["ip", "-6", "rule"],
        ["ip", "route", "show", "table", "all"],
        ["ip", "-6", "route", "show", "table", "all"],
    ):
        out.append(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    return "\n".join(out)


def netns_inode() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (.ci/run installs it)")
    return path


def need_thread_return() -> None:
    """Skip where a thread that leaves its network namespace could not come back.

    That is the rootless tier: the process runs in a user namespace pytest-tunpair entered
    by itself, so only disposable threads (the plugin's, for tests using the fixtures) may
    enter a tunnel namespace, and a standalone ``TunPair`` on the main thread is refused.
    """
    from pytest_tunpair._userns import thread_can_return

    if not thread_can_return():
        pytest.skip(
            "a standalone TunPair on this thread could not return: the process runs in a user "
            "namespace it entered itself (rootless tier); run as root or under `unshare -Urn`"
        )
