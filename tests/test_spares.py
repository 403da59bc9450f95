"""Spare namespaces (``_kernel/spare.py``, ``_plugin/spares.py``): the next tunnel test's
namespace and devices, built while the current one runs. Each test still gets a namespace
of its own, with the devices its options ask for and nothing a previous test left; and
teardown finds the processes a test left behind by looking only at pids given out since
the namespace was new (``procs.PidMark``)."""

from __future__ import annotations

import dataclasses
import errno
import os
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest

from pytest_tunpair import TunPairFactory
from pytest_tunpair._kernel import procs
from pytest_tunpair._kernel import spare as spare_mod
from pytest_tunpair._kernel.device import native_builder, release_fds
from pytest_tunpair._kernel.spare import DevicePlan, SparePool
from pytest_tunpair._options import PairOptions
from pytest_tunpair._pair import device_plan

from .conftest import run_standalone

T = TypeVar("T")

INNER = """
import os, socket, subprocess, pytest

SEEN = []

def _state(pair):
    names = sorted(name for _i, name in socket.if_nameindex())
    return os.stat("/proc/thread-self/ns/net").st_ino, names

def _fresh_then_marked():
    # A namespace nobody has used shows none of the marks every test leaves in its own: a
    # sysctl and an address. (Inode numbers cannot tell: the kernel gives a gone namespace's
    # number to a later one.)
    with open("/proc/sys/net/ipv4/ip_forward") as f:
        assert f.read().strip() == "0"
    out = subprocess.run(["ip", "-4", "addr", "show", "dev", "lo"], capture_output=True,
                         text=True, check=True).stdout
    assert "10.9.9.9" not in out
    with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
        f.write("1")
    subprocess.run(["ip", "addr", "add", "10.9.9.9/32", "dev", "lo"], check=True)

def test_one(tun_pair):
    SEEN.append(_state(tun_pair))
    _fresh_then_marked()
    assert subprocess.run(["ping", "-c", "1", "-W", "2", tun_pair.b.ip]).returncode == 0

def test_two(tun_pair):
    SEEN.append(_state(tun_pair))
    _fresh_then_marked()
    assert subprocess.run(["ping", "-c", "1", "-W", "2", tun_pair.b.ip]).returncode == 0

@pytest.mark.tunpair(names=("left", "right"), ipv6=None)
def test_other_options(tun_pair):
    SEEN.append(_state(tun_pair))
    _fresh_then_marked()
    assert (tun_pair.a.name, tun_pair.b.name) == ("left", "right")
    assert subprocess.run(["ping", "-c", "1", "-W", "2", tun_pair.b.ip]).returncode == 0

def test_factory_only(tun_pair_factory):
    pair = tun_pair_factory(names=("tun0", "x1"))
    SEEN.append(_state(pair))
    _fresh_then_marked()
    assert subprocess.run(["ping", "-c", "1", "-W", "2", pair.b.ip]).returncode == 0

def test_three(tun_pair):
    SEEN.append(_state(tun_pair))
    _fresh_then_marked()
    assert subprocess.run(["ping", "-c", "1", "-W", "2", tun_pair.b.ip]).returncode == 0

def test_zz_each_had_its_own(pytestconfig):
    from pytest_tunpair._plugin import keys

    # test_two took the spare built while test_one ran (same options).
    assert pytestconfig.stash[keys.SPARES].used >= 1
    inodes = [inode for inode, _names in SEEN]
    # Each test's namespace was alive while the next one's was built: never the same.
    assert len(SEEN) == 5 and all(a != b for a, b in zip(inodes, inodes[1:])), SEEN
    # Only lo and the test's own devices: no spare device was left in anyone's way.
    assert [names for _inode, names in SEEN] == [
        ["lo", "tun0", "tun1"],
        ["lo", "tun0", "tun1"],
        ["left", "lo", "right"],
        ["lo", "tun0", "x1"],
        ["lo", "tun0", "tun1"],
    ]
"""


def test_each_test_gets_a_fresh_namespace_with_its_own_devices(pytester: pytest.Pytester) -> None:
    """Spares are taken test after test (the same options), refused when the options
    change or a test makes its own pairs; every test's namespace is new and holds exactly
    its devices, and nothing a previous test changed."""
    pytester.makepyfile(INNER)
    result = pytester.runpytest_subprocess("--tunpair", "-p", "no:randomly", "-p", "no:xdist")
    result.assert_outcomes(passed=6)


