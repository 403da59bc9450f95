"""packetdrill's script language, read into plain objects: a lexer and a parser, no I/O.

The grammar is packetdrill's own (gtests/net/packetdrill/lexer.l and parser.y in
google/packetdrill): the same tokens with flex's longest-match rule, the same productions,
the same checks and messages where the C parser has them. Nothing here runs anything:
:func:`parse` turns the text of a ``.pkt`` file into a :class:`Script` (options, an init
command, the timed events, a cleanup command) that :mod:`.pkt_run` plays against a pair.

What the grammar accepts but this project cannot play (GRE/MPLS/PSP encapsulation, ...)
parses into :class:`Unsupported` markers, so that a file fails with its line and what is
missing rather than a syntax error -- and never passes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Code",
    "Command",
    "Event",
    "Expr",
    "PacketSpec",
    "PktSyntaxError",
    "Script",
    "Syscall",
    "TcpOption",
    "parse",
    "read_options",
    "tokenize",
]


class PktSyntaxError(ValueError):
    """A script that packetdrill itself would refuse: ``line`` and the reason."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.message = message


# -- tokens (lexer.l) ---------------------------------------------------------------------------

#: Keywords: lexer.l's reserved words, each its own token.
KEYWORDS = frozenset(
    """sa_family sin_port sin_addr msg_name msg_iov msg_flags msg_control cmsg_data
    cmsg_level cmsg_type ee_errno ee_origin ee_type ee_code ee_info ee_data scm_sec scm_nsec
    fd u32 u64 ptr events revents onoff linger htons ipv4 ipv6 icmp udp GREv0 gre raw sum
    off key seq none checksum present encap psp spi mpls label tc ttl inet_addr inet6_addr
    ack eol ecr mss mtu nop sack sackOK md5 TS FO FOEXP ECN e0b e1b ceb tos flowlabel flags
    Flags val win urg wscale ect01 ect0 ect1 noecn ce id""".split()
) | {"sequence#"}

# One alternative per lexer.l rule that can start a token; flex takes the longest match
# and, among equally long ones, the rule written first.
_SEG = r"[0-9a-fA-F]{1,4}"
_V4 = r"[0-9]+[.][0-9]+[.][0-9]+[.][0-9]+"
# Each form of IPv6 address its own alternative: flex takes the longest, where Python's
# alternation would take the first that matches ("fd3d::" of "fd3d::1").
_V6_FORMS = tuple(
    p
    for p in (
        r"::",
        rf"(?:{_SEG}:){{7}}{_SEG}",
        rf"(?:{_SEG}:){{1,7}}:",
        rf"(?:{_SEG}:){{1,6}}:{_SEG}",
        rf"(?:{_SEG}:){{1,5}}(?::{_SEG}){{1,2}}",
        rf"(?:{_SEG}:){{1,4}}(?::{_SEG}){{1,3}}",
        rf"(?:{_SEG}:){{1,3}}(?::{_SEG}){{1,4}}",
        rf"(?:{_SEG}:){{1,2}}(?::{_SEG}){{1,5}}",
        rf"{_SEG}:(?:(?::{_SEG}){{1,6}})",
        rf":(?::{_SEG}){{1,7}}",
        rf"::ffff:{_V4}",
        rf"::ffff:0{{1,4}}:{_V4}",
        rf"(?:{_SEG}:){{1,4}}:{_V4}",
    )
)
_RULES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern))
    for name, pattern in (
        ("ELLIPSIS", r"\.\.\."),
        ("OPTION", r"--[a-zA-Z0-9_]+"),
        ("FLOAT", r"-?[0-9]*\.[0-9]+"),
        ("INTEGER", r"-?[0-9]+"),
        ("HEX_INTEGER", r"0x[0-9a-fA-F]+"),
        ("WORD", r"[a-zA-Z0-9_]+#?"),
        ("STRING", r'"(?:\\.|[^"])*"'),
        ("BACK_QUOTED", r"`(?:\\.|[^`])*`"),
        ("CHAR", r"[^ \t\n]"),
        ("SPACE", r"[ \t\n]+"),
        ("COMMENT", r"//[^\n]*(?:\n|$)"),
        ("COMMENT", r"/\*(?:[^*]|\*(?!/))*\*/"),
        ("CODE", r"%\{(?:[^}]|\}(?!%))*\}%"),
        ("IPV4_ADDR", _V4),
        *(("IPV6_ADDR", form) for form in _V6_FORMS),
    )
)


