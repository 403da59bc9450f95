"""Captures a human can open: pcapng with the relay's actions and directions, the pair's
TLS/QUIC secrets embedded, and live streams. Read back by an independent reader
(``tests/pcapng_read.py``) and by tshark; real nginx (TLS, HTTP/2), curl, httpx and an
aioquic HTTP/3 server in the pair."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pytest_tunpair import TunPair

from . import pcapng_read
from .conftest import need, run_standalone, tcp_send, tcpdump_read

WAIT = 10.0
NGINX = "/usr/sbin/nginx"


def tshark(path: object, *args: str) -> str:
    """``tshark -r PATH ARGS`` with no key log of its own: what it decrypts, it decrypted
    from the file's Decryption Secrets Block."""
    __tracebackhide__ = True
    cmd = [need("tshark"), "-o", "tls.keylog_file:", "-r", str(path), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def http2_headers(path: object, where: str = "") -> list[dict[str, str]]:
    """The header fields of each HTTP/2 HEADERS frame tshark decodes in the file (of the
    packets that also match the display filter ``where``)."""
    out = tshark(
        path, "-Y", f"http2.type == 1 && ({where})" if where else "http2.type == 1",
        "-T", "fields", "-E", "aggregator=\x1f",
        "-e", "http2.header.name", "-e", "http2.header.value",
    )  # fmt: skip
    frames = []
    for line in out.splitlines():
        names, values = line.split("\t")
        frames.append(dict(zip(names.split("\x1f"), values.split("\x1f"), strict=True)))
    return frames


def udp_send(src: str, dst: str, payload: bytes, port: int = 9) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((src, 0))
        s.sendto(payload, (dst, port))


def wait_until(cond: object, what: str, timeout: float = WAIT) -> None:
    __tracebackhide__ = True
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.01)


# -- the file ------------------------------------------------------------------------------------
def test_one_interface_per_direction_and_what_the_relay_did(tun_pair: TunPair, tmp_path) -> None:
    a, b = tun_pair.a.ip, tun_pair.b.ip
    fault = tun_pair.fail(times=1, proto="udp")
    udp_send(a, b, b"one")  # dropped by the fault
    tun_pair.packets.wait_for(action="dropped", timeout=WAIT)
    with tun_pair.outage(direction="a->b"):
        udp_send(a, b, b"two")  # lost in the outage
        tun_pair.packets.wait_for(action="lost", timeout=WAIT)
    assert fault.hits == 1
    tun_pair.impair(delay="30ms", direction="a->b")
    udp_send(a, b, b"three")  # delayed, then the kernel's port unreachable comes back
    tun_pair.packets.wait_for(direction="b->a", timeout=WAIT)
    path = tun_pair.packets.to_pcap(tmp_path / "actions.pcapng")

    cap = pcapng_read.read(path)
    assert cap.sections == 1 and cap.order[:3] == ["shb", "idb", "idb"]
    assert [(i.name, i.linktype) for i in cap.interfaces] == [("a->b", 12), ("b->a", 12)]
    assert cap.interfaces[0].description == "tun0 198.18.0.1 2001:2::1 -> tun1 198.18.0.2 2001:2::2"
    assert not cap.secrets  # no TLS here: no key log was made
    packets = list(tun_pair.packets)
    assert [r.data for r in cap.packets] == [p.data for p in packets]
    comments = [r.comment for r in cap.packets]
    assert comments[0].startswith("dropped (not delivered); sojourn ")
    assert comments[1].startswith("lost (not delivered); sojourn ")
    assert comments[2].startswith("delayed; sojourn ")
    # The sojourn is the relay's, in the comment's units (30 ms of delay, and a little more).
    sojourn = float(comments[2].split("sojourn ")[1].split("ms")[0])
    assert 30 <= sojourn < 30 + 1000 * WAIT
    for record, p in zip(cap.packets, packets, strict=True):
        # epb_flags: a->b is what a sent (outbound), b->a what it received (inbound).
        assert (record.interface, record.flags) == ((0, 2) if p.direction == "a->b" else (1, 1))
        wall = tun_pair.packets.wall_t0 + p.time
        assert abs(record.ts_ns / 1e9 - wall) < 1e-6
    # tcpdump reads it too (one link type for both interfaces; see pcap.py on type 12).
    out = tcpdump_read(path)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == len(packets)


def test_classic_pcap_on_request(tun_pair: TunPair, tmp_path) -> None:
    udp_send(tun_pair.a.ip, tun_pair.b.ip, b"x")
    tun_pair.packets.wait_for(direction="b->a", timeout=WAIT)
    path = tun_pair.packets.to_pcap(tmp_path / "x.pcap", format="pcap")
    assert Path(path).read_bytes()[:4] == (0xA1B2C3D4).to_bytes(4, sys.byteorder)
    with pytest.raises(ValueError, match=r"to_pcap\(format='ng'\): use 'pcapng' or 'pcap'"):
        tun_pair.packets.to_pcap(tmp_path / "y", format="ng")