def test_a_spare_is_built_for_the_plan_and_adopted_whole() -> None:
    """The pool's spare carries the devices of the plan asked for; a factory opened with it
    makes its first pair from them, with the recipe's steps, and traffic flows."""
    plan = device_plan(PairOptions(ipv6=None))
    pool = SparePool()
    try:
        assert pool.take(plan) is None  # nothing built yet: the first test builds its own
        spare = pool.take(plan)
        assert spare is not None and spare.plan == plan and spare.built is not None
        built = spare.built.devices

        def use() -> None:
            with TunPairFactory().open(spare) as factory:
                pair = factory(ipv6=None)
                assert tuple(pair._devices) == built  # the very objects, fds and all
                assert pair.steps and pair.steps[0].startswith("ip link set tun0 up")
                with socket.create_server((pair.b.ip or "", 0)) as server:
                    with socket.create_connection(server.getsockname(), timeout=5):
                        server.accept()[0].close()

        run_standalone(use)
        assert pool.used == 1
    finally:
        pool.close()


def test_devices_built_for_other_options_are_deleted_before_a_pair_is_made() -> None:
    """A factory entered with a spare whose devices its first pair does not want (other
    names, other addresses) deletes them first: the pair's own devices take their names."""
    plan = device_plan(PairOptions())
    pool = SparePool()
    try:
        pool.take(plan)
        spare = pool.take(plan)
        assert spare is not None and spare.built is not None

        def use() -> None:
            with TunPairFactory().open(spare) as factory:
                assert sorted(n for _i, n in socket.if_nameindex()) == ["lo", "tun0", "tun1"]
                pair = factory(names=("tun1", "tun0"), ipv4=("198.18.7.1", "198.18.7.2"))
                assert sorted(n for _i, n in socket.if_nameindex()) == ["lo", "tun0", "tun1"]
                assert pair.a.name == "tun1"
                ping = ["ping", "-c", "1", "-W", "2", pair.b.ip or ""]
                assert subprocess.run(ping).returncode == 0

        run_standalone(use)
    finally:
        pool.close()


def test_closing_the_pool_leaves_no_namespace_or_fd() -> None:
    before = set(os.listdir("/proc/self/fd"))
    pool = SparePool()
    pool.take(device_plan(PairOptions()))
    pool.close()
    assert set(os.listdir("/proc/self/fd")) <= before
    assert pool.take(None) is None  # closed: no more builds


def test_a_process_left_in_the_namespace_is_found_among_the_new_pids() -> None:
    """The keeper reads only pids given out since its namespace was new -- and finds a
    process started in it after, as the full scan of /proc does."""

    def use() -> None:
        with TunPairFactory(leftovers="kill") as factory:
            keeper = factory.keeper
            assert keeper is not None and keeper._born is not None
            ns = factory.netns
            assert ns is not None
            child = subprocess.Popen(["sleep", "30"])
            try:
                found = procs.members(ns.stat(), keeper._born)
                assert child.pid in found
                assert found.keys() == procs.members(ns.stat()).keys()
            finally:
                child.kill()
                child.wait()

    run_standalone(use)


def test_pid_marks_span_the_allocators_cycle() -> None:
    """Pure logic: the new pids after a mark, with and without the allocator wrapping."""
    now = procs.PidMark.now()
    assert now is not None
    subprocess.run(["true"], check=True)  # one pid (at least) given out
    newer = now.newer()
    assert newer is not None and len(newer) == 1 and len(newer[0]) >= 1
    assert newer[0].start == now.last + 1
    later = procs.PidMark(now.last + 1000, now.forks)
    wrapped = later.newer()
    assert wrapped is not None and len(wrapped) == 2
    assert now.last + 1001 in wrapped[0] and now.last in wrapped[1]
    long_ago = procs.PidMark(now.last, now.forks - 10**9)
    assert long_ago.newer() is None  # a whole cycle may have passed: scan everything


@pytest.fixture
def c_builder() -> None:
    """Skip where the C builder was not built -- but CI builds it: fail there."""
    if native_builder() is None:
        message = "the spare's C builder (_kernel/_build.c) was not built"
        if os.environ.get("TUNPAIR_CI_TOOLS") == "1":
            pytest.fail(f"CI builds it, but {message}", pytrace=False)
        pytest.skip(message)


