"""packetdrill's system calls, made for real by the script runner (:mod:`.pkt_run`).

Each ``name(args) = result [ERRNO]`` line is evaluated as packetdrill's
``run_system_call.c`` evaluates it: symbols resolved (:mod:`.pkt_symbols`), ``...``
standing for what packetdrill fills in (the pair's addresses and ports, a buffer of zeros),
the call made on the calling thread -- which is inside the pair's network namespace -- and
its return value and errno compared with the script's. What a call learns about the socket
under test (a listener, a connecting socket, an accepted child) goes to the runner, which
maps the script's packets onto the live ones with it.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import fcntl
import os
import select
import socket
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .pkt_parse import Expr, Syscall
from .pkt_symbols import SYMBOLS

if TYPE_CHECKING:
    from .pkt_run import Runner

__all__ = ["TCP_INFO_FIELDS", "SyscallFailed", "SyscallUnsupported", "evaluate", "run_syscall"]

_LIBC = ctypes.CDLL(None, use_errno=True)
# Largest control buffer a recvmsg() line may expect (packetdrill's MSGHDR_MAX_CONTROLLEN).
_MAX_CONTROL = 4096
# include/uapi/linux/tcp.h: TCP_INFO, TCP_CC_INFO; include/uapi/asm-generic/socket.h:
# SO_MEMINFO.
TCP_INFO = 11
TCP_CC_INFO = 26
SO_MEMINFO = 55


class SyscallFailed(AssertionError):
    """The call returned what the script did not expect (or its arguments are wrong)."""


class SyscallUnsupported(Exception):
    """A call or argument this runner does not make."""


# -- expressions (script.c's evaluate) ------------------------------------------------------------


def evaluate(e: Expr) -> Any:
    """``e`` with symbols resolved: ints, strings, lists, dicts of fields; ``...`` stays
    the :data:`ELLIPSIS` marker."""
    if e.kind == "int":
        return e.value
    if e.kind == "word":
        if e.value in SYMBOLS:
            return SYMBOLS[e.value]
        raise SyscallFailed(f"unknown symbol: '{e.value}'")
    if e.kind in ("string", "string..."):
        return _unescape(e.value)
    if e.kind == "ellipsis":
        return ELLIPSIS
    if e.kind == "binary":
        op, lhs, rhs = e.value
        if op == "|":
            a, b = evaluate(lhs), evaluate(rhs)
            if not isinstance(a, int):
                raise SyscallFailed("left hand side of | not an integer")
            if not isinstance(b, int):
                raise SyscallFailed("right hand side of | not an integer")
            return a | b
        return (op, lhs.value if lhs.kind == "word" else evaluate(lhs), evaluate(rhs))
    if e.kind == "list":
        return [evaluate(x) for x in e.value]
    if e.kind == "struct":
        if e.name in ("inet_addr",):
            return int.from_bytes(socket.inet_aton(e.value["addr"]), "little")
        if e.name == "in6_addr":
            return socket.inet_pton(socket.AF_INET6, e.value["addr"])
        return {"_struct": e.name, **{k: evaluate(v) for k, v in e.value.items()}}
    raise SyscallUnsupported(f"{e.value}")


_ESCAPES = {"\\": "\\", '"': '"', "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}


def _unescape(text: str) -> str:
    """script.c's unescape_cstring_expression(): C escapes in a string argument, ``\\xhh``
    included (a key given as bytes). (packetdrill's own turns ``\\\\`` and ``\\"`` into a
    form feed by a missing ``break``; here they are a backslash and a quote.)"""
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        code = text[i + 1 : i + 2]
        if code == "x":
            digits = text[i + 2 : i + 4]
            try:
                out.append(chr(int(digits, 16)))
            except ValueError:
                raise SyscallFailed(f"invalid hex escape (\\xhh): '\\x{text[i + 2 :]}'") from None
            i += 4
        elif code in _ESCAPES:
            out.append(_ESCAPES[code])
            i += 2
        else:
            raise SyscallFailed(f"unsupported escape code: '{code}'")
    return "".join(out)


class _Ellipsis:
    def __repr__(self) -> str:
        return "..."


#: What ``...`` evaluates to.
ELLIPSIS: Any = _Ellipsis()


def _int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise SyscallFailed(f"Bad type for {what}: expected an integer, got {v!r}")
    return v


def _bracketed(v: Any, what: str) -> int:
    if not isinstance(v, list) or len(v) != 1:
        raise SyscallFailed(f"Expected [<element>] for {what} but got {v!r}")
    return _int(v[0], what)


# -- tcp_info for %{ }% code (include/uapi/linux/tcp.h, struct tcp_info, Linux 6.18) --------------

#: ``struct tcp_info`` field names in order, with their struct format (no padding is needed:
#: every field sits at its natural alignment); ``None`` marks the bit-field bytes.
TCP_INFO_FIELDS: tuple[tuple[str, str], ...] = (
    ("tcpi_state", "B"),
    ("tcpi_ca_state", "B"),
    ("tcpi_retransmits", "B"),
    ("tcpi_probes", "B"),
    ("tcpi_backoff", "B"),
    ("tcpi_options", "B"),
    ("_wscale", "B"),
    ("_app_limited", "B"),
    *((name, "I") for name in (
        "tcpi_rto", "tcpi_ato", "tcpi_snd_mss", "tcpi_rcv_mss", "tcpi_unacked",
        "tcpi_sacked", "tcpi_lost", "tcpi_retrans", "tcpi_fackets", "tcpi_last_data_sent",
        "tcpi_last_ack_sent", "tcpi_last_data_recv", "tcpi_last_ack_recv", "tcpi_pmtu",
        "tcpi_rcv_ssthresh", "tcpi_rtt", "tcpi_rttvar", "tcpi_snd_ssthresh", "tcpi_snd_cwnd",
        "tcpi_advmss", "tcpi_reordering", "tcpi_rcv_rtt", "tcpi_rcv_space",
        "tcpi_total_retrans",
    )),
    *((name, "Q") for name in (
        "tcpi_pacing_rate", "tcpi_max_pacing_rate", "tcpi_bytes_acked",
        "tcpi_bytes_received",
    )),
    ("tcpi_segs_out", "I"),
    ("tcpi_segs_in", "I"),
    ("tcpi_notsent_bytes", "I"),
    ("tcpi_min_rtt", "I"),
    ("tcpi_data_segs_in", "I"),
    ("tcpi_data_segs_out", "I"),
    ("tcpi_delivery_rate", "Q"),
    ("tcpi_busy_time", "Q"),
    ("tcpi_rwnd_limited", "Q"),
    ("tcpi_sndbuf_limited", "Q"),
    ("tcpi_delivered", "I"),
    ("tcpi_delivered_ce", "I"),
    ("tcpi_bytes_sent", "Q"),
    ("tcpi_bytes_retrans", "Q"),
    ("tcpi_dsack_dups", "I"),
    ("tcpi_reord_seen", "I"),
    ("tcpi_rcv_ooopack", "I"),
    ("tcpi_snd_wnd", "I"),
    ("tcpi_rcv_wnd", "I"),
    ("tcpi_rehash", "I"),
    ("tcpi_total_rto", "H"),
    ("tcpi_total_rto_recoveries", "H"),
    ("tcpi_total_rto_time", "I"),
    *((name, "I") for name in (
        "tcpi_received_ce", "tcpi_delivered_e1_bytes", "tcpi_delivered_e0_bytes",
        "tcpi_delivered_ce_bytes", "tcpi_received_e1_bytes", "tcpi_received_e0_bytes",
        "tcpi_received_ce_bytes",
    )),
    ("_ecn_bits", "I"),
)  # fmt: skip
_TCP_INFO = struct.Struct("=" + "".join(f for _n, f in TCP_INFO_FIELDS))

#: The names packetdrill's code.c defines beside the tcp_info values.
CODE_SYMBOLS = {
    **{
        name: i
        for i, name in enumerate(
            (
                "TCP_ESTABLISHED",
                "TCP_SYN_SENT",
                "TCP_SYN_RECV",
                "TCP_FIN_WAIT1",
                "TCP_FIN_WAIT2",
                "TCP_TIME_WAIT",
                "TCP_CLOSE",
                "TCP_CLOSE_WAIT",
                "TCP_LAST_ACK",
                "TCP_LISTEN",
                "TCP_CLOSING",
            ),
            start=1,
        )
    },
    "TCP_CA_Open": 0,
    "TCP_CA_Disorder": 1,
    "TCP_CA_CWR": 2,
    "TCP_CA_Recovery": 3,
    "TCP_CA_Loss": 4,
    "TCPI_OPT_TIMESTAMPS": 1,
    "TCPI_OPT_SACK": 2,
    "TCPI_OPT_WSCALE": 4,
    "TCPI_OPT_ECN": 8,
    "TCPI_OPT_ECN_SEEN": 16,
    "TCPI_OPT_SYN_DATA": 32,
    "TCPI_OPT_USEC_TS": 64,
    "TCPI_OPT_TFO_CHILD": 128,
}
_MEMINFO = (
    "SK_MEMINFO_RMEM_ALLOC",
    "SK_MEMINFO_RCVBUF",
    "SK_MEMINFO_WMEM_ALLOC",
    "SK_MEMINFO_SNDBUF",
    "SK_MEMINFO_FWD_ALLOC",
    "SK_MEMINFO_WMEM_QUEUED",
    "SK_MEMINFO_OPTMEM",
    "SK_MEMINFO_BACKLOG",
    "SK_MEMINFO_DROPS",
)


def code_variables(sock: socket.socket) -> dict[str, int]:
    """What packetdrill's code.c writes before a ``%{ }%`` snippet: the socket's
    ``tcp_info`` (``tcpi_*``), its congestion control's info (``bbr_*``, ``dctcp_*``) and
    ``SO_MEMINFO`` (``SK_MEMINFO_*``), with the symbolic names."""
    out: dict[str, int] = dict(CODE_SYMBOLS)
    raw = sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, _TCP_INFO.size)
    raw = raw.ljust(_TCP_INFO.size, b"\0")
    for (name, _fmt), value in zip(TCP_INFO_FIELDS, _TCP_INFO.unpack(raw), strict=True):
        if name == "_wscale":
            out["tcpi_snd_wscale"], out["tcpi_rcv_wscale"] = value & 0xF, value >> 4
        elif name == "_app_limited":
            out["tcpi_delivery_rate_app_limited"] = value & 1
            out["tcpi_fastopen_client_fail"] = value >> 1 & 3
        elif name == "_ecn_bits":
            out["tcpi_ecn_mode"] = value & 3
            out["tcpi_accecn_opt_seen"] = value >> 2 & 3
            out["tcpi_accecn_fail_mode"] = value >> 4 & 0xF
            out["tcpi_options2"] = value >> 8
        else:
            out[name] = value
    try:
        cc = sock.getsockopt(socket.IPPROTO_TCP, TCP_CC_INFO, 64)
    except OSError:
        cc = b""
    if len(cc) >= 20:  # struct tcp_bbr_info
        lo, hi, min_rtt, pacing_gain, cwnd_gain = struct.unpack_from("=5I", cc)
        out.update(
            bbr_bw_lo=lo,
            bbr_bw_hi=hi,
            bbr_bw=hi << 32 | lo,
            bbr_min_rtt=min_rtt,
            bbr_pacing_gain=pacing_gain,
            bbr_cwnd_gain=cwnd_gain,
        )
    if len(cc) >= 16:  # struct tcp_dctcp_info
        enabled, ce_state, alpha, ab_ecn, ab_tot = struct.unpack_from("=HHIII", cc.ljust(16, b"\0"))
        out.update(
            dctcp_enabled=enabled,
            dctcp_ce_state=ce_state,
            dctcp_alpha=alpha,
            dctcp_ab_ecn=ab_ecn,
            dctcp_ab_tot=ab_tot,
        )
    try:
        mem = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 4 * len(_MEMINFO))
        out.update(zip(_MEMINFO, struct.unpack(f"={len(mem) // 4}I", mem), strict=False))
    except OSError:
        pass
    return out


# -- calls ----------------------------------------------------------------------------------------


def _libc_call(fn: Callable[..., int], *args: Any) -> tuple[int, int]:
    ctypes.set_errno(0)
    result = fn(*args)
    return result, ctypes.get_errno() if result < 0 else 0


def run_syscall(rt: Runner, call: Syscall) -> None:
    """Make ``call`` and check its result against the script's (``SyscallFailed`` if it
    differs). Runs on the runner's thread, or its blocking-call thread."""
    handler = _CALLS.get(call.name)
    if handler is None:
        raise SyscallUnsupported(f"the system call {call.name}()")
    args = [evaluate(a) for a in call.args]
    handler(rt, call, args)


