"""Rootless and parallel runs: a normal user, ``unshare -Urn``, pytest-xdist, and the refusals.

The unprivileged tests run an inner pytest as nobody (``setpriv``, so the outer run must be
real root). They set up what that needs themselves, so that the README's plain
``pytest --tunpair`` runs them: a world-readable copy of this checkout's package and of the
distributions the inner runs import (pytest, pyroute2, scapy, xdist, timeout), an
interpreter nobody can execute (this one, or the system's ``python3``; ``TUNPAIR_USER_PYTHON``
overrides), and -- where the host's ``/dev/net/tun`` is not mode 0666 -- a private mount
namespace with a 0666 ``/dev/net/tun`` of its own, so the host's device is left as it is.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

import pytest_tunpair
from pytest_tunpair._kernel import disposable as _disposable
from pytest_tunpair._kernel import userns as _userns

from .conftest import host_snapshot, need, nsenter_line

NOBODY = 65534
PKG_DIR = Path(pytest_tunpair.__file__).parent
# What the inner runs import, with what those need (the pytest11 entry points of xdist and
# pytest-timeout are in their dist-info directories, which are copied too).
INNER_DISTRIBUTIONS = (
    "pytest", "pluggy", "iniconfig", "packaging", "pygments",
    "pyroute2", "scapy", "pytest-xdist", "execnet", "pytest-timeout",
)  # fmt: skip
INNER_IMPORTS = "import pytest, pyroute2, scapy, xdist, pytest_timeout"
USAGE_ERROR = 4  # a bad option value still stops the run before any test
HOST_NETNS = os.stat("/proc/self/ns/net").st_ino


# -- the unprivileged environment ---------------------------------------------------------------
def _need_real_root() -> None:
    if os.geteuid() != 0 or not _userns.in_initial_user_namespace():
        pytest.skip(
            "runs an inner pytest as the user nobody (setpriv), which only real root can "
            "switch to; this run is itself unprivileged, so the rest of the suite already "
            "checks what these would: nothing to do (CONTRIBUTING.md, 'Running the tests')"
        )
    # The host's own policy, which a test must not change (Ubuntu 24.04's AppArmor sysctl,
    # older Debian's switch, or a zero limit): nobody could not build a tunnel at all.
    fix = _userns._userns_sysctl_fix()
    if fix is None and Path("/proc/sys/user/max_user_namespaces").read_text().strip() == "0":
        fix = "`sudo sysctl -w user.max_user_namespaces=10000`"
    if fix is not None:
        pytest.skip(
            "these tests run pytest as nobody, which needs unprivileged user namespaces, and "
            f"this host forbids them: {fix} to run them"
        )


def _host_tun_is_world_usable() -> bool:
    try:
        return stat.S_IMODE(os.stat(_userns.TUN_PATH).st_mode) & 0o006 == 0o006
    except OSError:
        return False


# Runs argv (as root) in a private mount namespace where /dev/net/tun is a fresh node of the
# same device, mode 0666 -- what an unprivileged user finds on a stock Debian or Ubuntu. The
# mount is private to that namespace (unshare -m makes propagation private): the host's
# /dev/net/tun keeps its mode.
PRIVATE_TUN = ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o mode=0755 tunpair-tun /dev/net && mknod -m 0666 /dev/net/tun c 10 200 && exec "$@"', "sh"]  # fmt: skip


def world_tun() -> list[str]:
    """The prefix that gives nobody a usable /dev/net/tun: none where the host's is 0666."""
    return [] if _host_tun_is_world_usable() else PRIVATE_TUN


def _copy_distribution(name: str, dest: Path) -> None:
    dist = importlib.metadata.distribution(name)
    for file in dist.files or ():
        if file.parts[0] == ".." or "__pycache__" in file.parts or file.suffix == ".pyc":
            continue  # scripts in bin/, and bytecode the inner runs do not need
        src = Path(str(dist.locate_file(file)))
        if src.is_file():
            (dest / file).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest / file)