# The rules that can match at a character (the rest cannot start there): what makes the
# lexer an order of magnitude faster than trying every rule everywhere.
_FIRST = {
    "ELLIPSIS": ".",
    "OPTION": "-",
    "FLOAT": "-.0123456789",
    "INTEGER": "-0123456789",
    "HEX_INTEGER": "0",
    "STRING": '"',
    "BACK_QUOTED": "`",
    "SPACE": " \t\n",
    "COMMENT": "/",
    "CODE": "%",
    "IPV4_ADDR": "0123456789",
    "IPV6_ADDR": "0123456789abcdefABCDEF:",
}
_WORDCHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_"
_BY_FIRST: dict[str, tuple[tuple[str, re.Pattern[str]], ...]] = {
    ch: tuple(
        (kind, pattern)
        for kind, pattern in _RULES
        if kind == "CHAR"
        or (kind == "WORD" and ch in _WORDCHARS)
        or (kind in _FIRST and ch in _FIRST[kind])
    )
    for ch in {c for chars in _FIRST.values() for c in chars} | set(_WORDCHARS)
}
_ANY_FIRST = tuple((kind, pattern) for kind, pattern in _RULES if kind in ("CHAR", "SPACE"))


@dataclass(frozen=True)
class Token:
    """One token: its kind (lexer.l's token name, or ``"CHAR"`` with the character as
    ``text``), its text (the string's contents for STRING and BACK_QUOTED, the code for
    CODE, the name for OPTION), and the line it starts on."""

    kind: str
    text: str
    line: int
    value: Any = None
    pos: int = 0


def tokenize(
    text: str, defines: dict[str, str] | None = None, *, pos: int = 0, line: int = 1
) -> Iterator[Token]:
    """The tokens of ``text`` (from offset ``pos``, on line ``line``), as lexer.l makes
    them. A word that ``defines`` names is replaced by its value, typed as lexer.l's
    ``word()`` types it (a quoted string, a back-quoted command, an integer, or another
    word)."""
    defines = defines or {}
    n = len(text)
    while pos < n:
        best_len, best_kind = 0, ""
        for kind, pattern in _BY_FIRST.get(text[pos], _ANY_FIRST):
            m = pattern.match(text, pos)
            if m is not None and m.end() - pos > best_len:
                best_len, best_kind = m.end() - pos, kind
        if best_kind == "WORD" and text[pos + best_len - 1] == "#":
            # Only "sequence#" carries a '#': any other word stops before it.
            if text[pos : pos + best_len] != "sequence#":
                best_len -= 1
        lexeme = text[pos : pos + best_len]
        start_line, start = line, pos
        line += lexeme.count("\n")
        pos += best_len
        if best_kind in ("SPACE", "COMMENT"):
            continue
        tok = _token(best_kind, lexeme, start_line, defines)
        yield Token(tok.kind, tok.text, tok.line, tok.value, start)


def _token(kind: str, lexeme: str, line: int, defines: dict[str, str]) -> Token:
    if kind == "WORD":
        if lexeme in KEYWORDS:
            return Token(lexeme.upper() if lexeme != "sequence#" else "SEQUENCE", lexeme, line)
        value = defines.get(lexeme)
        if value is None:
            return Token("WORD", lexeme, line)
        if value.startswith('"'):
            return Token("STRING", value[1:-1], line)
        if value.startswith("`"):
            return Token("BACK_QUOTED", value[1:-1], line)
        try:
            return Token("INTEGER", value, line, int(value, 0))
        except ValueError:
            return Token("WORD", value, line)
    if kind == "INTEGER":
        return Token(kind, lexeme, line, int(lexeme))
    if kind == "HEX_INTEGER":
        return Token(kind, lexeme, line, int(lexeme, 16))
    if kind == "FLOAT":
        return Token(kind, lexeme, line, float(lexeme))
    if kind in ("STRING", "BACK_QUOTED"):
        return Token(kind, lexeme[1:-1], line)
    if kind == "OPTION":
        return Token(kind, lexeme[2:], line)
    if kind == "CODE":
        # lexer.l's code(): the text inside %{ }%, spaces and tabs stripped at both ends.
        return Token(kind, lexeme[2:-2].strip(" \t"), line)
    return Token(kind, lexeme, line)


# -- what a script is (parser.y's semantic values) ----------------------------------------------


@dataclass(frozen=True)
class Expr:
    """A system call argument or result, unevaluated: ``kind`` is ``"int"`` (``value`` the
    number, ``hex`` how it was written), ``"word"`` (a symbol), ``"string"``,
    ``"string..."`` (a prefix), ``"ellipsis"``, ``"binary"`` (``value`` = (op, lhs, rhs)),
    ``"list"`` (``value`` = items), ``"struct"`` (``name`` says which: sockaddr, msghdr,
    iovec, pollfd, linger, cmsg, epollev, sock_extended_err, scm_timestamping, in6_addr,
    fields; ``value`` = dict of fields), ``"unsupported"`` (``value`` = what)."""

    kind: str
    value: Any = None
    name: str = ""
    hex: bool = False


