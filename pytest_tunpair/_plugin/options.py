"""The plugin's own options, declared once: ``--tunpair-X`` and the ini key ``tunpair_X``.

Each option is one field of :class:`PluginOptions` (``_schema.option``: kind, default, one
help text), as pytest's ``_pytest/logging.py`` declares its options with ``add_option_ini``.
From the fields come the command-line flags and the ini keys (:func:`add`), the values
(:func:`resolve`: command line > ini > default; the marker's own options, such as
``seed=``, beat all three in the pair), and the errors: a bad value is an ``OptionError``
whose ``source`` says where it came from (``--tunpair-seed``, ``ini key tunpair_seed in
/x/tox.ini``), turned into a ``pytest.UsageError`` by :func:`usage_error` alone.

The field name is the ini key and the argparse dest; the flag is the name with dashes.
Nothing heavy is imported here: every run of every project that installs the plugin builds
this table, tunnels or not.
"""

from __future__ import annotations

import os
from dataclasses import Field, dataclass
from pathlib import Path
from typing import Any

import pytest

from .._errors import OptionError
from .._schema import Bool, Choice, Declared, Int, Invalid, Kind, declared, default_of, option

__all__ = [
    "LEFTOVER_POLICIES",
    "PCAP_FORMATS",
    "PCAP_MODES",
    "PKT_IP_VERSIONS",
    "USERNS_MODES",
    "PluginOptions",
    "add",
    "resolve",
]

PCAP_MODES = ("failed", "all")
# _packets/pcap.py's FORMATS, not imported (see below); tests/test_plugin_options.py keeps
# them equal.
PCAP_FORMATS = ("pcapng", "pcap")
# The machinery's own copies (_kernel/procs.py, _kernel/userns.py) are not imported: they
# would load ctypes and secrets into every pytest run. tests/test_plugin_options.py keeps
# them equal.
LEFTOVER_POLICIES = ("kill", "warn", "fail")
USERNS_MODES = ("auto", "always", "never")


class Directory(Kind):
    """A directory, created when the first file is written. A relative one is relative to
    where it was given: where pytest was started (command line), or the ini file."""

    allowed = "a directory"
    metavar = "DIR"

    def check(self, value: object) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.refuse("give the directory to write pcap files to")
        return value.strip()

    def within(self, text: str, base: Path) -> Path:
        directory = (base / os.path.expanduser(text)).resolve()
        if directory.exists() and not directory.is_dir():
            raise self.refuse(
                f"{directory} exists and is not a directory; "
                "give a directory (it is created when the first file is written)"
            )
        return directory


class LiveTarget(Directory):
    """A FIFO that exists (a reader such as ``wireshark -k -i FIFO`` takes one stream for
    the run), or a directory (one growing pcapng file per pair, created when needed)."""

    allowed = "a FIFO or a directory"
    metavar = "FIFO_OR_DIR"

    def check(self, value: object) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.refuse(
                "give a FIFO (mkfifo) for one live stream, or a directory for a file per pair"
            )
        return value.strip()

    def within(self, text: str, base: Path) -> Path:
        import stat

        target = (base / os.path.expanduser(text)).resolve()
        try:
            mode = target.stat().st_mode
        except OSError:
            return target  # a directory, made when the first pair opens
        if not (stat.S_ISFIFO(mode) or stat.S_ISDIR(mode)):
            raise self.refuse(
                f"{target} exists and is neither a FIFO nor a directory; make a FIFO "
                "(mkfifo) for one live stream, or give a directory for a file per pair"
            )
        return target


class Plot(Bool):
    """True or False; True needs matplotlib (looked up, not imported)."""

    def check(self, value: object) -> bool:
        wanted = super().check(value)
        if wanted:
            import importlib.util

            if importlib.util.find_spec("matplotlib") is None:
                raise self.refuse("plots need matplotlib: pip install 'pytest-tunpair[plot]'")
        return wanted


#: packetdrill's ``--ip_version`` values (``_peer/pkt_run.py``'s ``IP_VERSIONS``, repeated
#: here so that building this table imports nothing; tests/test_pkt.py keeps them equal).
PKT_IP_VERSIONS = ("ipv4", "ipv4-mapped-ipv6", "ipv6")