@pytest.fixture(scope="session")
def user_src() -> Iterator[Path]:
    """A world-readable tree: the package, its ``pytest11`` entry point, and what it imports."""
    _need_real_root()
    root = Path(tempfile.mkdtemp(prefix="tunpair-src-"))
    try:
        shutil.copytree(
            PKG_DIR, root / "pytest_tunpair", ignore=shutil.ignore_patterns("__pycache__")
        )
        info = root / f"pytest_tunpair-{pytest_tunpair.__version__}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: pytest-tunpair\nVersion: {pytest_tunpair.__version__}\n"
        )
        (info / "entry_points.txt").write_text("[pytest11]\ntunpair = pytest_tunpair.plugin\n")
        for name in INNER_DISTRIBUTIONS:
            try:
                _copy_distribution(name, root)
            except importlib.metadata.PackageNotFoundError:
                pass  # optional (pygments on older pytest); the probe below has the last word
        for path in [root, *root.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _interpreters() -> list[str]:
    """Interpreters to try, best first: the one named, this one, the system's python3."""
    named = os.environ.get("TUNPAIR_USER_PYTHON")
    found = [named] if named else []
    for python in (sys.executable, os.path.realpath(sys.executable), "/usr/bin/python3"):
        if python and python not in found:
            found.append(python)
    return found


@pytest.fixture(scope="session")
def user_python(user_src: Path) -> str:
    """An interpreter nobody can execute that runs the inner pytest from ``user_src``."""
    need("setpriv")
    tried = []
    for python in _interpreters():
        probe = subprocess.run(
            # Through sh: setpriv may exec a path that nobody could not (inner runs re-exec
            # sys.executable for xdist workers and under unshare, as nobody).
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             "sh", "-c", 'exec "$0" -c "$1"', python,
             f"import sys; assert sys.version_info >= (3, 11), sys.version; {INNER_IMPORTS}"],
            capture_output=True, text=True, timeout=120, cwd="/",
            env={"PYTHONPATH": str(user_src), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        )  # fmt: skip
        if probe.returncode == 0:
            return python
        tried.append(f"{python}: {(probe.stderr.strip().splitlines() or ['?'])[-1]}")
    pytest.skip(
        "the unprivileged tests need a Python 3.11+ that nobody can execute (set "
        "TUNPAIR_USER_PYTHON to one); tried " + "; ".join(tried)
    )


@pytest.fixture
def project() -> Iterator[Path]:
    """An empty directory owned by nobody (the outer tmp_path is root's, mode 0700)."""
    path = Path(tempfile.mkdtemp(prefix="tunpair-rootless-"))
    os.chown(path, NOBODY, NOBODY)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def write(project: Path, name: str, text: str) -> Path:
    path = project / name
    path.write_text(textwrap.dedent(text))
    os.chown(path, NOBODY, NOBODY)
    return path


@dataclass
class Run:
    ret: int
    stdout: str
    stderr: str

    def lines(self) -> pytest.LineMatcher:
        return pytest.LineMatcher((self.stdout + self.stderr).splitlines())

    def __str__(self) -> str:
        return f"exit {self.ret}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


def nobody_cmd(
    python: str, *args: str, wrap: Sequence[str] = (), outer: Sequence[str] = ()
) -> list[str]:
    return [
        *world_tun(),
        *outer,
        "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
        *wrap,
        python, "-m", "pytest", "-p", "no:cacheprovider", *args,
    ]  # fmt: skip


def nobody_env(python: str, src: Path, project: Path) -> dict[str, str]:
    # No USER/LOGNAME on purpose: the harder case for pytest's basetemp (see _userns).
    return {
        "PATH": f"{Path(python).parent}:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(project),
        "PYTHONPATH": str(src),
        "PYTHONDONTWRITEBYTECODE": "1",
        "LANG": "C.UTF-8",
        "HOST_NETNS": str(HOST_NETNS),
    }


def run_as_nobody(
    python: str,
    src: Path,
    project: Path,
    *args: str,
    wrap: Sequence[str] = (),
    outer: Sequence[str] = (),
) -> Run:
    """Run ``pytest ARGS`` in ``project`` as nobody; ``wrap`` runs as nobody, ``outer`` as root."""
    proc = subprocess.run(
        nobody_cmd(python, *args, wrap=wrap, outer=outer),
        cwd=project,
        env=nobody_env(python, src, project),
        capture_output=True,
        text=True,
        timeout=300,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


def assert_refused(run: Run, *expect: str) -> None:
    """Tunnels cannot be made here, and only the test that needs one pays for it: the plain
    test passes, the tunnel test fails at setup with one message saying why and what to do
    (no traceback), and the header and the end of the run say it once more."""
    __tracebackhide__ = True
    assert run.ret == 1, run
    run.lines().fnmatch_lines(
        [
            "tunpair: cannot create tunnels here (tests that need one fail at setup, saying "
            "why); pyroute2 *",
            "*ERROR at setup of test_tunnel*",
            "pytest-tunpair cannot create tunnels here: *",
            "*tunpair: no tunnels in this run*",
            "1 test that needs a tunnel failed at setup; the other tests ran as usual.",
            "pytest-tunpair cannot create tunnels here: *",
            "*1 passed, 1 error*",
        ]
    )
    out = run.stdout + run.stderr
    message = next(ln for ln in out.splitlines() if ln.startswith("pytest-tunpair cannot"))
    for text in expect:
        assert text in message, run
    print(run)  # what a user sees, when this test is run with -s
    assert "Traceback" not in out and "INTERNALERROR" not in out, run


# -- a normal user, unshare -Urn, xdist ----------------------------------------------------------
TUNNEL_TESTS = """
import os, subprocess, threading

START = os.stat("/proc/thread-self/ns/net").st_ino

def test_tunnel(tun_pair, tmp_path):
    assert os.stat("/proc/thread-self/ns/net").st_ino != START
    for ip in (tun_pair.b.ip, tun_pair.b.ip6):
        r = subprocess.run(["ping", "-c", "1", "-W", "5", ip], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    assert any(p.direction == "a->b" for p in tun_pair.packets)
    (tmp_path / "by-test").write_text("x")
    with open("report.txt", "w") as f:  # the project directory
        f.write(f"{tmp_path}\\n{threading.current_thread().name}\\n")

def test_plain():
    # Tests without a tunnel stay where they were, on the main thread.
    assert threading.current_thread() is threading.main_thread()
    assert os.stat("/proc/thread-self/ns/net").st_ino == START
"""


def test_plain_flag_as_a_normal_user(user_python: str, user_src: Path, project: Path) -> None:
    write(project, "test_inner.py", TUNNEL_TESTS)
    write(
        project,
        "test_host.py",
        """
        import os

        def test_plain_test_sees_the_host_network():
            assert os.stat("/proc/thread-self/ns/net").st_ino == int(os.environ["HOST_NETNS"])
        """,
    )
    before = host_snapshot()
    run = run_as_nobody(user_python, user_src, project, "--tunpair", "-v")
    assert host_snapshot() == before
    assert run.ret == 0, run
    run.lines().fnmatch_lines(
        [
            "tunpair: user namespace (made by pytest-tunpair, uid 65534 outside; tunnel tests "
            "run on their own threads); pyroute2 *, scapy *",
            "*3 passed*",
        ]
    )
    tmp, thread = (project / "report.txt").read_text().splitlines()
    assert thread.startswith("tunpair ")  # a disposable thread (see _userns)
    # pytest's basetemp is nobody's, not root's (getuid() is 0 inside the user namespace) ...
    assert "/pytest-of-nobody/" in tmp, tmp
    # ... and what the tests write belongs to the user.
    assert os.stat(Path(tmp) / "by-test").st_uid == NOBODY
    assert os.stat(project / "report.txt").st_uid == NOBODY


def test_under_unshare_Urn(user_python: str, user_src: Path, project: Path) -> None:
    write(project, "test_inner.py", TUNNEL_TESTS)
    run = run_as_nobody(user_python, user_src, project, "--tunpair", wrap=["unshare", "-Urn"])
    assert run.ret == 0, run
    run.lines().fnmatch_lines(
        ["tunpair: user namespace (inherited, uid 65534 outside); pyroute2 *", "*2 passed*"]
    )
    tmp, thread = (project / "report.txt").read_text().splitlines()
    # Here the process's own namespace is owned by its user namespace: setns back works, so
    # tests run on the main thread as under root.
    assert thread == "MainThread"
    assert "/pytest-of-nobody/" in tmp, tmp


XDIST_TESTS = """
import os, socket, subprocess, pytest

@pytest.mark.parametrize("i", range(6))
def test_tunnel(tun_pair, i):
    assert sorted(n for _, n in socket.if_nameindex()) == ["lo", "tun0", "tun1"]
    r = subprocess.run(["ping", "-c", "1", "-W", "5", tun_pair.b.ip], capture_output=True)
    assert r.returncode == 0
    with open(f"ran-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}-{i}", "w") as f:
        f.write(str(os.stat("/proc/thread-self/ns/net").st_ino))

@pytest.mark.parametrize("i", range(2))
def test_plain(i):
    assert os.stat("/proc/thread-self/ns/net").st_ino == int(os.environ["HOST_NETNS"])
"""


def _check_xdist_outcome(run: Run, project: Path, owner: int) -> None:
    __tracebackhide__ = True
    assert run.ret == 0, run
    run.lines().fnmatch_lines(["*8 passed*"])
    ran = sorted(project.glob("ran-*"))
    assert len(ran) == 6, run
    # Every test ran in a namespace of its own (holding only lo, tun0 and tun1, checked
    # inside), whichever worker ran it. (Inode numbers of freed namespaces are reused, so
    # they need not differ from test to test.)
    assert all(int(p.read_text()) != HOST_NETNS for p in ran)
    assert {p.stat().st_uid for p in ran} == {owner}


@pytest.mark.parametrize("workers", ["2", "auto"])
def test_xdist_as_a_normal_user(
    user_python: str, user_src: Path, project: Path, workers: str
) -> None:
    write(project, "test_inner.py", XDIST_TESTS)
    before = host_snapshot()
    run = run_as_nobody(user_python, user_src, project, "--tunpair", "-n", workers)
    assert host_snapshot() == before
    _check_xdist_outcome(run, project, NOBODY)


def test_xdist_as_root(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    _need_real_root()
    pytest.importorskip("xdist")
    monkeypatch.setenv("HOST_NETNS", str(HOST_NETNS))
    pytester.makepyfile(test_inner=XDIST_TESTS)
    before = host_snapshot()
    result = pytester.runpytest_subprocess("--tunpair", "-n", "2", "-p", "no:cacheprovider")
    assert host_snapshot() == before
    out = result.stdout.str() + result.stderr.str()
    _check_xdist_outcome(Run(int(result.ret), out, ""), pytester.path, 0)


# -- the user-namespace mode as root: --tunpair-userns=always -------------------------------------
def test_userns_always_as_root(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disposable-thread mode, testable wherever the suite runs as root."""
    _need_real_root()
    monkeypatch.setenv("HOST_NETNS", str(HOST_NETNS))
    pytester.makepyfile(test_inner=TUNNEL_TESTS, test_xdist=XDIST_TESTS)
    before = host_snapshot()
    result = pytester.runpytest_subprocess("--tunpair", "--tunpair-userns=always", "-v")
    assert host_snapshot() == before
    result.stdout.fnmatch_lines(
        [
            "tunpair: user namespace (made by pytest-tunpair, uid 0 outside; tunnel tests run "
            "on their own threads); *",
        ]
    )
    result.assert_outcomes(passed=10)
    assert (pytester.path / "report.txt").read_text().splitlines()[1].startswith("tunpair ")


def test_report_header_as_root(pytester: pytest.Pytester) -> None:
    _need_real_root()
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest_subprocess("--tunpair")
    result.stdout.fnmatch_lines(["tunpair: root; pyroute2 *, scapy *; relay: *"])
    # Without --tunpair the line costs nothing to make (no package metadata read).
    result = pytester.runpytest_subprocess()
    result.stdout.fnmatch_lines(["tunpair: off (run with --tunpair)"])


# -- refusals -----------------------------------------------------------------------------------
SIMPLE = """
import os

def test_tunnel(tun_pair):
    pass

def test_plain():
    # Runs, on the host's network, however the tunnel test fared.
    assert os.stat("/proc/thread-self/ns/net").st_ino == int(os.environ["HOST_NETNS"])
"""

# Replace /dev/net for one command only, in a private mount namespace (unshare -m makes
# mounts private): the real /dev/net/tun is never touched.
FAKE_DEV_NET = ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o mode=0755 tunpair-test /dev/net && {} exec "$@"', "sh"]  # fmt: skip


def test_refusal_never_without_privileges(user_python: str, user_src: Path, project: Path) -> None:
    write(project, "test_inner.py", SIMPLE)
    run = run_as_nobody(user_python, user_src, project, "--tunpair", "--tunpair-userns=never")
    assert_refused(
        run,
        "lacks CAP_NET_ADMIN and CAP_SYS_ADMIN",
        "--tunpair-userns=never",
        "run pytest as root",
        "unshare -Urn",
    )


def test_refusal_tun_device_not_openable(user_python: str, user_src: Path, project: Path) -> None:
    write(project, "test_inner.py", SIMPLE)
    outer = [*FAKE_DEV_NET]
    outer[4] = outer[4].format("mknod -m 0600 /dev/net/tun c 10 200 &&")
    run = run_as_nobody(user_python, user_src, project, "--tunpair", outer=outer)
    assert_refused(
        run,
        "cannot open /dev/net/tun (mode 0600, owner root): Permission denied",
        "`sudo chmod 0666 /dev/net/tun`",
        "run pytest as root",
    )


def test_refusal_reaches_xdist_workers(user_python: str, user_src: Path, project: Path) -> None:
    """Under xdist the workers fail their tunnel tests with the controller's reason (they
    are multi-threaded, so on their own they would give a worse one)."""
    write(project, "test_inner.py", SIMPLE)
    outer = [*FAKE_DEV_NET]
    outer[4] = outer[4].format("mknod -m 0600 /dev/net/tun c 10 200 &&")
    run = run_as_nobody(user_python, user_src, project, "--tunpair", "-n", "2", outer=outer)
    assert_refused(run, "cannot open /dev/net/tun (mode 0600, owner root): Permission denied")


def test_cli_refusal_speaks_of_the_cli(user_python: str, user_src: Path, project: Path) -> None:
    """`tunpair run` without access to /dev/net/tun: the fixes name tunpair, not pytest."""
    outer = [*FAKE_DEV_NET]
    outer[4] = outer[4].format("mknod -m 0600 /dev/net/tun c 10 200 &&")
    cmd = [
        *outer,
        "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
        user_python, "-m", "pytest_tunpair", "run", "--", "true",
    ]  # fmt: skip
    env = nobody_env(user_python, user_src, project)
    proc = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 125, proc.stderr
    assert "cannot open /dev/net/tun (mode 0600, owner root)" in proc.stderr, proc.stderr
    assert "run tunpair as root" in proc.stderr and "pytest " not in proc.stderr, proc.stderr


def test_standalone_pair_refusal_names_no_pytest_flag(
    user_python: str, user_src: Path, project: Path
) -> None:
    """A script opening a TunPair as a normal user is told what works outside pytest."""
    script = "from pytest_tunpair import TunPair\nTunPair().open()\n"
    cmd = [
        "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
        user_python, "-c", script,
    ]  # fmt: skip
    env = nobody_env(user_python, user_src, project)
    proc = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "PrivilegeError" in proc.stderr and "unshare -Urn" in proc.stderr, proc.stderr
    assert "--tunpair" not in proc.stderr and "_userns" not in proc.stderr, proc.stderr


def test_refusal_tun_device_missing(user_python: str, user_src: Path, project: Path) -> None:
    write(project, "test_inner.py", SIMPLE)
    outer = [*FAKE_DEV_NET]
    outer[4] = outer[4].format("")
    run = run_as_nobody(user_python, user_src, project, "--tunpair", outer=outer)
    assert_refused(run, "/dev/net/tun does not exist", "modprobe tun")


# Run argv in a new user namespace mapping ids 0-65535 to themselves in which
# user.max_user_namespaces is 0 -- a per-user-namespace limit, so the host's stays as it is.
LIMITED_USERNS = """
import ctypes, os, sys
go_r, go_w = os.pipe(); ready_r, ready_w = os.pipe()
pid = os.fork()
if pid == 0:
    if ctypes.CDLL(None, use_errno=True).unshare(0x10000000) != 0:  # CLONE_NEWUSER
        os._exit(90)
    os.write(ready_w, b"1"); os.read(go_r, 1)
    with open("/proc/sys/user/max_user_namespaces", "w") as f:
        f.write("0")
    os.execvp(sys.argv[1], sys.argv[1:])
os.read(ready_r, 1)
for name in ("uid_map", "gid_map"):
    with open(f"/proc/{pid}/{name}", "w") as f:
        f.write("0 0 65536")
os.write(go_w, b"1")
sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


def test_refusal_user_namespaces_disabled(user_python: str, user_src: Path, project: Path) -> None:
    write(project, "test_inner.py", SIMPLE)
    host_limit = Path("/proc/sys/user/max_user_namespaces").read_text()
    run = run_as_nobody(
        user_python, user_src, project, "--tunpair", outer=[sys.executable, "-c", LIMITED_USERNS]
    )
    assert Path("/proc/sys/user/max_user_namespaces").read_text() == host_limit
    assert_refused(
        run,
        "user.max_user_namespaces = 0",
        "`sudo sysctl -w user.max_user_namespaces=10000`",
        "run pytest as root",
    )


def test_refusal_when_threads_run_before_configure(
    user_python: str, user_src: Path, project: Path
) -> None:
    write(project, "test_inner.py", SIMPLE)
    write(
        project,
        "conftest.py",
        """
        import threading
        threading.Thread(target=threading.Event().wait, daemon=True).start()
        """,
    )
    run = run_as_nobody(user_python, user_src, project, "--tunpair")
    assert_refused(run, "single-threaded", "already runs 2 threads", "unshare -Urn")


def test_nothing_changes_without_the_flag(user_python: str, user_src: Path, project: Path) -> None:
    write(project, "test_inner.py", SIMPLE)
    run = run_as_nobody(user_python, user_src, project, "--tunpair-userns=never", "-rs")
    assert run.ret == 0, run
    run.lines().fnmatch_lines(["tunpair: off (run with --tunpair)*", "*1 passed, 1 skipped*"])


def test_refusal_bad_ini_value(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\ntunpair = true\ntunpair_userns = sometimes\n")
    pytester.makepyfile(SIMPLE)
    result = pytester.runpytest_subprocess()
    assert result.ret == USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["ERROR: ini key tunpair_userns in *: bad value 'sometimes': use one of 'auto'*"]
    )


# -- living on disposable threads ---------------------------------------------------------------
def test_dynamic_fixture_request_is_refused_not_stranded(
    user_python: str, user_src: Path, project: Path
) -> None:
    """A pair requested with getfixturevalue() would strand the main thread: refused."""
    write(
        project,
        "test_inner.py",
        """
        import os
        START = os.stat("/proc/thread-self/ns/net").st_ino

        def test_dynamic(request):
            request.getfixturevalue("tun_pair")

        def test_still_home():
            assert os.stat("/proc/thread-self/ns/net").st_ino == START
        """,
    )
    run = run_as_nobody(user_python, user_src, project, "--tunpair")
    assert run.ret == 1, run
    run.lines().fnmatch_lines(
        [
            "tun_pair_factory was requested while the test ran (request.getfixturevalue?): in "
            "this rootless run*Request tun_pair or tun_pair_factory as an argument*",
            "*1 failed, 1 passed*",
        ]
    )
    assert "Traceback" not in run.stdout + run.stderr


def test_ctrl_c_interrupts_a_tunnel_test_and_tears_it_down(
    user_python: str, user_src: Path, project: Path
) -> None:
    write(
        project,
        "test_inner.py",
        """
        import time, pytest

        @pytest.fixture
        def server(tun_pair):
            yield
            open("torn-down", "w").close()

        def test_waits(tun_pair, server):
            open("started", "w").close()
            while True:
                time.sleep(0.01)
        """,
    )
    before = host_snapshot()
    proc = subprocess.Popen(
        nobody_cmd(user_python, "--tunpair"),
        cwd=project,
        env=nobody_env(user_python, user_src, project),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (project / "started").exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "the inner test never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)  # setpriv exec()s: this is pytest's pid
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 2, out  # pytest's "interrupted"
    assert "KeyboardInterrupt" in out
    assert "test_inner.py:" in out  # raised in the test body, on the test's thread
    assert (project / "torn-down").exists(), out
    assert host_snapshot() == before


def test_pytest_timeout_signal_method(user_python: str, user_src: Path, project: Path) -> None:
    """SIGALRM reaches the main thread only: the failure is forwarded to the test's thread."""
    write(
        project,
        "test_inner.py",
        """
        import time, pytest
        import pyroute2  # at collection: the 3 s timers count the tests, not this import

        @pytest.mark.timeout(3)
        def test_busy(tun_pair):
            while True:
                time.sleep(0.01)

        @pytest.mark.timeout(60)
        def test_failing(tun_pair):
            assert False, "deliberate"

        def test_after():
            pass

        @pytest.mark.timeout(3)
        def test_blocked(tun_pair):
            time.sleep(120)  # one system call: nothing can interrupt it on this thread
        """,
    )
    run = run_as_nobody(user_python, user_src, project, "--tunpair", "-o", "timeout_method=signal")
    out = run.stdout + run.stderr
    assert "INTERNALERROR" not in out, run
    run.lines().fnmatch_lines(
        [
            "FAILED test_inner.py::test_busy - Failed: Timeout (>3.0s) from pytest-timeout.",
            "FAILED test_inner.py::test_failing - AssertionError: deliberate*",
        ]
    )
    run.lines().fnmatch_lines(["*test_inner.py::test_blocked: Failed: Timeout (>3.0s)*did not stop within*timeout_method = thread*"])  # fmt: skip
    run.lines().fnmatch_lines(["*2 failed, 1 passed*"])
    assert run.ret == 1, run


# -- the machinery, in-process ------------------------------------------------------------------
def test_run_in_disposable_thread_returns_raises_and_marks() -> None:
    assert not _disposable.thread_is_disposable()
    seen: list[object] = []

    def fn() -> int:
        seen.append(threading.current_thread() is not threading.main_thread())
        seen.append(_disposable.thread_is_disposable())
        return 42

    assert _disposable.run_in_disposable_thread(fn, name="t") == 42
    assert seen == [True, True]

    def boom() -> None:
        raise ValueError("from the thread")

    with pytest.raises(ValueError, match="from the thread"):
        _disposable.run_in_disposable_thread(boom, name="t")


def test_forwarded_exception_keeps_its_message() -> None:
    landed = threading.Event()
    original = pytest.fail.Exception("Timeout (>3.0s) from pytest-timeout.", pytrace=True)
    clone = _disposable._clone_exception_type(original, landed)()
    assert isinstance(clone, pytest.fail.Exception)
    assert (clone.msg, clone.pytrace, str(clone)) == (original.msg, True, str(original))
    assert landed.is_set()


def _python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(PKG_DIR.parent)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip


def test_sigint_reaches_the_disposable_thread() -> None:
    # kill() from another of our threads may deliver the signal to a thread other than the
    # main one, which then never wakes from a plain lock wait: this caught that (1 run in 5).
    proc = _python(
        """
        import os, signal, threading, time
        from pytest_tunpair._kernel.disposable import run_in_disposable_thread

        started, seen = threading.Event(), []

        def body():
            started.set()
            try:
                while True:
                    time.sleep(0.01)
            except KeyboardInterrupt:
                seen.append("worker interrupted")
                raise

        threading.Thread(target=lambda: (started.wait(), os.kill(os.getpid(), signal.SIGINT))).start()
        try:
            run_in_disposable_thread(body, name="t")
        except KeyboardInterrupt:
            print("main interrupted;", *seen)
        """
    )
    assert proc.stdout.strip() == "main interrupted; worker interrupted", proc


def test_a_blocked_thread_is_given_up_after_the_grace_period() -> None:
    proc = _python(
        """
        import signal, time
        from pytest_tunpair import ThreadNotStopped
        from pytest_tunpair._kernel.disposable import run_in_disposable_thread

        def alarm(signum, frame):
            raise RuntimeError("too slow")

        signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        try:
            run_in_disposable_thread(lambda: time.sleep(60), name="t", grace=0.5)
        except ThreadNotStopped as exc:
            print(type(exc.__cause__).__name__, "|", exc)
        """
    )
    assert proc.stdout.startswith("RuntimeError | RuntimeError: too slow -- and the test's "), proc
    assert "did not stop within 0.5 s" in proc.stdout


def test_prepare_rejects_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match="use one of auto, always, never"):
        _userns.prepare("sometimes")


# -- the command-line tool, rootless ---------------------------------------------------------------


def test_cli_run_as_a_normal_user(user_python: str, user_src: Path, project: Path) -> None:
    """`tunpair run` follows the plugin's rules: it enters a user namespace by itself."""
    env = nobody_env(user_python, user_src, project)
    cmd = [
        *world_tun(),
        "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
        user_python, "-m", "pytest_tunpair", "run", "--", "sh", "-c",
        "ping -c 1 -W 2 198.18.0.2 && exit 7",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 7, proc.stderr
    assert "a->b forwarded" in proc.stderr and "b->a forwarded" in proc.stderr, proc.stderr
    assert os.stat("/proc/self/ns/net").st_ino == HOST_NETNS


def test_cli_nsenter_line_works_from_outside_its_user_namespace(
    user_python: str, user_src: Path, project: Path
) -> None:
    """The shell banner's line, run as another terminal of the same user would run it."""
    need("nsenter")
    need("ping")
    env = {**nobody_env(user_python, user_src, project), "SHELL": "/bin/sh"}
    shell = [
        *world_tun(),
        "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
        user_python, "-m", "pytest_tunpair", "shell",
    ]  # fmt: skip
    proc = subprocess.Popen(
        shell,
        cwd=project,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stderr is not None
        nsenter = nsenter_line(proc.stderr, 120)
        # The tool entered a user namespace: a process outside it must join it first.
        assert nsenter[1] == "--preserve-credentials" and nsenter[2].startswith("--user="), nsenter
        other = subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             *nsenter, "ping", "-c", "1", "-W", "2", "198.18.0.2"],
            cwd=project, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert other.returncode == 0, other.stderr
        _out, err = proc.communicate("exit 0\n", timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "b->a forwarded" in err and "echo-reply" in err, err  # through this pair's relay
    assert os.stat("/proc/self/ns/net").st_ino == HOST_NETNS