@dataclass(frozen=True)
class Syscall:
    """A system call line: ``name(args) = result [ERRNO (note)]``; ``end`` is the
    blocking call's end time (``+0...0.1``), in microseconds, ``None`` if non-blocking."""

    name: str
    args: tuple[Expr, ...]
    result: Expr
    errno: str | None
    note: str | None
    end: int | None


#: A TCP option as written: ``(name, value)`` -- ``("nop", None)``, ``("eol", None)``,
#: ``("mss", 1460)``, ``("wscale", 7)``, ``("sackOK", None)``, ``("sack", ((l, r), ...))``,
#: ``("TS", (val, ecr))``, ``("FO", "hex")``, ``("FOEXP", "hex")``, ``("md5", "hex")``,
#: ``("ECN", (kind, (field, ...)))`` for AccECN.
TcpOption = tuple[str, Any]


@dataclass(frozen=True)
class IpInfo:
    """``[ect0]``, ``(tos 0x10)``, ``[flowlabel 0x12]``, ``(ttl 32)``: what the IP header
    of a packet says or must say. ``tos_check``: ``None``, ``"ecn"`` (``tos`` holds the
    codepoint), ``"ect01"`` (ECT(0) or ECT(1)) or ``"tos"`` (the whole byte)."""

    tos_check: str | None = None
    tos: int = 0
    flowlabel: int = 0
    ttl: int = 0


@dataclass(frozen=True)
class PacketSpec:
    """A packet line. ``direction``: ``"<"`` inbound (the script sends it to the kernel),
    ``">"`` outbound (the kernel must send it). ``proto``: ``"tcp"``, ``"udp"`` or
    ``"icmp"``."""

    direction: str
    proto: str
    ip: IpInfo = IpInfo()
    ports: tuple[int, int] | None = None
    # TCP
    flags: str = ""
    seq: int = 0
    length: int = 0
    ack: int = 0
    window: int | None = None
    urg: int = 0
    #: ``None``: ``<...>``, any options (outbound only).
    options: tuple[TcpOption, ...] | None = ()
    # ICMP
    icmp_type: str = ""
    icmp_code: str | None = None
    icmp_mtu: int | None = None
    icmp_id: int = 0
    #: What an ICMP error echoes: ``("tcp", seq, length)``, ``("udp", 0, length)``,
    #: ``("raw", 0, length)``.
    echoed: tuple[str, int, int] = ("tcp", 0, 0)
    #: Encapsulation this project does not play (gre, mpls, an outer ipv4/ipv6, psp).
    unsupported: str | None = None


@dataclass(frozen=True)
class Command:
    """A back-quoted shell command."""

    text: str


@dataclass(frozen=True)
class Code:
    """A ``%{ }%`` Python snippet, run at the end with the socket's ``tcp_info`` of this
    moment."""

    text: str


# event time kinds (packetdrill's enum event_time_t)
ABSOLUTE, RELATIVE, ANY, ABSOLUTE_RANGE, RELATIVE_RANGE = (
    "absolute",
    "relative",
    "any",
    "absolute_range",
    "relative_range",
)


@dataclass
class Event:
    """One timed line. ``time``/``end`` are microseconds as written (relative ones from
    the previous event until the runner anchors them)."""

    line: int
    time_kind: str
    time: int
    end: int | None
    action: PacketSpec | Syscall | Command | Code
    #: What a relative time was anchored to, in microseconds (set by the runner).
    offset: int = 0


@dataclass
class Script:
    """A parsed ``.pkt`` file."""

    options: list[tuple[str, str | None, int]] = field(default_factory=list)
    init_command: Command | None = None
    init_line: int = 0
    events: list[Event] = field(default_factory=list)
    cleanup_command: Command | None = None
    cleanup_line: int = 0


# -- the parser (parser.y, by recursive descent) ------------------------------------------------


