from __future__ import annotations

import os
import queue
import re
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TypeVar

import pytest

pytest_plugins = ["pytester"]

T = TypeVar("T")

# The shell banner's line for other terminals: `nsenter --net=...` as root, with
# `--preserve-credentials --user=...` in front when the tool runs in a user namespace.
NSENTER = (
    r"other terminals: (nsenter (?:--preserve-credentials --user=/proc/\d+/ns/user )?"
    r"--net=/proc/\d+/fd/\d+) COMMAND"
)


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
    """The path of ``tool`` (a program on PATH, or an absolute path). Without it the test
    skips -- the README's first run comes before `.ci/run` installs the tools -- except where
    `.ci/run` says it has installed them (``TUNPAIR_CI_TOOLS=1``): there a missing tool is
    a missing install step, and fails."""
    path = shutil.which(tool)
    if path is None:
        message = f"{tool} is not installed (.ci/run installs it)"
        if os.environ.get("TUNPAIR_CI_TOOLS") == "1":
            pytest.fail(f"{message}, but TUNPAIR_CI_TOOLS=1 says it did", pytrace=False)
        pytest.skip(message)
    return path


def need_thread_return() -> None:
    """Skip where a thread that leaves its network namespace could not come back.

    That is the rootless tier: the process runs in a user namespace pytest-tunpair entered
    by itself, so only disposable threads (the plugin's, for tests using the fixtures) may
    enter a tunnel namespace, and a standalone ``TunPair`` on the main thread is refused.
    """
    from pytest_tunpair._kernel.userns import thread_can_return

    if not thread_can_return():
        pytest.skip(
            "a standalone TunPair on this thread could not return: the process runs in a user "
            "namespace it entered itself (rootless tier); run as root or under `unshare -Urn`"
        )


def run_standalone(fn: Callable[[], T]) -> T:
    """Run ``fn``, which opens a standalone ``TunPair``, where that is allowed.

    On this thread when it could come back from the pair's namespace (root, ``unshare
    -Urn``); in the rootless tier on a disposable thread that ends inside it, as the README
    says to open a standalone pair there. Exceptions (and assertion failures) reach the caller.
    """
    from pytest_tunpair._kernel.disposable import run_in_disposable_thread
    from pytest_tunpair._kernel.userns import thread_can_return

    if thread_can_return():
        return fn()
    return run_in_disposable_thread(fn, name=f"standalone {fn.__qualname__}")


def _setgroups_denied() -> bool:
    try:
        return Path("/proc/self/setgroups").read_text().strip() == "deny"
    except OSError:
        return False


def tcpdump_read(path: object, *args: str) -> subprocess.CompletedProcess[str]:
    """``tcpdump -n -r PATH ARGS``: what a person would run to read a pcap file.

    Run as root, Debian's tcpdump drops privileges to its own user once the file is open,
    even with ``-r``; with ``-Z root`` it still calls ``initgroups()``. Inside a user
    namespace entered by an unprivileged user (the rootless tier, ``unshare -Ur``) that
    user is not mapped and ``setgroups`` is denied, so either way it stops with "Couldn't
    change to ...: Operation not permitted". There tcpdump runs as a non-root uid of a
    nested user namespace (mapped to ours, so the file stays readable) and drops nothing.
    """
    cmd = [need("tcpdump"), "-n", "-r", str(path), *args]
    if os.getuid() == 0 and _setgroups_denied():
        cmd = [need("unshare"), "--user", "--map-user=65534", "--map-group=65534", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True)


def nsenter_line(stderr: IO[str], timeout: float) -> list[str]:
    """The shell banner's nsenter line, as a command (reads ``stderr`` up to it)."""
    __tracebackhide__ = True
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in stderr:
            lines.put(line)
            if re.search(NSENTER, line):
                return
        lines.put(None)  # the tool ended without one

    # A reader thread, so that a banner without the line fails the test instead of
    # blocking it until the shell (which waits for its stdin) exits.
    threading.Thread(target=read, daemon=True).start()
    seen = []
    deadline = time.monotonic() + timeout
    try:
        while (line := lines.get(timeout=max(deadline - time.monotonic(), 0.01))) is not None:
            seen.append(line)
            match = re.search(NSENTER, line)
            if match:
                return shlex.split(match.group(1))
    except queue.Empty:
        seen.append(f"(nothing more within {timeout} s)")
    pytest.fail("no nsenter line in the banner:\n" + "".join(seen))


def tcp_send(server_ip: str, payload: bytes, *, timeout: float = 30) -> bytes:
    """Send ``payload`` over TCP from an unbound client to a server bound to ``server_ip``
    (b's address: the bytes cross the relay a->b); return what the server received."""
    import socket
    import threading

    received = bytearray()
    with socket.socket(socket.AF_INET6 if ":" in server_ip else socket.AF_INET) as server:
        server.bind((server_ip, 0))
        server.listen(1)
        server.settimeout(timeout)

        def serve() -> None:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(timeout)
                while chunk := conn.recv(1 << 16):
                    received.extend(chunk)

        t = threading.Thread(target=serve)
        t.start()
        with socket.create_connection(server.getsockname()[:2], timeout=timeout) as client:
            client.sendall(payload)
        t.join(timeout)
        assert not t.is_alive(), "the receiver did not finish"
    return bytes(received)
