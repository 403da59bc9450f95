"""Play a packetdrill script against the kernel of a pair, with the scripted peer as the
remote host.

packetdrill's model (run.c, run_packet.c, run_system_call.c in google/packetdrill), on
this project's pieces: the *local* side is the Linux stack of the pair's namespace, reached
through side a's device (``tun0``, the address packetdrill calls ``--local_ip``); the
*remote* side is side b, played by a :class:`~pytest_tunpair.ScriptedPeer` (the address
``--remote_ip``). Inbound packets (``<``) are written into a's device as b; outbound ones
(``>``) are the next packets the kernel sends to b for the socket under test, mapped into
the script's numbers and compared field by field; system calls run for real on the test's
thread (blocking ones on a thread of their own, as packetdrill does), inside the namespace;
back-quoted commands run in a shell in the namespace; ``%{ }%`` snippets run at the end
with the ``tcp_info`` of their moment. Times are checked with packetdrill's tolerances, plus
the widening a busy machine needs (``slack_usecs``).

The pieces that need no kernel -- the grammar (:mod:`.pkt_parse`), the mapping of numbers
and the comparison of packets here -- are plain functions over plain objects.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._kernel.threads import own_thread
from .._packets.packet import Packet
from .._wire import build as _build
from .._wire.numbers import IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP
from . import pkt_syscalls as _sys
from .pkt_parse import (
    ABSOLUTE_RANGE,
    ANY,
    RELATIVE,
    RELATIVE_RANGE,
    Code,
    Command,
    Event,
    PacketSpec,
    Script,
    Syscall,
    TcpOption,
    parse,
    read_options,
)

if TYPE_CHECKING:
    from .peer import ScriptedPeer

__all__ = [
    "IP_VERSIONS",
    "PktConfig",
    "PktFailure",
    "PktUnsupported",
    "Runner",
    "config_for",
    "defaults_sysctls",
    "load",
    "variants",
]

#: packetdrill's ``--ip_version`` values, in run_all.py's order.
IP_VERSIONS = ("ipv4", "ipv4-mapped-ipv6", "ipv6")

# What google/packetdrill's run_all.py and the kernel's ksft_runner.sh pass per variant
# (the addresses the scripts' TFO cookies were computed for, the MTU that gives IPv6 the
# same 1460-byte MSS, and the symbols the scripts use).
_VARIANTS: dict[str, dict[str, Any]] = {
    "ipv4": {
        "local_ip": "192.168.0.1",
        "gateway_ip": "192.168.0.1",
        "remote_ip": "192.0.2.1",
        "mtu": 1500,
        "defines": {
            "TFO_COOKIE": "3021b9d889017eeb",
            "CODE": "host_unreachable",
            "CMSG_LEVEL_IP": "SOL_IP",
            "CMSG_TYPE_RECVERR": "IP_RECVERR",
        },
    },
    "ipv4-mapped-ipv6": {
        "local_ip": "192.168.0.1",
        "gateway_ip": "192.168.0.1",
        "remote_ip": "192.0.2.1",
        "mtu": 1500,
        "defines": {
            "TFO_COOKIE": "3021b9d889017eeb",
            "CODE": "host_unreachable",
            "CMSG_LEVEL_IP": "SOL_IPV6",
            "CMSG_TYPE_RECVERR": "IPV6_RECVERR",
        },
    },
    "ipv6": {
        "local_ip": "fd3d:a0b:17d6::1",
        "gateway_ip": "fd3d:a0b:17d6:8888::1",
        "remote_ip": "fd3d:fa7b:d17d::1",
        "mtu": 1520,
        "defines": {
            "TFO_COOKIE": "c1d1e9742a47a9bc",
            "CMSG_LEVEL_IP": "SOL_IPV6",
            "CMSG_TYPE_RECVERR": "IPV6_RECVERR",
        },
    },
}

# packetdrill's defaults (config.c): 4 ms, or 12.5 % of the time since the previous event.
DEFAULT_TOLERANCE_USECS = 4000
DEFAULT_TOLERANCE_PERCENT = 12.5
# run_packet.c: an outbound packet is waited for until its time plus 2 s.
SNIFF_EXTRA = 2.0
# run_system_call.c: how long a call waits for a blocking call still running before it.
BLOCKING_WAIT = 1.0
# How long the runner polls a blocking call's thread until it sleeps in the kernel.
_BLOCK_POLL = 0.0005


def defaults_sysctls() -> list[tuple[str, str]]:
    """The per-namespace sysctls of packetdrill's ``defaults.sh`` (the Linux kernel's
    tools/testing/selftests/net/packetdrill/defaults.sh, which google/packetdrill's
    gtests/net/common/defaults.sh extends), as (name, value)."""
    return [
        ("net.ipv4.tcp_rmem", f"4096 540000 {15 * 1024 * 1024}"),
        ("net.ipv4.tcp_wmem", f"4096 {256 * 1024} 4194304"),
        ("net.ipv4.tcp_timestamps", "1"),
        ("net.ipv4.tcp_syn_retries", "5"),
        ("net.ipv4.tcp_synack_retries", "5"),
        ("net.ipv4.tcp_frto", "2"),
        ("net.ipv4.tcp_sack", "1"),
        ("net.ipv4.tcp_dsack", "1"),
        ("net.ipv4.tcp_fack", "0"),
        ("net.ipv4.tcp_reordering", "3"),
        ("net.ipv4.tcp_congestion_control", "cubic"),
        ("net.ipv4.tcp_slow_start_after_idle", "0"),
        ("net.ipv4.tcp_early_retrans", "4"),
        ("net.ipv4.tcp_recovery", "1"),
        ("net.ipv4.tcp_tso_win_divisor", "3"),
        ("net.ipv4.tcp_ecn", "0"),
        ("net.ipv4.tcp_pacing_ss_ratio", "200"),
        ("net.ipv4.tcp_pacing_ca_ratio", "120"),
        ("net.ipv4.tcp_notsent_lowat", "4294967295"),
        ("net.ipv4.tcp_fastopen", "0x3"),
        ("net.ipv4.tcp_fastopen_key", "a1a1a1a1-b2b2b2b2-c3c3c3c3-d4d4d4d4"),
        ("net.ipv4.tcp_syncookies", "1"),
    ]


# -- errors -----------------------------------------------------------------------------------------


class PktFailure(AssertionError):
    """The kernel did not do what the script says: ``line`` of ``path``, why, and for a
    packet the expected and actual packets with the fields that differ."""

    def __init__(
        self,
        path: str,
        line: int,
        message: str,
        *,
        expected: str | None = None,
        actual: str | None = None,
        diff: Sequence[str] = (),
        source: str = "",
    ) -> None:
        self.path = path
        self.line = line
        self.reason = message
        self.expected = expected
        self.actual = actual
        self.diff = list(diff)
        self.source = source
        super().__init__(self.describe())

    def describe(self) -> str:
        text = f"{self.path}:{self.line}: {self.reason}"
        if self.source:
            text += f"\n  script line:   {self.source.strip()}"
        if self.expected is not None:
            text += f"\n  script packet: {self.expected}"
        if self.actual is not None:
            text += f"\n  actual packet: {self.actual}"
        for line in self.diff:
            text += f"\n    {line}"
        return text


class PktUnsupported(Exception):
    """A script uses something this runner cannot play: ``line`` and what."""

    def __init__(self, path: str, line: int, what: str) -> None:
        self.path = path
        self.line = line
        self.what = what
        super().__init__(f"{path}:{line}: unsupported: {what}")


# -- configuration ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PktConfig:
    """One run of one script: packetdrill's command-line configuration."""

    ip_version: str = "ipv4"
    local_ip: str = "192.168.0.1"
    remote_ip: str = "192.0.2.1"
    gateway_ip: str = "192.168.0.1"
    #: The local address's prefix (IPv4; IPv6 has packetdrill's /48): see
    #: Runner.route_local_prefix().
    netmask_ip: str = "255.255.0.0"
    mtu: int = 1500
    bind_port: int = 8080
    connect_port: int = 8080
    tolerance_usecs: int = DEFAULT_TOLERANCE_USECS
    tolerance_percent: float = DEFAULT_TOLERANCE_PERCENT
    #: Added to every tolerance (``tunpair_pkt_slack_usecs``): what a busy machine or an
    #: HZ=250 kernel needs on top of packetdrill's numbers.
    slack_usecs: int = 0
    mss: int = 0
    tcp_ts_tick_usecs: int = 0
    tcp_ts_ecr_scaled: bool = False
    strict_segments: bool = False
    defines: dict[str, str] = field(default_factory=dict)
    #: Apply :func:`defaults_sysctls` to the namespace before the script.
    defaults: bool = True

    @property
    def socket_domain(self) -> int:
        return socket.AF_INET if self.ip_version == "ipv4" else socket.AF_INET6

    @property
    def wire_family(self) -> int:
        """4 or 6: what the packets on the wire are."""
        return 6 if self.ip_version == "ipv6" else 4


#: Script options accepted without effect, because this runner does what they ask anyway:
#: its output (``--verbose``, ``--debug``) and fresh send buffers (``--send_omit_free``).
#: Every other option this runner does not implement (``--non_fatal``, ``--speed``,
#: ``--dry_run``, wire mode, ...) makes the script unsupported rather than silently ignored.
_OPTIONS_IGNORED = frozenset({"send_omit_free", "verbose", "debug"})


def variants(script: Script) -> list[str]:
    """The ``--ip_version`` values to run ``script`` with: its own, if it sets one."""
    for name, value, _line in script.options:
        if name == "ip_version" and value:
            return [value]
    return list(IP_VERSIONS)


def load(
    text: str, ip_version: str, path: str = "<script>", **overrides: Any
) -> tuple[Script, PktConfig]:
    """Parse ``text`` for one ``--ip_version`` (its symbols, such as ``TFO_COOKIE``, are the
    variant's) and configure its run: (script, config). ``PktSyntaxError`` from the parser,
    ``PktUnsupported`` for an option this runner does not implement."""
    options = Script(options=read_options(text))
    config = config_for(options, ip_version, path, **overrides)
    script = parse(text, config.defines)
    return script, config_for(script, ip_version, path, **overrides)


