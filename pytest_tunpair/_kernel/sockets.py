"""The kernel's view of a namespace's sockets, from NETLINK_SOCK_DIAG (what ``ss`` reads).

One dump lists every TCP or UDP socket of the namespace the netlink socket was created in,
whichever process owns it, with ``struct tcp_info`` for TCP: a daemon's cwnd, RTT and
retransmissions are as visible as the test's own. No privilege is needed to read one's own
namespace, so it works in rootless runs.

The request and replies are packed here with ``struct`` rather than through pyroute2's
``DiagSocket``: its ``tcp_info`` decoder stops at ``tcpi_snd_wnd`` and reads the wscale
bit fields wrongly, and its ``get_sock_stats`` signature is marked work in progress.
Layouts: include/uapi/linux/sock_diag.h, inet_diag.h, tcp.h (``struct tcp_info``).
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

__all__ = ["TCP_STATES", "SocketInfo", "dump"]

# include/uapi/linux/netlink.h
NETLINK_SOCK_DIAG = 4
NLM_F_REQUEST = 0x01
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
_NLMSGHDR = struct.Struct("=IHHII")
# include/uapi/linux/sock_diag.h
SOCK_DIAG_BY_FAMILY = 20
# include/uapi/linux/inet_diag.h: struct inet_diag_req_v2 (family, protocol, ext, pad,
# states, then struct inet_diag_sockid: sport, dport (big endian), src[4], dst[4], if,
# cookie[2]) and struct inet_diag_msg (family, state, timer, retrans, sockid, expires,
# rqueue, wqueue, uid, inode).
_REQ = struct.Struct("=BBBxI48s")
_MSG = struct.Struct("=BBBB2s2s16s16sI8sIIIII")
_RTA = struct.Struct("=HH")
INET_DIAG_INFO = 2
INET_DIAG_CONG = 4

PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
#: include/net/tcp_states.h, the names ``ss`` shows (UDP sockets report 7 when
#: unconnected and 1 when connected).
TCP_STATES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
    12: "NEW_SYN_RECV",
}

# struct tcp_info after its eight u8 fields (state, ca_state, retransmits, probes, backoff,
# options, snd_wscale:4 | rcv_wscale:4, delivery_rate_app_limited:1 |
# fastopen_client_fail:2), in order, with their sizes. A kernel sends the prefix it knows
# (Linux 6.7 added the total_rto fields); names past what it sent are left out.
_TCP_INFO_TAIL = (
    ("rto", "I"),
    ("ato", "I"),
    ("snd_mss", "I"),
    ("rcv_mss", "I"),
    ("unacked", "I"),
    ("sacked", "I"),
    ("lost", "I"),
    ("retrans", "I"),
    ("fackets", "I"),
    ("last_data_sent", "I"),
    ("last_ack_sent", "I"),
    ("last_data_recv", "I"),
    ("last_ack_recv", "I"),
    ("pmtu", "I"),
    ("rcv_ssthresh", "I"),
    ("rtt", "I"),
    ("rttvar", "I"),
    ("snd_ssthresh", "I"),
    ("snd_cwnd", "I"),
    ("advmss", "I"),
    ("reordering", "I"),
    ("rcv_rtt", "I"),
    ("rcv_space", "I"),
    ("total_retrans", "I"),
    ("pacing_rate", "Q"),
    ("max_pacing_rate", "Q"),
    ("bytes_acked", "Q"),
    ("bytes_received", "Q"),
    ("segs_out", "I"),
    ("segs_in", "I"),
    ("notsent_bytes", "I"),
    ("min_rtt", "I"),
    ("data_segs_in", "I"),
    ("data_segs_out", "I"),
    ("delivery_rate", "Q"),
    ("busy_time", "Q"),
    ("rwnd_limited", "Q"),
    ("sndbuf_limited", "Q"),
    ("delivered", "I"),
    ("delivered_ce", "I"),
    ("bytes_sent", "Q"),
    ("bytes_retrans", "Q"),
    ("dsack_dups", "I"),
    ("reord_seen", "I"),
    ("rcv_ooopack", "I"),
    ("snd_wnd", "I"),
    ("rcv_wnd", "I"),
    ("rehash", "I"),
    ("total_rto", "H"),
    ("total_rto_recoveries", "H"),
    ("total_rto_time", "I"),
)


def _tail_layout() -> list[tuple[str, int, struct.Struct]]:
    out = []
    off = 8
    for name, code in _TCP_INFO_TAIL:
        s = struct.Struct("=" + code)
        off += -off % s.size  # natural alignment, as the C struct has
        out.append((name, off, s))
        off += s.size
    return out


_TAIL = _tail_layout()


def decode_tcp_info(data: bytes) -> dict[str, int]:
    """``struct tcp_info`` as a dict with the kernel's names minus ``tcpi_``."""
    out: dict[str, int] = {}
    if len(data) >= 8:
        for i, name in enumerate(
            ("state", "ca_state", "retransmits", "probes", "backoff", "options")
        ):
            out[name] = data[i]
        # Bit fields are laid out from the low bit on little-endian targets (x86, arm64).
        out["snd_wscale"] = data[6] & 0x0F
        out["rcv_wscale"] = data[6] >> 4
        out["delivery_rate_app_limited"] = data[7] & 0x01
        out["fastopen_client_fail"] = (data[7] >> 1) & 0x03
    for name, off, s in _TAIL:
        if off + s.size > len(data):
            break
        out[name] = s.unpack_from(data, off)[0]
    return out


