"""packetdrill's script language: the lexer's longest-match corner cases, every construct of
parser.y, and the errors packetdrill's own parser gives -- no devices, no privileges."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_tunpair._peer.pkt_parse import (
    Code,
    Command,
    Expr,
    PacketSpec,
    PktSyntaxError,
    Syscall,
    parse,
    read_options,
    tokenize,
)
from pytest_tunpair._peer.pkt_run import IP_VERSIONS, load

SCRIPTS = sorted((Path(__file__).parent / "packetdrill").glob("*.pkt"))


def kinds(text: str, defines: dict[str, str] | None = None) -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for t in tokenize(text, defines):
        out.append((t.kind, t.value if t.value is not None else t.text))
    return out


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # A sequence range is numbers and punctuation, never an IPv6 address...
        ("1:1001(1000)", [("INTEGER", 1), ("CHAR", ":"), ("INTEGER", 1001), ("CHAR", "("),
                          ("INTEGER", 1000), ("CHAR", ")")]),
        # ... but an address with "::" is one, and so is a mapped one.
        ("fd3d:a0b:17d6::1", [("IPV6_ADDR", "fd3d:a0b:17d6::1")]),
        ("::ffff:192.0.2.1", [("IPV6_ADDR", "::ffff:192.0.2.1")]),
        ("192.0.2.1", [("IPV4_ADDR", "192.0.2.1")]),
        # Relative time, a blocking call's end: '+', 0, "...", a float.
        ("+0...0.100", [("CHAR", "+"), ("INTEGER", 0), ("ELLIPSIS", "..."), ("FLOAT", 0.1)]),
        ("+.1~+.2", [("CHAR", "+"), ("FLOAT", 0.1), ("CHAR", "~"), ("CHAR", "+"), ("FLOAT", 0.2)]),
        ("0x2a -1", [("HEX_INTEGER", 42), ("INTEGER", -1)]),
        # The longest match wins: a cookie is a word, a port a number.
        ("3021b9d889017eeb 8080", [("WORD", "3021b9d889017eeb"), ("INTEGER", 8080)]),
        # Keywords are tokens of their own; "S" and "P" are words (flags).
        ("S. ack win <sackOK,TS val", [("WORD", "S"), ("CHAR", "."), ("ACK", "ack"),
                                       ("WIN", "win"), ("CHAR", "<"), ("SACKOK", "sackOK"),
                                       ("CHAR", ","), ("TS", "TS"), ("VAL", "val")]),
        ("S.5", [("WORD", "S"), ("FLOAT", 0.5)]),  # AccECN's ACE digit after the ack flag
        ("sequence# seq", [("SEQUENCE", "sequence#"), ("SEQ", "seq")]),
        ('"a\\"b" `cmd`', [("STRING", 'a\\"b'), ("BACK_QUOTED", "cmd")]),
        ("%{ x = 1 }%", [("CODE", "x = 1")]),
        ("--tolerance_usecs=10000", [("OPTION", "tolerance_usecs"), ("CHAR", "="),
                                     ("INTEGER", 10000)]),
    ],
)  # fmt: skip
def test_tokens_as_lexer_l_makes_them(text: str, expected: list[tuple[str, object]]) -> None:
    assert kinds(text) == expected


def test_comments_are_skipped_and_lines_counted() -> None:
    text = "// one\n/* two\nthree */ 0 // four\n%{\nfive\n}% x\n"
    toks = list(tokenize(text))
    assert [(t.kind, t.line) for t in toks] == [("INTEGER", 3), ("CODE", 4), ("WORD", 6)]
    assert toks[1].text == "\nfive\n"


def test_defines_replace_words_as_word_types_them() -> None:
    defines = {"N": "12", "S": '"str"', "C": "`cmd`", "W": "SOL_IP"}
    assert kinds("N S C W", defines) == [
        ("INTEGER", 12),
        ("STRING", "str"),
        ("BACK_QUOTED", "cmd"),
        ("WORD", "SOL_IP"),
    ]


EVERYTHING = """\
--tolerance_usecs=10000
--define=PORT=8080
`echo init`