def _failing_inner(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_inner="""
        import socket

        def send(pair, payload):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind((pair.a.ip, 0))
                s.sendto(payload, (pair.b.ip, 9))

        def test_fails(tun_pair):
            with open(tun_pair.keylog, "a") as keys:  # as a TLS client would
                keys.write("CLIENT_RANDOM 00 11\\n")
            tun_pair.fail(times=1, proto="udp")
            send(tun_pair, b"dropped by the fault")
            tun_pair.packets.wait_for(action="dropped")
            with tun_pair.outage(direction="a->b"):
                send(tun_pair, b"lost in the outage")
                tun_pair.packets.wait_for(action="lost")
            send(tun_pair, b"delivered")
            tun_pair.packets.wait_for(direction="b->a")
            assert False
        """
    )


def test_a_failing_tests_pcapng_opens_in_tshark_with_its_drops(pytester: pytest.Pytester) -> None:
    need("tshark")
    _failing_inner(pytester)
    result = pytester.runpytest_subprocess(
        "--tunpair", "-p", "no:cacheprovider", "--tunpair-pcap=out"
    )
    result.assert_outcomes(failed=1)
    path = pytester.path / "out" / "test_inner.py_test_fails.pcapng"
    result.stdout.fnmatch_lines([f"pcap: {path}"])
    fields = ["-T", "fields", "-e", "frame.interface_name", "-e", "frame.packet_flags_direction"]
    rows = [line.split("\t") for line in tshark(path, *fields, "-e", "frame.comment").splitlines()]
    assert {row[0] for row in rows} == {"a->b", "b->a"}  # two interfaces
    assert {(row[0], row[1]) for row in rows} == {("a->b", "0x00000002"), ("b->a", "0x00000001")}
    # The display filter the docs give for what the receiver never got.
    gone = tshark(
        path, "-Y", 'frame.comment contains "not delivered"', *fields, "-e", "frame.comment"
    )
    comments = [line.split("\t")[2] for line in gone.splitlines()]
    assert [c.split(" ", 1)[0] for c in comments] == ["dropped", "lost"]
    assert len(tshark(path, "-Y", 'frame.comment contains "lost"').splitlines()) == 1
    # Written after teardown (the key log's directory is gone by then), with its secrets.
    assert pcapng_read.read(path).secrets == [(0x544C534B, b"CLIENT_RANDOM 00 11\n")]


@pytest.mark.tunpair(ipv6=None)
def test_gso_super_packets_decode_in_tshark(tun_pair: TunPair, tmp_path) -> None:
    with socket.create_server((tun_pair.b.ip, 0)) as server:
        received = bytearray()

        def serve() -> None:
            conn, _ = server.accept()
            with conn:
                while chunk := conn.recv(1 << 16):
                    received.extend(chunk)

        t = threading.Thread(target=serve)
        t.start()
        with socket.create_connection(server.getsockname()) as client:
            client.sendall(os.urandom(1 << 20))
        t.join(WAIT)
    assert len(received) == 1 << 20
    tun_pair.packets.wait_quiet()
    supers = [p for p in tun_pair.packets if p.gso is not None and p.gso.is_super_packet]
    if not supers:
        pytest.skip("the kernel sent no GSO super-packet this time (offload is a hint)")
    path = tun_pair.packets.to_pcap(tmp_path / "bulk.pcapng")
    cap = pcapng_read.read(path)
    big = [r for r in cap.packets if r.wire_len > tun_pair.a.mtu]
    assert len(big) == len(supers)
    for r in big:
        assert "gso tcpv4 super-packet: " in r.comment and " segments of " in r.comment
    # Written as the super-packet itself (IP length covering it all, as a capture on a host
    # with TSO shows): tshark decodes each as one large TCP segment, nothing malformed.
    assert tshark(path, "-Y", "_ws.malformed") == ""
    lengths = tshark(path, "-Y", f"ip.len > {tun_pair.a.mtu}", "-T", "fields", "-e", "ip.len")
    assert sorted(int(n) for n in lengths.split()) == sorted(p.wire_len for p in supers)


def tcp_fields(path: object, *fields: str) -> list[list[str]]:
    """One row per packet: ``fields`` of each as tshark decodes it, TCP checksums checked."""
    out = tshark(path, "-o", "tcp.check_checksum:TRUE", "-T", "fields", *(
        arg for f in fields for arg in ("-e", f)
    ))  # fmt: skip
    return [line.split("\t") for line in out.splitlines()]


def _blocks(cap: pcapng_read.Capture) -> list[tuple[int, int, int, str, bytes]]:
    return [(r.interface, r.flags, r.ts_ns, r.comment, r.data) for r in cap.packets]


