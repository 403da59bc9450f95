"""fq_codel (RFC 8290) as a queue discipline, against the RFC's behaviour: flows hashed by
their 5-tuple, deficit round robin with new and old lists, CoDel per flow, drops from the
fattest flow at the limit. Pure logic, times passed in."""

from __future__ import annotations

import struct

from pytest_tunpair._link.queue import LinkQueue, Outcome, QueueSpec, RateServer

from .test_queue_unit import _checksum

# 1500-byte packets at 12 Mbit/s: 1 ms of service each.
RATE = 12e6
SERVICE = 0.001


def udp(sport: int, size: int = 1500, dport: int = 9, ident: int = 0) -> bytes:
    """An IPv4 UDP packet of flow (10.0.0.1:sport -> 10.0.0.2:dport)."""
    header = bytearray(
        struct.pack("!BBHHHBBH4s4s", 0x45, 0, size, ident, 0, 64, 17, 0, b"\n\0\0\1", b"\n\0\0\2")
    )
    header[10:12] = struct.pack("!H", _checksum(bytes(header)))
    return bytes(header) + struct.pack("!HHHH", sport, dport, size - 20, 0) + bytes(size - 28)


def fq(**kw: object) -> LinkQueue:
    spec = QueueSpec(discipline="fq_codel", **kw)  # type: ignore[arg-type]
    return LinkQueue(spec, RateServer(RATE), seed=1)


def sent(outs: list[Outcome]) -> list[object]:
    return [o.tag for o in outs if o.action != "dropped"]


def test_flows_are_hashed_by_their_5_tuple() -> None:
    q = fq()
    aqm = q._aqm
    assert aqm is not None
    one = aqm.classify(udp(1000))  # type: ignore[attr-defined]
    assert one == aqm.classify(udp(1000, size=200))  # type: ignore[attr-defined]
    others = {aqm.classify(udp(1001 + i)) for i in range(20)}  # type: ignore[attr-defined]
    assert len(others) > 15  # 20 flows into 1024 queues: few collisions
    # The perturbation is the seed's: another seed hashes the flows elsewhere.
    other = LinkQueue(QueueSpec(discipline="fq_codel"), RateServer(RATE), seed=2)._aqm
    assert [other.classify(udp(1001 + i)) for i in range(5)] != [  # type: ignore[union-attr]
        aqm.classify(udp(1001 + i))  # type: ignore[attr-defined]
        for i in range(5)
    ]


def test_drr_shares_bytes_not_packets() -> None:
    # Two backlogged flows: one of 1500-byte packets, one of 300-byte packets. Each turn
    # serves a quantum (1514 bytes) of each: equal bytes, five small packets per big one.
    q = fq(limit=10_000)
    for i in range(200):
        q.enqueue(udp(1, 1500), 0.0, tag=("big", i))
    for i in range(1000):
        q.enqueue(udp(2, 300), 0.0, tag=("small", i))
    outs = q.advance(0.200)  # 0.2 s: far less than either backlog takes to drain
    done = sent(outs)
    big = sum(1500 for tag in done if tag[0] == "big")  # type: ignore[index]
    small = sum(300 for tag in done if tag[0] == "small")  # type: ignore[index]
    assert big > 0 and small > 0
    assert abs(big - small) <= 1514 * 2, (big, small)


def test_a_new_flow_goes_before_the_backlogged_ones() -> None:
    q = fq(limit=10_000)
    for i in range(100):
        q.enqueue(udp(1), 0.0, tag=("bulk", i))
    # A sparse flow's packet arrives behind 100 ms of bulk backlog...
    q.enqueue(udp(7, 100), 0.0101, tag=("sparse", 0))
    outs = q.advance(1.0)
    order = [o.tag for o in outs if o.action != "dropped"]
    at = order.index(("sparse", 0))
    # ...and leaves after at most the packet in service and one more: it did not wait
    # for the bulk flow's queue, as it would in a FIFO.
    assert at <= 12, order[: at + 1]
    sparse = next(o for o in outs if o.tag == ("sparse", 0))
    assert sparse.sojourn < 0.003