@dataclass(frozen=True)
class SocketInfo:
    """One socket as the kernel reports it (``tun_pair.sockets()``).

    ``local`` and ``remote`` are ``(address, port)``; ``state`` a name from
    :data:`TCP_STATES` (``"ESTABLISHED"``, ``"LISTEN"``, ...); ``inode`` the socket's inode
    (``/proc/PID/fd`` links read ``socket:[inode]``), ``uid`` its owner. ``tcp_info`` maps
    ``struct tcp_info``'s field names without ``tcpi_`` to their values (``rtt`` and
    ``rttvar`` in microseconds, ``snd_cwnd`` in segments, ``retrans``, ``total_retrans``,
    ``lost``, ``pmtu``, ``delivery_rate`` in bytes/s, ...); empty for UDP and for sockets
    without one (time-wait). ``congestion`` is the algorithm's name, e.g. ``"cubic"``.
    """

    proto: str
    """``"tcp"`` or ``"udp"``."""
    family: int
    """``socket.AF_INET`` or ``socket.AF_INET6``."""
    local: tuple[str, int]
    """The socket's own ``(address, port)``."""
    remote: tuple[str, int]
    """The peer's ``(address, port)``; ``("0.0.0.0", 0)`` (or ``("::", 0)``) if none."""
    state: str
    """The TCP state by the kernel's name, see :data:`TCP_STATES`."""
    inode: int
    """The socket's inode: ``/proc/PID/fd/N`` links to ``socket:[inode]``."""
    uid: int
    """The socket's owner."""
    rqueue: int
    """Bytes received and not read yet (a listener: connections waiting for accept)."""
    wqueue: int
    """Bytes written and not acknowledged yet (a listener: its backlog)."""
    tcp_info: Mapping[str, int] = field(default_factory=dict)
    """``struct tcp_info`` by the kernel's names without ``tcpi_``; empty if none."""
    congestion: str | None = None
    """The congestion control algorithm (``"cubic"``, ``"bbr"``), TCP only."""

    def pids(self) -> list[int]:
        """Processes holding this socket open (by scanning ``/proc/*/fd``; only processes
        this one may inspect)."""
        target = f"socket:[{self.inode}]"
        found = []
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        found.append(int(pid))
                        break
                except OSError:
                    continue
        return sorted(found)

    def __repr__(self) -> str:
        def show(ep: tuple[str, int]) -> str:
            return f"[{ep[0]}]:{ep[1]}" if ":" in ep[0] else f"{ep[0]}:{ep[1]}"

        extra = ""
        if "rtt" in self.tcp_info:
            extra = f" rtt={self.tcp_info['rtt']}us retrans={self.tcp_info.get('total_retrans')}"
        return (
            f"<SocketInfo {self.proto} {show(self.local)} -> {show(self.remote)} "
            f"{self.state} inode={self.inode}{extra}>"
        )


def _address(family: int, raw: bytes) -> str:
    return socket.inet_ntop(family, raw[:4] if family == socket.AF_INET else raw)


def _messages(sock: socket.socket, seq: int) -> Iterator[tuple[int, bytes]]:
    while True:
        data = sock.recv(1 << 16)
        off = 0
        while off + _NLMSGHDR.size <= len(data):
            length, mtype, _flags, mseq, _pid = _NLMSGHDR.unpack_from(data, off)
            if length < _NLMSGHDR.size:
                return
            body = data[off + _NLMSGHDR.size : off + length]
            off += (length + 3) & ~3
            if mseq != seq:
                continue
            if mtype == NLMSG_DONE:
                return
            if mtype == NLMSG_ERROR:
                (err,) = struct.unpack_from("=i", body)
                if err:
                    raise OSError(-err, f"sock_diag: {os.strerror(-err)}")
                continue
            yield mtype, body


def dump(proto: str = "tcp") -> list[SocketInfo]:
    """Every ``proto`` socket (IPv4 and IPv6) of the calling thread's network namespace."""
    protocol = PROTOCOLS[proto]
    out: list[SocketInfo] = []
    # A netlink socket belongs to the namespace of the thread that creates it
    # (docs/internals.md, "A sock_diag socket dumps its creator's namespace").
    with socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG
    ) as sock:
        sock.bind((0, 0))
        for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), 1):
            ext = (1 << (INET_DIAG_INFO - 1)) | (1 << (INET_DIAG_CONG - 1)) if proto == "tcp" else 0
            req = _REQ.pack(family, protocol, ext, 0xFFFFFFFF, bytes(48))
            hdr = _NLMSGHDR.pack(
                _NLMSGHDR.size + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0
            )
            sock.send(hdr + req)
            for _mtype, body in _messages(sock, seq):
                out.append(_socket_info(proto, body))
    return out


def _socket_info(proto: str, body: bytes) -> SocketInfo:
    (
        family,
        state,
        _timer,
        _retrans,
        sport,
        dport,
        src,
        dst,
        _ifindex,
        _cookie,
        _expires,
        rqueue,
        wqueue,
        uid,
        inode,
    ) = _MSG.unpack_from(body)
    info: dict[str, int] = {}
    congestion = None
    off = _MSG.size
    while off + _RTA.size <= len(body):
        rlen, rtype = _RTA.unpack_from(body, off)
        if rlen < _RTA.size:
            break
        value = body[off + _RTA.size : off + rlen]
        if rtype == INET_DIAG_INFO:
            info = decode_tcp_info(value)
        elif rtype == INET_DIAG_CONG:
            congestion = value.split(b"\0", 1)[0].decode(errors="replace")
        off += (rlen + 3) & ~3
    return SocketInfo(
        proto=proto,
        family=family,
        local=(_address(family, src), int.from_bytes(sport, "big")),
        remote=(_address(family, dst), int.from_bytes(dport, "big")),
        state=TCP_STATES.get(state, str(state)),
        inode=inode,
        uid=uid,
        rqueue=rqueue,
        wqueue=wqueue,
        tcp_info=info,
        congestion=congestion,
    )