class _Parser:
    def __init__(self, tokens: list[Token]) -> None:
        self.toks = tokens
        self.i = 0

    # token helpers
    def peek(self, k: int = 0) -> Token | None:
        j = self.i + k
        return self.toks[j] if j < len(self.toks) else None

    def at(self, kind: str, text: str | None = None, k: int = 0) -> bool:
        t = self.peek(k)
        return t is not None and t.kind == kind and (text is None or t.text == text)

    def at_char(self, ch: str, k: int = 0) -> bool:
        return self.at("CHAR", ch, k)

    def line(self) -> int:
        t = self.peek()
        if t is not None:
            return t.line
        return self.toks[-1].line if self.toks else 1

    def error(self, message: str, line: int | None = None) -> PktSyntaxError:
        return PktSyntaxError(self.line() if line is None else line, message)

    def take(self, kind: str, what: str | None = None) -> Token:
        t = self.peek()
        if t is None or t.kind != kind:
            got = "the end of the file" if t is None else repr(t.text)
            raise self.error(f"syntax error: expected {what or kind}, got {got}")
        self.i += 1
        return t

    def char(self, ch: str) -> Token:
        return self.take("CHAR", repr(ch)) if self.at_char(ch) else self._expected(repr(ch))

    def _expected(self, what: str) -> Token:
        t = self.peek()
        got = "the end of the file" if t is None else repr(t.text)
        raise self.error(f"syntax error: expected {what}, got {got}")

    def integer(self, what: str = "an integer") -> int:
        t = self.peek()
        if t is not None and t.kind in ("INTEGER", "HEX_INTEGER"):
            self.i += 1
            return int(t.value)
        self._expected(what)
        raise AssertionError  # not reached

    # script
    def script(self) -> Script:
        s = Script()
        while self.at("OPTION"):
            line = self.line()
            name = self.take("OPTION").text
            value = None
            if self.at_char("="):
                self.i += 1
                value = self.option_value()
            s.options.append((name, value, line))
        if self.at("BACK_QUOTED"):
            s.init_line = self.line()
            s.init_command = Command(self.take("BACK_QUOTED").text)
        while self.peek() is not None:
            if self.at("BACK_QUOTED") and self.peek(1) is None:
                s.cleanup_line = self.line()
                s.cleanup_command = Command(self.take("BACK_QUOTED").text)
                break
            s.events.append(self.event())
        if not s.events:
            raise self.error("syntax error: a script needs at least one timed event")
        return s

    def option_value(self) -> str:
        t = self.peek()
        if t is None:
            self._expected("an option value")
            raise AssertionError
        if t.kind in ("INTEGER", "HEX_INTEGER", "IPV4_ADDR", "IPV6_ADDR", "FLOAT"):
            self.i += 1
            return t.text
        if t.kind in ("IPV4", "IPV6"):
            self.i += 1
            return t.text
        if t.kind == "STRING":
            self.i += 1
            return t.text
        if t.kind == "WORD":
            self.i += 1
            if self.at_char("="):  # --define=NAME=value
                self.i += 1
                v = self.peek()
                if v is None or v.kind not in ("WORD", "STRING", "BACK_QUOTED", "INTEGER"):
                    self._expected("a value after '='")
                    raise AssertionError
                self.i += 1
                quote = {"STRING": '"', "BACK_QUOTED": "`"}.get(v.kind, "")
                return f"{t.text}={quote}{v.text}{quote}"
            return t.text
        self._expected("an option value")
        raise AssertionError

    # events
    def event(self) -> Event:
        line = self.line()
        kind, start, end = self.event_time()
        action = self.action()
        if end is not None and end < start:
            raise self.error("time range is backwards", line)
        outbound = isinstance(action, PacketSpec) and action.direction == ">"
        if kind == ANY and not outbound:
            raise self.error("event time <star> can only be used with outbound packets", line)
        if kind in (ABSOLUTE_RANGE, RELATIVE_RANGE) and not outbound:
            raise self.error("event time range can only be used with outbound packets", line)
        return Event(line, kind, start, end, action)

    def event_time(self) -> tuple[str, int, int | None]:
        if self.at_char("*"):
            self.i += 1
            return ANY, 0, None
        if self.at_char("+"):
            self.i += 1
            start = self.time()
            if self.at_char("~"):
                self.i += 1
                self.char("+")
                return RELATIVE_RANGE, start, self.time()
            return RELATIVE, start, None
        start = self.time()
        if self.at_char("~"):
            self.i += 1
            return ABSOLUTE_RANGE, start, self.time()
        return ABSOLUTE, start, None

    def time(self) -> int:
        t = self.peek()
        if t is not None and t.kind in ("FLOAT", "INTEGER"):
            self.i += 1
            if t.value < 0:
                raise self.error("negative time")
            return round(float(t.value) * 1_000_000)
        self._expected("a time (seconds)")
        raise AssertionError

    def action(self) -> PacketSpec | Syscall | Command | Code:
        if self.at_char("<") or self.at_char(">"):
            return self.packet()
        if self.at("BACK_QUOTED"):
            return Command(self.take("BACK_QUOTED").text)
        if self.at("CODE"):
            return Code(self.take("CODE").text)
        return self.syscall()

    # packets
    def packet(self) -> PacketSpec:
        direction = self.take("CHAR").text
        unsupported = None
        # packet_prefix: outer headers (IP-in-IP, GRE, MPLS) before the packet itself.
        prefixes = {
            "IPV4": "an outer IPv4 header (IP-in-IP)",
            "IPV6": "an outer IPv6 header (IP-in-IP)",
            "GRE": "GRE encapsulation",
            "GREV0": "GRE encapsulation",
            "MPLS": "MPLS encapsulation",
        }
        while True:
            t = self.peek()
            if t is None or t.kind not in prefixes:
                break
            # An outer header, up to the ':' that ends it (addresses are single tokens).
            unsupported = unsupported or prefixes[t.kind]
            self.skip_until_char(":")
        ip = self.opt_ip_info()
        if self.at("ENCAP"):
            unsupported = unsupported or "PSP encapsulation"
            self.i += 1
            self.take("PSP", "psp")
            self.take("SPI", "spi")
            self.integer()
        if self.at("UDP"):
            self.i += 1
            ports = self.opt_ports()
            self.char("(")
            length = self.integer("the UDP payload length")
            self.char(")")
            if ip.tos_check == "ecn":
                raise self.error("ECN can only be used with TCP packets")
            _check_range(self, length, 0xFFFF, "UDP payload size out of range")
            return PacketSpec(direction, "udp", ip, ports, length=length, unsupported=unsupported)
        if self.at("ICMP"):
            return self.icmp(direction, ip, unsupported)
        ports = self.opt_ports()
        flags = self.flags()
        seq, length = self.seq()
        ack = 0
        if self.at("ACK"):
            self.i += 1
            ack = self.integer("the ack number")
            _check_range(self, ack, 0xFFFFFFFF, "TCP ack sequence number out of range")
        window = None
        if self.at("WIN"):
            self.i += 1
            window = self.integer("the window")
            _check_range(self, window, 0xFFFF, "TCP window value out of range")
        urg = 0
        if self.at("URG"):
            self.i += 1
            urg = self.integer("the urgent pointer")
            _check_range(self, urg, 0xFFFF, "urg_ptr value out of range")
        options: tuple[TcpOption, ...] | None = ()
        if self.at_char("<"):
            line = self.line()
            self.i += 1
            if self.at("ELLIPSIS"):
                self.i += 1
                self.char(">")
                options = None
                if direction != ">":
                    raise self.error(
                        "<...> for TCP options can only be used with outbound packets", line
                    )
            else:
                options = self.tcp_options()
                self.char(">")
        if direction == "<" and window is None:
            raise self.error("window must be specified for inbound packets")
        if ip.tos_check == "ect01" and direction != ">":
            raise self.error("[ect01] can only be used with outbound packets")
        _check_flags(self, flags)
        return PacketSpec(
            direction,
            "tcp",
            ip,
            ports,
            flags=flags,
            seq=seq,
            length=length,
            ack=ack,
            window=window,
            urg=urg,
            options=options,
            unsupported=unsupported,
        )

    def skip_until_char(self, ch: str) -> None:
        while self.peek() is not None and not self.at_char(ch):
            self.i += 1
        self.char(ch)

    def opt_ports(self) -> tuple[int, int] | None:
        if self.at("INTEGER") and self.at_char(">", 1) and self.at("INTEGER", None, 2):
            src = self.integer()
            self.i += 1
            dst = self.integer()
            _check_range(self, src, 0xFFFF, "src port out of range")
            _check_range(self, dst, 0xFFFF, "dst port out of range")
            return src, dst
        return None

    def opt_ip_info(self) -> IpInfo:
        if not (self.at_char("(") or self.at_char("[")):
            return IpInfo()
        close = ")" if self.at_char("(") else "]"
        # Only ip_info may follow here: a TCP packet never starts with '(' or '['.
        self.i += 1
        tos_check, tos, flowlabel, ttl = None, 0, 0, 0
        if self.at("TTL"):
            self.i += 1
            ttl = self.integer("the TTL")
        elif self.at("FLOWLABEL"):
            flowlabel = self.flowlabel()
        else:
            t = self.peek()
            kind = t.kind if t is not None else ""
            if kind in ("NOECN", "ECT0", "ECT1", "CE"):
                self.i += 1
                tos_check, tos = "ecn", {"NOECN": 0, "ECT1": 1, "ECT0": 2, "CE": 3}[kind]
            elif kind == "ECT01":
                self.i += 1
                tos_check = "ect01"
            elif kind == "TOS":
                self.i += 1
                tos_check, tos = "tos", int(self.take("HEX_INTEGER", "a hex TOS byte").value)
                _check_range(self, tos, 0xFF, "tos out of range for 8 bits")
            else:
                self._expected("ip info (noecn, ect0, ect1, ce, ect01, tos, flowlabel, ttl)")
            if self.at_char(","):
                self.i += 1
                flowlabel = self.flowlabel()
        self.char(close)
        return IpInfo(tos_check, tos, flowlabel, ttl)

    def flowlabel(self) -> int:
        self.take("FLOWLABEL", "flowlabel")
        value = int(self.take("HEX_INTEGER", "a hex flow label").value)
        _check_range(self, value, 0xFFFFF, "flowlabel out of range for 20 bits")
        return value

    def flags(self) -> str:
        # flags: WORD ['.'] | [WORD] FLOAT (ACE digits after the ack) | '.' | '-'
        if self.at_char("-"):
            self.i += 1
            return ""
        text = ""
        if self.at("WORD"):
            text = self.take("WORD").text
            if self.at_char("."):
                self.i += 1
                return text + "."
            if self.at("FLOAT") and self.peek() is not None and self.peek().text.startswith("."):  # type: ignore[union-attr]
                return text + self.take("FLOAT").text
            return text
        if self.at("FLOAT") and self.peek().text.startswith("."):  # type: ignore[union-attr]
            return self.take("FLOAT").text
        if self.at_char("."):
            self.i += 1
            return "."
        self._expected("TCP flags (S, S., P., F., ., R, ...) or udp/icmp")
        raise AssertionError

    def seq(self) -> tuple[int, int]:
        start = self.integer("the start sequence number")
        self.char(":")
        end = self.integer("the end sequence number")
        self.char("(")
        length = self.integer("the payload length")
        self.char(")")
        _check_range(self, start, 0xFFFFFFFF, "TCP start sequence number out of range")
        _check_range(self, end, 0xFFFFFFFF, "TCP end sequence number out of range")
        _check_range(self, length, 0xFFFF, "TCP payload size out of range")
        if end != start + length:
            raise self.error("inconsistent TCP sequence numbers and payload size")
        return start, length

    def tcp_options(self) -> tuple[TcpOption, ...]:
        out = [self.tcp_option()]
        while self.at_char(","):
            self.i += 1
            out.append(self.tcp_option())
        return tuple(out)

    def tcp_option(self) -> TcpOption:
        t = self.peek()
        kind = t.kind if t is not None else ""
        if kind in ("NOP", "EOL", "SACKOK"):
            self.i += 1
            return ({"NOP": "nop", "EOL": "eol", "SACKOK": "sackOK"}[kind], None)
        if kind == "MSS":
            self.i += 1
            value = self.integer("the MSS")
            _check_range(self, value, 0xFFFF, "mss value out of range")
            return ("mss", value)
        if kind == "WSCALE":
            self.i += 1
            value = self.integer("the window scale")
            _check_range(self, value, 0xFF, "window scale shift count out of range")
            return ("wscale", value)
        if kind == "SACK":
            self.i += 1
            blocks = [self.sack_block()]
            while self.at("INTEGER"):
                blocks.append(self.sack_block())
            return ("sack", tuple(blocks))
        if kind == "TS":
            self.i += 1
            self.take("VAL", "val")
            val = self.integer("the TS val")
            self.take("ECR", "ecr")
            ecr = self.integer("the TS ecr")
            _check_range(self, val, 0xFFFFFFFF, "ts val out of range")
            _check_range(self, ecr, 0xFFFFFFFF, "ecr val out of range")
            return ("TS", (val, ecr))
        if kind in ("FO", "FOEXP", "MD5"):
            self.i += 1
            cookie = ""
            if self.at("WORD") or self.at("INTEGER"):
                cookie = self.take(self.peek().kind).text  # type: ignore[union-attr]
            name = {"FO": "FO", "FOEXP": "FOEXP", "MD5": "md5"}[kind]
            return (name, cookie)
        if kind == "ECN":
            self.i += 1
            return ("ECN", self.accecn())
        self._expected(
            "a TCP option (nop, eol, mss, wscale, sackOK, sack, TS, FO, FOEXP, md5, ECN)"
        )
        raise AssertionError

    def sack_block(self) -> tuple[int, int]:
        left = self.integer("a SACK block's left edge")
        self.char(":")
        right = self.integer("a SACK block's right edge")
        return left, right

    def accecn(self) -> tuple[int, tuple[int, ...]]:
        # ECN e0b N [ceb N [e1b N]] | ECN e1b N [ceb N [e0b N]]  (order 0: kind 172, 1: 174)
        first = self.peek()
        if first is None or first.kind not in ("E0B", "E1B"):
            self._expected("e0b or e1b")
            raise AssertionError
        order = ("E0B", "CEB", "E1B") if first.kind == "E0B" else ("E1B", "CEB", "E0B")
        values: list[int] = []
        for name in order:
            if not self.at(name):
                break
            self.i += 1
            value = self.integer("an AccECN counter")
            _check_range(self, value, 0xFFFFFF, "TCP AccECN field value out of range")
            values.append(value)
        return (172 if first.kind == "E0B" else 174), tuple(values)

    def icmp(self, direction: str, ip: IpInfo, unsupported: str | None) -> PacketSpec:
        self.take("ICMP")
        icmp_type = self.take("WORD", "an ICMP type").text
        code = self.take("WORD").text if self.at("WORD") else None
        mtu = None
        if self.at("MTU"):
            self.i += 1
            mtu = self.integer("the MTU")
        ident = 0
        if self.at("ID"):
            self.i += 1
            ident = self.integer("the echo id")
        echoed: tuple[str, int, int] = ("tcp", 0, 0)
        if self.at_char("["):
            self.i += 1
            if self.at("UDP") or self.at("RAW"):
                proto = self.take(self.peek().kind).text  # type: ignore[union-attr]
                self.char("(")
                echoed = (proto, 0, self.integer())
                self.char(")")
            else:
                start, length = self.seq()
                echoed = ("tcp", start, length)
            self.char("]")
        if ip.tos_check == "ect01" and direction != ">":
            raise self.error("[ect01] can only be used with outbound packets")
        return PacketSpec(
            direction,
            "icmp",
            ip,
            icmp_type=icmp_type,
            icmp_code=code,
            icmp_mtu=mtu,
            icmp_id=ident,
            echoed=echoed,
            unsupported=unsupported,
        )

    # system calls
    def syscall(self) -> Syscall:
        end = None
        if self.at("ELLIPSIS"):
            self.i += 1
            end = self.time()
        name = self.take("WORD", "a system call, a packet, a `command` or %{ code }%").text
        self.char("(")
        args: list[Expr] = []
        if not self.at_char(")"):
            args = self.expression_list()
        self.char(")")
        self.char("=")
        result = self.expression()
        errno = note = None
        if self.at("WORD"):
            errno = self.take("WORD").text
            note = self.note()
        elif self.at_char("("):
            note = self.note()
        return Syscall(name, tuple(args), result, errno, note, end)

    def note(self) -> str:
        self.char("(")
        words = []
        depth = 1
        while self.peek() is not None:
            if self.at_char("("):
                depth += 1
            elif self.at_char(")"):
                depth -= 1
                if depth == 0:
                    break
            words.append(self.toks[self.i].text)
            self.i += 1
        self.char(")")
        return " ".join(words)

    def expression_list(self) -> list[Expr]:
        out = [self.expression()]
        while self.at_char(","):
            self.i += 1
            out.append(self.expression())
        return out

    def expression(self) -> Expr:
        lhs = self.primary()
        while self.at_char("|"):
            self.i += 1
            lhs = Expr("binary", ("|", lhs, self.primary()))
        return lhs

    def primary(self) -> Expr:
        t = self.peek()
        if t is None:
            self._expected("an expression")
            raise AssertionError
        if t.kind == "ELLIPSIS":
            self.i += 1
            return Expr("ellipsis")
        if t.kind == "INTEGER":
            self.i += 1
            return Expr("int", int(t.value))
        if t.kind == "HEX_INTEGER":
            self.i += 1
            return Expr("int", int(t.value), hex=True)
        if t.kind == "WORD":
            self.i += 1
            if self.at_char("="):
                self.i += 1
                return Expr("binary", ("=", Expr("word", t.text), self.expression()))
            return Expr("word", t.text)
        if t.kind == "STRING":
            self.i += 1
            if self.at("ELLIPSIS"):
                self.i += 1
                return Expr("string...", t.text)
            text = t.text
            while self.at("STRING"):  # string concatenation
                text += self.take("STRING").text
            return Expr("string", text)
        if t.kind == "CHAR" and t.text == "[":
            self.i += 1
            items: list[Expr] = []
            if not self.at_char("]"):
                items = self.expression_list()
            self.char("]")
            return Expr("list", tuple(items))
        if t.kind == "INET_ADDR":
            self.i += 1
            self.char("(")
            addr = self.take("STRING", "an address string").text
            self.char(")")
            return Expr("struct", {"addr": addr}, name="inet_addr")
        if t.kind == "INET6_ADDR":
            self.i += 1
            self.char("(")
            addr = self.take("STRING", "an address string").text
            self.char(")")
            return Expr("struct", {"addr": addr}, name="in6_addr")
        if t.kind == "CHAR" and t.text == "{":
            return self.braced()
        self._expected("an expression")
        raise AssertionError

    def braced(self) -> Expr:
        """``{...}``: a sockaddr, msghdr, iovec, pollfd, linger, cmsg, epoll event,
        sock_extended_err, scm_timestamping, MPLS stack or GRE header, or a list."""
        self.char("{")
        t = self.peek()
        kind = t.kind if t is not None else ""
        if kind == "ELLIPSIS":  # iovec: {..., len}
            self.i += 1
            self.char(",")
            length = self.expression()
            self.char("}")
            return Expr("struct", {"iov_len": length}, name="iovec")
        if kind in ("FLAGS", "LABEL") or self.at_char("("):
            what = "a GRE header" if kind == "FLAGS" else "an MPLS label stack"
            depth = 1
            while self.peek() is not None and depth:
                depth += self.at_char("{") - self.at_char("}")
                self.i += 1
            return Expr("unsupported", what)
        keyword_structs = {
            "SA_FAMILY": "sockaddr",
            "MSG_NAME": "msghdr",
            "FD": "pollfd",
            "ONOFF": "linger",
            "CMSG_LEVEL": "cmsg",
            "EVENTS": "epollev",
            "EE_ERRNO": "sock_extended_err",
            "SCM_SEC": "scm_timestamping",
        }
        if kind in keyword_structs:
            return self.fields(keyword_structs[kind])
        items = self.expression_list()
        self.char("}")
        return Expr("list", tuple(items), name="braces")

    def fields(self, name: str) -> Expr:
        """``{name = value, ...}`` of a keyword struct; msghdr's ``msg_name(...)`` and
        ``msg_iov(N)`` take their parenthesised part too."""
        out: dict[str, Any] = {}
        while True:
            key_tok = self.peek()
            if key_tok is None:
                self._expected("'}'")
                raise AssertionError
            key = key_tok.text
            self.i += 1
            if key in ("msg_name", "msg_iov") and self.at_char("("):
                self.i += 1
                out[key + "_len"] = self.expression()
                self.char(")")
            self.char("=")
            if key == "sin_port":  # htons(N)
                self.take("HTONS", "htons")
                self.char("(")
                out[key] = Expr("int", self.integer())
                self.char(")")
            else:
                out[key] = self.expression()
            if self.at_char(","):
                self.i += 1
                continue
            self.char("}")
            return Expr("struct", out, name=name)


