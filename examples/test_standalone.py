"""Runs standalone.py the way its docstring says, and checks what it printed."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# The initial user namespace's inode (fixed by the kernel: PROC_USER_INIT_INO).
ROOT_USERNS = 0xEFFFFFFD


def test_standalone_script():
    if shutil.which("ping") is None:
        pytest.skip("ping is not installed")
    cmd = [sys.executable, str(Path(__file__).with_name("standalone.py"))]
    if os.getuid() != 0 or os.stat("/proc/self/ns/user").st_ino != ROOT_USERNS:
        cmd = ["unshare", "-Urn", *cmd]  # what a normal user runs
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "a->b forwarded" in out.stdout and "echo-reply" in out.stdout, out.stdout
