"""Examples that need a tool `.ci/run` installs after the README's first run (which runs
examples/ before the tools exist, so there they skip): run here, where need() fails
instead of skipping once the tools tier has run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .conftest import need

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_openvpn_example_runs() -> None:
    need("openvpn")
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "--tunpair", "-q", "-p", "no:cacheprovider",
         str(EXAMPLES / "test_openvpn.py")],
        capture_output=True,
        text=True,
        timeout=240,
    )  # fmt: skip
    assert r.returncode == 0 and "1 passed" in r.stdout, r.stdout + r.stderr
