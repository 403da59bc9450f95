"""Which packets `loss` drops follows from the seed alone: predict it, then watch it happen."""

import random
import socket

import pytest


def predicted_losses(seed, loss, count, direction="a->b"):
    """The packets (0, 1, ...) of `direction` that impair(loss=..., seed=seed) drops."""
    # One stream per direction: 2 * seed for a->b, 2 * seed + 1 for b->a.
    rng = random.Random(2 * seed + (direction == "b->a"))
    lost = []
    for k in range(count):
        # Six draws per packet, always, in this order: loss, corrupt, bit position,
        # jitter, duplicate, reorder. Packet k's loss draw is the first of its six.
        u_loss, _corrupt, _bit, _jitter, _duplicate, _reorder = (rng.random() for _ in range(6))
        if u_loss < loss:
            lost.append(k)
    return lost


@pytest.mark.tunpair(ipv6=None)  # no IPv6 chatter: our datagrams are the only packets
def test_the_seed_predicts_the_loss_pattern(tun_pair):
    tun_pair.impair(loss=0.3, seed=2024, direction="a->b")
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client,
    ):
        server.bind((tun_pair.b.ip, 0))
        client.bind((tun_pair.a.ip, 0))
        for i in range(40):
            client.sendto(bytes([i]), server.getsockname())
        # The last datagram is recorded either way: delivered, or lost.
        tun_pair.packets.wait_for(lambda p: p.direction == "a->b" and p.data[-1] == 39)
    sent = [p for p in tun_pair.packets if p.direction == "a->b"]
    assert len(sent) == 40
    lost = [k for k, p in enumerate(sent) if p.action == "lost"]
    assert lost == predicted_losses(2024, 0.3, len(sent))