def test_codel_runs_per_flow() -> None:
    # A bulk flow at 2x the link rate builds a standing queue; a sparse flow (one packet
    # every 20 ms) never does. CoDel drops only the bulk flow's packets, and the sparse
    # flow's packets see almost no queueing delay.
    q = fq(limit=100_000)
    outs: list[Outcome] = []
    t = 0.0
    for i in range(4000):  # 2 s of 2x overload
        t = i * SERVICE / 2
        outs += q.enqueue(udp(1), t, tag=("bulk", i))
        if i % 40 == 0:
            outs += q.enqueue(udp(2, 200), t, tag=("sparse", i))
    outs += q.advance(t + 10)
    dropped = [o.tag for o in outs if o.action == "dropped"]
    assert dropped and all(tag[0] == "bulk" for tag in dropped)  # type: ignore[index]
    assert all(o.reason == "codel" for o in outs if o.action == "dropped")
    late = [o for o in outs if o.action == "sent" and o.arrival > 1.0]
    bulk = sorted(o.sojourn for o in late if o.tag[0] == "bulk")  # type: ignore[index]
    sparse = sorted(o.sojourn for o in late if o.tag[0] == "sparse")  # type: ignore[index]
    # The bulk flow's CoDel is in its dropping state (a flow that does not answer drops
    # keeps a long queue: CoDel raises its drop rate only as the square root of the drop
    # count); the sparse flow, new at every packet, waits at most for one of its turns.
    assert bulk[len(bulk) // 2] > 0.1
    assert max(sparse) <= 2 * SERVICE, max(sparse)


def test_at_the_limit_the_fattest_flow_loses_its_head() -> None:
    q = fq(limit=20)
    outs: list[Outcome] = []
    for i in range(19):
        outs += q.enqueue(udp(1), 0.0, tag=("fat", i))
    outs += q.enqueue(udp(2, 100), 0.0, tag=("thin", 0))  # 20 held: at the limit
    outs += q.enqueue(udp(2, 100), 0.0, tag=("thin", 1))  # over: the fat flow pays
    dropped = [o for o in outs if o.action == "dropped"]
    assert [o.tag for o in dropped] == [("fat", 1)]  # its head waiting (0 is on the wire)
    assert dropped[0].reason == "limit"
    outs += q.advance(1.0)
    assert ("thin", 1) in sent(outs) and ("thin", 0) in sent(outs)


def test_an_emptied_new_flow_passes_the_old_list_once() -> None:
    # RFC 8290 4.1.2: a new flow that empties goes to the end of the old list (when that
    # is not empty) instead of vanishing, so a flow that sends a packet each time it has
    # been served cannot stay "new" and starve the others: its next packet waits for
    # the old flows' turn.
    q = fq(limit=10_000)
    for i in range(30):
        q.enqueue(udp(1, 500), 0.0, tag=("old", i))  # 500 bytes: 1/3 ms each
    # By 1.4 ms flow 1 has used its first quantum and started its second (as an old flow).
    q.enqueue(udp(2, 100), 0.0014, tag=("new", 0))
    outs = q.advance(0.0018)  # flow 2 was served next (new), then emptied
    assert ("new", 0) in sent(outs)
    aqm = q._aqm
    flow2 = next(f for f in aqm.table.values() if f.backlog == 0)  # type: ignore[union-attr]
    assert flow2.listed and list(aqm.old)[-1] is flow2  # type: ignore[union-attr]
    q.enqueue(udp(2, 100), 0.0018, tag=("new", 1))  # not new any more: it waits its turn
    order = sent(q.advance(0.01))
    assert order[0][0] == "old" and ("new", 1) in order  # type: ignore[index]