def config_for(
    script: Script, ip_version: str, path: str = "<script>", **overrides: Any
) -> PktConfig:
    """The configuration for ``script`` in ``ip_version``: run_all.py's per-variant flags,
    then the script's own ``--options``, then ``overrides`` (the ini keys).
    ``PktUnsupported`` for an option this runner does not implement."""
    for name, value, line in script.options:
        if name == "ip_version" and value not in _VARIANTS:
            raise PktUnsupported(path, line, f"--ip_version={value} (use {', '.join(IP_VERSIONS)})")
    if ip_version not in _VARIANTS:
        raise PktUnsupported(path, 0, f"--ip_version={ip_version} (use {', '.join(IP_VERSIONS)})")
    v = _VARIANTS[ip_version]
    values: dict[str, Any] = {
        "ip_version": ip_version,
        "local_ip": v["local_ip"],
        "remote_ip": v["remote_ip"],
        "gateway_ip": v["gateway_ip"],
        "mtu": v["mtu"],
        "defines": dict(v["defines"]),
    }
    ints = {
        "bind_port",
        "connect_port",
        "tolerance_usecs",
        "mtu",
        "mss",
        "tcp_ts_tick_usecs",
    }
    for name, value, line in script.options:
        if name in ("local_ip", "remote_ip", "gateway_ip"):
            address = str(value).split("/")[0]
            try:
                family = ipaddress.ip_address(address).version
            except ValueError:
                raise PktUnsupported(path, line, f"--{name}={value} (not an address)") from None
            # run_all.py and the kernel's ksft_runner.sh give each variant its addresses on
            # the command line, which overrides the script's (parse_and_finalize_config()):
            # an IPv4 script's --local_ip=192.168.0.1 runs over IPv6 with the variant's.
            if family == (6 if ip_version == "ipv6" else 4):
                values[name] = address
        elif name == "netmask_ip":
            values[name] = str(value)
        elif name in ints:
            try:
                values[name] = int(str(value), 0)
            except ValueError:
                raise PktUnsupported(path, line, f"--{name}={value} (not a number)") from None
        elif name == "tolerance_percent":
            try:
                values[name] = float(str(value))
            except ValueError:
                raise PktUnsupported(path, line, f"--{name}={value} (not a number)") from None
        elif name in ("tcp_ts_ecr_scaled", "strict_segments"):
            values[name] = True
        elif name == "ip_version":
            continue
        elif name == "define" and value:
            key, _, val = str(value).partition("=")
            values["defines"][key] = val
        elif name in _OPTIONS_IGNORED:
            continue
        else:
            raise PktUnsupported(path, line, f"the option --{name}")
    values.update({k: val for k, val in overrides.items() if val is not None})
    return PktConfig(**values)


def pair_options(config: PktConfig) -> dict[str, Any]:
    """The pair for ``config``: a is the local host (the kernel under test), b the remote
    one (the scripted peer), with packetdrill's addresses; both families are configured
    so that a script may reach either (the mapped variant's sockets are IPv6, its wire
    IPv4)."""
    v4 = ("192.168.0.1", "192.0.2.1")
    v6 = ("fd3d:a0b:17d6::1", "fd3d:fa7b:d17d::1")
    if config.wire_family == 4:
        v4 = (config.local_ip, config.remote_ip)
    else:
        v6 = (config.local_ip, config.remote_ip)
    return {"ipv4": v4, "ipv6": v6, "mtu": config.mtu, "mode": "tun"}


# -- packets in the script's terms -------------------------------------------------------------------

# packetdrill's flag letters; ours are scapy's (headers.FLAG_STRINGS).
_PD_FLAGS = (("F", 0x01), ("S", 0x02), ("R", 0x04), ("P", 0x08), (".", 0x10), ("U", 0x20))
_ECE, _CWR, _AE = 0x40, 0x80, 0x100


def flag_bits(flags: str) -> tuple[int, bool]:
    """packetdrill's flags (``S.``, ``P.``, ``.5`` with AccECN's ACE digits) as the
    header's 9 bits, and whether the ACE field is given as a number."""
    bits = 0
    for letter, bit in _PD_FLAGS:
        if letter in flags:
            bits |= bit
    ace = next((int(c) for c in flags if c.isdigit()), None)
    if ace is not None:
        bits |= (_ECE if ace & 1 else 0) | (_CWR if ace & 2 else 0) | (_AE if ace & 4 else 0)
        return bits, True
    for letter, bit in (("E", _ECE), ("W", _CWR), ("A", _AE)):
        if letter in flags:
            bits |= bit
    return bits, False


def flag_text(bits: int, ace: bool = False) -> str:
    """The header's flag bits in packetdrill's letters (tcpdump 4.1.1's order)."""
    out = "".join(letter for letter, bit in _PD_FLAGS if bits & bit)
    if ace:
        return out + str((bits & _ECE and 1) | (bits & _CWR and 2) | (bits & _AE and 4))
    return out + "".join(
        letter for letter, bit in (("E", _ECE), ("W", _CWR), ("A", _AE)) if bits & bit
    )


def encode_options(options: Sequence[TcpOption]) -> list[tuple[str | int, Any]]:
    """Script options as ``_wire.build.tcp_options`` takes them, byte for byte as
    packetdrill writes them (no padding added: the script pads with nop)."""
    out: list[tuple[str | int, Any]] = []
    for name, value in options:
        if name == "nop":
            out.append(("NOP", None))
        elif name == "eol":
            out.append(("EOL", None))
        elif name == "mss":
            out.append(("MSS", value))
        elif name == "wscale":
            out.append(("WScale", value))
        elif name == "sackOK":
            out.append(("SAckOK", b""))
        elif name == "sack":
            out.append(("SAck", tuple(x for block in value for x in block)))
        elif name == "TS":
            out.append(("Timestamp", tuple(value)))
        elif name == "FO":
            out.append((34, _hex(value)))
        elif name == "FOEXP":
            out.append((254, b"\xf9\x89" + _hex(value)))
        elif name == "md5":
            out.append((19, _hex(value)))
        elif name == "ECN":
            kind, fields = value
            out.append((kind, b"".join(v.to_bytes(3, "big") for v in fields)))
        else:
            out.append((name, value))
    return out


def _hex(text: str) -> bytes:
    if len(text) % 2:
        raise ValueError(f"the hex string {text!r} has an odd number of digits")
    return bytes.fromhex(text)


def options_length(options: Sequence[TcpOption]) -> int:
    total = 0
    for name, value in options:
        if name in ("nop", "eol"):
            total += 1
        elif name == "mss":
            total += 4
        elif name == "wscale":
            total += 3
        elif name == "sackOK":
            total += 2
        elif name == "sack":
            total += 2 + 8 * len(value)
        elif name == "TS":
            total += 10
        elif name == "FO":
            total += 2 + len(value) // 2
        elif name in ("FOEXP",):
            total += 4 + len(value) // 2
        elif name == "md5":
            total += 2 + len(value) // 2
        elif name == "ECN":
            total += 2 + 3 * len(value[1])
    return total


def decode_options(options: Sequence[tuple[str | int, Any]] | None) -> list[TcpOption]:
    """A live packet's options (``Packet.tcp_options``) in the script's terms."""
    out: list[TcpOption] = []
    for name, value in options or ():
        if name == "NOP":
            out.append(("nop", None))
        elif name == "EOL":
            out.append(("eol", None))
        elif name == "MSS":
            out.append(("mss", value))
        elif name == "WScale":
            out.append(("wscale", value))
        elif name == "SAckOK":
            out.append(("sackOK", None))
        elif name == "SAck":
            out.append(("sack", tuple(zip(value[0::2], value[1::2], strict=True))))
        elif name == "Timestamp":
            out.append(("TS", tuple(value)))
        elif name in (34, "TFO"):
            out.append(("FO", _option_bytes(value, "!II").hex()))
        elif name == 254 and bytes(value)[:2] == b"\xf9\x89":
            out.append(("FOEXP", bytes(value)[2:].hex()))
        elif name in (19, "MD5"):
            out.append(("md5", _option_bytes(value, "16s").hex()))
        elif name in (172, 174):
            raw = bytes(value)
            fields = tuple(int.from_bytes(raw[i : i + 3], "big") for i in range(0, len(raw) - 2, 3))
            out.append(("ECN", (name, fields)))
        else:
            out.append((str(name), value))
    return out


def _option_bytes(value: Any, layout: str) -> bytes:
    """An option's value as bytes: the parser decodes a cookie of the usual size into
    numbers (scapy's shape), any other size stays bytes."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    return struct.pack(layout, *(value if isinstance(value, tuple) else (value,)))


def options_text(options: Sequence[TcpOption] | None) -> str:
    """``<mss 1460,sackOK,TS val 100 ecr 0,nop,wscale 8>`` as packetdrill prints it."""
    if options is None:
        return "<...>"
    parts = []
    for name, value in options:
        if name in ("nop", "eol", "sackOK"):
            parts.append(name)
        elif name in ("mss", "wscale"):
            parts.append(f"{name} {value}")
        elif name == "sack":
            parts.append("sack " + " ".join(f"{a}:{b}" for a, b in value))
        elif name == "TS":
            parts.append(f"TS val {value[0]} ecr {value[1]}")
        elif name in ("FO", "FOEXP", "md5"):
            parts.append(f"{name} {value}".rstrip())
        elif name == "ECN":
            kind, fields = value
            names = ("e0b", "ceb", "e1b") if kind == 172 else ("e1b", "ceb", "e0b")
            parts.append("ECN " + " ".join(f"{n} {v}" for n, v in zip(names, fields, strict=False)))
        else:
            parts.append(f"{name} {value!r}")
    return "<" + ",".join(parts) + ">" if parts else ""


@dataclass
class Seg:
    """A TCP segment in the script's numbers: what a script line says, or what the
    kernel sent, mapped."""

    flags: int
    seq: int
    length: int
    ack: int
    window: int | None
    urg: int
    options: list[TcpOption] | None
    ace: bool = False
    tos: int = 0
    ttl: int = 0
    flowlabel: int = 0
    time: float = 0.0
    #: The TCP header's length in 32-bit words (the live packet's data offset).
    doff: int = 5

    def text(self) -> str:
        out = f"{flag_text(self.flags, self.ace)} {self.seq}:{(self.seq + self.length) % 2**32}({self.length})"
        if self.flags & 0x10:
            out += f" ack {self.ack}"
        if self.window is not None:
            out += f" win {self.window}"
        opts = options_text(self.options)
        return out + (f" {opts}" if opts else "")


# -- the socket under test (packetdrill's struct socket) -------------------------------------------


@dataclass
class _Tuple:
    local: tuple[str, int] = ("", 0)
    remote: tuple[str, int] = ("", 0)
    local_isn: int = 0
    remote_isn: int = 0


@dataclass
class SockState:
    """What packetdrill tracks of the socket under test: its state, its addresses and
    ISNs in the script's and the live numbering, and the TS val mapping."""

    state: str  # new, listening, connecting, syn_sent, syn_acked, packet_received, synack_sent, synack_acked
    protocol: int
    script_fd: int = -1
    script: _Tuple = field(default_factory=_Tuple)
    live: _Tuple = field(default_factory=_Tuple)
    ts_map: dict[int, int] = field(default_factory=dict)
    first_ts: tuple[int, int] | None = None  # (script val, actual val)
    flowlabel: tuple[int, int] | None = None  # (script, live)


