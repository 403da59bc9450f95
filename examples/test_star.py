"""A star: three clients, each on a link of its own (a fast one, a slow one, a lossy one),
fetching from one server with curl. Each link is a pair: impaired and captured on its own,
named after its hosts in reports.

Run: pytest --tunpair examples/test_star.py
"""

import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


# --8<-- [start:star]
def test_three_clients_on_different_links(tun_pair_factory, tmp_path):
    star = tun_pair_factory.star(3)  # hosts client1..client3 and server
    star.link("client2", "server").impair(delay="50ms")
    star.link("client3", "server").impair(loss=0.2, seed=7)
    (tmp_path / "data").write_bytes(b"x" * 200_000)
    server = star.address("server")
    star["server"].spawn(
        [sys.executable, "-m", "http.server", "--bind", server, "8000"], ready=8000, cwd=tmp_path
    )
    for name in ("client1", "client2", "client3"):
        fetch = star[name].run(
            subprocess.run,
            ["curl", "-sS", "--max-time", "30", "-o", "/dev/null", "-w", "%{size_download}",
             f"http://{server}:8000/data"],
            capture_output=True, text=True,
        )  # fmt: skip
        assert fetch.stdout == "200000", fetch.stderr
    slow = star.link("client2", "server")
    lossy = star.link("client3", "server")
    assert min(p.sojourn for p in slow.packets.filter(direction="a->b")) >= 0.05
    assert lossy.packets.filter(action="lost")  # TCP recovered what the link lost
    assert not star.link("client1", "server").packets.filter(action="lost")
    assert "client3<->server" in lossy.describe()


# --8<-- [end:star]