def _nargs(call: Syscall, args: list[Any], n: int | tuple[int, ...]) -> None:
    counts = (n,) if isinstance(n, int) else n
    if len(args) not in counts:
        raise SyscallFailed(f"Expected {' or '.join(map(str, counts))} args but got {len(args)}")


def check_result(
    rt: Runner, call: Syscall, actual: int, err: int, *, fd_result: bool = False
) -> None:
    """end_syscall(): the return value (an fd: any non-negative one when the script's is),
    then the errno the script names."""
    expected = evaluate(call.result)
    if not isinstance(expected, int):
        raise SyscallFailed(f"Bad type for the result: expected an integer, got {expected!r}")
    why = f" with errno {err} ({os.strerror(err)})" if actual < 0 else ""
    if fd_result and expected >= 0:
        if actual < 0:
            raise SyscallFailed(f"Expected non-negative result but got {actual}{why}")
    elif actual != expected:
        raise SyscallFailed(f"Expected result {expected} but got {actual}{why}")
    if call.errno is not None:
        want = SYMBOLS.get(call.errno)
        if want is None:
            raise SyscallFailed(f"unknown symbol: '{call.errno}'")
        if err != want:
            raise SyscallFailed(
                f"Expected errno {want} ({os.strerror(want)}) but got {err} "
                f"({os.strerror(err) if err else 'none'})"
            )