class FdEntry:
    """A live file descriptor the script made (a socket, an epoll instance, a pipe end, a
    file), by the script's number."""

    def __init__(self, script_fd: int, obj: Any, state: SockState | None = None) -> None:
        self.script_fd = script_fd
        self.obj = obj
        self.state = state
        self.closed = False
        self.own_cc = False

    @property
    def sock(self) -> socket.socket:
        if not isinstance(self.obj, socket.socket):
            raise _sys.SyscallFailed(f"fd {self.script_fd} is not a socket")
        return self.obj

    def fileno(self) -> int:
        return self.obj if isinstance(self.obj, int) else int(self.obj.fileno())

    def close(self) -> None:
        if isinstance(self.obj, int):
            os.close(self.obj)
        else:
            self.obj.close()


# -- the runner -------------------------------------------------------------------------------------


class Runner:
    """Plays one parsed script against the pair's kernel, with ``peer`` as the remote host.

    ``pair`` is a :class:`~pytest_tunpair.TunPair` (the calling thread inside its
    namespace) whose a side has ``config.local_ip`` and b side ``config.remote_ip``;
    ``peer`` scripts its b side. :meth:`run` raises :class:`PktFailure` at the first
    difference, :class:`PktUnsupported` for what it cannot play.
    """

    def __init__(
        self,
        script: Script,
        config: PktConfig,
        peer: ScriptedPeer,
        *,
        path: str,
        lines: Sequence[str] = (),
        directory: str | None = None,
        netns_path: str | None = None,
        spawn: Callable[..., subprocess.Popen[Any]] | None = None,
    ) -> None:
        self.script = script
        self.config = config
        self.peer = peer
        self.path = path
        #: Where commands run and open() looks (packetdrill runs in the script's directory).
        self.directory = directory or (
            str(Path(path).resolve().parent) if os.path.exists(path) else os.getcwd()
        )
        self._lines = list(lines)
        self._spawn = spawn
        self._netns_path = netns_path
        self.fds: dict[int, FdEntry] = {}  # by script fd: the newest (as packetdrill finds it)
        self._all_fds: list[FdEntry] = []  # every fd made, to close at the end
        self._sockets: list[SockState] = []  # every socket the script made or a SYN did
        self.under_test: SockState | None = None
        self._lock = threading.RLock()
        self._start = 0.0  # monotonic time of script time 0
        self._start_wall = 0.0  # the same moment on CLOCK_REALTIME (kernel timestamps)
        self._event: Event | None = None
        self._last: Event | None = None
        self._last_script_time = 0  # usecs: the previous event's script time
        self._events_done = 0
        self._cursor = -1  # last peer.packets seq looked at
        self._worker: _Worker | None = None
        self._code: list[tuple[Event, dict[str, int]]] = []
        self._wanted_cc = "cubic" if config.defaults else None
        self._ephemeral: int | None = None
        self.log: list[str] = []
        #: (what, seconds late): for each timed event, how far from the script's time it
        #: happened (an outbound packet: when the kernel sent it; the rest: when it ran).
        self.timing: list[tuple[str, float]] = []
        #: When the last event's action was over (Runner.now()): the inbound packet
        #: written, the call returned, the outbound packet sent; a blocking call's entry
        #: into the kernel. _anchor() counts the next relative time from it.
        self._done_at: float | None = None
        self.packets_in = 0
        self.packets_out = 0

    # -- helpers --------------------------------------------------------------------------
    def now(self) -> float:
        """Seconds since script time 0."""
        return time.monotonic() - self._start

    def _source(self, line: int) -> str:
        return self._lines[line - 1] if 0 < line <= len(self._lines) else ""

    def fail(self, message: str, *, line: int | None = None, **kw: Any) -> PktFailure:
        if line is None:
            line = self._event.line if self._event is not None else 0
        return PktFailure(self.path, line, message, source=self._source(line), **kw)

    def unsupported(self, line: int, what: str) -> PktUnsupported:
        return PktUnsupported(self.path, line, what)

    # -- the whole run --------------------------------------------------------------------
    def check_supported(self) -> None:
        """Refuse up front what this runner cannot play (so a script fails with the line
        and what is missing before anything runs, and never passes)."""
        for e in self.script.events:
            a = e.action
            if isinstance(a, PacketSpec):
                if a.unsupported:
                    raise self.unsupported(e.line, a.unsupported)
                if a.proto == "icmp" and a.direction == ">" and a.echoed[0] == "raw":
                    raise self.unsupported(e.line, "outbound ICMP with a raw payload")
            elif isinstance(a, Syscall):
                if a.name not in _sys.SUPPORTED:
                    raise self.unsupported(e.line, f"the system call {a.name}()")
                for arg in (*a.args, a.result):
                    what = _find_unsupported(arg)
                    if what:
                        raise self.unsupported(e.line, what)

    def run(self) -> None:
        """Play the script: setup (the defaults' sysctls, the init command), every event
        in order, the %{ }% code, the cleanup command."""
        try:
            self.check_supported()
            if self.config.defaults:
                self.apply_defaults()
            self.route_local_prefix()
            if self.script.init_command is not None:
                self.command(self.script.init_command, self.script.init_line)
            self._start, self._start_wall = time.monotonic(), time.time()
            for event in self.script.events:
                self._check_worker()
                self._event = event
                self._anchor(event)
                with self._lock:
                    self._dispatch(event)
                self._last_script_time = event.time
                self._last = event
                self._events_done += 1
            self._event = None
            self._finish_worker()
            self._run_code()
            if self.script.cleanup_command is not None:
                self.command(self.script.cleanup_command, self.script.cleanup_line)
        finally:
            self.close()

    def close(self) -> None:
        worker = self._worker
        if worker is not None and not worker.idle():
            # A blocking call still in the kernel: shut its sockets down to wake it (a
            # close() from another thread does not), so no thread stays in the namespace.
            for entry in self._all_fds:
                if not entry.closed and isinstance(entry.obj, socket.socket):
                    try:
                        entry.obj.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
            worker.wait_idle(BLOCKING_WAIT)
        if worker is not None:
            worker.stop()
        for entry in self._all_fds:
            if not entry.closed:
                try:
                    entry.close()
                except OSError:
                    pass
                entry.closed = True
        # What set_sysctls.py left for the cleanup command (packetdrill leaves it behind).
        try:
            os.unlink(f"/tmp/sysctl_restore_{os.getpid()}.sh")
        except OSError:
            pass

    def _dispatch(self, event: Event) -> None:
        a = event.action
        if isinstance(a, PacketSpec):
            if a.direction == "<":
                self._wait_for(event)
                self.inbound(a, event)
            else:
                self.outbound(a, event)
        elif isinstance(a, Syscall):
            self.syscall(a, event)
        elif isinstance(a, Command):
            self._wait_for(event)
            self.command(a, event.line)
        elif isinstance(a, Code):
            self._wait_for(event)
            self.code(event)

    # -- time (run.c) ---------------------------------------------------------------------
    def _anchor(self, event: Event) -> None:
        """adjust_relative_event_times(): a relative time counts from now, or, between two
        inbound packets, from the previous one's scheduled time."""
        if event.time_kind not in (ANY, RELATIVE, RELATIVE_RANGE):
            return
        last = self._last
        done_at, self._done_at = self._done_at, None
        if last is not None and _anchored(last) and _anchored(event):
            offset = last.time
        else:
            # packetdrill's "now" is when its main thread is done with the last event,
            # microseconds after the action itself. Here the last event's bookkeeping, a
            # thread switch or a busy machine may add milliseconds, which must not move
            # the script's clock: count from when the action was over.
            now = self.now()
            if done_at is not None:
                now = min(now, done_at)
            offset = round(now * 1e6) if self._start else 0
        event.offset = offset
        event.time += offset
        if event.time_kind == RELATIVE_RANGE and event.end is not None:
            event.end += offset
        a = event.action
        if event.time_kind == RELATIVE and isinstance(a, Syscall) and a.end is not None:
            event.action = replace(a, end=a.end + offset)

    def tolerance(self, script_usecs: int, last_usecs: int | None) -> int:
        tol = self.config.tolerance_usecs
        if last_usecs is not None:
            dynamic = int(self.config.tolerance_percent / 100.0 * (script_usecs - last_usecs))
            tol = max(tol, dynamic)
        return tol + self.config.slack_usecs

    def check_time(
        self,
        kind: str,
        expected: int,
        expected_end: int | None,
        actual: float,
        last: int | None,
        what: str,
    ) -> str | None:
        """verify_time(): a message if ``actual`` (seconds) misses the window."""
        if kind == ANY:
            return None
        tol = self.tolerance(expected, last)
        act = round(actual * 1e6)
        if kind in (ABSOLUTE_RANGE, RELATIVE_RANGE) and expected_end is not None:
            if act < expected - tol or act > expected_end + tol:
                return (
                    f"timing error: expected {what} in time range {expected / 1e6:.6f}~"
                    f"{expected_end / 1e6:.6f} sec but happened at {act / 1e6:.6f} sec "
                    f"(tolerance {tol / 1e6:.6f} sec)"
                )
            return None
        if act < expected - tol or act > expected + tol:
            return (
                f"timing error: expected {what} at {expected / 1e6:.6f} sec but happened at "
                f"{act / 1e6:.6f} sec; tolerance {tol / 1e6:.6f} sec"
            )
        return None

    def _last_time(self) -> int | None:
        return self._last.time if self._last is not None else None

    def _wait_for(self, event: Event) -> None:
        """wait_for_event(): sleep until the event's time, then check we are not late."""
        target = self._start + event.time / 1e6
        while True:
            wait = target - time.monotonic()
            if wait <= 0:
                break
            self._lock.release()
            try:
                time.sleep(wait)
            finally:
                self._lock.acquire()
        if self._events_done:
            what = _describe(event)
            now = self.now()
            self.timing.append((what, now - event.time / 1e6))
            error = self.check_time(
                event.time_kind, event.time, event.end, now, self._last_time(), what
            )
            if error:
                raise self.fail(error)

    # -- commands and code ---------------------------------------------------------------
    def apply_defaults(self) -> None:
        """defaults.sh's sysctls, in the pair's namespace (never the host's: /proc/sys/net
        is the calling thread's namespace's)."""
        _check_namespace(self._netns_path)
        for name, value in defaults_sysctls():
            path = "/proc/sys/" + name.replace(".", "/")
            try:
                with open(path, "w") as f:
                    f.write(value)
            except OSError:
                # cubic as the namespace's default is refused where the host does not allow
                # it (docs/internals.md, "packetdrill: cubic, where the host allows only
                # bbr"): each socket asks for it instead. Others may not exist here.
                continue

    def route_local_prefix(self) -> None:
        """packetdrill gives tun0 its address with a prefix (``--netmask_ip``, 255.255.0.0;
        /48 for IPv6), so an address inside it is on-link: scripts route the remote
        ``via 192.168.0.2 dev tun0 advmss 600 mtu lock 640`` (gtests/net/tcp/mtu_probe,
        the kernel's tcp_advmss_pmtu_ipv4.pkt), which the kernel refuses ("Nexthop has
        invalid gateway") when the address is point to point, as the pair's is. The same
        prefix routed to tun0 makes it on-link; the pair's own routes are more specific."""
        c = self.config
        if not self._netns_path:
            return  # never a route outside the pair's namespace
        _check_namespace(self._netns_path)
        try:
            if c.wire_family == 4:
                net = ipaddress.ip_network(f"{c.local_ip}/{c.netmask_ip}", strict=False)
            else:
                net = ipaddress.ip_network(f"{c.local_ip}/48", strict=False)
        except ValueError:
            raise self.fail(f"bad --local_ip/--netmask_ip: {c.local_ip}/{c.netmask_ip}") from None
        if net.prefixlen == net.max_prefixlen or shutil.which("ip") is None:
            return
        cmd = ["ip", f"-{c.wire_family}", "route", "replace", str(net), "dev", "tun0"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        self.log.append(f"{' '.join(cmd)} -> {done.returncode} {done.stderr.strip()}".strip())

    def command(self, cmd: Command, line: int) -> None:
        """A back-quoted command: ``sh -c`` in the namespace, from the script's directory,
        with /proc/sys read-only but for /proc/sys/net (a mount namespace of its own)."""
        _check_namespace(self._netns_path)
        text = cmd.text
        if _missing_defaults(text, self.directory):
            # `../common/defaults.sh` of a script copied without its tree: the built-in one.
            self.apply_defaults()
            return
        before = _read_cc()
        # set_sysctls.py writes /tmp/sysctl_restore_$PACKETDRILL_PID.sh, which a later
        # command runs as /tmp/sysctl_restore_${PPID}.sh: the shell's parent is this process.
        env = dict(os.environ, PACKETDRILL_PID=str(os.getpid()), PKT_CMD=text)
        argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _SANDBOX]
        if shutil.which("unshare") is None:
            raise self.unsupported(line, "commands: util-linux's unshare is not installed")
        try:
            done = subprocess.run(
                argv, cwd=self.directory, env=env, capture_output=True, text=True, timeout=60
            )
        except subprocess.TimeoutExpired:
            raise self.fail(f"command `{text}` did not finish within 60 s", line=line) from None
        self.log.append(
            f"`{text}` -> {done.returncode}"
            + (f": {done.stderr.strip()}" if done.stderr.strip() else "")
        )
        if done.returncode == _GUARD_FAILED:
            raise self.unsupported(
                line, f"a mount namespace with /proc/sys read-only: {done.stderr.strip()}"
            )
        if done.returncode != 0:
            detail = (done.stderr or done.stdout).strip()
            raise self.fail(
                f"error executing command `{text}`: exit status {done.returncode}"
                + (f": {detail}" if detail else ""),
                line=line,
            )
        after = _read_cc()
        if after != before and after is not None:
            self._wanted_cc = after

    def code(self, event: Event) -> None:
        """A %{ }% snippet: the socket's tcp_info now; the code runs at the end."""
        entry = self._entry_of(self.under_test)
        worker = self._worker
        if entry is None and worker is not None and not worker.idle():
            # The socket may be a blocking accept()'s that the kernel has just returned:
            # packetdrill's C thread records it within microseconds, ours may take
            # milliseconds on a busy machine (fastopen/server/basic-non-tfo-listener.pkt
            # reads its tcp_info 5 ms after the ACK). Give it the event's tolerance.
            self._lock.release()
            try:
                worker.wait_idle(self.tolerance(event.time, None) / 1e6)
            finally:
                self._lock.acquire()
            self._check_worker()
            entry = self._entry_of(self.under_test)
        if entry is None:
            raise self.fail("runtime error in code: no socket to use for code")
        try:
            variables = _sys.code_variables(entry.sock)
        except OSError as exc:
            raise self.fail(
                f"runtime error in code: can't find getsockopt to get TCP info: {exc}"
            ) from None
        self._code.append((event, variables))

    def _run_code(self) -> None:
        namespace: dict[str, Any] = {"__name__": "__packetdrill__"}
        for event, variables in self._code:
            assert isinstance(event.action, Code)
            namespace.update(variables)
            namespace["_file"], namespace["_line"] = self.path, event.line
            try:
                # code.c writes each snippet followed by two newlines: a trailing
                # backslash continues onto an empty line.
                text = event.action.text + "\n\n"
                compiled = compile(text, f"{self.path}:{event.line}", "exec")
                exec(compiled, namespace)
            except AssertionError as exc:
                values = {k: v for k, v in variables.items() if k in event.action.text}
                shown = ", ".join(f"{k}={v}" for k, v in sorted(values.items()))
                raise self.fail(
                    f"error in Python code: AssertionError: {exc}"
                    + (f" ({shown})" if shown else ""),
                    line=event.line,
                ) from None
            except Exception as exc:
                raise self.fail(
                    f"error in Python code: {type(exc).__name__}: {exc}", line=event.line
                ) from None

    # -- system calls --------------------------------------------------------------------
    def syscall(self, call: Syscall, event: Event) -> None:
        if call.end is not None:
            self._enqueue(call, event)
            return
        self._await_idle(error=False)
        self._wait_for(event)
        try:
            _sys.run_syscall(self, call)
            self._done_at = self.now()
        except _sys.SyscallFailed as exc:
            raise self.fail(f"runtime error in {call.name} call: {exc}") from None
        except _sys.SyscallUnsupported as exc:
            raise self.unsupported(event.line, str(exc)) from None

    def blocking(self, call: Syscall, fn: Callable[[], tuple[int, int]]) -> tuple[int, int]:
        """Make the call itself: for a blocking call, without the runner's lock, noting
        when it returned."""
        if call.end is None:
            return fn()
        worker = self._worker
        assert worker is not None
        worker.running = True
        worker.start_time = self.now()
        self._lock.release()
        try:
            return fn()
        finally:
            worker.end_time = self.now()
            self._lock.acquire()

    def _enqueue(self, call: Syscall, event: Event) -> None:
        if not self._await_idle(error=True):
            raise self.fail(
                "blocking system call while another blocking system call is already in progress"
            )
        self._wait_for(event)
        if self._worker is None:
            self._worker = _Worker(self)
        self._worker.start(call, event)
        # Until the call sleeps in the kernel (or is done): then the script goes on.
        self._lock.release()
        try:
            self._worker.wait_blocked()
        finally:
            self._lock.acquire()
        # packetdrill's main thread goes on the moment the call blocks, about when it
        # entered the kernel; seeing it blocked in /proc may take a few ms on a busy
        # machine, which must not move the next relative time (_anchor).
        if self._worker.start_time >= 0:
            self._done_at = self._worker.start_time

    def _await_idle(self, *, error: bool) -> bool:
        worker = self._worker
        if worker is None or worker.idle():
            return True
        self._lock.release()
        try:
            done = worker.wait_idle(BLOCKING_WAIT)
        finally:
            self._lock.acquire()
        self._check_worker()
        return done or not error

    def _check_worker(self) -> None:
        if self._worker is not None:
            self._worker.raise_error()

    def _finish_worker(self) -> None:
        worker = self._worker
        if worker is None:
            return
        if not worker.wait_idle(BLOCKING_WAIT):
            line = worker.event.line if worker.event is not None else 0
            raise self.fail(
                "runtime error: exiting while a blocking system call is in progress", line=line
            )
        worker.raise_error()

    # system calls' view of the sockets (run_syscall_* in run_system_call.c)
    def fd(self, script_fd: Any) -> FdEntry:
        entry = self.fds.get(script_fd) if isinstance(script_fd, int) else None
        if entry is None or entry.closed:
            raise _sys.SyscallFailed(f"unable to find fd with script fd {script_fd}")
        return entry

    def new_fd(self, script_fd: int, obj: Any, *, check: bool = True) -> FdEntry:
        """Track a new fd under the script's number. ``check``: refuse one still open
        (check_duplicate_fd(), as socket() and friends do; accept() does not check)."""
        old = self.fds.get(script_fd)
        if check and old is not None and not old.closed:
            raise _sys.SyscallFailed(f"duplicate fd {script_fd} in script")
        entry = self.fds[script_fd] = FdEntry(script_fd, obj)
        self._all_fds.append(entry)
        return entry

    def new_socket(
        self, script_fd: int, sock: socket.socket, domain: int, kind: int, proto: int
    ) -> None:
        if script_fd < 0:
            raise _sys.SyscallFailed(f"invalid socket fd {script_fd} in script")
        entry = self.new_fd(script_fd, sock)
        protocol = proto or (IPPROTO_TCP if kind & 0xF == socket.SOCK_STREAM else IPPROTO_UDP)
        if kind & 0xF == socket.SOCK_DGRAM and proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
            protocol = proto
        entry.state = SockState("new", protocol, script_fd)
        self._sockets.append(entry.state)
        self.under_test = entry.state
        if protocol == IPPROTO_TCP and self._wanted_cc and _read_cc() != self._wanted_cc:
            # defaults.sh's cubic, which this namespace may not make its default
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, self._wanted_cc.encode())
            except OSError:
                pass

    def _entry_of(self, state: SockState | None) -> FdEntry | None:
        if state is None:
            return None
        entry = self.fds.get(state.script_fd)
        if entry is None or entry.closed or entry.state is not state:
            return None
        return entry

    def _addr(self, ip: str) -> str:
        """A wire address as the socket's family writes it (mapped for the mapped variant)."""
        if self.config.ip_version == "ipv4-mapped-ipv6":
            return "::ffff:" + ip
        return ip

    def bind_address(self, entry: FdEntry) -> tuple[Any, ...]:
        ip = self._addr(self.config.local_ip)
        if entry.sock.family == socket.AF_INET6:
            return (ip, self.config.bind_port, 0, 0)
        return (self.config.local_ip, self.config.bind_port)

    def connect_address(self, entry: FdEntry) -> tuple[Any, ...]:
        if entry.sock.family == socket.AF_INET6:
            return (self._addr(self.config.remote_ip), self.config.connect_port, 0, 0)
        return (self.config.remote_ip, self.config.connect_port)

    def listening(self, entry: FdEntry) -> None:
        assert entry.state is not None
        entry.state.state = "listening"

    def connecting(
        self, entry: FdEntry, *, disconnect: bool = False, must_be_new: bool = False
    ) -> None:
        """run_syscall_connect(): a new socket starts connecting to the remote host."""
        st = entry.state
        assert st is not None
        if disconnect:
            st.state = "new"
            return
        if st.state != "new":
            if must_be_new:
                raise _sys.SyscallFailed("socket is not new")
            return
        st.state = "connecting"
        st.script = _Tuple()
        st.live = _Tuple(remote=(self.config.remote_ip, self.config.connect_port))

    def accepted(self, script_fd: int, child: socket.socket) -> None:
        """run_syscall_accept(): the child socket the SYN made gets its fd."""
        try:
            port = child.getpeername()[1]
        except OSError:
            port = None
        waiting = [
            st
            for st in reversed(self._sockets)
            if st.state in ("synack_sent", "synack_acked") and st.script_fd < 0
        ]
        # The child whose SYN came from the accepted address; packetdrill takes the newest.
        match = [st for st in waiting if st.live.remote[1] == port] or waiting
        if not match:
            child.close()
            raise _sys.SyscallFailed("unable to find socket matching accept() call")
        st = match[0]
        entry = self.new_fd(script_fd, child, check=False)
        entry.state = st
        st.script_fd = script_fd

    def closed(self, entry: FdEntry) -> None:
        entry.closed = True

    def check_cmsgs(
        self, expected: list[dict[str, Any]], got: list[tuple[int, int, bytes]]
    ) -> None:
        _check_cmsgs(self, expected, got)

    # -- packets -------------------------------------------------------------------------
    def _socket_for(self, spec: PacketSpec, line: int) -> SockState:
        """find_or_create_socket_for_script_packet()."""
        st = self.under_test
        if spec.proto == "tcp":
            syn = "S" in spec.flags
            ack = "." in spec.flags
            if spec.direction == "<" and (st is None or st.state == "listening"):
                # handle_listen_for_script_packet(): a child for this SYN
                child = SockState("packet_received", IPPROTO_TCP)
                child.script = _Tuple(remote_isn=spec.seq)
                child.live = _Tuple(
                    local=(
                        self.config.local_ip,
                        spec.ports[1] if spec.ports else self.config.bind_port,
                    ),
                    remote=(self.config.remote_ip, self._ephemeral_port()),
                    remote_isn=spec.seq,
                )
                self._sockets.append(child)
                self.under_test = child
                return child
            if (
                spec.direction == ">"
                and syn
                and not ack
                and st is not None
                and st.state == "connecting"
            ):
                st.state = "syn_sent"
                st.script.local_isn = spec.seq
                return st
        if st is not None:
            if st.protocol == IPPROTO_TCP and spec.proto in ("tcp", "icmp"):
                return st
            if st.protocol == IPPROTO_UDP and spec.proto in ("udp", "icmp"):
                return st
            if spec.ports:
                return st
        raise self.fail("error handling packet: no matching socket for script packet", line=line)

    def _ephemeral_port(self) -> int:
        """packetdrill's ephemeral_port(): a port free in the namespace, from a socket the
        kernel gives one (the first one is kept for the next passive open)."""
        family = socket.AF_INET if self.config.wire_family == 4 else socket.AF_INET6
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            return int(s.getsockname()[1])

    # inbound: map the script's packet to live values and write it (do_inbound_script_packet)
    def inbound(self, spec: PacketSpec, event: Event) -> None:
        st = self._socket_for(spec, event.line)
        if spec.proto == "tcp":
            if st.state == "synack_sent" and "." in spec.flags:
                st.state = "synack_acked"
            elif st.state == "syn_sent" and "S" in spec.flags and "." in spec.flags:
                st.state = "syn_acked"
                st.script.remote_isn = st.live.remote_isn = spec.seq
        frame, gso = self._build_inbound(spec, st, event.line)
        if gso or len(frame) > self.config.mtu:
            # --mss: every TCP segment carries that gso_size, as packetdrill's tun write
            # gives it; longer than the MTU: whole, as packetdrill writes it into its TUN.
            self.peer.send(frame, gso_size=gso)
        else:
            self.peer.send(frame)
        self._done_at = self.now()
        self.packets_in += 1

    def _ips(self) -> tuple[bytes, bytes]:
        """(remote, local) packed: an inbound packet's source and destination."""
        return (
            ipaddress.ip_address(self.config.remote_ip).packed,
            ipaddress.ip_address(self.config.local_ip).packed,
        )

    def _build_inbound(self, spec: PacketSpec, st: SockState, line: int) -> tuple[bytes, int]:
        src, dst = self._ips()
        live = st.live
        sport, dport = live.remote[1], live.local[1]
        if spec.ports:
            sport, dport = spec.ports
        ip = spec.ip
        tos = ip.tos if ip.tos_check in ("ecn", "tos") else 0
        ttl = ip.ttl or 255
        if spec.proto == "udp":
            l4 = _build.udp(src, dst, sport, dport, bytes(spec.length))
            proto = IPPROTO_UDP
        elif spec.proto == "icmp":
            l4, proto = self._build_icmp(spec, st, src, dst, line)
        else:
            proto = IPPROTO_TCP
            is_syn = "S" in spec.flags
            seq = (spec.seq + (0 if is_syn else live.remote_isn)) % 2**32
            ack_off = (live.local_isn - st.script.local_isn) if is_syn else live.local_isn
            ack = (spec.ack + ack_off) % 2**32 if "." in spec.flags else spec.ack
            options = list(spec.options or ())
            if options_length(options) % 4:
                raise self.fail(
                    "TCP options are not padded correctly to ensure TCP header is a multiple "
                    f"of 4 bytes: {options_length(options) % 4} excess bytes",
                    line=line,
                )
            mapped: list[TcpOption] = []
            for name, value in options:
                if name == "sack":
                    value = tuple(((a + ack_off) % 2**32, (b + ack_off) % 2**32) for a, b in value)
                elif name == "TS" and "." in spec.flags:
                    value = (value[0], self._live_ecr(st, value[1], line))
                mapped.append((name, value))
            bits, _ace = flag_bits(spec.flags)
            try:
                opts = encode_options(mapped)
            except ValueError as exc:
                raise self.fail(str(exc), line=line) from None
            l4 = _build.tcp(
                src,
                dst,
                sport,
                dport,
                seq=seq,
                ack=ack,
                flags=bits,
                window=spec.window or 0,
                options=opts,
                payload=bytes(spec.length),
                urgent=spec.urg,
            )
        frame = _build.ip_packet(src, dst, proto, l4, ttl=ttl, tos=tos, flowlabel=ip.flowlabel)
        gso = self.config.mss if spec.proto == "tcp" and self.config.mss else 0
        return frame, gso

    def _live_ecr(self, st: SockState, script_ecr: int, line: int) -> int:
        """map_inbound_packet(): an inbound TS ecr names a TS val the kernel sent."""
        if script_ecr in st.ts_map:
            return st.ts_map[script_ecr]
        if self.config.tcp_ts_ecr_scaled and st.first_ts is not None:
            return (script_ecr - st.first_ts[0] + st.first_ts[1]) % 2**32
        raise self.fail(
            f"error handling packet: unable to infer live TS ecr for script TS ecr {script_ecr};  "
            "no matching or preceding outbound TS val",
            line=line,
        )

    def _build_icmp(
        self, spec: PacketSpec, st: SockState, src: bytes, dst: bytes, line: int
    ) -> tuple[bytes, int]:
        v4 = len(src) == 4
        kind, code = _icmp_numbers(spec.icmp_type, spec.icmp_code, v4)
        if kind is None or code is None:
            raise self.fail(
                f"unknown ICMP type/code {spec.icmp_type} {spec.icmp_code or ''}", line=line
            )
        rest = spec.icmp_id << 16 if spec.icmp_type.startswith("echo") else 0
        if spec.icmp_mtu is not None:
            rest = spec.icmp_mtu & 0xFFFF if v4 else spec.icmp_mtu
        proto_name, start, length = spec.echoed
        body = b""
        if proto_name in ("tcp", "udp"):
            # The echoed packet: the socket's outbound IP header and its first 8 bytes
            # (ports and, for TCP, the sequence number in live numbers).
            inner_proto = IPPROTO_TCP if proto_name == "tcp" else IPPROTO_UDP
            l4_len = (20 if proto_name == "tcp" else 8) + length
            inner_src, inner_dst = dst, src
            inner = _build.ip_header(inner_src, inner_dst, inner_proto, l4_len, ttl=0)
            lp, rp = st.live.local[1], st.live.remote[1]
            if proto_name == "tcp":
                seq = (start + st.live.local_isn) % 2**32
                inner += struct.pack("!HHI", lp, rp, seq)
            else:
                inner += struct.pack("!HHHH", lp, rp, 8 + length, 0)
            body = inner
        elif proto_name == "raw":
            body = bytes(max(0, length - 8))
        msg = _build.icmp(src, dst, kind, code, rest, body)
        return msg, IPPROTO_ICMP if v4 else IPPROTO_ICMPV6

    # outbound: sniff the socket's next packets, map them, compare (do_outbound_script_packet)
    def outbound(self, spec: PacketSpec, event: Event) -> None:
        st = self._socket_for(spec, event.line)
        if (
            spec.proto == "tcp"
            and st.state == "packet_received"
            and "S" in spec.flags
            and "." in spec.flags
        ):
            st.script.local_isn = spec.seq
        last = self._last_script_time
        ahead = max(event.time - last, (event.end or event.time) - last) / 1e6
        deadline = (
            None if event.time_kind == ANY else time.monotonic() + max(0.0, ahead) + SNIFF_EXTRA
        )
        # how far the expected packet's start time lies from now, for the timeout message
        got: list[Packet] = []
        total = 0
        # Segments of one TSO burst (the kernel's GSO cuts it before the device here) are
        # taken together until they carry the script's payload, as packetdrill aggregates
        # them; --strict_segments compares one packet at a time.
        while True:
            pkt = self._sniff(st, spec, deadline, event)
            if (
                spec.proto == "tcp"
                and st.state == "packet_received"
                and "S" in spec.flags
                and "." in spec.flags
            ):
                st.state = "synack_sent"
                st.live.local_isn = pkt.tcp_seq or 0
            if got and not _continues(got[-1], pkt):
                raise self.fail(
                    "aggregate candidate packet does not continue the previous one "
                    f"(expected {spec.length} bytes in all, {total} so far)",
                    expected=self._dump_script(spec, event),
                    actual=f"{pkt.arrival + self.peer.packets.t0 - self._start:9.6f} {_live_text(pkt)}",
                )
            got.append(pkt)
            total += len(pkt.payload or b"") if spec.proto != "icmp" else 0
            if spec.proto != "tcp" or total >= spec.length or self.config.strict_segments:
                break
        self.packets_out += 1
        self._verify(spec, st, got, total, event)

    def _sniff(
        self, st: SockState, spec: PacketSpec, deadline: float | None, event: Event
    ) -> Packet:
        """The kernel's next packet of the socket under test (others are passed over, as
        packetdrill passes over packets of other sockets)."""
        while True:
            wait = 0.05 if deadline is None else min(0.05, deadline - time.monotonic())
            if wait <= 0 and deadline is not None:
                raise self.fail(
                    "timed out waiting for packet",
                    expected=self._dump_script(spec, event),
                    actual=None,
                )
            self._lock.release()
            try:
                new = self.peer.packets.wait_new(self._cursor, max(0.0, wait))
            finally:
                self._lock.acquire()
            self._check_worker()
            for pkt in new:
                self._cursor = pkt.seq
                if self._matches_socket(st, pkt):
                    self.peer._looked.add(pkt.seq)
                    return pkt

    def _matches_socket(self, st: SockState, pkt: Packet) -> bool:
        """find_socket_for_live_packet() / find_connect_for_live_packet(): outbound from
        the socket under test, by its live 4-tuple, or the SYN of a connecting socket."""
        if pkt.ip_version is None or _norm(pkt.src) != _norm(self.config.local_ip):
            return False
        if _norm(pkt.dst) != _norm(self.config.remote_ip):
            return False
        proto = pkt.ip_proto
        if proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
            return st.protocol in (IPPROTO_ICMP, IPPROTO_ICMPV6) or st.protocol == IPPROTO_UDP
        live = st.live
        if live.local[1] and (pkt.sport, pkt.dport) == (live.local[1], live.remote[1]):
            return True
        if (
            st.state in ("connecting", "syn_sent")
            and proto == st.protocol
            and pkt.dport == live.remote[1]
        ):
            if (
                proto == IPPROTO_TCP
                and pkt.flags is not None
                and not ("S" in pkt.flags and "A" not in pkt.flags)
            ):
                return False
            # A connecting socket's first packet: its local port is learnt here.
            live.local = (self.config.local_ip, pkt.sport or 0)
            if proto == IPPROTO_TCP:
                live.local_isn = pkt.tcp_seq or 0
            return True
        return False

    def _dump_script(self, spec: PacketSpec, event: Event) -> str:
        t = f"{event.time / 1e6:9.6f}"
        if spec.proto != "tcp":
            return f"{t} {_nontcp_text(spec)}"
        seg = _script_seg(spec)
        return f"{t} {seg.text()}"

    def _verify(
        self, spec: PacketSpec, st: SockState, got: list[Packet], total: int, event: Event
    ) -> None:
        """verify_outbound_live_packet(): headers, options, payload, then the time (of the
        first segment: a TSO burst leaves at once)."""
        first = got[0]
        when = first.arrival + self.peer.packets.t0 - self._start
        self._done_at = got[-1].arrival + self.peer.packets.t0 - self._start
        expected_text = self._dump_script(spec, event)
        if spec.proto != "tcp":
            self._verify_nontcp(spec, first, when, event, expected_text)
            return
        actual = self._actual_seg(st, got, total, spec)
        actual.time = when
        actual_text = f"{when:9.6f} {actual.text()}  ({self._in_trace(got)})"
        if first.ip_proto != IPPROTO_TCP:
            raise self.fail(
                f"live packet header layer 1: expected: TCP header vs actual: "
                f"{first.proto or 'unknown'} header",
                expected=expected_text,
                actual=f"{when:9.6f} {_live_text(first)}",
            )
        if total != spec.length:
            raise self.fail(
                f"live packet payload: expected {spec.length} bytes vs actual {total} bytes",
                expected=expected_text,
                actual=actual_text,
            )
        script = _script_seg(spec)
        diff = compare_segments(script, actual, spec, self.config)
        ip_diff = self._ip_diff(spec, st, first)
        if diff or ip_diff:
            lines = ip_diff + diff
            raise self.fail(
                "live packet field " + lines[0],
                expected=expected_text,
                actual=actual_text,
                diff=lines,
            )
        payload = b"".join(p.payload or b"" for p in got)
        if payload != bytes(len(payload)):
            raise self.fail(
                "incorrect outbound data payload", expected=expected_text, actual=actual_text
            )
        if event.time_kind != ANY:
            self.timing.append(("outbound packet", when - event.time / 1e6))
        error = self.check_time(
            event.time_kind, event.time, event.end, when, self._last_time(), "outbound packet"
        )
        if error:
            raise self.fail(error, expected=expected_text, actual=actual_text)

    def _ip_diff(self, spec: PacketSpec, st: SockState, pkt: Packet) -> list[str]:
        out = []
        tclass = _tclass(pkt)
        ip = spec.ip
        if ip.tos_check == "ect01" and tclass & 3 not in (1, 2):
            out.append(f"ip_ecn: expected: 0x1 or 0x2 vs actual: 0x{tclass & 3:x}")
        elif ip.tos_check == "ecn" and tclass & 3 != ip.tos:
            out.append(
                f"ip_ecn: expected: {ip.tos} (0x{ip.tos:x}) vs actual: {tclass & 3} (0x{tclass & 3:x})"
            )
        elif ip.tos_check == "tos" and tclass != ip.tos:
            out.append(f"tos: expected: {ip.tos} (0x{ip.tos:x}) vs actual: {tclass} (0x{tclass:x})")
        if ip.ttl and pkt.ttl != ip.ttl:
            out.append(f"ttl: expected: {ip.ttl} vs actual: {pkt.ttl}")
        if ip.flowlabel and pkt.ip_version == 6:
            live = _flowlabel(pkt)
            if not live:
                out.append("flowlabel unmarked in the live packet")
            elif st.flowlabel is None or (
                ip.flowlabel != st.flowlabel[0] and live != st.flowlabel[1]
            ):
                st.flowlabel = (ip.flowlabel, live)
            elif ip.flowlabel != st.flowlabel[0]:
                out.append("expected a different flowlabel but got the same")
            elif live != st.flowlabel[1]:
                out.append(
                    f"inconsistent flowlabels for this packet: expected: 0x{st.flowlabel[1]:x} vs actual: 0x{live:x}"
                )
        return out

    def _in_trace(self, pkts: Sequence[Packet]) -> str:
        """Where ``pkts`` are in the report's trace (``tun_pair.packets``' numbers and
        times, not the peer's own)."""
        refs = []
        # The peer gets a packet from the relay before the relay's flush records it in the
        # pair's capture: a failure found at once waits (briefly) for that record, so the
        # report's trace holds the packet it names.
        deadline = time.monotonic() + 1.0
        for p in pkts:
            origin = self.peer._origin.get(p.seq)
            while origin is not None and origin.seq < 0 and time.monotonic() < deadline:
                time.sleep(0.001)
            refs.append(origin if origin is not None and origin.seq >= 0 else p)
        numbers = ", ".join(f"#{p.seq}" for p in refs[:8]) + (", ..." if len(refs) > 8 else "")
        return f"in the trace: {numbers} at {refs[0].time:.6f}"

    def _actual_seg(self, st: SockState, got: list[Packet], total: int, spec: PacketSpec) -> Seg:
        """The live packet (segments aggregated) in the script's numbers: tcp_convert_seq_number()
        and map_outbound_live_packet()."""
        first, last = got[0], got[-1]
        flags = _bits_of(last)
        flags = flags & ~_CWR | (_bits_of(first) & _CWR)
        is_syn = bool(flags & 0x02)
        live = st.live
        seq_off = (live.local_isn - st.script.local_isn) if is_syn else live.local_isn
        ack_off = 0 if is_syn else live.remote_isn
        seq = ((first.tcp_seq or 0) - seq_off) % 2**32
        # tcp_convert_seq_number(): the ACK field is mapped only when the ACK flag is set.
        ack = last.tcp_ack or 0
        if flags & 0x10:
            ack = (ack - ack_off) % 2**32
        options = decode_options(last.tcp_options)
        mapped: list[TcpOption] = []
        script_ts = next((v for n, v in (spec.options or ()) if n == "TS"), None)
        for name, value in options:
            if name == "sack":
                value = tuple(((a - ack_off) % 2**32, (b - ack_off) % 2**32) for a, b in value)
            elif name == "TS" and script_ts is not None:
                val, ecr = value
                st.ts_map[script_ts[0]] = val
                if st.first_ts is None:
                    st.first_ts = (script_ts[0], val)
                value = ((st.first_ts[0] + (val - st.first_ts[1])) % 2**32, ecr)
            mapped.append((name, value))
        return Seg(
            flags=flags,
            seq=seq,
            length=total,
            ack=ack,
            window=last.window,
            urg=_urgent(last),
            options=mapped,
            ace=_script_seg(spec).ace,
            tos=_tclass(first),
            ttl=first.ttl or 0,
            doff=_doff(last),
        )

    def _verify_nontcp(
        self, spec: PacketSpec, pkt: Packet, when: float, event: Event, expected: str
    ) -> None:
        actual = f"{when:9.6f} {_live_text(pkt)}  ({self._in_trace([pkt])})"
        want = {
            "udp": IPPROTO_UDP,
            "icmp": IPPROTO_ICMP if pkt.ip_version == 4 else IPPROTO_ICMPV6,
        }[spec.proto]
        if pkt.ip_proto != want:
            raise self.fail(
                f"live packet header layer 1: expected: {spec.proto} vs actual: {pkt.proto}",
                expected=expected,
                actual=actual,
            )
        if spec.proto == "udp" and len(pkt.payload or b"") != spec.length:
            raise self.fail(
                f"live packet field udp_len: expected: {8 + spec.length} vs actual: "
                f"{8 + len(pkt.payload or b'')}",
                expected=expected,
                actual=actual,
            )
        if spec.proto == "icmp":
            kind, code = _icmp_numbers(spec.icmp_type, spec.icmp_code, pkt.ip_version == 4)
            if pkt.icmp_type != kind or (code is not None and pkt.icmp_code != code):
                raise self.fail(
                    f"live packet field icmp_type/code: expected: {kind}/{code} vs actual: "
                    f"{pkt.icmp_type}/{pkt.icmp_code}",
                    expected=expected,
                    actual=actual,
                )
        diff = self._ip_diff(spec, self.under_test or SockState("new", 0), pkt)
        if diff:
            raise self.fail(
                "live packet field " + diff[0], expected=expected, actual=actual, diff=diff
            )
        error = self.check_time(
            event.time_kind, event.time, event.end, when, self._last_time(), "outbound packet"
        )
        if error:
            raise self.fail(error, expected=expected, actual=actual)