def _check_range(p: _Parser, value: int, top: int, message: str) -> None:
    if not 0 <= value <= top:
        raise p.error(message)


_VALID_FLAGS = set(".FSRPEWAU01234567")


def _check_flags(p: _Parser, flags: str) -> None:
    ecn = ace = False
    for ch in flags:
        if ch not in _VALID_FLAGS:
            raise p.error(f"Invalid TCP flag: '{ch}'")
        if ch in "EWA":
            if ace:
                raise p.error(f"Conflicting TCP flag: '{ch}'")
            ecn = True
        if ch in "01234567":
            if ecn or ace:
                raise p.error(f"Conflicting TCP flag: '{ch}'")
            ace = True


def read_options(text: str) -> list[tuple[str, str | None, int]]:
    """The ``--name[=value]`` options a script starts with (what decides how to run it,
    before its symbols are known)."""
    p = _Parser(list(_leading_tokens(text)))
    out = []
    while p.at("OPTION"):
        line = p.line()
        name = p.take("OPTION").text
        value = None
        if p.at_char("="):
            p.i += 1
            value = p.option_value()
        out.append((name, value, line))
    return out


def _leading_tokens(text: str) -> Iterator[Token]:
    # The options, and the token after them: enough for read_options().
    for tok in tokenize(text):
        yield tok
        if tok.kind not in (
            "OPTION",
            "CHAR",
            "WORD",
            "STRING",
            "INTEGER",
            "HEX_INTEGER",
            "IPV4_ADDR",
            "IPV6_ADDR",
            "IPV4",
            "IPV6",
            "FLOAT",
            "BACK_QUOTED",
        ):
            return
        if tok.kind == "BACK_QUOTED":
            return


def parse(text: str, defines: dict[str, str] | None = None) -> Script:
    """The :class:`Script` of ``text``; :class:`PktSyntaxError` (with the line) where
    packetdrill's parser would stop. ``defines`` are ``-D NAME=value`` / ``--define``
    symbols, substituted as packetdrill's lexer does; the script's own ``--define``
    options count too."""
    defines = dict(defines or {})
    first = _Parser(list(tokenize(text, defines)))
    # Options come first: a --define among them changes how the rest reads.
    script_defines = {}
    while first.at("OPTION"):
        name = first.take("OPTION").text
        value = None
        if first.at_char("="):
            first.i += 1
            value = first.option_value()
        if name == "define" and value is not None and "=" in value:
            key, _, val = value.partition("=")
            script_defines[key] = val
    if script_defines:
        # The options' own words stay as written; what follows them reads the symbols.
        defines.update(script_defines)
        head = first.toks[: first.i]
        rest = first.toks[first.i] if first.i < len(first.toks) else None
        tail = [] if rest is None else list(tokenize(text, defines, pos=rest.pos, line=rest.line))
        return _Parser(head + tail).script()
    first.i = 0
    return first.script()