def _ok(fn: Callable[[], object]) -> Callable[[], int]:
    """``fn`` as a call that returns 0 (Python raises where C returns -1)."""

    def call() -> int:
        fn()
        return 0

    return call


def _outcome(fn: Callable[[], int]) -> tuple[int, int]:
    """``fn()`` as a system call's (result, errno)."""
    try:
        return fn(), 0
    except OSError as exc:
        return -1, exc.errno or 0


def _socket(rt: Runner, call: Syscall, args: list[Any]) -> None:
    _nargs(call, args, 3)
    domain = rt.config.socket_domain if args[0] is ELLIPSIS else _int(args[0], "domain")
    kind, proto = _int(args[1], "type"), _int(args[2], "protocol")
    result, err = -1, 0
    sock = None
    try:
        sock = socket.socket(domain, kind, proto)
        result = sock.fileno()
    except OSError as exc:
        err = exc.errno or 0
    try:
        check_result(rt, call, result, err, fd_result=True)
    except BaseException:
        if sock is not None:
            sock.close()
        raise
    if sock is not None:
        rt.new_socket(_int(evaluate(call.result), "fd"), sock, domain, kind, proto)


def _bind(rt: Runner, call: Syscall, args: list[Any]) -> None:
    _nargs(call, args, 3)
    entry = rt.fd(args[0])
    for a in args[1:]:
        if a is not ELLIPSIS:
            raise SyscallFailed("bind() takes ... for its address and length")
    result, err = _outcome(_ok(lambda: entry.sock.bind(rt.bind_address(entry))))
    check_result(rt, call, result, err)


