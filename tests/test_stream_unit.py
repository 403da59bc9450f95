"""The live pcapng stream's logic without a tunnel: pipes for readers, a Capture filled by
hand, and the file finishing (secrets to the front). Unprivileged, milliseconds."""

from __future__ import annotations

import os
import threading
import time

import pytest

from pytest_tunpair import Capture, Packet
from pytest_tunpair._packets import pcap as _pcap
from pytest_tunpair._packets.stream import Follower, Sink, hoist_secrets, open_fifo

from . import pcapng_read

# An IPv4/UDP packet 198.18.0.1:1000 -> 198.18.0.2:9, 4 bytes of payload.
UDP = bytes.fromhex("4500002000004000401100000ac6120001c61200" + "03e800090000c0de" + "74657374")


def _packet(seq_time: float, direction: str = "a->b", action: str = "forwarded") -> Packet:
    return Packet(seq_time, direction, action, UDP)


def test_a_reader_that_goes_away_breaks_the_stream_not_the_writer() -> None:
    r, w = os.pipe()
    sink = Sink(w, name="pipe")
    os.close(r)
    assert not sink.write_packets([b"\0" * 64], 1)
    assert sink.broken == "the reader went away"
    assert not sink.write_secrets(b"x\n")  # and stays broken, quietly
    sink.close()


def test_a_reader_that_stops_reading_is_given_up_on_abandon() -> None:
    r, w = os.pipe()
    sink = Sink(w, name="pipe")
    result: list[bool] = []
    writer = threading.Thread(
        target=lambda: result.append(sink.write_packets([b"\0" * (1 << 20)], 1))
    )
    writer.start()
    time.sleep(0.05)  # the pipe (64 KiB) is full: the write waits for the reader
    assert writer.is_alive()
    sink.abandon()
    writer.join(5)
    assert result == [False] and sink.broken == "the reader stopped reading"
    sink.close()
    os.close(r)


def test_a_fifo_without_a_reader_is_enxio(tmp_path) -> None:
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    with pytest.raises(OSError) as info:
        open_fifo(str(fifo))
    assert info.value.errno == 6  # ENXIO


def test_follower_streams_packets_and_notes_those_the_capture_let_go(tmp_path) -> None:
    capture = Capture(max_packets=2, interfaces=("tun0 -> tun1", "tun1 -> tun0"))
    path = tmp_path / "s.pcapng"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    sink = Sink(fd, name=str(path), path=str(path))
    follower = Follower(capture, sink, label="t.py::test").start()
    capture.record(_packet(0.001))
    deadline = time.monotonic() + 5
    while sink.packets < 1:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    # Five more at once under a bound of two: three are gone before the follower looks.
    with capture.lock:
        capture.record_locked([_packet(0.002 + i / 1000, "b->a", "lost") for i in range(5)])
    follower.stop()
    sink.close()
    cap = pcapng_read.read(path)
    assert [i.description for i in cap.interfaces] == [
        "tun0 -> tun1 (t.py::test)",
        "tun1 -> tun0 (t.py::test)",
    ]
    assert [r.interface for r in cap.packets] == [0, 1, 1]
    assert cap.packets[1].comment.endswith(
        "; 3 packets before this one not streamed (capture bound)"
    )
    assert cap.packets[2].comment.startswith("lost (not delivered); sojourn 0")
    assert follower.skipped == 3


def test_hoist_secrets_moves_them_before_the_packets(tmp_path) -> None:
    path = tmp_path / "late.pcapng"
    link = _pcap.linktype("tun")
    blocks = [
        _pcap.section_header(),
        _pcap.interface_block(link, "a->b"),
        _pcap.interface_block(link, "b->a"),
        _pcap.packet_block(0, 1, UDP, len(UDP), 2, "forwarded"),
        _pcap.secrets_block(b"CLIENT_RANDOM aa bb\n"),
        _pcap.packet_block(1, 2, UDP, len(UDP), 1, "forwarded"),
    ]
    path.write_bytes(b"".join(blocks))
    os.chmod(path, 0o640)
    hoist_secrets(str(path), b"CLIENT_RANDOM aa bb\n")
    cap = pcapng_read.read(path)
    assert cap.order == ["shb", "idb", "idb", "dsb", "epb", "dsb", "epb"]
    assert [r.interface for r in cap.packets] == [0, 1]
    assert oct(os.stat(path).st_mode & 0o777) == "0o640"
    assert not list(tmp_path.glob("*.tunpair-*"))  # no temporary file left


def test_comment_of_a_packet_cut_by_snaplen() -> None:
    p = _packet(0.0)
    Capture(snaplen=20).record(p)
    assert _pcap.comment(p) == "forwarded; sojourn 0; 20 of 32 bytes kept (snaplen)"


@pytest.mark.parametrize(
    ("action", "first"),
    [
        ("dropped", "dropped (not delivered)"),
        ("too-big", "too-big (not delivered)"),
        ("marked", "marked"),
        # A rule sent other packets on in its place (Verdict.forward): not a loss.
        ("rewritten", "rewritten (replaced by its translation)"),
        ("fragmented", "fragmented (replaced by its fragments)"),
    ],
)
def test_comment_says_what_became_of_the_packet(action: str, first: str) -> None:
    assert _pcap.comment(_packet(0.0, action=action)) == f"{first}; sojourn 0"