@pytest.mark.tunpair(ipv6=None)
def test_a_per_segment_link_is_written_as_wire_packets(tun_pair: TunPair, tmp_path) -> None:
    # Offload on and a rate with loss: the relay splits super-packets and records runs of
    # segments as one entry, which the capture expands when read (docs/link.md).
    from pytest_tunpair._packets.stream import Follower, Sink

    live = str(tmp_path / "live.pcapng")  # what --tunpair-pcap-live streams, the same way
    sink = Sink(os.open(live, os.O_WRONLY | os.O_CREAT | os.O_EXCL), name=live, path=live)
    follower = Follower(tun_pair.packets, sink).start()
    try:
        tun_pair.impair(rate="200mbit", loss=0.02, seed=3, direction="a->b")
        payload = os.urandom(1 << 19)
        assert tcp_send(tun_pair.b.ip, payload) == payload
        tun_pair.packets.wait_quiet()
    finally:
        follower.stop()
        sink.close()
    packets = list(tun_pair.packets)
    path = tun_pair.packets.to_pcap(tmp_path / "segments.pcapng")
    cap = pcapng_read.read(path)
    assert [r.data for r in cap.packets] == [p.data for p in packets]
    # The live stream wrote the same blocks as the file written at the end.
    assert _blocks(pcapng_read.read(live)) == _blocks(cap)
    rows = tcp_fields(
        path, "frame.interface_name", "frame.len", "tcp.len", "tcp.checksum.status",
        "frame.comment",
    )  # fmt: skip
    sent = [row for row in rows if row[0] == "a->b" and int(row[2]) > 0]
    # Each a segment as a wire carries it: MTU-sized, its checksum done (status 1: good).
    assert sent and all(int(row[1]) <= tun_pair.a.mtu and row[3] == "1" for row in sent)
    assert not any("super-packet" in row[4] for row in sent)
    lost = [row for row in sent if row[4].startswith("lost (not delivered); sojourn ")]
    assert len(lost) == sum(p.action == "lost" for p in packets) > 0
    assert tshark(path, "-Y", "_ws.malformed") == ""


def test_a_class_is_named_in_the_records_and_the_comments(tun_pair: TunPair, tmp_path) -> None:
    # Packets a class's link carries say so (Packet.link_class, "class NAME" in the
    # comment): UDP one by one, TCP super-packets split on the class's per-segment link.
    a, b = tun_pair.a.ip, tun_pair.b.ip
    assert a is not None and b is not None
    tun_pair.impair(direction="a->b", match={"proto": "udp"}, name="voice", delay="5ms")
    tun_pair.impair(
        direction="a->b", match={"proto": "tcp"}, name="bulk", rate="200mbit", loss=0.01, seed=3
    )
    udp_send(a, b, b"hello")
    payload = os.urandom(1 << 18)
    assert tcp_send(b, payload) == payload
    tun_pair.packets.wait_quiet()
    packets = list(tun_pair.packets)
    udp = [p for p in packets if p.direction == "a->b" and p.proto == "udp"]
    tcp = [p for p in packets if p.direction == "a->b" and p.proto == "tcp"]
    assert udp and {p.link_class for p in udp} == {"voice"}
    assert tcp and {p.link_class for p in tcp} == {"bulk"}
    assert any(p.action == "lost" for p in tcp)
    assert all(p.link_class is None for p in packets if p.direction == "b->a")
    assert tun_pair.packets.filter(link_class="voice") == udp
    path = tun_pair.packets.to_pcap(tmp_path / "classes.pcapng")
    bulk = tshark(
        path, "-Y", 'frame.comment contains "class bulk"', "-T", "fields", "-e", "frame.number"
    )
    assert len(bulk.split()) == len(tcp)
    voice = tshark(
        path, "-Y", 'frame.comment contains "class voice"', "-T", "fields", "-e", "frame.number"
    )
    assert len(voice.split()) == len(udp)


