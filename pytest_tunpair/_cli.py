"""``tunpair run`` / ``tunpair shell``: the seed's prototyping tool, outside pytest.

tunpair run [options] -- COMMAND [ARGS...]   # COMMAND runs inside a fresh pair's namespace
tunpair shell [options]                      # an interactive shell there instead

The pair is the very ``TunPair`` the fixtures use; this module only adds a process around
it: argument parsing, a child process, signal handling and a live trace. The calling
(main) thread enters the pair's namespace, so the child forked from it lives there too.
"""

from __future__ import annotations

import argparse
import errno
import os
import shlex
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, NoReturn, TextIO

from ._errors import OptionError, PrivilegeError, TunPairError
from ._kernel import userns as _userns
from ._options import PairOptions
from ._packets.capture import Capture
from ._packets.packet import Packet
from ._packets.pcap import FORMATS
from ._packets.stream import Follower, Sink, is_regular, lost_to_bound, open_fifo
from ._pair import TunPair
from ._plugin.report import plural
from ._schema import Bool, Duration, Int, Invalid, declared, default_of

__all__ = ["build_parser", "main"]

#: tunpair itself failed (could not build the pair...): 125, as env(1) and timeout(1) do,
#: so it cannot be mistaken for an exit status of COMMAND.
EXIT_FAILED = 125
EXIT_CANNOT_RUN = 126
EXIT_NOT_FOUND = 127
EXIT_USAGE = 2

# Leftover processes get this long to exit after SIGTERM before SIGKILL.
_LEFTOVER_GRACE = 2.0
# How long the trace printer sleeps on the capture before re-checking whether to stop: it
# bounds how late the tool exits, and costs a handful of wake-ups a second when idle.
_PRINTER_TICK = 0.1
# Longest wait for the printer to load scapy before the command starts anyway.
_PRINTER_READY_TIMEOUT = 30.0
_ENV_KEYS = (
    "TUNPAIR_NETNS",
    "TUNPAIR_A",
    "TUNPAIR_B",
    "TUNPAIR_A_IP",
    "TUNPAIR_B_IP",
    "TUNPAIR_A_IP6",
    "TUNPAIR_B_IP6",
    "TUNPAIR_TRACE",
)
#: Put before the shell's prompt, so that a terminal inside the pair says so.
PROMPT_MARK = "(tunpair) "
# bash reads ~/.bashrc after the environment, and Debian's sets PS1: the mark goes on top
# of it from an rcfile that reads ~/.bashrc first.
_BASH_RC = f"""\
if [ -f ~/.bashrc ]; then . ~/.bashrc; fi
PS1="{PROMPT_MARK}${{PS1-\\s-\\v\\$ }}"
"""


# -- command line -----------------------------------------------------------------------------
def _prog() -> str:
    return "tunpair" if os.path.basename(sys.argv[0]) == "tunpair" else "python -m pytest_tunpair"


_GROUPS = {
    "pair": "the pair (the options of @pytest.mark.tunpair)",
    "capture": "trace and capture",
    "impair": "impairments (pair.impair(...), done in the relay)",
}
# argparse's value for a flag meaning "None" (--no-ipv4): None itself means "not given".
_NONE = object()


