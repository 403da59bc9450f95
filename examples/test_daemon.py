"""A real daemon in the namespace: one http.server for the whole module, curl as the client.

Run: pytest --tunpair examples/test_daemon.py
"""

import shutil
import subprocess
import sys

import pytest

pytestmark = [
    pytest.mark.tunpair(mtu=1400),  # the options of this module's tun_pair_module
    pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed"),
]
PORT = 8000


@pytest.fixture(scope="module")
def web(tun_pair_module, tmp_path_factory):
    """Started once for the module; stopped (with anything it forked) after its last test."""
    root = tmp_path_factory.mktemp("www")
    (root / "index.html").write_text("hello from the namespace\n")
    tun_pair_module.spawn(
        [sys.executable, "-m", "http.server", "--bind", tun_pair_module.b.ip, str(PORT)],
        ready=PORT,  # returns once it listens: read from the socket table, no probe packet
        cwd=root,
    )
    return f"http://{tun_pair_module.b.ip}:{PORT}/"


def curl(url, *args):
    return subprocess.run(
        ["curl", "-sS", "--max-time", "10", *args, url], capture_output=True, text=True
    )


def test_fetch(web, tun_pair_module):
    # The test runs inside the module's namespace, so curl (its child) does too.
    assert curl(web).stdout == "hello from the namespace\n"
    mine = tun_pair_module.packets.since(tun_pair_module.test_start)
    assert any(p.direction == "a->b" for p in mine)


def test_fetch_over_a_slow_link(web, tun_pair_module):
    tun_pair_module.impair(delay="50ms")  # this test only: removed at its end
    r = curl(web, "-w", "%{time_total}", "-o", "/dev/null")
    assert float(r.stdout) >= 0.2  # SYN, request and their answers each cross twice


def test_the_next_test_has_a_clean_link(web, tun_pair_module):
    assert "impair" not in tun_pair_module.describe()
    r = curl(web, "-w", "%{time_total}", "-o", "/dev/null")
    assert float(r.stdout) < 5