class IpVersions(Kind):
    """Some of packetdrill's ``--ip_version`` values, comma- or space-separated."""

    allowed = "some of ipv4, ipv4-mapped-ipv6, ipv6 (comma-separated)"
    metavar = "LIST"

    def check(self, value: object) -> tuple[str, ...]:
        if isinstance(value, str):
            value = tuple(v for v in value.replace(",", " ").split() if v)
        if not isinstance(value, (tuple, list)) or not value:
            raise self.refuse()
        for v in value:
            if v not in PKT_IP_VERSIONS:
                raise self.refuse(f"{v!r} is no --ip_version: use {self.allowed}")
        return tuple(v for v in PKT_IP_VERSIONS if v in value)

    def format(self, value: Any) -> str:
        return ",".join(value)


@dataclass(frozen=True, repr=False, eq=False)  # fewer generated methods: cheaper import
class PluginOptions:
    """The plugin's options: declared here, resolved once per run by :func:`resolve`
    (``config.stash[keys.OPTIONS]``)."""

    tunpair: bool = option(
        False,
        Bool(),
        "turn on the tun_pair / tun_pair_factory fixtures (tests using them are skipped otherwise)",
    )
    # option() returns a dataclasses.Field (as for the bool fields, which ruff lets pass).
    tunpair_pcap: Path | None = option(  # noqa: RUF009
        None,
        Directory(),
        "write the packet capture of each failed test that used a tunnel to DIR, one pcap "
        "file per pair named after the test id (created if missing)",
    )
    tunpair_pcap_mode: str = option(
        "failed",
        Choice(
            PCAP_MODES,
            reason="use 'failed' (pcap files for failed tests only) "
            "or 'all' (for every test that used a tunnel)",
        ),
        "which tests --tunpair-pcap writes a file for: 'failed' (default) or 'all' "
        "(every test that used a tunnel)",
    )
    tunpair_pcap_format: str = option(
        "pcapng",
        Choice(
            PCAP_FORMATS,
            reason="use 'pcapng' (directions, the relay's actions, TLS secrets) "
            "or 'pcap' (classic libpcap, packets only)",
        ),
        "the format of --tunpair-pcap's files: 'pcapng' (default: each packet's direction "
        "and what the relay did as its comment, the pair's TLS/QUIC secrets embedded) or "
        "'pcap' (classic libpcap, packets only)",
    )
    tunpair_pcap_live: Path | None = option(  # noqa: RUF009
        None,
        LiveTarget(),
        "stream each test's pairs as pcapng while the tests run: into a FIFO (one stream "
        "for the run; `wireshark -k -i FIFO`), or into a directory (a growing file per pair, "
        "named after the test). A reader that goes away stops the stream, never the test",
    )
    tunpair_plot: bool = option(
        False,
        Plot(),
        "with --tunpair-pcap: also draw each pair's throughput and sojourn to a PNG next to "
        "its pcap file (needs matplotlib: pytest-tunpair[plot])",
    )
    tunpair_seed: int | None = option(
        None,
        Int(0),
        "default seed of tun_pair.impair() for the run (a failing test's report states the "
        "seed it used; pass it here to replay). Default: random per test",
    )
    tunpair_leftovers: str = option(
        "warn",
        Choice(LEFTOVER_POLICIES),
        "what to do at teardown with processes a test left running in its tunnel namespace "
        "that tun_pair.spawn() did not start (spawned ones are always stopped): kill them, "
        "warn (default: kill them and emit a warning naming each), or fail (kill them and "
        "fail the test's teardown). Threads it started there and left running are reported "
        "too: a warning under warn and kill (a thread cannot be killed), a failure under fail",
    )
    tunpair_no_pkt: bool = option(
        False,
        Bool(),
        "with --tunpair, leave packetdrill scripts (*.pkt) alone instead of collecting each "
        "as a test run against the pair's kernel",
    )
    tunpair_pkt_ip_versions: tuple[str, ...] = option(
        PKT_IP_VERSIONS,
        IpVersions(),
        "the --ip_version variants each *.pkt script runs in (comma-separated: ipv4, "
        "ipv4-mapped-ipv6, ipv6; default all three, as packetdrill's run_all.py); a script "
        "that sets --ip_version itself runs in that one",
    )
    tunpair_pkt_slack_usecs: int = option(
        0,
        Int(0),
        "microseconds added to every timing tolerance of *.pkt scripts (packetdrill's own, "
        "4000 us or 12.5 percent of the interval, or the script's --tolerance_usecs): an HZ=250 "
        "kernel fires timers up to ~30 ms late, a busy CI machine runs the peer late",
    )
    tunpair_userns: str = option(
        "auto",
        Choice(USERNS_MODES),
        "auto (default): enter a user namespace when the process lacks CAP_NET_ADMIN or "
        "CAP_SYS_ADMIN, so that a normal user can build tunnels; always: even as root; "
        "never: refuse to run unprivileged",
    )