0.000 socket(..., SOCK_STREAM, IPPROTO_TCP) = 3
+0 setsockopt(3, SOL_SOCKET, SO_LINGER, {onoff=1, linger=0}, 8) = 0
+0 fcntl(3, F_SETFL, O_RDWR|O_NONBLOCK) = 0
+0 connect(3, ..., ...) = -1 EINPROGRESS (Operation now in progress)
+0 > SEW 0:0(0) <mss 1460,sackOK,TS val 100 ecr 0,nop,wscale 8>
+.1 < [ect0] S. 0:0(0) ack 1 win 5792 <mss 1200,nop,nop,sackOK,FO 0011,nop,nop>
+0...0.2 read(3, ..., 100) = 100
+0 < (tos 0x2e) P. 1:101(100) ack 1 win 257 urg 5 <nop,nop,sack 1001:2001 3001:4001>
0.3~0.4 > [ect01] . 1:1(0) ack 101 <...>
* > (ttl 64) F. 1:1(0) ack 101
+0 < [ect0, flowlabel 0x12345] .5 1:1(0) ack 2 win 257 <ECN e0b 1 ceb 2,nop>
+0 < udp (50)
+0 > udp 1000>PORT (10)
+0 < icmp unreachable frag_needed mtu 1200 [1:1461(1460)]
+0 < icmp unreachable port_unreachable [udp (10)]
+0 sendmsg(3, {msg_name(...)=..., msg_iov(2)=[{..., 1}, {..., 2}], msg_flags=0}, 0) = 3
+0 poll([{fd=3, events=POLLIN|POLLOUT, revents=POLLOUT}], 1, 0) = 1
+0 epoll_ctl(5, EPOLL_CTL_ADD, 3, {events=EPOLLIN, fd=3}) = 0
+0 connect(3, {sa_family=AF_INET, sin_port=htons(8080), sin_addr=inet_addr("1.2.3.4")}, 16) = 0
+0 getsockopt(3, SOL_TCP, TCP_CONGESTION, "cu" "bic", [5]) = 0
+0 setsockopt(3, SOL_SOCKET, SO_ZEROCOPY, "abc"..., 4) = 0
+0 recvmsg(3, {msg_name(...)=..., msg_iov(1)=[{..., 0}], msg_flags=MSG_ERRQUEUE,
   msg_control=[{cmsg_level=SOL_IP, cmsg_type=IP_RECVERR,
   cmsg_data={ee_errno=0, ee_origin=5, ee_type=0, ee_code=0, ee_info=0, ee_data=1}}]},
   MSG_ERRQUEUE) = 0