def _on_a_thread_of_its_own(fn: Callable[[], T]) -> T:
    """Run ``fn`` on a thread that ends where ``fn`` leaves it (build_spare moves the calling
    thread into the new namespace for good, as the pool's thread)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, name="spare-test")
    thread.start()
    thread.join(30)
    if "error" in box:
        raise box["error"]
    return cast(T, box["value"])


def _routing_state() -> dict[str, str]:
    """The calling thread's namespace as `ip` shows it (a child forked here starts in it)."""

    def ip(*args: str) -> str:
        return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout

    return {
        "links": ip("-o", "link"),
        "addresses": ip("-o", "addr"),
        "rules": ip("rule") + ip("-6", "rule"),
        "routes": ip("route", "show", "table", "all") + ip("-6", "route", "show", "table", "all"),
        "sysctls": " ".join(
            Path(f"/proc/sys/net/{name}").read_text().strip()
            for name in ("ipv4/ip_nonlocal_bind", "ipv6/ip_nonlocal_bind")
        ),
    }


def _build_and_look(plan: DevicePlan) -> tuple[dict[str, str], list[str], tuple[int, int]]:
    def build() -> tuple[dict[str, str], list[str], tuple[int, int]]:
        spare = spare_mod.build_spare(plan)
        try:
            assert spare.built is not None and spare.born is not None
            devices = spare.built.devices
            return _routing_state(), spare.built.steps, (devices[0].index, devices[1].index)
        finally:
            spare.discard()

    return _on_a_thread_of_its_own(build)


@pytest.mark.usefixtures("c_builder")
@pytest.mark.parametrize("options", [{}, {"ipv6": None}, {"mode": "tap", "offload": False}])
def test_the_c_builder_builds_what_the_python_one_does(
    monkeypatch: pytest.MonkeyPatch, options: dict[str, Any]
) -> None:
    """The same namespace, whoever builds it: links, addresses, rules, routes and settings
    as `ip` shows them, and the same steps -- also when the devices get other ifindexes
    than the C builder's recipe was compiled for (it then routes them from Python)."""
    plan = device_plan(PairOptions(**options))
    assert plan is not None
    native = _build_and_look(plan)
    monkeypatch.setattr(spare_mod, "_indexes", (40, 41))  # not what a namespace gives
    relearned = _build_and_look(plan)
    assert spare_mod._indexes == native[2]  # learned again
    monkeypatch.setattr(spare_mod, "native_builder", lambda: None)
    python = _build_and_look(plan)
    assert native == relearned == python
    assert "iif tun0 lookup 13" in native[0]["rules"] and "tun1" in native[0]["links"]


@pytest.mark.usefixtures("c_builder")
def test_a_c_build_that_fails_says_what_and_leaves_nothing_open() -> None:
    plan = device_plan(PairOptions())
    assert plan is not None
    clash = dataclasses.replace(plan, names=("tun0", "tun0"))  # the second TUNSETIFF: EBUSY
    for _attempt in range(2):  # the first compiles the recipe (pyroute2 keeps sockets)
        before = set(os.listdir("/proc/self/fd"))
        with pytest.raises(OSError, match="TUNSETIFF") as info:
            _on_a_thread_of_its_own(lambda: spare_mod.build_spare(clash))
        assert info.value.errno == errno.EBUSY
    assert set(os.listdir("/proc/self/fd")) <= before
    with pytest.raises(ValueError, match="too long"):
        native_builder().build([], b"", [("x" * 20, 1, -1)] * 2, [], (0, 0), b"", (), b"", 1)


@pytest.mark.usefixtures("c_builder")
def test_released_devices_are_persistent_and_their_fds_closed() -> None:
    """release_fds (the disposer's work): TUNSETPERSIST then close, so the devices stay in
    their namespace -- and go with it -- rather than unregistering on the spot."""
    plan = device_plan(PairOptions())
    assert plan is not None

    def build() -> tuple[list[int], list[str]]:
        spare = spare_mod.build_spare(plan)
        assert spare.built is not None
        fds = [d.detach() for d in spare.built.devices]
        release_fds(fds)
        names = sorted(n for _i, n in socket.if_nameindex())
        spare.discard()
        return [fd for fd in fds if fd is not None], names

    fds, names = _on_a_thread_of_its_own(build)
    assert names == ["lo", "tun0", "tun1"]  # persistent: still there after the close
    for fd in fds:
        with pytest.raises(OSError) as info:
            os.fstat(fd)
        assert info.value.errno == errno.EBADF