def add(parser: pytest.Parser) -> None:
    """Each option's flag (in the plugin's group) and its ini key, with one help text."""
    group = parser.getgroup("tunpair", "pytest-tunpair: in-kernel TUN/TAP pair fixtures")
    for f, decl in declared(PluginOptions):
        flag = decl.flag(f.name, default_of(f))
        if isinstance(decl.kind, Bool):
            group.addoption(flag, action="store_true", default=None, dest=f.name, help=decl.help)
            parser.addini(f.name, type="bool", default=default_of(f), help=decl.help)
        else:
            # No argparse choices: a bad value gets the same message from either source.
            metavar = decl.kind.metavar
            group.addoption(flag, metavar=metavar, default=None, dest=f.name, help=decl.help)
            parser.addini(f.name, default="", help=decl.help)


def resolve(config: pytest.Config) -> PluginOptions:
    """Every option's value: command line, else ini key, else default.

    Raises ``pytest.UsageError`` for the first bad value, naming where it came from.
    """
    try:
        resolved = PluginOptions(
            **{f.name: _value(config, f, decl) for f, decl in declared(PluginOptions)}
        )
    except OptionError as exc:
        raise usage_error(exc) from None
    if resolved.tunpair_pcap is None:
        # Each says something about the files of --tunpair-pcap: without it, nothing.
        for f, decl in declared(PluginOptions):
            if f.name in NEED_PCAP and getattr(resolved, f.name) != default_of(f):
                given = config.getoption(f.name) is not None
                source = decl.flag(f.name, default_of(f)) if given else _ini_source(config, f.name)
                raise pytest.UsageError(
                    f"{source}: does nothing without --tunpair-pcap DIR (the directory the "
                    "pcap files, and their plots, go to): add it, or leave this out"
                )
    return resolved


#: Options about --tunpair-pcap's files, refused without it (they would do nothing).
NEED_PCAP = frozenset({"tunpair_pcap_mode", "tunpair_pcap_format", "tunpair_plot"})


def usage_error(exc: OptionError) -> pytest.UsageError:
    """The one phrasing of a bad plugin option: ``--tunpair-seed: bad value 'x': use ...``.

    A refused True (``--tunpair-plot`` without matplotlib) was understood, not misspelt:
    its message is the reason alone.
    """
    bad = f"bad value {exc.value!r}: " if isinstance(exc.value, str) else ""
    return pytest.UsageError(f"{exc.source}: {bad}{exc.reason}")


def _value(config: pytest.Config, f: Field[Any], decl: Declared) -> Any:
    name, default = f.name, default_of(f)
    given = config.getoption(name)
    if given is not None:
        source = decl.flag(name, default)
        return _parse(name, decl.kind, given, source, config.invocation_params.dir)
    source = _ini_source(config, name)
    try:
        raw = config.getini(name)
    except (ValueError, TypeError, pytest.UsageError) as exc:  # pytest's own parse (a bool)
        hint = "; use true or false" if isinstance(decl.kind, Bool) else ""
        raise OptionError(name, None, source=source, reason=f"{exc}{hint}") from None
    if isinstance(raw, str):
        raw = raw.strip()
        if not raw:
            return default
    if raw == default:
        return default
    base = config.inipath.parent if config.inipath else config.rootpath
    return _parse(name, decl.kind, raw, source, base)


def _parse(name: str, kind: Kind, raw: object, source: str, base: Path) -> Any:
    """``raw`` (text, or a flag's True) through ``kind``; a relative directory joins ``base``."""
    try:
        value = kind.check(kind.from_text(raw) if isinstance(raw, str) else raw)
        if isinstance(kind, Directory):
            value = kind.within(value, base)
    except Invalid as exc:
        raise OptionError(name, raw, source=source, reason=exc.reason) from None
    return value


def _ini_source(config: pytest.Config, name: str) -> str:
    overrides = config.getoption("override_ini", None) or []
    if any(entry.partition("=")[0].strip() == name for entry in overrides):
        return f"-o {name}"
    return f"ini key {name} in {config.inipath}" if config.inipath else f"ini key {name}"