def _add_options(groups: dict[str, Any], cls: type, prefix: str) -> None:
    """One flag per declared option of ``cls`` (``_schema``), its help from the declaration."""
    for f, decl in declared(cls):
        if not decl.cli:
            continue
        default = default_of(f)
        flag = decl.flag(f.name, default)
        dest = prefix + f.name
        shown = decl.default_doc or decl.kind.format(default)
        text = f"{decl.help} (default {shown})".replace("%", "%%")
        group = groups[decl.group]
        if isinstance(decl.kind, Bool):
            text = (f"turn off: {decl.help}" if default else decl.help).replace("%", "%%")
            group.add_argument(flag, dest=dest, action="store_const", const=not default, help=text)
            continue
        if decl.none_flag is not None:
            group = group.add_mutually_exclusive_group()
        metavar: Any = ("A", "B") if decl.nargs == 2 else decl.kind.metavar
        group.add_argument(flag, dest=dest, nargs=decl.nargs, metavar=metavar, help=text)
        if decl.none_flag is not None:
            group.add_argument(
                decl.none_flag, dest=dest, action="store_const", const=_NONE, help=f"{f.name}=None"
            )


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The parser; ``run`` and ``shell`` share every pair option."""
    from ._link.impair import ImpairmentSpec

    common = argparse.ArgumentParser(add_help=False)
    groups = {key: common.add_argument_group(title) for key, title in _GROUPS.items()}
    c = groups["capture"]
    c.add_argument("-q", "--quiet", action="store_true", help="no packet trace, no banner")
    c.add_argument("--log", metavar="FILE", help="write the packet trace to FILE, not stderr")
    c.add_argument(
        "--pcap",
        metavar="FILE",
        help="stream every packet as pcapng to FILE while it runs, with the relay's action as "
        "each packet's comment and the TLS/QUIC secrets of the command (SSLKEYLOGFILE) "
        "embedded; '-' streams to stdout (pipe it into `wireshark -k -i -` or `tshark -i -`; "
        "COMMAND's own stdout then goes to stderr); a FIFO works too",
    )
    c.add_argument(
        "--pcap-format",
        choices=FORMATS,
        help="pcapng (default: streamed) or pcap (classic libpcap, packets only, written at exit)",
    )
    c.add_argument(
        "--plot",
        metavar="FILE",
        help="at exit, draw throughput and sojourn to FILE (.png or .svg; needs matplotlib)",
    )
    _add_options(groups, ImpairmentSpec, "impair_")
    _add_options(groups, PairOptions, "pair_")
    groups["impair"].add_argument(
        "--direction", choices=("a->b", "b->a"), help="impair one direction only (default both)"
    )
    groups["impair"].add_argument(
        "--class",
        dest="impair_classes",
        action="append",
        metavar="NAME:FIELDS:PARAMS",
        help="impair only the packets that match FIELDS (as packets.filter() takes them), "
        "as a class of their own with PARAMS (the flags above, without dashes), e.g. "
        "'quic:proto=udp,dport=443:loss=10%%,delay=20ms'; repeatable (the first class "
        "that matches takes a packet)",
    )
    s = common.add_argument_group("scenarios (rules on the link, as pair.outage/path_mtu)")
    s.add_argument(
        "--gemodel",
        metavar="P,R[,LOSS_BAD[,LOSS_GOOD]]",
        help="burst loss: Gilbert-Elliott with p (good->bad) and r (bad->good), e.g. 1%%,30%%",
    )
    s.add_argument(
        "--outage",
        metavar="DURATION[,after=AFTER]",
        action="append",
        help="drop every packet for DURATION, from AFTER on (default: from the start), as "
        "pair.outage(duration, after=...): e.g. 500ms,after=2s; repeatable",
    )
    s.add_argument(
        "--path-mtu",
        metavar="N",
        help="packets over N bytes that may not be fragmented are dropped with an ICMP back",
    )

    parser = argparse.ArgumentParser(
        prog=prog or _prog(),
        description="A TUN/TAP pair routed through a userspace relay, from the shell: "
        "the pytest-tunpair machinery without pytest.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="action", metavar="{run,shell}", required=True)
    run = sub.add_parser(
        "run",
        parents=[common],
        help="run a command inside a fresh pair's namespace, tracing every packet",
        description="Run COMMAND inside a fresh network namespace holding the pair, print "
        "every packet the relay carries to stderr, and exit with COMMAND's status "
        "(128+N if a signal N killed it). Without COMMAND: an interactive shell.",
        usage="%(prog)s [options] -- COMMAND [ARGS...]",
    )
    run.add_argument("command", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    run.set_defaults(parser=run)
    shell = sub.add_parser(
        "shell",
        parents=[common],
        help="an interactive shell ($SHELL) inside a fresh pair's namespace",
        description="Start $SHELL (or /bin/sh) inside a fresh network namespace holding the "
        "pair, after printing the addresses and the nsenter line for other terminals. The "
        f"prompt starts with {PROMPT_MARK.strip()!r}. In a terminal the live trace goes to a "
        "file (the banner names it; `tail -f` it in a second pane) so that it never writes "
        "over the prompt; --log FILE picks the file, --log /dev/stderr the terminal.",
    )
    shell.set_defaults(parser=shell, command=[])
    return parser


@dataclass
class Plan:
    """What to do, validated: nothing is built until all of it is known to be good."""

    command: list[str]
    options: PairOptions
    impair: dict[str, Any] = field(default_factory=dict)
    #: ``impair()`` keywords of each ``--class`` (with ``match`` and ``name``).
    classes: list[dict[str, Any]] = field(default_factory=list)
    direction: str | None = None
    pcap: str | None = None
    pcap_format: str = "pcapng"
    log: str | None = None
    plot: str | None = None
    outages: list[tuple[float, float]] = field(default_factory=list)
    path_mtu: int | None = None
    quiet: bool = False


def _given(
    args: argparse.Namespace, cls: type, prefix: str, parser: argparse.ArgumentParser
) -> tuple[dict[str, Any], dict[str, tuple[str, str]]]:
    """The declared options of ``cls`` given on the command line, as values its check
    takes, and for each the flag and the text the user typed (for messages)."""
    values: dict[str, Any] = {}
    typed: dict[str, tuple[str, str]] = {}
    for f, decl in declared(cls):
        raw = getattr(args, prefix + f.name, None) if decl.cli else None
        if raw is None:
            continue
        flag = decl.flag(f.name, default_of(f))
        if raw is _NONE:
            values[f.name], typed[f.name] = None, (decl.none_flag or flag, "")
        elif isinstance(raw, bool):
            values[f.name], typed[f.name] = raw, (flag, "")
        elif isinstance(raw, list):
            values[f.name], typed[f.name] = tuple(raw), (flag, " ".join(raw))
        else:
            try:
                values[f.name] = decl.kind.from_text(raw)
            except Invalid as exc:
                parser.error(f"argument {flag}: bad value {raw!r}: {exc.reason}")
            typed[f.name] = (flag, raw)
    return values, typed


def _class(parser: argparse.ArgumentParser, text: str) -> dict[str, Any]:
    """``--class NAME:FIELDS:PARAMS`` as ``impair()`` keywords, checked."""
    from ._link.impair import ImpairmentSpec

    def bad(reason: str) -> NoReturn:
        parser.error(f"argument --class: bad value {text!r}: {reason}")

    name, _, rest = text.partition(":")
    fields, _, params = rest.partition(":")
    if not name.strip() or not fields.strip() or not params.strip():
        bad("write NAME:FIELDS:PARAMS, e.g. 'quic:proto=udp,dport=443:loss=10%,delay=20ms'")
    kinds = {f.name: decl for f, decl in declared(ImpairmentSpec) if decl.cli}
    kwargs: dict[str, Any] = {"name": name.strip(), "match": fields}
    for part in filter(None, (p.strip() for p in params.split(","))):
        key, eq, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in kinds:
            bad(f"{part!r}: give PARAM=VALUE with a PARAM among {', '.join(kinds)}")
        try:
            kwargs[key] = kinds[key].kind.from_text(value.strip())
        except Invalid as exc:
            bad(f"{key}: {exc.reason}")
    try:
        ImpairmentSpec.from_kwargs(**kwargs)
    except OptionError as exc:
        bad(exc.reason)
    return kwargs


def _bad(
    parser: argparse.ArgumentParser, exc: OptionError, typed: dict[str, tuple[str, str]]
) -> NoReturn:
    flag, text = typed.get(exc.option, ("--" + exc.option.replace("_", "-"), ""))
    value = f" {text!r}" if text else ""
    parser.error(f"argument {flag}: bad value{value}: {exc.reason}")


_QUEUE_PARAMETERS = ("flows", "quantum", "target", "interval", "ecn")


def make_plan(args: argparse.Namespace) -> Plan:
    """Turn parsed arguments into a :class:`Plan`; bad values end in ``parser.error``."""
    from ._link.impair import ImpairmentSpec

    parser: argparse.ArgumentParser = args.parser
    kwargs, typed = _given(args, PairOptions, "pair_", parser)
    if "ipv4" in kwargs and "ipv6" in kwargs and kwargs["ipv4"] is kwargs["ipv6"] is None:
        parser.error("--no-ipv4 and --no-ipv6 leave the pair without addresses; drop one")
    try:
        options = PairOptions.from_kwargs(kwargs, source=f"tunpair {args.action}")
    except OptionError as exc:
        _bad(parser, exc, typed)

    impair, typed = _given(args, ImpairmentSpec, "impair_", parser)
    if args.gemodel is not None:
        from ._link.gemodel import GilbertElliott

        if "loss" in impair:
            parser.error("argument --gemodel: give --loss or --gemodel, not both")
        try:
            impair["loss"] = GilbertElliott.parse(args.gemodel, source="--gemodel")
        except OptionError as exc:
            parser.error(f"argument --gemodel: bad value {args.gemodel!r}: {exc.reason}")
    for key, value in impair.items():
        # A queue parameter is refused where the queue does not use it: check it with the
        # queue (and ecn with the loss) given beside it.
        with_queue: dict[str, Any] = {}
        if key in _QUEUE_PARAMETERS:
            with_queue = {k: impair[k] for k in ("queue", "loss") if k in impair}
        try:
            # One field at a time, so the message names the flag that is wrong.
            ImpairmentSpec.from_kwargs(**{key: value, **with_queue})
        except OptionError as exc:
            _bad(parser, exc, typed)
    try:
        ImpairmentSpec.from_kwargs(**impair)  # then together (--rate with --trace)
    except OptionError as exc:
        _bad(parser, exc, typed)
    classes = [_class(parser, text) for text in args.impair_classes or ()]
    if args.direction is not None and not impair and not classes:
        flags = [
            decl.flag(f.name, default_of(f)) for f, decl in declared(ImpairmentSpec) if decl.cli
        ]
        parser.error(
            f"argument --direction: nothing to impair; add {', '.join(flags[:-1])} or {flags[-1]}"
        )
    if args.pcap_format is not None and args.pcap is None:
        parser.error(
            f"argument --pcap-format: no capture file to write it to: add --pcap FILE "
            f"(--pcap-format {args.pcap_format} --pcap FILE)"
        )
    args.pcap_format = args.pcap_format or "pcapng"
    if args.pcap == "-":
        if args.pcap_format != "pcapng":
            parser.error("argument --pcap: '-' streams pcapng; drop --pcap-format pcap")
        if sys.stdout.isatty():
            parser.error(
                "argument --pcap: '-' writes pcapng to stdout, which is a terminal: pipe it, "
                "e.g. `tunpair run --pcap - -- COMMAND | wireshark -k -i -`"
            )
    elif args.pcap is not None and _is_fifo(args.pcap) and args.pcap_format != "pcapng":
        parser.error(f"argument --pcap: {args.pcap!r} is a FIFO, which takes pcapng only")
    for flag, path in (("--pcap", args.pcap), ("--log", args.log), ("--plot", args.plot)):
        if path is not None and not (flag == "--pcap" and (path == "-" or _is_fifo(path))):
            problem = _unwritable(path)
            if problem:
                parser.error(f"argument {flag}: cannot write {path!r}: {problem}")
    if args.plot is not None:
        if os.path.splitext(args.plot)[1].lower() not in (".png", ".svg"):
            parser.error(f"argument --plot: {args.plot!r} must end in .png or .svg")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("argument --plot: needs matplotlib: pip install 'pytest-tunpair[plot]'")
    outages = [_outage(parser, text) for text in args.outage or ()]
    path_mtu = None
    if args.path_mtu is not None:
        from ._link.rules import check_mtu

        try:
            path_mtu, _ = check_mtu(Int().from_text(args.path_mtu), True)
        except OptionError as exc:
            parser.error(f"argument --path-mtu: bad value {args.path_mtu!r}: {exc.reason}")
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    return Plan(
        command=command,
        options=options,
        impair=impair,
        classes=classes,
        direction=args.direction,
        pcap=args.pcap,
        pcap_format=args.pcap_format,
        log=args.log,
        plot=args.plot,
        outages=outages,
        path_mtu=path_mtu,
        quiet=args.quiet,
    )


def _outage(parser: argparse.ArgumentParser, text: str) -> tuple[float, float]:
    """``--outage DURATION[,after=AFTER]`` as (after, duration), in the order of
    ``pair.outage(duration, after=...)``; units required, as for --delay.

    The 0.2 form ``AFTER,DURATION`` (two bare durations) still works, with a deprecation
    message giving the new spelling.
    """
    from ._link.rules import check_duration

    usage = "give DURATION[,after=AFTER], e.g. 500ms,after=2s"
    parts = [part.strip() for part in text.split(",")]
    old_order = len(parts) == 2 and "=" not in parts[1]
    if old_order:
        after_text, duration_text = parts
        print(
            f"tunpair: --outage {text}: AFTER,DURATION is deprecated (the order differs from "
            f"pair.outage(duration, after=...)); write --outage {duration_text},after={after_text}",
            file=sys.stderr,
        )
    elif len(parts) == 1:
        duration_text, after_text = parts[0], "0s"
    elif len(parts) == 2 and parts[1].startswith("after="):
        duration_text, after_text = parts[0], parts[1][len("after=") :].strip()
    else:
        parser.error(f"argument --outage: bad value {text!r}: {usage}")
    kind = Duration()
    values = {}
    for name, part in (("after", after_text), ("duration", duration_text)):
        try:
            values[name] = check_duration(name, kind.from_text(part), "--outage")
        except (Invalid, OptionError) as exc:
            parser.error(f"argument --outage: bad value {text!r}: {name}: {exc.reason}")
    return values["after"], values["duration"]


def _is_fifo(path: str) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


def _unwritable(path: str) -> str | None:
    if os.path.isdir(path):
        return "it is a directory"
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        return f"no directory {parent}"
    if os.path.exists(path):
        return None if os.access(path, os.W_OK) else "permission denied"
    return None if os.access(parent, os.W_OK | os.X_OK) else "permission denied"


# -- the live trace ---------------------------------------------------------------------------
class TracePrinter:
    """Prints each packet the relay records, from its own thread.

    The relay never waits for it: the printer sleeps on the capture (``wait_new``) and
    formats what arrived in chunks. Formatting (scapy) holds the GIL, and a relay thread
    returning from read()/write() must wait for the GIL (up to the 5 ms switch interval), so
    an unthrottled printer cut TCP through the pair from 4-8 to 0.4-0.6 Gbit/s. Hence a budget:
    after each chunk the printer sleeps ``1/DUTY - 1`` times as long as it worked, and when
    more than ``MAX_BACKLOG`` packets wait it prints only the newest ``KEEP`` and says how
    many it skipped -- nobody reads thousands of lines a second; ``--pcap`` keeps them all.
    """

    DUTY = 0.2
    CHUNK = 32
    MAX_BACKLOG = 512
    KEEP = 64
    MAX_PAUSE = 0.1

    def __init__(self, capture: Capture, out: TextIO, lock: threading.Lock) -> None:
        self._capture = capture
        self._out = out
        self._lock = lock
        self._stop = threading.Event()
        self._last = -1
        self.skipped = 0
        self.ready = threading.Event()
        self.broken: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="tunpair-trace", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Print what is left, then end the thread (call it after the relay has stopped)."""
        self._stop.set()
        self._thread.join()

    def _main(self) -> None:
        capture = self._capture
        try:
            Packet(0.0, "a->b", "forwarded", b"").summary()  # loads scapy's layers
        finally:
            self.ready.set()
        while self.broken is None:
            stopping = self._stop.is_set()
            new = capture.wait_new(self._last, 0 if stopping else _PRINTER_TICK)
            if not new:
                if stopping:
                    return
                continue
            lines = []
            gap = new[0].seq - self._last - 1
            if gap > 0:
                lines.append(
                    f"... {gap} packets no longer kept by the capture "
                    "(see --capture-bytes, --max-packets)"
                )
            if len(new) > self.MAX_BACKLOG:
                skip = len(new) - self.KEEP
                self.skipped += skip
                lines.append(
                    f"... {skip} packets not shown: too many to print live "
                    "(--pcap FILE keeps every packet)"
                )
                new = new[skip:]
            self._last = new[-1].seq
            for i in range(0, len(new), self.CHUNK):
                began = time.perf_counter()
                for p in new[i : i + self.CHUNK]:
                    lines.append(p.summary())
                    # Let go of the GIL after each packet: a relay thread waiting for it
                    # then waits one summary, not the 5 ms switch interval (ping -i 0.005
                    # through a traced pair: average RTT near --quiet's, not 2-10x it).
                    time.sleep(0)
                self._write(lines)
                lines = []
                if not stopping:  # the relay has stopped once we drain: no need to yield
                    spent = time.perf_counter() - began
                    time.sleep(min(spent * (1 / self.DUTY - 1), self.MAX_PAUSE))

    def _write(self, lines: list[str]) -> None:
        try:
            with self._lock:
                self._out.write("\n".join(lines) + "\n")
                self._out.flush()
        except (OSError, ValueError) as exc:  # the reader went away (EPIPE, closed stderr)
            self.broken = exc