+0 %{ assert tcpi_state == 1 }%
+0 `echo in between`
`echo cleanup`
"""


def test_every_construct_parses_into_its_parts() -> None:
    s = parse(EVERYTHING)
    assert s.options == [("tolerance_usecs", "10000", 1), ("define", "PORT=8080", 2)]
    assert s.init_command == Command("echo init") and s.init_line == 3
    assert s.cleanup_command == Command("echo cleanup")
    e = {event.line: event for event in s.events}
    assert (e[5].time_kind, e[5].time) == ("absolute", 0)
    linger = e[6].action
    assert isinstance(linger, Syscall) and linger.args[3].name == "linger"
    fcntl = e[7].action
    assert isinstance(fcntl, Syscall) and fcntl.args[2].kind == "binary"
    connect = e[8].action
    assert isinstance(connect, Syscall)
    assert (connect.result, connect.errno, connect.note) == (
        Expr("int", -1),
        "EINPROGRESS",
        "Operation now in progress",
    )
    syn = e[9].action
    assert isinstance(syn, PacketSpec) and (syn.direction, syn.flags, syn.window) == (
        ">",
        "SEW",
        None,
    )
    assert syn.options == (("mss", 1460), ("sackOK", None), ("TS", (100, 0)), ("nop", None),
                           ("wscale", 8))  # fmt: skip
    synack = e[10].action
    assert isinstance(synack, PacketSpec)
    assert (e[10].time_kind, e[10].time) == ("relative", 100_000)
    assert (synack.ip.tos_check, synack.ip.tos, synack.ack) == ("ecn", 2, 1)
    assert ("FO", "0011") in (synack.options or ())
    read = e[11].action
    assert isinstance(read, Syscall) and read.end == 200_000
    data = e[12].action
    assert isinstance(data, PacketSpec)
    assert (data.ip.tos_check, data.ip.tos, data.seq, data.length, data.urg) == (
        "tos",
        0x2E,
        1,
        100,
        5,
    )
    assert ("sack", ((1001, 2001), (3001, 4001))) in (data.options or ())
    ranged = e[13]
    assert (ranged.time_kind, ranged.time, ranged.end) == ("absolute_range", 300_000, 400_000)
    assert isinstance(ranged.action, PacketSpec) and ranged.action.options is None
    assert ranged.action.ip.tos_check == "ect01"
    star = e[14]
    assert star.time_kind == "any" and isinstance(star.action, PacketSpec)
    assert star.action.ip.ttl == 64
    ace = e[15].action
    assert isinstance(ace, PacketSpec) and ace.flags == ".5" and ace.ip.flowlabel == 0x12345
    assert ("ECN", (172, (1, 2))) in (ace.options or ())
    udp_in, udp_out = e[16].action, e[17].action
    assert isinstance(udp_in, PacketSpec) and (udp_in.proto, udp_in.length) == ("udp", 50)
    assert isinstance(udp_out, PacketSpec) and udp_out.ports == (1000, 8080)  # PORT defined
    icmp = e[18].action
    assert isinstance(icmp, PacketSpec)
    assert (icmp.icmp_type, icmp.icmp_code, icmp.icmp_mtu, icmp.echoed) == (
        "unreachable",
        "frag_needed",
        1200,
        ("tcp", 1, 1460),
    )
    icmp_udp = e[19].action
    assert isinstance(icmp_udp, PacketSpec) and icmp_udp.echoed == ("udp", 0, 10)
    sendmsg = e[20].action
    assert isinstance(sendmsg, Syscall) and sendmsg.args[1].name == "msghdr"
    assert len(sendmsg.args[1].value["msg_iov"].value) == 2
    poll = e[21].action
    assert isinstance(poll, Syscall) and poll.args[0].value[0].name == "pollfd"
    epoll = e[22].action
    assert isinstance(epoll, Syscall) and epoll.args[3].name == "epollev"
    sockaddr = e[23].action
    assert isinstance(sockaddr, Syscall) and sockaddr.args[1].value["sin_port"] == Expr("int", 8080)
    strings = e[24].action
    assert isinstance(strings, Syscall) and strings.args[3] == Expr("string", "cubic")
    prefix = e[25].action
    assert isinstance(prefix, Syscall) and prefix.args[3] == Expr("string...", "abc")
    recvmsg = e[26].action
    assert isinstance(recvmsg, Syscall)
    cmsg = recvmsg.args[1].value["msg_control"].value[0]
    assert cmsg.name == "cmsg" and cmsg.value["cmsg_data"].name == "sock_extended_err"
    assert isinstance(e[30].action, Code) and isinstance(e[31].action, Command)


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("0 socket(..., SOCK_STREAM, 0) = 3\n+1~+0.5 > S 0:0(0)\n", 2, "time range is backwards"),
        (
            "* socket(..., SOCK_STREAM, 0) = 3\n",
            1,
            "event time <star> can only be used with outbound packets",
        ),
        (
            "0 socket(..., SOCK_STREAM, 0) = 3\n0~1 < S 0:0(0) win 1\n",
            2,
            "event time range can only be used with outbound packets",
        ),
        ("0 < S 0:0(0)\n", 1, "window must be specified for inbound packets"),
        (
            "0 < S 0:0(0) win 1 <...>\n",
            1,
            "<...> for TCP options can only be used with outbound packets",
        ),
        ("0 > S 0:5(0)\n", 1, "inconsistent TCP sequence numbers and payload size"),
        ("0 > SQ 0:0(0)\n", 1, "Invalid TCP flag: 'Q'"),
        ("0 > SE5 0:0(0)\n", 1, "Conflicting TCP flag: '5'"),
        ("0 > S 0:0(0) win 70000\n", 1, "TCP window value out of range"),
        ("0 < [ect01] S 0:0(0) win 1\n", 1, "[ect01] can only be used with outbound packets"),
        ("0 < udp (70000)\n", 1, "UDP payload size out of range"),
        ("\n\n0 socket(... = 3\n", 3, "syntax error: expected ')', got '='"),
        ("// nothing\n", 1, "syntax error: a script needs at least one timed event"),
        ("-1 > S 0:0(0)\n", 1, "negative time"),
    ],
)
def test_errors_packetdrill_gives_with_their_line(text: str, line: int, message: str) -> None:
    with pytest.raises(PktSyntaxError) as raised:
        parse(text)
    assert (raised.value.line, raised.value.message) == (line, message)


def test_encapsulation_parses_as_unsupported() -> None:
    s = parse("0 < gre: S 0:0(0) win 1\n+0 < mpls (label 1, tc 0, [S], ttl 1): S 0:0(0) win 1\n")
    spec = [e.action for e in s.events]
    assert [p.unsupported for p in spec if isinstance(p, PacketSpec)] == [
        "GRE encapsulation",
        "MPLS encapsulation",
    ]


def test_options_come_before_symbols() -> None:
    text = "--ip_version=ipv6\n--define=X=1\n0 socket(..., X, 0) = 3\n"
    assert read_options(text) == [("ip_version", "ipv6", 1), ("define", "X=1", 2)]


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.name for p in SCRIPTS])
@pytest.mark.parametrize("ip_version", IP_VERSIONS)
def test_the_suites_scripts_parse_in_every_variant(path: Path, ip_version: str) -> None:
    script, config = load(path.read_text(), ip_version, str(path))
    assert script.events and config.ip_version == ip_version