# -- comparing segments (verify_tcp, verify_outbound_live_tcp_options) -------------------------------


def _script_seg(spec: PacketSpec) -> Seg:
    bits, ace = flag_bits(spec.flags)
    return Seg(
        flags=bits,
        seq=spec.seq,
        length=spec.length,
        ack=spec.ack,
        window=spec.window,
        urg=spec.urg,
        options=None if spec.options is None else list(spec.options),
        ace=ace,
    )


def compare_segments(script: Seg, actual: Seg, spec: PacketSpec, config: PktConfig) -> list[str]:
    """The fields of ``actual`` that differ from ``script``, one line each in packetdrill's
    words (``tcp_ack_seq: expected: 2001 vs actual: 1001``); ``[]`` when it matches."""
    out: list[str] = []

    def field_(name: str, want: int, got: int) -> None:
        want, got = int(want), int(got)
        if want != got:
            out.append(f"{name}: expected: {want} (0x{want:x}) vs actual: {got} (0x{got:x})")

    if script.options is not None:
        field_("tcp_data_offset", (20 + options_length(script.options)) // 4, actual.doff)
    for name, bit in (("tcp_fin", 0x01), ("tcp_syn", 0x02), ("tcp_rst", 0x04), ("tcp_psh", 0x08),
                      ("tcp_ack", 0x10), ("tcp_urg", 0x20)):  # fmt: skip
        field_(name, bool(script.flags & bit), bool(actual.flags & bit))
    if script.ace:
        field_("tcp_ace", _ace_of(script.flags), _ace_of(actual.flags))
    else:
        for name, bit in (("tcp_ece", _ECE), ("tcp_cwr", _CWR), ("tcp_ae", _AE)):
            field_(name, bool(script.flags & bit), bool(actual.flags & bit))
    field_("tcp_seq", script.seq, actual.seq)
    field_("tcp_ack_seq", script.ack, actual.ack)
    if script.window is not None and actual.window is not None:
        field_("tcp_window", script.window, actual.window)
    field_("tcp_urg_ptr", script.urg, actual.urg)
    if script.options is not None:
        out.extend(_compare_options(script.options, actual.options or [], config))
    return out


def _compare_options(
    script: list[TcpOption], actual: list[TcpOption], config: PktConfig
) -> list[str]:
    """TCP options must come in the same order, each with the same value -- but a TS val
    only within the tick tolerance (when ``--tcp_ts_tick_usecs`` asks) and no TS ecr."""
    if [n for n, _ in script] != [n for n, _ in actual]:
        return [
            f"bad outbound TCP options: expected: {options_text(script)} actual: {options_text(actual)}"
        ]
    out = []
    for (name, want), (_n, got) in zip(script, actual, strict=True):
        if name in ("nop", "eol"):
            continue
        if name == "TS":
            tick = config.tcp_ts_tick_usecs
            if (
                tick
                and abs(((got[0] - want[0] + 2**31) % 2**32) - 2**31) * tick
                > config.tolerance_usecs + config.slack_usecs
            ):
                out.append(
                    f"bad outbound TCP timestamp value: expected: {want[0]} actual: {got[0]}"
                )
            continue
        if name in ("FO", "FOEXP", "md5"):
            if str(want).lower() != str(got).lower():
                out.append(
                    f"bad value in outbound TCP option ({name}): expected: {want} actual: {got}"
                )
            continue
        if want != got:
            out.append(
                f"bad value in outbound TCP option ({name}): expected: {options_text([(name, want)])} "
                f"actual: {options_text([(name, got)])}"
            )
    return out


# -- small helpers ------------------------------------------------------------------------------------


def _ace_of(bits: int) -> int:
    return (1 if bits & _ECE else 0) | (2 if bits & _CWR else 0) | (4 if bits & _AE else 0)


def _anchored(event: Event) -> bool:
    a = event.action
    return isinstance(a, PacketSpec) and a.direction == "<"


def _describe(event: Event) -> str:
    a = event.action
    if isinstance(a, PacketSpec):
        return "inbound packet" if a.direction == "<" else "outbound packet"
    if isinstance(a, Syscall):
        return "system call start"
    if isinstance(a, Command):
        return "command"
    return "data collection for code"


def _norm(addr: str | None) -> str:
    if addr is None:
        return ""
    return ipaddress.ip_address(addr).compressed


def _bits_of(pkt: Packet) -> int:
    from .._packets.packet import parsed
    from .._wire import headers as _h

    bits = parsed(pkt)[_h.TCP_FLAGS]
    return bits or 0


def _doff(pkt: Packet) -> int:
    from .._packets.packet import parsed
    from .._wire import headers as _h

    f = parsed(pkt)
    return (f[_h.PAYLOAD] - f[_h.L4]) // 4 if f[_h.PAYLOAD] >= 0 and f[_h.L4] >= 0 else 5


def _continues(prev: Packet, pkt: Packet) -> bool:
    """verify_packet_fragments(): the next segment of a burst starts where the previous
    ended, with the same header otherwise -- the same SYN/RST/ACK/URG/ECE/AE flags (FIN,
    PSH and CWR may differ), acknowledgment, window and header length."""
    end = ((prev.tcp_seq or 0) + len(prev.payload or b"")) % 2**32
    mask = 0x02 | 0x04 | 0x10 | 0x20 | _ECE | _AE
    return (
        pkt.tcp_seq == end
        and pkt.tcp_ack == prev.tcp_ack
        and pkt.window == prev.window
        and _doff(pkt) == _doff(prev)
        and _bits_of(pkt) & mask == _bits_of(prev) & mask
    )


def _urgent(pkt: Packet) -> int:
    from .._packets.packet import parsed
    from .._wire import headers as _h

    return _h.tcp_word(pkt.frame, parsed(pkt), 18, 2) or 0


def _tclass(pkt: Packet) -> int:
    from .._packets.packet import parsed
    from .._wire import headers as _h

    return parsed(pkt)[_h.TCLASS] or 0


def _flowlabel(pkt: Packet) -> int:
    from .._packets.packet import parsed
    from .._wire import headers as _h

    f = parsed(pkt)
    l3 = f[_h.L3]
    return int.from_bytes(pkt.frame[l3 + 1 : l3 + 4], "big") & 0xFFFFF


def _live_text(pkt: Packet) -> str:
    """A live packet in packetdrill's short form, without scapy (which a failure report
    loads later; importing it mid-script would delay the script by a second)."""
    proto = pkt.ip_proto
    if proto == IPPROTO_UDP:
        return f"udp ({len(pkt.payload or b'')})"
    if proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
        return f"icmp type {pkt.icmp_type} code {pkt.icmp_code}"
    if proto == IPPROTO_TCP:
        bits = _bits_of(pkt)
        seq, n = pkt.tcp_seq or 0, len(pkt.payload or b"")
        ack = f" ack {pkt.tcp_ack}" if bits & 0x10 else ""
        return f"{flag_text(bits)} {seq}:{(seq + n) % 2**32}({n}){ack} win {pkt.window} (absolute)"
    return f"{pkt.proto or 'ip'} packet of {pkt.wire_len} bytes"


def _nontcp_text(spec: PacketSpec) -> str:
    if spec.proto == "udp":
        return f"udp ({spec.length})"
    code = f" {spec.icmp_code}" if spec.icmp_code else ""
    return f"icmp {spec.icmp_type}{code}"


_ICMP4 = {"echo_reply": 0, "unreachable": 3, "source_quench": 4, "redirect": 5, "echo_request": 8,
          "time_exceeded": 11, "parameter_problem": 12, "timestamp_request": 13,
          "timestamp_reply": 14, "information_request": 15, "information_reply": 16,
          "address_mask_request": 17, "address_mask_reply": 18}  # fmt: skip
_ICMP4_UNREACH = ("net_unreachable", "host_unreachable", "protocol_unreachable",
                  "port_unreachable", "frag_needed", "source_route_failed", "net_unknown",
                  "host_unknown", "source_host_isolated", "net_prohibited", "host_prohibited",
                  "net_unreachable_for_tos", "host_unreachable_for_tos", "packet_filtered",
                  "precedence_violation", "precedence_cutoff")  # fmt: skip
_ICMP6 = {"unreachable": 1, "packet_too_big": 2, "time_exceeded": 3, "parameter_problem": 4,
          "echo_request": 128, "echo_reply": 129}  # fmt: skip
_ICMP6_CODES = {
    1: (
        "net_unreachable",
        "admin_prohibited",
        "not_neighbour",
        "address_unreachable",
        "port_unreachable",
    ),
    3: ("exceeded_hop_limit", "exceeded_frag_time"),
    4: ("header_field", "unknown_next_header", "unknown_option"),
}


def _icmp_numbers(kind: str, code: str | None, v4: bool) -> tuple[int | None, int | None]:
    """parse_icmp_type_and_code(): names (or numbers) as type and code bytes."""
    if v4:
        t = _ICMP4.get(kind)
        codes: Sequence[str] = _ICMP4_UNREACH if t == 3 else ()
    else:
        t = _ICMP6.get(kind)
        codes = _ICMP6_CODES.get(t or -1, ())
        if t == 1 and code == "no_route":
            return t, 0
    if t is None:
        return None, None
    if code is None:
        return t, 0
    if code.isdigit():
        return t, int(code)
    if code in codes:
        return t, codes.index(code) + (1 if not v4 and t == 1 and code != "net_unreachable" else 0)
    return t, None


def _find_unsupported(e: Any) -> str | None:
    if getattr(e, "kind", None) == "unsupported":
        return str(e.value)
    value = getattr(e, "value", None)
    if isinstance(value, tuple):
        for item in value:
            found = _find_unsupported(item)
            if found:
                return found
    if isinstance(value, dict):
        for item in value.values():
            found = _find_unsupported(item)
            if found:
                return found
    return None


def _read_cc() -> str | None:
    try:
        with open("/proc/sys/net/ipv4/tcp_congestion_control") as f:
            return f.read().strip()
    except OSError:
        return None


def _check_namespace(ns: str | None) -> None:
    """Sysctls and commands only ever touch the pair's namespace."""
    if ns and os.stat("/proc/thread-self/ns/net").st_ino != os.stat(ns).st_ino:
        raise RuntimeError("the script runner's thread is not in the pair's network namespace")


def _missing_defaults(text: str, directory: str) -> bool:
    words = text.strip().split()
    return (
        len(words) == 1
        and os.path.basename(words[0]) == "defaults.sh"
        and not os.path.exists(os.path.join(directory, words[0]))
    )


# The shell a command runs in: a mount namespace of its own in which /proc/sys is
# read-only but for /proc/sys/net, which is the pair's namespace's -- so a command's sysctl
# can only ever change the test's namespace, never the host's kernel.* or vm.*.
_GUARD_FAILED = 97
_SANDBOX = (
    "mount --bind /proc/sys/net /proc/sys/net && "
    "mount --rbind /proc/sys /proc/sys && "
    "mount -o remount,bind,ro /proc/sys || exit 97; "
    'exec sh -c "$PKT_CMD"'
)


def _check_timestamp(rt: Runner, body: dict[str, Any], data: bytes, index: int) -> None:
    """scm_timestamping_expect_eq(): the script's ``{scm_sec=, scm_nsec=}`` is a script
    time, the kernel's first timestamp a CLOCK_REALTIME one; 0 is not checked."""
    sec, nsec = int(body["scm_sec"]), int(body["scm_nsec"])
    if not sec and not nsec:
        return
    live_sec, live_nsec = struct.unpack_from("=qq", data)
    start = round(rt._start_wall * 1e6)
    expected = start + sec * 1_000_000 + nsec // 1000
    actual = live_sec * 1_000_000 + live_nsec // 1000
    if abs(expected - actual) > rt.config.tolerance_usecs + rt.config.slack_usecs:
        raise _sys.SyscallFailed(
            f"Bad timestamp 0 in scm_timestamping {index}: expected={expected} "
            f"({expected - start}) actual={actual} ({actual - start}) start={start}"
        )


def _check_cmsgs(
    rt: Runner, expected: list[dict[str, Any]], got: list[tuple[int, int, bytes]]
) -> None:
    """cmsg_expect_eq(): each expected cmsg's level, type and data, in order."""
    for i, (want, (level, kind, data)) in enumerate(zip(expected, got, strict=False)):
        if level != want["cmsg_level"]:
            raise _sys.SyscallFailed(
                f"Bad level in cmsg {i}: expected={want['cmsg_level']} actual={level}"
            )
        if kind != want["cmsg_type"]:
            raise _sys.SyscallFailed(
                f"Bad type in cmsg {i}: expected={want['cmsg_type']} actual={kind}"
            )
        body = want["cmsg_data"]
        if isinstance(body, dict) and body.get("_struct") == "sock_extended_err":
            ee = struct.unpack_from("=IBBBBII", data)
            names = ("ee_errno", "ee_origin", "ee_type", "ee_code", "ee_pad", "ee_info", "ee_data")
            for name, value in zip(names, ee, strict=True):
                if name == "ee_pad":
                    continue
                if value != body[name]:
                    raise _sys.SyscallFailed(
                        f"Bad {name.split('_')[1]} in extended err {i}: expected={body[name]} actual={value}"
                    )
        elif isinstance(body, dict) and body.get("_struct") == "scm_timestamping":
            _check_timestamp(rt, body, data, i)
        elif isinstance(body, int):
            (value,) = struct.unpack_from("=i", data.ljust(4, b"\0"))
            if value != body:
                raise _sys.SyscallFailed(f"Bad data in cmsg {i}: expected={body} actual={value}")
        else:
            raise _sys.SyscallUnsupported("this kind of cmsg_data in recvmsg()")
    if len(got) > len(expected):
        raise _sys.SyscallFailed(f"received more than {len(expected)} cmsgs")
    if len(got) < len(expected):
        raise _sys.SyscallFailed(f"received only {len(got)} cmsgs")


class _Worker:
    """packetdrill's system call thread: one blocking call at a time, while the script
    goes on. Created from the runner's thread, so it is inside the pair's namespace."""

    def __init__(self, rt: Runner) -> None:
        self.rt = rt
        self.event: Event | None = None
        self.call: Syscall | None = None
        self.running = False
        self.end_time = -1.0
        #: When the current call entered the kernel (Runner.now()), -1 before it did.
        self.start_time = -1.0
        self.tid = 0
        self._error: BaseException | None = None
        self._go = threading.Condition()
        self._done = threading.Event()
        self._done.set()
        self._stopping = False
        self._thread = own_thread(self._loop, "tunpair-pkt-syscall")
        self._thread.start()

    def idle(self) -> bool:
        return self._done.is_set()

    def wait_idle(self, timeout: float) -> bool:
        return self._done.wait(timeout)

    def start(self, call: Syscall, event: Event) -> None:
        with self._go:
            self.call, self.event = call, event
            self.running = False
            self.end_time = -1.0
            self.start_time = -1.0
            self._done.clear()
            self._go.notify()

    def wait_blocked(self) -> None:
        """Until the call sleeps in the kernel, or has finished (enqueue_system_call())."""
        while not self._done.is_set():
            if self.running and _sleeping_in_kernel(self.tid):
                return
            time.sleep(_BLOCK_POLL)

    def raise_error(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

    def stop(self) -> None:
        with self._go:
            self._stopping = True
            self._go.notify()

    def _loop(self) -> None:
        self.tid = threading.get_native_id()
        while True:
            with self._go:
                while self.call is None and not self._stopping:
                    self._go.wait()
                if self._stopping:
                    return
                call, event = self.call, self.event
                self.call = None
            assert call is not None and event is not None
            rt = self.rt
            try:
                with rt._lock:
                    try:
                        _sys.run_syscall(rt, call)
                    except _sys.SyscallFailed as exc:
                        raise rt.fail(
                            f"runtime error in {call.name} call: {exc}", line=event.line
                        ) from None
                    except _sys.SyscallUnsupported as exc:
                        raise rt.unsupported(event.line, str(exc)) from None
                    end = rt.now()
                    if self.end_time >= 0:
                        end = self.end_time
                    assert call.end is not None
                    error = rt.check_time(
                        event.time_kind if event.time_kind != ANY else RELATIVE,
                        call.end, None, end, event.time, "system call return",
                    )  # fmt: skip
                    if error:
                        raise rt.fail(error, line=event.line)
            except BaseException as exc:
                self._error = exc
            finally:
                self.running = False
                self._done.set()


def _sleeping_in_kernel(tid: int) -> bool:
    """The thread sleeps in a system call other than futex (a Python lock, the GIL)."""
    try:
        with open(f"/proc/self/task/{tid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        if state not in ("S", "D"):
            return False
        with open(f"/proc/self/task/{tid}/syscall") as f:
            nr = f.read().split()[0]
    except (OSError, IndexError):
        return False
    return nr not in ("running", str(_SYS_FUTEX))


# x86-64 and arm64 numbers of futex(2): a thread waiting there waits for a Python lock.
_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}.get(os.uname().machine, 202)