# -- the live pcapng stream (--pcap) -----------------------------------------------------------
class PcapStream:
    """``--pcap FILE|-``: every packet as pcapng while the command runs (a :class:`Follower`
    of the capture into a :class:`Sink`); a regular file is finished with the secrets in
    front at the end."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.name = "stdout" if target == "-" else target
        self.path: str | None = None
        self._own = target != "-"
        if target == "-":
            self.fd = sys.stdout.fileno()
        elif _is_fifo(target):
            self.fd = open_fifo(target)
        else:
            self.fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            # Only a regular file is finished in place (/dev/null, a terminal device: never).
            self.path = target if is_regular(self.fd) else None
        self.sink: Sink | None = None
        self.follower: Follower | None = None

    def follow(self, pair: TunPair) -> None:
        self.sink = Sink(self.fd, name=self.name, path=self.path, own=self._own)
        self.follower = Follower(pair.packets, self.sink, name="tunpair-pcapng").start()

    def stop(self, pair: TunPair) -> None:
        """After the relay stopped: the last packets and secrets, then close."""
        if self.follower is not None:
            self.follower.stop()
        if self.sink is not None:
            self.sink.close(pair.packets.secrets())
        elif self._own:
            os.close(self.fd)

    def discard(self) -> None:
        """The pair never came up: close, and remove a regular file made for nothing."""
        if self._own:
            os.close(self.fd)
        if self.path is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass

    @property
    def problem(self) -> str | None:
        sink = self.sink
        if sink is None or sink.broken is None:
            return None
        return f"the pcapng stream stopped after {plural(sink.packets, 'packet')}: {sink.broken}"

    def summary(self) -> str:
        sink = self.sink
        if sink is None:
            return f"nothing streamed to {self.name}"
        text = f"streamed {plural(sink.packets, 'packet')}"
        if sink.secret_lines:
            text += f" and {plural(sink.secret_lines, 'key log line')}"
        text += f" to {self.name}"
        skipped = self.follower.skipped if self.follower is not None else 0
        if skipped:
            text += f" ({lost_to_bound(skipped, '--capture-bytes/--max-packets')})"
        return text


def _why(exc: OSError, path: str) -> str:
    if exc.errno == errno.ENXIO:
        return (
            "no reader has the FIFO open: start the reader first "
            f"(`wireshark -k -i {path}` or `tshark -i {path}`)"
        )
    return exc.strerror or str(exc)


# -- signals ----------------------------------------------------------------------------------
def _terminal_foreground() -> bool:
    """True when a controlling terminal exists and our process group is its foreground."""
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)


class _Signals:
    """Deliver SIGINT & co. to the child exactly once, and never die before teardown.

    In a terminal's foreground the child stays in our process group, like a command a shell
    runs: Ctrl-C, Ctrl-\\ and hang-ups reach it from the terminal directly (and it can read
    the terminal), so we only take note. Elsewhere the child gets a process group of its
    own, so a signal aimed at our group reaches it only through us: once. SIGTERM never comes
    from a terminal and is always passed on.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
    FROM_TERMINAL = (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP)

    def __init__(self) -> None:
        self.terminal = _terminal_foreground()
        self.child: subprocess.Popen[bytes] | None = None
        self.received: int | None = None
        self._pending: list[int] = []
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        for sig in self.SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
        if self.child is None:
            self._pending.append(signum)  # setup, or the child is being forked: see adopt()
        else:
            self._forward(signum)

    def adopt(self, child: subprocess.Popen[bytes]) -> None:
        """From now on signals go to ``child``; pass on those that came while it was forked."""
        self.child = child
        # Handlers run in this (the main) thread, between bytecodes: one that comes during
        # this loop already sees self.child and forwards by itself. None is lost or doubled.
        while self._pending:
            self._forward(self._pending.pop(0))

    def _forward(self, signum: int) -> None:
        child = self.child
        if child is None or child.returncode is not None:
            return  # teardown finishes, then we exit with the child's status
        if self.terminal and signum in self.FROM_TERMINAL:
            return
        try:
            if self.terminal:
                os.kill(child.pid, signum)
            else:
                os.killpg(child.pid, signum)  # like a terminal: the child's whole group
        except ProcessLookupError:
            pass