def test_run_pcap_streams_a_per_segment_link_into_tshark(tmp_path) -> None:
    need("tshark")
    script = tmp_path / "send.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from conftest import tcp_send\n"
        "data = os.urandom(1 << 19)\n"
        "assert tcp_send('198.18.0.2', data) == data\n"
    )
    tp = subprocess.Popen(
        [
            *_tunpair_cmd(), "run", "-q", "--no-ipv6", "--rate", "200mbit", "--loss", "2%",
            "--seed", "3", "--direction", "a->b", "--pcap", "-", "--", sys.executable, str(script),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    fields = ["frame.interface_name", "frame.len", "tcp.len", "tcp.checksum.status"]
    r = subprocess.run(
        [need("tshark"), "-i", "-", "-o", "tcp.check_checksum:TRUE", "-T", "fields",
         *(arg for f in [*fields, "frame.comment"] for arg in ("-e", f))],
        stdin=tp.stdout,
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert tp.stdout is not None and tp.stderr is not None
    tp.stdout.close()
    assert tp.wait(30) == 0, tp.stderr.read()
    tp.stderr.close()
    assert r.returncode == 0, r.stderr
    rows = [line.split("\t") for line in r.stdout.splitlines()]
    sent = [row for row in rows if row[0] == "a->b" and row[2] and int(row[2]) > 0]
    assert len(sent) >= (1 << 19) // 1448
    assert all(int(row[1]) <= 1500 and row[3] == "1" for row in sent)
    assert any(row[4].startswith("lost (not delivered)") for row in sent)


# -- secrets ---------------------------------------------------------------------------------------
def test_the_key_log_lives_with_the_pair(tmp_path) -> None:
    def run() -> tuple[TunPair, str, str]:
        with TunPair(ipv6=None) as pair:
            path = pair.keylog
            assert path is not None and os.path.exists(path)
            assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
            proc = pair.spawn(
                [
                    "sh",
                    "-c",
                    'echo "$SSLKEYLOGFILE"; echo "CLIENT_RANDOM 00 11" >> "$SSLKEYLOGFILE"',
                ]
            )
            assert proc.wait(WAIT) == 0
            told = pair.output(proc).strip()
            mine = pair.spawn(["sh", "-c", 'echo "$SSLKEYLOGFILE"'], env={"SSLKEYLOGFILE": "/x"})
            assert mine.wait(WAIT) == 0
            assert pair.output(mine).strip() == "/x"  # an env of the caller's own is kept
            assert pair.ssl_context().keylog_filename == path
            udp_send(pair.a.ip, pair.b.ip, b"x")
            pair.packets.wait_for(direction="b->a", timeout=WAIT)
        return pair, path, told

    pair, path, told = run_standalone(run)
    assert told == path
    assert not os.path.exists(os.path.dirname(path))  # gone with the pair ...
    assert pair.packets.secrets() == b"CLIENT_RANDOM 00 11\n"  # ... its secrets kept
    cap = pcapng_read.read(pair.packets.to_pcap(tmp_path / "after.pcapng"))
    assert cap.secrets == [(0x544C534B, b"CLIENT_RANDOM 00 11\n")]
    assert cap.order.index("dsb") < cap.order.index("epb")  # before the packets


@pytest.mark.tunpair(hosts=True)
def test_each_hosts_spawn_gets_the_key_log(tun_pair: TunPair) -> None:
    for end in (tun_pair.a, tun_pair.b):
        proc = end.spawn(["sh", "-c", 'echo "$SSLKEYLOGFILE"'])
        assert proc.wait(WAIT) == 0
        assert end.output(proc).strip() == tun_pair.keylog


@pytest.mark.tunpair(keylog=False)
def test_keylog_false_turns_it_off(tun_pair: TunPair, tmp_path) -> None:
    assert tun_pair.keylog is None
    assert tun_pair.ssl_context().keylog_filename is None
    env = {k: v for k, v in os.environ.items() if k != "SSLKEYLOGFILE"}
    proc = tun_pair.spawn(["sh", "-c", 'echo "[${SSLKEYLOGFILE-unset}]"'], env=env)
    assert proc.wait(WAIT) == 0
    assert tun_pair.output(proc).strip() == "[unset]"
    assert tun_pair.packets.secrets() == b""
    udp_send(tun_pair.a.ip, tun_pair.b.ip, b"x")
    tun_pair.packets.wait_for(timeout=WAIT)
    assert not pcapng_read.read(tun_pair.packets.to_pcap(tmp_path / "x.pcapng")).secrets


NGINX_TLS = """
daemon off;
master_process {master};
{user}
worker_processes 1;
pid {tmp}/nginx.pid;
error_log stderr notice;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen {ip}:{port} ssl http2;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {{ return 200 "nginx over h2\\n"; }}
    }}
}}
"""
TLS_PORT = 8443


def nginx_tls(tmp_path: Path, ip: str) -> tuple[list[str], Path]:
    """nginx with TLS and HTTP/2 on ``ip`` (its command line) and the certificate."""
    if not os.access(NGINX, os.X_OK):
        need(NGINX)
    from pytest_tunpair._kernel.userns import in_initial_user_namespace

    from .h3 import make_certificate

    cert, key = make_certificate(tmp_path, ip)
    # As tests/test_daemons.py: in a user namespace nginx serves from its master process.
    real_root = in_initial_user_namespace() and os.getuid() == 0
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        NGINX_TLS.format(
            tmp=tmp_path,
            ip=ip,
            port=TLS_PORT,
            cert=cert,
            key=key,
            master="on" if real_root else "off",
            user="" if real_root else "user root;",
        )
    )
    return [NGINX, "-e", "stderr", "-p", str(tmp_path), "-c", str(conf)], cert


def test_http2_to_nginx_over_tls_opens_decrypted_in_tshark(tun_pair: TunPair, tmp_path) -> None:
    import httpx

    command, cert = nginx_tls(tmp_path, tun_pair.b.ip)
    nginx = tun_pair.spawn(command, ready=TLS_PORT)
    url = f"https://{tun_pair.b.ip}:{TLS_PORT}"
    # curl, spawned: its secrets go to SSLKEYLOGFILE (TLS 1.2, to cover that version too).
    curl_args = ["--cacert", str(cert), f"{url}/curl"]
    curl = tun_pair.spawn(
        [
            need("curl"),
            "-sS",
            "--http2",
            "--tlsv1.2",
            "--tls-max",
            "1.2",
            "--max-time",
            "20",
            *curl_args,
        ],
    )
    assert curl.wait(30) == 0, tun_pair.output(curl) + tun_pair.output(nginx)
    assert tun_pair.output(curl) == "nginx over h2\n"
    # httpx with h2, in the test: its secrets go to the key log through ssl_context().
    with httpx.Client(http2=True, verify=tun_pair.ssl_context(cafile=cert)) as client:
        response = client.get(f"{url}/httpx")
    assert response.http_version == "HTTP/2" and response.text == "nginx over h2\n"
    tun_pair.packets.wait_quiet()

    # The decrypted route in the test itself.
    records = tun_pair.packets.tls_records()
    assert {r.version for r in records} == {"TLS 1.2", "TLS 1.3"}
    assert all(r.decrypted for r in records if r.encrypted)
    sent = b"".join(
        r.data for r in records if r.type == "application_data" and r.direction == "a->b"
    )
    assert sent.count(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") == 2

    # The file: tshark decrypts it from the embedded secrets alone.
    path = tun_pair.packets.to_pcap(tmp_path / "h2.pcapng")
    requests = http2_headers(path)
    assert [h[":path"] for h in requests if ":method" in h] == ["/curl", "/httpx"]
    assert [h[":status"] for h in requests if ":status" in h] == ["200", "200"]
    # Without the secrets (classic pcap has no place for them) it is ciphertext.
    plain = tun_pair.packets.to_pcap(tmp_path / "h2.pcap", format="pcap")
    assert tshark(plain, "-Y", "http2") == ""


@pytest.mark.tunpair(ipv6=None)
def test_a_nat_s_packets_in_the_capture_and_decrypted(tun_pair: TunPair, tmp_path) -> None:
    import httpx

    nat = tun_pair.nat()  # a's address becomes 198.18.1.1 on b's side
    command, cert = nginx_tls(tmp_path, tun_pair.b.ip)
    tun_pair.spawn(command, ready=TLS_PORT)
    with httpx.Client(http2=True, verify=tun_pair.ssl_context(cafile=cert)) as client:
        response = client.get(f"https://{tun_pair.b.ip}:{TLS_PORT}/nat")
    assert response.text == "nginx over h2\n"
    tun_pair.packets.wait_quiet()
    assert nat.rewritten > 0

    # tls_records() pairs the two sides although no packet delivered names both a's
    # address and the NAT's: b got 198.18.1.1, a got its own address back.
    records = tun_pair.packets.tls_records()
    assert {(r.direction, r.client[0]) for r in records} == {
        ("a->b", "198.18.1.1"),
        ("b->a", "198.18.1.1"),
    }
    assert all(r.decrypted for r in records if r.encrypted)
    answer = b"".join(
        r.data for r in records if r.type == "application_data" and r.direction == "b->a"
    )
    assert b"nginx over h2\n" in answer

    path = tun_pair.packets.to_pcap(tmp_path / "nat.pcapng")
    rows = tcp_fields(path, "ip.src", "ip.dst", "frame.comment")
    rewritten = [row for row in rows if row[2].startswith("rewritten")]
    assert len(rewritten) == nat.rewritten
    assert all(row[2].startswith("rewritten (replaced by its translation); ") for row in rewritten)
    # A translated packet is not one the receiver never got.
    assert tshark(path, "-Y", 'frame.comment contains "not delivered"') == ""
    # The file holds each connection as each side saw it; either view decrypts alone.
    for view in ("198.18.1.1", tun_pair.a.ip):
        headers = http2_headers(path, f"ip.addr == {view}")
        assert [h[":path"] for h in headers if ":method" in h] == ["/nat"]
        assert [h[":status"] for h in headers if ":status" in h] == ["200"]


def test_http3_with_aioquic_opens_decrypted_in_tshark(tun_pair: TunPair, tmp_path) -> None:
    from .h3 import BODY, H3Server, h3_get, make_certificate

    cert, key = make_certificate(tmp_path, tun_pair.b.ip)
    with H3Server(tun_pair.b.ip, 4433, cert, key):
        with open(tun_pair.keylog, "a") as secrets:  # QuicConfiguration(secrets_log_file=...)
            status, body = h3_get(tun_pair.b.ip, 4433, "/h3", cafile=cert, secrets=secrets)
    assert (status, body) == (200, BODY)
    tun_pair.packets.wait_quiet()
    path = tun_pair.packets.to_pcap(tmp_path / "h3.pcapng")
    out = tshark(
        path, "-Y", "http3", "-T", "fields", "-e", "http3.frame_type", "-e", "http3.frame_payload"
    )
    frames = [line.split("\t") for line in out.splitlines()]
    # HEADERS (1) both ways, and the response's DATA (0) carrying the body, decrypted.
    assert sum("1" in row[0].split(",") for row in frames) >= 2
    assert any(BODY.hex() in row[1].split(",") for row in frames if len(row) > 1)


# -- live ------------------------------------------------------------------------------------------
def _tunpair_cmd() -> list[str]:
    return [sys.executable, "-m", "pytest_tunpair"]


def test_run_pcap_dash_streams_into_tshark_while_the_command_runs(tmp_path) -> None:
    need("tshark")
    curl = need("curl")
    go = tmp_path / "go"
    # An HTTP server on b, curl from a until it answers, then wait for `go`.
    command = (
        f"{sys.executable} -m http.server --bind 198.18.0.2 8080 >/dev/null 2>&1 & "
        f"for i in $(seq 200); do {curl} -s -o /dev/null http://198.18.0.2:8080/ && break; "
        f"sleep 0.05; done; while [ ! -e {go} ]; do sleep 0.05; done; kill $!; echo finished"
    )
    tp = subprocess.Popen(
        [*_tunpair_cmd(), "run", "-q", "--pcap", "-", "--", "sh", "-c", command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert tp.stdout is not None
    reader = subprocess.Popen(
        [need("tshark"), "-l", "-i", "-"],
        stdin=tp.stdout,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    tp.stdout.close()  # tshark holds the pipe now
    assert reader.stdout is not None
    try:
        seen = []
        deadline = time.monotonic() + 30
        # The command is still waiting for `go`: whatever tshark prints came live.
        while not any("HTTP/1.0 200 OK" in line for line in seen):
            assert time.monotonic() < deadline, seen
            line = reader.stdout.readline()
            assert line, f"tshark ended early: {seen}"
            seen.append(line)
        assert tp.poll() is None
        go.touch()
        assert tp.wait(30) == 0
        assert reader.wait(30) == 0
    finally:
        for p in (tp, reader):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert tp.stderr is not None
    assert b"finished" in tp.stderr.read()  # COMMAND's stdout went to stderr
    assert any("GET / HTTP/1.1" in line for line in seen)


def test_a_reader_closing_early_leaves_the_command_unharmed(tmp_path) -> None:
    need("ping")
    done = tmp_path / "done"
    command = f"ping -c 3 -i 0.2 -W 2 198.18.0.2 && echo ok > {done}"
    r = subprocess.run(
        f"{' '.join(_tunpair_cmd())} run --pcap - -- sh -c '{command}' | head -c 100 >/dev/null",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert done.read_text() == "ok\n"
    assert "3 received" in r.stderr  # ping's own output, on stderr with --pcap -
    assert "the pcapng stream stopped after" in r.stderr
    assert "the reader went away" in r.stderr


def test_run_pcap_says_what_a_stream_that_fell_behind_missed(tmp_path) -> None:
    fifo = tmp_path / "wire"
    os.mkfifo(fifo)
    sent = tmp_path / "sent"
    data = bytearray()

    def read_once_sent() -> None:
        with open(fifo, "rb") as f:
            deadline = time.monotonic() + 30
            # Nothing read meanwhile: the pipe fills and the stream falls behind.
            while not sent.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            while chunk := f.read(1 << 16):
                data.extend(chunk)

    reader = threading.Thread(target=read_once_sent, daemon=True)
    reader.start()
    send = (
        "import socket\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "for i in range(300):\n"
        "    s.sendto(b'x' * 1400, ('198.18.0.2', 9))\n"
    )
    r = subprocess.run(
        [
            *_tunpair_cmd(), "run", "--no-ipv6", "--max-packets", "10", "--pcap", str(fifo),
            "--", "sh", "-c", f'{sys.executable} -c "{send}" && touch {sent}',
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    reader.join(WAIT)
    assert r.returncode == 0, r.stderr
    assert "packets not streamed: the capture let them go before the stream caught up; a " in (
        r.stderr
    )
    gaps = [p.comment for p in pcapng_read.read(bytes(data)).packets if "not streamed" in p.comment]
    assert gaps and all(
        c.endswith("packets before this one not streamed (capture bound)") for c in gaps
    )


def test_run_pcap_file_embeds_the_commands_secrets_first(tmp_path) -> None:
    need("curl")
    need("tshark")
    command, cert = nginx_tls(tmp_path, "198.18.0.2")
    pid = tmp_path / "nginx.pid"
    script = (
        f"{' '.join(command)} & "
        f"while [ ! -e {pid} ]; do sleep 0.02; done; "  # nginx writes it once it listens
        f"curl -sS --http2 --cacert {cert} --max-time 20 https://198.18.0.2:{TLS_PORT}/cli"
    )
    path = tmp_path / "cli.pcapng"
    r = subprocess.run(
        [*_tunpair_cmd(), "run", "--pcap", str(path), "--", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "nginx over h2\n"
    assert "key log lines to" in r.stderr
    cap = pcapng_read.read(path)
    assert cap.order[:4] == ["shb", "idb", "idb", "dsb"]  # moved to the front at the end
    assert [h[":path"] for h in http2_headers(path) if ":method" in h] == ["/cli"]


def test_shell_pcap_streams_what_its_commands_send(tmp_path) -> None:
    need("ping")
    path = tmp_path / "shell.pcapng"
    r = subprocess.run(
        [*_tunpair_cmd(), "shell", "--pcap", str(path)],
        input='echo "keys in $SSLKEYLOGFILE"\nping -c 1 -W 2 198.18.0.2 >/dev/null\n',
        env={**os.environ, "SHELL": "/bin/sh"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    keylog = r.stdout.split("keys in ", 1)[1].strip()
    assert keylog.endswith("/sslkeylog.txt") and not os.path.exists(keylog)  # gone with it
    assert f"TLS/QUIC secrets: $SSLKEYLOGFILE ({keylog}) goes into --pcap {path}" in r.stderr
    cap = pcapng_read.read(path)
    assert [r.comment.split(";")[0] for r in cap.packets] == ["forwarded", "forwarded"]


def test_run_pcap_to_a_fifo_without_a_reader_says_so(tmp_path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    r = subprocess.run(
        [*_tunpair_cmd(), "run", "--pcap", str(fifo), "--", "true"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 125
    assert "no reader has the FIFO open: start the reader first" in r.stderr


INNER_LIVE = """
import socket, time
from pathlib import Path

def blocks(path):
    data = Path(path).read_bytes() if Path(path).exists() else b""
    off, kinds = 0, []
    while off + 12 <= len(data):
        kind, total = int.from_bytes(data[off:off + 4], "little"), int.from_bytes(data[off + 4:off + 8], "little")
        if off + total > len(data):
            break
        kinds.append(kind)
        off += total
    return kinds

def test_live(tun_pair):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((tun_pair.a.ip, 0))
        s.sendto(b"live", (tun_pair.b.ip, 9))
    deadline = time.monotonic() + 10
    # Streamed while the test runs: both packets are in the file before it ends.
    while blocks("live/test_inner.py_test_live.pcapng").count(6) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)

def test_second(tun_pair):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((tun_pair.a.ip, 0))
        s.sendto(b"second", (tun_pair.b.ip, 9))
    tun_pair.packets.wait_for(direction="b->a")
"""


def test_pcap_live_into_a_directory_streams_each_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inner=INNER_LIVE)
    result = pytester.runpytest_subprocess(
        "--tunpair", "-p", "no:cacheprovider", "--tunpair-pcap-live=live"
    )
    result.assert_outcomes(passed=2)
    live = pytester.path / "live"
    assert sorted(p.name for p in live.iterdir()) == [
        "test_inner.py_test_live.pcapng",
        "test_inner.py_test_second.pcapng",
    ]
    for f in live.iterdir():
        cap = pcapng_read.read(f)
        assert [i.name for i in cap.interfaces] == ["a->b", "b->a"]
        assert len(cap.packets) == 2


INNER_TWO = """
import socket

def send(pair, payload):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((pair.a.ip, 0))
        s.sendto(payload, (pair.b.ip, 9))
    pair.packets.wait_for(direction="b->a")

def test_live(tun_pair):
    send(tun_pair, b"first")

def test_second(tun_pair):
    send(tun_pair, b"second")
"""


def test_pcap_live_into_a_fifo_is_one_stream_for_the_run(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inner=INNER_TWO)
    fifo = pytester.path / "wire.fifo"
    os.mkfifo(fifo)
    data = bytearray()
    opened = threading.Event()

    def read() -> None:
        with open(fifo, "rb") as f:  # blocks until the writer comes
            opened.set()
            while chunk := f.read(4096):
                data.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        result = pytester.runpytest_subprocess(
            "--tunpair", "-p", "no:cacheprovider", f"--tunpair-pcap-live={fifo}"
        )
    finally:
        if not opened.is_set():
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # let the reader go
    reader.join(WAIT)
    result.assert_outcomes(passed=2)
    cap = pcapng_read.read(bytes(data))
    assert cap.sections == 1
    assert [i.name for i in cap.interfaces] == ["a->b", "b->a", "a->b", "b->a"]
    assert "(test_inner.py::test_live)" in cap.interfaces[0].description
    assert "(test_inner.py::test_second)" in cap.interfaces[2].description
    assert sorted({r.interface for r in cap.packets}) == [0, 1, 2, 3]


INNER_READER_GOES = """
import pathlib, socket, time

def test_live(tun_pair):
    deadline = time.monotonic() + 10
    while not pathlib.Path("reader-gone").exists():  # the reader took a few bytes and left
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((tun_pair.a.ip, 0))
        s.sendto(b"into a pipe nobody reads", (tun_pair.b.ip, 9))
    tun_pair.packets.wait_for(direction="b->a")

def test_second(tun_pair):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((tun_pair.a.ip, 0))
        s.sendto(b"second", (tun_pair.b.ip, 9))
    tun_pair.packets.wait_for(direction="b->a")
"""


def test_pcap_live_fifo_reader_going_away_ends_the_stream_not_the_tests(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_inner=INNER_READER_GOES)
    fifo = pytester.path / "wire.fifo"
    os.mkfifo(fifo)

    def read_a_little() -> None:
        with open(fifo, "rb") as f:
            f.read(16)
        (pytester.path / "reader-gone").touch()

    reader = threading.Thread(target=read_a_little, daemon=True)
    reader.start()
    try:
        result = pytester.runpytest_subprocess(
            "--tunpair", "-p", "no:cacheprovider", f"--tunpair-pcap-live={fifo}"
        )
    finally:
        if reader.is_alive():
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    reader.join(WAIT)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "*- tunpair: live pcapng -*",
            f"1 test not streamed: no reader had {fifo} open when the pair opened (first: "
            "test_inner.py::test_second)*",
            f"{fifo}: the stream ended early: the reader went away (during "
            "test_inner.py::test_second)",
        ]
    )


INNER_FALLS_BEHIND = """
import pathlib, socket, pytest

@pytest.mark.tunpair(max_packets=10)
def test_burst(tun_pair):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((tun_pair.a.ip, 0))
        for _ in range(300):
            s.sendto(b"x" * 1400, (tun_pair.b.ip, 9))
    tun_pair.packets.wait_quiet()
    pathlib.Path("sent").touch()  # the reader starts reading now
"""


def test_pcap_live_says_what_a_stream_that_fell_behind_missed(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inner=INNER_FALLS_BEHIND)
    fifo = pytester.path / "wire.fifo"
    os.mkfifo(fifo)
    data = bytearray()

    def read_once_sent() -> None:
        with open(fifo, "rb") as f:
            deadline = time.monotonic() + 30
            while not (pytester.path / "sent").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            while chunk := f.read(1 << 16):
                data.extend(chunk)

    reader = threading.Thread(target=read_once_sent, daemon=True)
    reader.start()
    try:
        result = pytester.runpytest_subprocess(
            "--tunpair", "-p", "no:cacheprovider", f"--tunpair-pcap-live={fifo}"
        )
    finally:
        if reader.is_alive():
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    reader.join(WAIT)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "*- tunpair: live pcapng -*",
            f"{fifo}: * packets not streamed: the capture let them go before the stream caught "
            "up; a larger capture_bytes or max_packets *",
        ]
    )
    assert any(
        "not streamed (capture bound)" in p.comment for p in pcapng_read.read(bytes(data)).packets
    )


def test_pcap_live_fifo_without_a_reader_runs_the_tests_and_says_so(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        test_inner="def test_one(tun_pair):\n    pass\n\ndef test_two(tun_pair):\n    pass\n"
    )
    fifo = pytester.path / "wire.fifo"
    os.mkfifo(fifo)
    result = pytester.runpytest_subprocess(
        "--tunpair", "-p", "no:cacheprovider", f"--tunpair-pcap-live={fifo}"
    )
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "*- tunpair: live pcapng -*",
            f"2 tests not streamed: no reader had {fifo} open when the pair opened (first: "
            "test_inner.py::test_one); start the reader*",
        ]
    )


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (
            ["-n", "2", "--tunpair-pcap-live=wire.fifo"],
            "*is a FIFO, which takes one writer, and -n runs several*",
        ),
        (
            ["--tunpair-pcap=same", "--tunpair-pcap-live=same"],
            "*both name */same: the failed tests' files would overwrite the live ones*",
        ),
    ],
    ids=["fifo-with-xdist", "same-directory"],
)
def test_pcap_live_refusals(pytester: pytest.Pytester, args: list[str], expect: str) -> None:
    os.mkfifo(pytester.path / "wire.fifo")
    pytester.makepyfile("def test_plain():\n    pass\n")
    result = pytester.runpytest_subprocess("--tunpair", "-p", "no:cacheprovider", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --tunpair-pcap-live*" + expect.lstrip("*")])


def test_ssl_context_purpose_for_a_server(tun_pair: TunPair) -> None:
    ctx = tun_pair.ssl_context(ssl.Purpose.CLIENT_AUTH)
    assert ctx.keylog_filename == tun_pair.keylog
    assert not ctx.check_hostname