def _listen(rt: Runner, call: Syscall, args: list[Any]) -> None:
    _nargs(call, args, 2)
    entry = rt.fd(args[0])
    backlog = _int(args[1], "backlog")
    result, err = _outcome(_ok(lambda: entry.sock.listen(backlog)))
    check_result(rt, call, result, err)
    rt.listening(entry)


def _accept(rt: Runner, call: Syscall, args: list[Any]) -> None:
    _nargs(call, args, 3)
    entry = rt.fd(args[0])
    got: list[socket.socket] = []

    def accept() -> int:
        child, _addr = entry.sock.accept()
        got.append(child)
        return child.fileno()

    result, err = rt.blocking(call, lambda: _outcome(accept))
    try:
        check_result(rt, call, result, err, fd_result=True)
    except BaseException:
        for child in got:
            child.close()
        raise
    if got:
        rt.accepted(_int(evaluate(call.result), "fd"), got[0])


def _connect(rt: Runner, call: Syscall, args: list[Any]) -> None:
    _nargs(call, args, 3)
    entry = rt.fd(args[0])
    family = None if args[1] is ELLIPSIS else _int(args[1], "address family")
    if family == socket.AF_UNSPEC:
        rt.connecting(entry, disconnect=True)
        # connect(AF_UNSPEC) dissolves the association (a sockaddr of family 0).
        addr = struct.pack("=H14x", socket.AF_UNSPEC)
        result, err = rt.blocking(
            call, lambda: _libc_call(_LIBC.connect, entry.sock.fileno(), addr, len(addr))
        )
        check_result(rt, call, result, err)
        return
    rt.connecting(entry)
    target = rt.connect_address(entry)
    result, err = rt.blocking(call, lambda: _outcome(_ok(lambda: entry.sock.connect(target))))
    check_result(rt, call, result, err)


def _buffer(arg: Any, what: str) -> bool:
    """buffer_arg(): ``...`` (a buffer) or 0 (NULL); True for NULL."""
    if arg is ELLIPSIS:
        return False
    if arg == 0:
        return True
    raise SyscallFailed(f"Expected ... or NULL for buffer of {what}")


def _read_like(rt: Runner, call: Syscall, args: list[Any]) -> None:
    name = call.name
    _nargs(call, args, {"read": 3, "recv": 4, "recvfrom": 6}[name])
    entry = rt.fd(args[0])
    null = _buffer(args[1], name)
    count = _int(args[2], "count")
    flags = _int(args[3], "flags") if name != "read" else 0
    fd = entry.fileno()

    def do() -> tuple[int, int]:
        if null:
            if name == "read":
                return _libc_call(_LIBC.read, fd, None, count)
            return _libc_call(_LIBC.recv, fd, None, count, flags)
        if name == "read":
            return _outcome(lambda: len(os.read(fd, count)))
        return _outcome(lambda: len(entry.sock.recv(count, flags)))

    result, err = rt.blocking(call, do)
    check_result(rt, call, result, err)