# -- one run ----------------------------------------------------------------------------------
class Session:
    """Build the pair, run the command inside, tear down, report."""

    def __init__(self, plan: Plan, *, err: TextIO | None = None) -> None:
        self.plan = plan
        self.err = err or sys.stderr
        self.lock = threading.Lock()
        #: Where the live trace goes when not to ``err`` (--log, or a shell's file).
        self.trace_path: str | None = None
        self.stream: PcapStream | None = None

    def say(self, text: str) -> None:
        with self.lock:
            try:
                self.err.write(f"tunpair: {text}\n")
                self.err.flush()
            except (OSError, ValueError):
                pass

    def run(self) -> int:
        signals = _Signals()
        signals.install()
        trace_file: TextIO | None = None
        try:
            if self.plan.log is not None and not self.plan.quiet:
                trace_file = open(self.plan.log, "w", encoding="utf-8")
                self.trace_path = self.plan.log
            elif self._interactive_shell() and not self.plan.quiet:
                # A shell owns the terminal: lines written while its line editor waits land
                # on the prompt and what is being typed. The trace goes to a file instead,
                # in full and live (flushed per batch), for `tail -f` in a second pane.
                fd, self.trace_path = tempfile.mkstemp(prefix="tunpair-trace-", suffix=".txt")
                trace_file = os.fdopen(fd, "w", encoding="utf-8")
            return self._run(signals, trace_file)
        finally:
            if trace_file is not None:
                trace_file.close()
            signals.restore()

    def _interactive_shell(self) -> bool:
        """``shell`` (or ``run`` alone) in a terminal: there is a prompt to keep clean."""
        return not self.plan.command and self.err.isatty() and sys.stdin.isatty()

    def _run(self, signals: _Signals, trace_file: TextIO | None) -> int:
        plan = self.plan
        stream: PcapStream | None = None
        if plan.pcap is not None and plan.pcap_format == "pcapng":
            try:
                stream = self.stream = PcapStream(plan.pcap)
            except OSError as exc:
                self.say(f"cannot write --pcap {plan.pcap}: {_why(exc, plan.pcap)}")
                return EXIT_FAILED
        pair = TunPair(plan.options)
        printer: TracePrinter | None = None
        if not plan.quiet:
            # Started first: it loads scapy while the pair comes up.
            printer = TracePrinter(pair.packets, trace_file or self.err, self.lock)
            printer.start()
        try:
            try:
                pair.open()
            except (TunPairError, OSError) as exc:
                hint = ""
                if isinstance(exc, PrivilegeError):
                    hint = " (run tunpair as root, or as `unshare -Urn tunpair ...`)"
                self.say(f"cannot set up the pair: {exc}{hint}")
                if stream is not None:
                    stream.discard()
                return EXIT_FAILED
            status = EXIT_FAILED
            if stream is not None:
                stream.follow(pair)
            try:
                if plan.impair:
                    pair.impair(direction=plan.direction, **plan.impair)
                for cls in plan.classes:
                    pair.impair(direction=plan.direction, **cls)
                for after, duration in plan.outages:
                    pair.outage(duration, after=after)
                if plan.path_mtu is not None:
                    pair.path_mtu(plan.path_mtu)
                if printer is not None:
                    # Live means live: without this the first lines wait for scapy's import
                    # (0.3-1 s) and show up after the command has printed its own.
                    printer.ready.wait(_PRINTER_READY_TIMEOUT)
                status = self._inside(pair, signals)
            except TunPairError as exc:
                self.say(str(exc))
            finally:
                failed = self._close(pair)
        finally:
            if printer is not None:
                printer.stop()
            if stream is not None:
                stream.stop(pair)
        if failed and status == 0:
            status = EXIT_FAILED
        if stream is not None and stream.problem is not None:
            # A reader closing early ends the stream, never the command: no status change.
            self.say(f"--pcap {plan.pcap}: {stream.problem}")
        if plan.pcap is not None and stream is None:
            try:
                pair.packets.to_pcap(plan.pcap, format=plan.pcap_format)
            except OSError as exc:
                self.say(f"cannot write --pcap {plan.pcap}: {exc}")
                if status == 0:
                    status = EXIT_FAILED
        if plan.plot is not None:
            try:
                pair.packets.plot(plan.plot)
            except OSError as exc:
                self.say(f"cannot write --plot {plan.plot}: {exc}")
                if status == 0:
                    status = EXIT_FAILED
        if not plan.quiet:
            self.say(self._summary(pair))
        return status

    def _inside(self, pair: TunPair, signals: _Signals) -> int:
        plan = self.plan
        command = plan.command
        if not command:
            shell = os.environ.get("SHELL") or "/bin/sh"
            self._shell_banner(pair, shell)
            return self._run_shell(shell, pair, signals)
        elif not plan.quiet:
            first, *more = self._banner(pair)
            self.say(f"{first}; running: {shlex.join(command)}")
            for line in more:
                self.say(line)
        if signals.received is not None:
            return 128 + signals.received  # interrupted while the pair came up
        try:
            return self._run_child(command, pair, signals)
        finally:
            self._stop_leftovers(pair)

    def _run_shell(self, shell: str, pair: TunPair, signals: _Signals) -> int:
        env = {"PS1": PROMPT_MARK + os.environ.get("PS1", "$ ")}  # sh, dash, ksh: from env
        if os.path.basename(shell) != "bash":
            return self._inside_child([shell], pair, signals, env)
        with tempfile.NamedTemporaryFile("w", prefix="tunpair-bashrc-", suffix=".sh") as rc:
            rc.write(_BASH_RC)
            rc.flush()
            return self._inside_child([shell, "--rcfile", rc.name], pair, signals, env)

    def _inside_child(
        self, command: list[str], pair: TunPair, signals: _Signals, env: dict[str, str]
    ) -> int:
        if signals.received is not None:
            return 128 + signals.received  # interrupted while the pair came up
        try:
            return self._run_child(command, pair, signals, env)
        finally:
            self._stop_leftovers(pair)

    def _banner(self, pair: TunPair) -> list[str]:
        """The pair, then one line per impaired direction with the seed in use."""
        return pair.describe(replay=lambda seed: f"replay with --seed {seed}").splitlines()

    def _shell_banner(self, pair: TunPair, shell: str) -> None:
        for line in self._banner(pair):
            self.say(line)
        for label, end in (("a", pair.a), ("b", pair.b)):
            var = f"$TUNPAIR_{label.upper()}_IP"
            addrs = [(end.ip, var), (end.ip6, var + "6")]
            shown = "  ".join(f"{ip} ({v})" for ip, v in addrs if ip)
            self.say(f"  {label}: {end.name}  {shown}")
        self.say(
            f"other terminals: {nsenter_command(pair)} COMMAND   (valid while this shell runs)"
        )
        if self.trace_path is not None and not self.trace_path.startswith("/dev/"):
            self.say(f"live trace: tail -f {shlex.quote(self.trace_path)}   ($TUNPAIR_TRACE)")
            if os.environ.get("TMUX"):
                self.say(f"  in a tmux pane: tmux split-window -d 'tail -f {self.trace_path}'")
        if self.stream is not None and pair.keylog is not None:
            self.say(
                f"TLS/QUIC secrets: $SSLKEYLOGFILE ({pair.keylog}) goes into --pcap {self.stream.name}"
            )
        self.say(f"starting {shell}; exit it to tear the pair down")

    def _env(self, pair: TunPair) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _ENV_KEYS}
        env["TUNPAIR_NETNS"] = pair.netns_path
        if self.stream is not None and pair.keylog is not None:
            # Secrets only where they end up in a capture (--pcap): the command's TLS
            # clients log them, the stream embeds them.
            env["SSLKEYLOGFILE"] = pair.keylog
        if self.trace_path is not None:
            env["TUNPAIR_TRACE"] = self.trace_path
        for label, end in (("A", pair.a), ("B", pair.b)):
            env[f"TUNPAIR_{label}"] = end.name
            if end.ip:
                env[f"TUNPAIR_{label}_IP"] = end.ip
            if end.ip6:
                env[f"TUNPAIR_{label}_IP6"] = end.ip6
        return env

    def _run_child(
        self,
        command: list[str],
        pair: TunPair,
        signals: _Signals,
        extra_env: dict[str, str] | None = None,
    ) -> int:
        try:
            # Forked from this thread, the child starts inside the pair's namespace.
            child = subprocess.Popen(
                command,
                env={**self._env(pair), **(extra_env or {})},
                process_group=None if signals.terminal else 0,
                # --pcap -: stdout carries the capture, COMMAND's own output goes to stderr.
                stdout=sys.stderr.fileno() if self.plan.pcap == "-" else None,
            )
        except FileNotFoundError:
            self.say(f"{command[0]}: command not found")
            return EXIT_NOT_FOUND
        except OSError as exc:
            self.say(f"cannot run {command[0]}: {exc.strerror or exc}")
            return EXIT_CANNOT_RUN
        signals.adopt(child)
        returncode = child.wait()
        return returncode if returncode >= 0 else 128 - returncode

    def _stop_leftovers(self, pair: TunPair) -> None:
        """End processes COMMAND left in the namespace: its relay is about to go away."""
        from ._kernel.procs import stop_all

        names = stop_all(os.stat(pair.netns_path), grace=_LEFTOVER_GRACE)
        if names:
            self.say(
                f"stopped {plural(len(names), 'process')} left in the namespace: "
                + "; ".join(names)
            )

    def _close(self, pair: TunPair) -> bool:
        try:
            pair.close()
        except Exception as exc:
            self.say(f"the relay failed: {type(exc).__name__}: {exc}")
            return True
        return False

    def _summary(self, pair: TunPair) -> str:
        parts = []
        for d, s in pair.stats.items():
            more = [f"{s['bytes']} bytes"]
            if s["dropped"]:
                more.append(f"{s['dropped']} not delivered")
            if s.get("marked"):
                more.append(f"{s['marked']} ECN-marked")
            if s.get("device_dropped"):
                more.append(f"{s['device_dropped']} dropped by the device before the relay")
            parts.append(f"{d} {plural(s['packets'], 'packet')} ({', '.join(more)})")
        text = "carried " + ", ".join(parts)
        if self.stream is not None:
            text += f"; {self.stream.summary()}"
        elif self.plan.pcap is not None:
            text += f"; wrote {plural(len(pair.packets), 'packet')} to {self.plan.pcap}"
        if self.trace_path is not None and self.plan.log is None:
            text += f"; the trace is in {self.trace_path}"
        return text


