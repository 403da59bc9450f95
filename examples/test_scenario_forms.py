"""The forms of docs/scenarios.md, each a test CI runs: a trace and burst loss declared with
the ``impair`` marker, outages, a path MTU, plots.

Run: pytest --tunpair examples/
"""

import socket

import pytest

from pytest_tunpair import GilbertElliott, traces


def send_udp(pair, src_ip, dst_ip, count, size=200):
    """``count`` numbered datagrams from ``src_ip`` to a fresh socket on ``dst_ip``, once the
    relay has recorded the last (whatever it did with it); returns the receiver (timeout
    2 s) and its port."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind((dst_ip, 0))
    rx.settimeout(2)
    port = rx.getsockname()[1]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        tx.bind((src_ip, 0))
        for i in range(count):
            tx.sendto(i.to_bytes(4, "big") * (size // 4), rx.getsockname())
    last = (count - 1).to_bytes(4, "big")
    pair.packets.wait_for(lambda p: p.dport == port and p.payload[:4] == last, timeout=5)
    return rx, port


# --8<-- [start:trace]
@pytest.mark.impair(trace=traces.constant(12), direction="b->a")  # 12 Mbit/s downlink
def test_download(tun_pair):
    rx, port = send_udp(tun_pair, tun_pair.b.ip, tun_pair.a.ip, 20)  # b -> a: the downlink
    with rx:
        assert all(rx.recv(2048) for _ in range(20))
    down = tun_pair.packets.filter(direction="b->a", dport=port)
    assert {p.action for p in down} == {"delayed"}  # each waited for a delivery opportunity
    # --8<-- [end:trace]


# --8<-- [start:gemodel]
@pytest.mark.impair(loss=GilbertElliott(p=0.01, r=0.3), seed=7)
def test_video_survives_bursts(tun_pair):
    rx, port = send_udp(tun_pair, tun_pair.a.ip, tun_pair.b.ip, 1000)
    rx.close()
    fates = [p.action == "lost" for p in tun_pair.packets.filter(direction="a->b", dport=port)]
    assert len(fates) == 1000
    # About p / (p + r) = 3 % lost, in bursts of 1 / r = 3.3 packets on average.
    assert 0 < sum(fates) < 100
    # --8<-- [end:gemodel]


def test_outages(tun_pair):
    # --8<-- [start:outage]
    with tun_pair.outage():  # both directions, from now until the block ends
        rx, _ = send_udp(tun_pair, tun_pair.a.ip, tun_pair.b.ip, 1)
        with rx, pytest.raises(TimeoutError):
            rx.settimeout(0.2)
            rx.recv(2048)
    later = tun_pair.outage(2.0, after=0.5)  # from 0.5 s from now, for 2 s
    o = tun_pair.outage(direction="a->b")
    o.end()
    # --8<-- [end:outage]
    assert later.end_time - later.start == pytest.approx(2.0)
    assert [p.action for p in tun_pair.packets if p.direction == "a->b"] == ["lost"]


def test_path_mtu_forms(tun_pair):
    def send_big():  # 1400 bytes of UDP with DF set (path-MTU discovery on)
        after = tun_pair.packets.last_seq
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            # IP_MTU_DISCOVER = IP_PMTUDISC_PROBE: DF set, the path MTU learnt ignored
            # (linux/in.h: 10 and 3; Python's socket module does not name them).
            tx.setsockopt(socket.IPPROTO_IP, 10, 3)
            tx.sendto(b"x" * 1372, (tun_pair.b.ip, 9))
        # Recorded under this path MTU, before the next call changes it.
        tun_pair.packets.wait_for(lambda p: p.seq > after and len(p) > 1280)

    # --8<-- [start:path_mtu]
    tun_pair.path_mtu(1280)  # ICMP "fragmentation needed" / "packet too big" back
    send_big()
    tun_pair.path_mtu(1280, icmp=False)  # a PMTU black hole: big packets vanish
    send_big()
    tun_pair.path_mtu(None)  # back to the pair's MTU
    send_big()
    # --8<-- [end:path_mtu]
    big = tun_pair.packets.wait_for(lambda p: p.action == "forwarded" and len(p) > 1280)
    actions = [p.action for p in tun_pair.packets if p.seq <= big.seq and len(p) > 1280]
    assert actions == ["too-big", "too-big", "forwarded"]
    too_big = tun_pair.packets.filter(direction="b->a", icmp_type=3, icmp_code=4)
    assert len(too_big) == 1  # only the first path MTU answered


def test_plots_and_logs(tun_pair, tmp_path):
    pytest.importorskip("matplotlib")
    tun_pair.impair(rate="10mbit", direction="a->b")
    rx, _ = send_udp(tun_pair, tun_pair.a.ip, tun_pair.b.ip, 50, size=1000)
    rx.close()
    tun_pair.packets.wait_quiet()  # the last datagrams leave the 10 Mbit/s link
    # --8<-- [start:plot]
    tun_pair.packets.plot(tmp_path / "run.png")  # or .svg
    tun_pair.packets.to_mahimahi_log(tmp_path / "up.log", direction="a->b")
    # --8<-- [end:plot]
    assert (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    departures = [line for line in (tmp_path / "up.log").read_text().splitlines() if "-" in line]
    assert len(departures) >= 50