def _write_like(rt: Runner, call: Syscall, args: list[Any]) -> None:
    name = call.name
    _nargs(call, args, {"write": 3, "send": 4, "sendto": 6}[name])
    entry = rt.fd(args[0])
    null = _buffer(args[1], name)
    count = _int(args[2], "count")
    flags = _int(args[3], "flags") if name != "write" else 0
    fd = entry.fileno()
    data = bytes(count)  # packetdrill writes a zeroed buffer
    target = None
    if name == "sendto":
        family = None if args[4] is ELLIPSIS else _int(args[4], "address family")
        if args[5] is not ELLIPSIS:
            raise SyscallFailed("sendto() takes ... for its address length")
        rt.connecting(entry, must_be_new=False)
        target = rt.connect_address(entry) if family is None else None
        if family is not None and family != socket.AF_UNSPEC:
            raise SyscallUnsupported(f"sendto() with address family {family}")

    def do() -> tuple[int, int]:
        if null:
            if name == "write":
                return _libc_call(_LIBC.write, fd, None, count)
            return _libc_call(_LIBC.send, fd, None, count, flags)
        if name == "write":
            return _outcome(lambda: os.write(fd, data))
        if name == "send":
            return _outcome(lambda: entry.sock.send(data, flags))
        if target is None:  # sendto(..., AF_UNSPEC, ...): a sockaddr of family 0
            addr = struct.pack("=H14x", socket.AF_UNSPEC)
            return _libc_call(_LIBC.sendto, fd, data, count, flags, addr, len(addr))
        return _outcome(lambda: entry.sock.sendto(data, flags, target))

    result, err = rt.blocking(call, do)
    check_result(rt, call, result, err)


def _iovec(arg: Any, what: str) -> list[int]:
    if not isinstance(arg, list):
        raise SyscallFailed(f"Bad type for {what}: expected an iovec array")
    out = []
    for item in arg:
        if not isinstance(item, dict) or item.get("_struct") != "iovec":
            raise SyscallFailed(f"Bad type in {what}: expected {{..., len}}")
        out.append(_int(item["iov_len"], "iov_len"))
    return out


def _readv_writev(rt: Runner, call: Syscall, args: list[Any]) -> None:
    _nargs(call, args, 3)
    entry = rt.fd(args[0])
    lengths = _iovec(args[1], call.name)
    if _int(args[2], "iov_count") != len(lengths):
        raise SyscallFailed(
            f"iov_count {args[2]} does not match {len(lengths)}-element iovec array"
        )
    fd = entry.fileno()

    def do() -> tuple[int, int]:
        if call.name == "writev":
            return _outcome(lambda: os.writev(fd, [bytes(n) for n in lengths]))
        return _outcome(lambda: os.readv(fd, [bytearray(n) for n in lengths]))

    result, err = rt.blocking(call, do)
    check_result(rt, call, result, err)


def _msghdr(arg: Any) -> dict[str, Any]:
    if not isinstance(arg, dict) or arg.get("_struct") != "msghdr":
        raise SyscallFailed(
            "Bad type: expected a msghdr {msg_name(...)=..., msg_iov(N)=[...], ...}"
        )
    lengths = _iovec(arg.get("msg_iov", []), "msg_iov")
    if _int(arg.get("msg_iov_len", len(lengths)), "msg_iovlen") != len(lengths):
        raise SyscallFailed(
            f"msg_iovlen {arg.get('msg_iov_len')} does not match {len(lengths)}-element iovec array"
        )
    return {**arg, "lengths": lengths}