def nsenter_command(pair: TunPair) -> str:
    """The ``nsenter`` line that enters the pair's namespace from another terminal."""
    if _userns.in_user_namespace():
        # The namespace belongs to our user namespace (`unshare -Urn`): another process of the
        # same user may enter it only through that user namespace, keeping its own ids.
        return (
            f"nsenter --preserve-credentials --user=/proc/{os.getpid()}/ns/user "
            f"--net={pair.netns_path}"
        )
    return f"nsenter --net={pair.netns_path}"


def _enter_rootless_if_needed() -> None:
    """Enter a user namespace when unprivileged (``_userns.prepare``, the plugin's rules).

    The plugin keeps the host network for tests without a tunnel, so it runs tunnel tests on
    threads that end with them. This one-shot tool needs no way back: when the thread could
    not return from the pair's namespace (setns needs CAP_SYS_ADMIN over the *target's*
    owning user namespace, and the host's is not ours), it first moves the whole process
    into a network namespace of its own to return to.
    """
    from ._kernel import linux as _linux

    status = _userns.prepare("auto", program="tunpair")
    if not status.can_return:
        _linux.unshare(_linux.CLONE_NEWNET)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m pytest_tunpair`` and the ``tunpair`` script; returns the
    exit status (2 for a usage error, COMMAND's status for ``run``)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        plan = make_plan(args)
    except SystemExit as exc:  # argparse: --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    # Rootless, as in the plugin: after parsing (so --help and usage errors stay cheap) and
    # before anything starts a thread (unshare(CLONE_NEWUSER) needs a single-threaded
    # process; Session.run starts the relay and trace threads).
    try:
        _enter_rootless_if_needed()
    except PrivilegeError as exc:
        print(f"tunpair: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return Session(plan).run()