def _cmsg_list(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise SyscallFailed("Bad type for msg_control: expected an array of cmsgs")
    for c in value:
        if not isinstance(c, dict) or c.get("_struct") != "cmsg":
            raise SyscallFailed("Unrecognized type for cmsg_data")
    return value


def _sendmsg(rt: Runner, call: Syscall, args: list[Any]) -> None:
    _nargs(call, args, 3)
    entry = rt.fd(args[0])
    msg = _msghdr(args[1])
    flags = _int(args[2], "flags")
    if msg.get("msg_flags", 0) not in (0, ELLIPSIS):
        raise SyscallFailed("sendmsg ignores msg_flags field in msghdr")
    ancillary = []
    for c in _cmsg_list(msg.get("msg_control")):
        data = c["cmsg_data"]
        if not isinstance(data, int):
            raise SyscallUnsupported("a sendmsg() cmsg_data other than an integer")
        ancillary.append((_int(c["cmsg_level"], "cmsg_level"), _int(c["cmsg_type"], "cmsg_type"),
                          struct.pack("=i", data)))  # fmt: skip
    rt.connecting(entry, must_be_new=False)
    target = rt.connect_address(entry)
    buffers = [bytes(n) for n in msg["lengths"]]
    result, err = rt.blocking(
        call, lambda: _outcome(lambda: entry.sock.sendmsg(buffers, ancillary, flags, target))
    )
    check_result(rt, call, result, err)


def _recvmsg(rt: Runner, call: Syscall, args: list[Any]) -> None:
    _nargs(call, args, 3)
    entry = rt.fd(args[0])
    msg = _msghdr(args[1])
    flags = _int(args[2], "flags")
    expected_flags = msg.get("msg_flags", 0)
    expected_cmsgs = _cmsg_list(msg.get("msg_control"))
    got: list[tuple[bytes, list[tuple[int, int, bytes]], int]] = []

    def receive() -> int:
        data, anc, mflags, _addr = entry.sock.recvmsg(sum(msg["lengths"]), _MAX_CONTROL, flags)
        got.append((data, anc, mflags))
        return len(data)

    result, err = rt.blocking(call, lambda: _outcome(receive))
    check_result(rt, call, result, err)
    if not got:
        return
    _data, anc, mflags = got[0]
    if isinstance(expected_flags, int) and mflags != expected_flags:
        raise SyscallFailed(f"Expected msg_flags 0x{expected_flags:08X} but got 0x{mflags:08X}")
    rt.check_cmsgs(expected_cmsgs, anc)


def _fcntl(rt: Runner, call: Syscall, args: list[Any]) -> None:
    _nargs(call, args, (2, 3))
    entry = rt.fd(args[0])
    cmd = _int(args[1], "command")
    extra = [_int(args[2], "arg")] if len(args) == 3 else []
    result, err = _outcome(lambda: fcntl.fcntl(entry.fileno(), cmd, *extra))
    check_result(rt, call, result, err)


def _ioctl(rt: Runner, call: Syscall, args: list[Any]) -> None:
    _nargs(call, args, (2, 3))
    entry = rt.fd(args[0])
    cmd = _int(args[1], "command")
    if len(args) == 2:
        result, err = _outcome(lambda: fcntl.ioctl(entry.fileno(), cmd))
        check_result(rt, call, result, err)
        return
    want = _bracketed(args[2], "the ioctl value")
    buf = bytearray(4)
    result, err = _outcome(lambda: fcntl.ioctl(entry.fileno(), cmd, buf, True))
    check_result(rt, call, result, err)
    (live,) = struct.unpack("=i", buf)
    if live != want:
        raise SyscallFailed(f"Bad ioctl optval: expected: {want} actual: {live}")


def _close(rt: Runner, call: Syscall, args: list[Any]) -> None:
    _nargs(call, args, 1)
    entry = rt.fd(args[0])
    result, err = rt.blocking(call, lambda: _outcome(_ok(entry.close)))
    check_result(rt, call, result, err)
    rt.closed(entry)


def _shutdown(rt: Runner, call: Syscall, args: list[Any]) -> None:
    _nargs(call, args, 2)
    entry = rt.fd(args[0])
    how = _int(args[1], "how")
    result, err = rt.blocking(call, lambda: _outcome(_ok(lambda: entry.sock.shutdown(how))))
    check_result(rt, call, result, err)


def _optval_bytes(value: Any, optlen: int) -> bytes:
    if isinstance(value, list):
        number = _bracketed(value, "optval")
        # An s32 in packetdrill: a value written as 0xffffffff means its bits.
        raw = struct.pack("=I", number & 0xFFFFFFFF)
    elif isinstance(value, str):
        raw = value.encode("latin-1")
    elif isinstance(value, bytes):
        raw = value
    elif isinstance(value, dict) and value.get("_struct") == "linger":
        raw = struct.pack("=ii", _int(value["onoff"], "onoff"), _int(value["linger"], "linger"))
    else:
        raise SyscallUnsupported(f"a setsockopt() value like {value!r}")
    return raw[:optlen].ljust(optlen, b"\0")


def _setsockopt(rt: Runner, call: Syscall, args: list[Any]) -> None:
    _nargs(call, args, 5)
    entry = rt.fd(args[0])
    level, name = _int(args[1], "level"), _int(args[2], "optname")
    optlen = _int(args[4], "optlen")
    raw = _optval_bytes(args[3], optlen)
    result, err = _outcome(_ok(lambda: entry.sock.setsockopt(level, name, raw)))
    check_result(rt, call, result, err)
    if level == socket.IPPROTO_TCP and name == socket.TCP_CONGESTION and result == 0:
        entry.own_cc = True


def _getsockopt(rt: Runner, call: Syscall, args: list[Any]) -> None:
    _nargs(call, args, 5)
    entry = rt.fd(args[0])
    level, name = _int(args[1], "level"), _int(args[2], "optname")
    optlen = _bracketed(args[4], "optlen")
    got: list[bytes] = []

    def get() -> int:
        got.append(entry.sock.getsockopt(level, name, max(optlen, 0)))
        return 0

    result, err = _outcome(get)
    check_result(rt, call, result, err)
    if not got:
        return
    live = got[0]
    if len(live) != optlen:
        raise SyscallFailed(f"Bad getsockopt optlen: expected: {optlen} actual: {len(live)}")
    want = args[3]
    if isinstance(want, list):
        if optlen != 4:
            raise SyscallFailed(f"Unsupported getsockopt optlen: {optlen}")
        expected = _bracketed(want, "optval")
        # packetdrill reads the script's value with get_s32(), which takes INT_MIN ..
        # UINT_MAX as an int: [0xffffffff] is -1 (gtests/net/tcp/epoll/epoll_out_edge.pkt).
        if 2**31 <= expected < 2**32:
            expected -= 2**32
        (actual,) = struct.unpack("=i", live)
        if actual != expected:
            raise SyscallFailed(f"Bad getsockopt optval: expected: {expected} actual: {actual}")
    elif isinstance(want, str):
        raw = want.encode("latin-1")
        if optlen != len(raw):
            raise SyscallFailed(
                f"Bad getsockopt optval: expected optlen ({optlen} bytes) does not match "
                f"length of expected optval string '{want}' ({len(raw)} bytes)"
            )
        if live != raw:
            raise SyscallFailed(
                f"Bad getsockopt optval: expected: '{want}' actual: '{live.decode('latin-1')}'"
            )
    elif isinstance(want, bytes):  # in6_addr
        if live != want:
            raise SyscallFailed(
                f"Bad getsockopt optval: expected: {socket.inet_ntop(socket.AF_INET6, want)} "
                f"actual: {socket.inet_ntop(socket.AF_INET6, live.ljust(16, b'0'))}"
            )
    else:
        raise SyscallUnsupported(f"a getsockopt() value like {want!r}")


def _poll(rt: Runner, call: Syscall, args: list[Any]) -> None:
    _nargs(call, args, 3)
    fds = args[0]
    if not isinstance(fds, list):
        raise SyscallFailed("Bad type for the pollfd array")
    items = []
    for item in fds:
        if not isinstance(item, dict) or item.get("_struct") != "pollfd":
            raise SyscallFailed("Bad type in the pollfd array: expected {fd=..., events=...}")
        items.append(
            (rt.fd(item["fd"]).fileno(), _int(item["events"], "events"), item.get("revents", 0))
        )
    if _int(args[1], "nfds") != len(items):
        raise SyscallFailed(f"nfds {args[1]} does not match {len(items)}-element pollfd array")
    timeout = _int(args[2], "timeout")
    array = (ctypes.c_byte * (8 * len(items)))()
    for i, (fd, events, _r) in enumerate(items):
        struct.pack_into("=ihh", array, 8 * i, fd, events, 0)
    result, err = rt.blocking(call, lambda: _libc_call(_LIBC.poll, array, len(items), timeout))
    check_result(rt, call, result, err)
    for i, (_fd, _events, want) in enumerate(items):
        _fd2, _ev, revents = struct.unpack_from("=ihh", array, 8 * i)
        revents &= 0xFFFF
        if revents != _int(want, "revents"):
            raise SyscallFailed(
                f"Expected revents of {_poll_names(want)} but got {_poll_names(revents)} "
                f"for pollfd {i}"
            )


def _poll_names(mask: int) -> str:
    names = [n for n in ("POLLIN", "POLLPRI", "POLLOUT", "POLLERR", "POLLHUP", "POLLNVAL",
                         "POLLRDNORM", "POLLRDBAND", "POLLWRNORM", "POLLWRBAND", "POLLMSG",
                         "POLLRDHUP") if mask & SYMBOLS[n]]  # fmt: skip
    return "|".join(names) or "0"


def _epoll_create(rt: Runner, call: Syscall, args: list[Any]) -> None:
    _nargs(call, args, 1)
    size = _int(args[0], "size")
    got: list[select.epoll] = []

    def create() -> int:
        if size <= 0:
            raise OSError(_errno.EINVAL, "epoll_create size")
        ep = select.epoll()
        got.append(ep)
        return ep.fileno()

    result, err = _outcome(create)
    check_result(rt, call, result, err, fd_result=True)
    if got:
        rt.new_fd(_int(evaluate(call.result), "fd"), got[0])


def _epoll_event(value: Any) -> tuple[int, int | None]:
    if not isinstance(value, dict) or value.get("_struct") != "epollev":
        raise SyscallFailed("Bad type: expected an epoll event {events=..., fd=...}")
    if "fd" not in value:
        raise SyscallUnsupported("epoll events with ptr, u32 or u64 data (only fd=)")
    return _int(value["events"], "events"), _int(value["fd"], "fd")


def _epoll_ctl(rt: Runner, call: Syscall, args: list[Any]) -> None:
    _nargs(call, args, 4)
    ep = rt.fd(args[0]).obj
    op = _int(args[1], "op")
    target = rt.fd(args[2])
    events, _fd = _epoll_event(args[3]) if args[3] != 0 else (0, None)
    assert isinstance(ep, select.epoll)

    def ctl() -> int:
        if op == SYMBOLS["EPOLL_CTL_ADD"]:
            ep.register(target.fileno(), events)
        elif op == SYMBOLS["EPOLL_CTL_MOD"]:
            ep.modify(target.fileno(), events)
        else:
            ep.unregister(target.fileno())
        return 0

    result, err = _outcome(ctl)
    check_result(rt, call, result, err)


def _epoll_wait(rt: Runner, call: Syscall, args: list[Any]) -> None:
    _nargs(call, args, 4)
    ep = rt.fd(args[0]).obj
    assert isinstance(ep, select.epoll)
    expected = args[1] if isinstance(args[1], list) else []
    maxevents = _int(args[2], "maxevents")
    timeout = _int(args[3], "timeout")
    got: list[list[tuple[int, int]]] = []

    def wait() -> int:
        events = ep.poll(timeout / 1000 if timeout >= 0 else -1, maxevents)
        got.append(events)
        return len(events)

    result, err = rt.blocking(call, lambda: _outcome(wait))
    check_result(rt, call, result, err)
    if not got:
        return
    for i, (want, (live_fd, live_events)) in enumerate(zip(expected, got[0], strict=False)):
        events, fd = _epoll_event(want)
        if live_events != events:
            raise SyscallFailed(
                f"epoll_event->events does not match script: expected: 0x{events:x} "
                f"actual: 0x{live_events:x} (event {i})"
            )
        if fd is not None and rt.fd(fd).fileno() != live_fd:
            raise SyscallFailed(f"epoll_event->data.fd does not match script (event {i})")


def _pipe(rt: Runner, call: Syscall, args: list[Any]) -> None:
    _nargs(call, args, 1)
    want = args[0]
    if not isinstance(want, list) or len(want) != 2:
        raise SyscallFailed("pipe() takes [read_fd, write_fd]")
    got: list[tuple[int, int]] = []

    def make() -> int:
        got.append(os.pipe())
        return 0

    result, err = _outcome(make)
    check_result(rt, call, result, err)
    if got:
        for script_fd, live in zip(want, got[0], strict=True):
            rt.new_fd(_int(script_fd, "fd"), live)


def _open(rt: Runner, call: Syscall, args: list[Any]) -> None:
    _nargs(call, args, 2)
    if not isinstance(args[0], str):
        raise SyscallFailed("open() takes a path string")
    path, flags = args[0], _int(args[1], "flags")
    result, err = _outcome(lambda: os.open(os.path.join(rt.directory, path), flags))
    check_result(rt, call, result, err, fd_result=True)
    if result >= 0:
        rt.new_fd(_int(evaluate(call.result), "fd"), result)


def _sendfile(rt: Runner, call: Syscall, args: list[Any]) -> None:
    _nargs(call, args, 4)
    out, inp = rt.fd(args[0]), rt.fd(args[1])
    offset = _bracketed(args[2], "offset")
    count = _int(args[3], "count")
    result, err = rt.blocking(
        call, lambda: _outcome(lambda: os.sendfile(out.fileno(), inp.fileno(), offset, count))
    )
    check_result(rt, call, result, err)


def _splice(rt: Runner, call: Syscall, args: list[Any]) -> None:
    _nargs(call, args, 6)
    src, dst = rt.fd(args[0]), rt.fd(args[2])
    if args[1] != 0 or args[3] != 0:
        raise SyscallUnsupported("splice() with offsets")
    count, flags = _int(args[4], "len"), _int(args[5], "flags")
    result, err = rt.blocking(
        call,
        lambda: _outcome(lambda: os.splice(src.fileno(), dst.fileno(), count, flags=flags)),
    )
    check_result(rt, call, result, err)


_CALLS: dict[str, Callable[[Runner, Syscall, list[Any]], None]] = {
    "socket": _socket,
    "bind": _bind,
    "listen": _listen,
    "accept": _accept,
    "connect": _connect,
    "read": _read_like,
    "recv": _read_like,
    "recvfrom": _read_like,
    "readv": _readv_writev,
    "recvmsg": _recvmsg,
    "write": _write_like,
    "send": _write_like,
    "sendto": _write_like,
    "writev": _readv_writev,
    "sendmsg": _sendmsg,
    "fcntl": _fcntl,
    "ioctl": _ioctl,
    "close": _close,
    "shutdown": _shutdown,
    "getsockopt": _getsockopt,
    "setsockopt": _setsockopt,
    "poll": _poll,
    "epoll_create": _epoll_create,
    "epoll_ctl": _epoll_ctl,
    "epoll_wait": _epoll_wait,
    "pipe": _pipe,
    "open": _open,
    "sendfile": _sendfile,
    "splice": _splice,
}
#: The system calls this runner makes (packetdrill's table less cap_set and psp_*).
SUPPORTED = frozenset(_CALLS)
