"""Async tests: a server and a client in one event loop, pytest-asyncio's loop scopes, anyio
on trio, the scripted peer in a coroutine, and thread pools inside the namespace.

Run: pytest --tunpair examples/  (pytest-asyncio, anyio and trio come with the test extra)
"""

import asyncio
import socket

import anyio
import pytest
from scapy.layers.inet import TCP
from scapy.packet import Raw


# --8<-- [start:same-loop]
@pytest.mark.asyncio
async def test_server_and_client_in_one_loop(tun_pair):
    async def echo(reader, writer):
        writer.write(await reader.read(100))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, tun_pair.b.ip, 0)  # on b, in this loop
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection(tun_pair.b.ip, port)  # from a
    writer.write(b"ping")
    # Awaited: the loop runs the server meanwhile, so its answer can come.
    answer = await tun_pair.packets.wait_for_async(direction="b->a", payload=b"ping")
    assert answer.sport == port
    assert await reader.read(100) == b"ping"
    writer.close()
    server.close()
    await server.wait_closed()


# --8<-- [end:same-loop]


# --8<-- [start:session-loop]
@pytest.mark.asyncio(loop_scope="session")  # one event loop for the whole session...
@pytest.mark.parametrize("attempt", range(3))
async def test_to_thread_from_a_session_loop(tun_pair, attempt):
    with socket.create_server((tun_pair.b.ip, 0)) as server:
        # ...whose worker threads connect from inside each test's own namespace.
        client = await asyncio.to_thread(socket.create_connection, server.getsockname(), 5)
        conn, (peer_ip, _port) = server.accept()
        conn.close()
        client.close()
    assert peer_ip == tun_pair.a.ip


# --8<-- [end:session-loop]


# --8<-- [start:trio]
@pytest.fixture
def anyio_backend():
    return "trio"  # anyio's pytest plugin runs the test on trio


@pytest.mark.anyio
async def test_trio_client_and_worker_thread(tun_pair):
    with socket.create_server((tun_pair.b.ip, 0)) as server:
        port = server.getsockname()[1]
        async with await anyio.connect_tcp(tun_pair.b.ip, port) as stream:
            conn, _ = await anyio.to_thread.run_sync(server.accept)  # trio's worker thread
            await stream.send(b"hi")
            sent = await tun_pair.packets.expect_async(TCP(dport=port) / Raw(b"hi"))
            assert sent.direction == "a->b"
            conn.close()


# --8<-- [end:trio]


# --8<-- [start:peer]
@pytest.mark.asyncio
async def test_the_scripted_peer_in_a_coroutine(tun_pair):
    with tun_pair.script("b") as peer:  # the test plays b's TCP
        client = asyncio.ensure_future(asyncio.open_connection(tun_pair.b.ip, 8080))
        conn = await peer.tcp_accept_async(8080)  # the loop sends the SYN meanwhile
        reader, writer = await client
        writer.write(b"hello")
        segment = await conn.recv_async()
        assert segment.payload == b"hello"
        conn.send(b"HELLO")  # and the kernel's socket reads the answer
        assert await reader.read(5) == b"HELLO"
        writer.close()


# --8<-- [end:peer]


# --8<-- [start:executor]
def test_a_thread_pool_inside_the_namespace(tun_pair):
    pool = tun_pair.executor(max_workers=4)  # its workers live in the pair's namespace
    with socket.create_server((tun_pair.b.ip, 0)) as server:
        clients = [pool.submit(socket.create_connection, server.getsockname(), 5) for _ in range(4)]
        for _ in clients:
            server.accept()[0].close()
        for client in clients:
            assert client.result().getsockname()[0] == tun_pair.a.ip
            client.result().close()
    # Shut down at teardown: no thread of it outlives the test.


# --8<-- [end:executor]


# --8<-- [start:asyncio-run]
def test_asyncio_run_in_a_plain_test(tun_pair):
    async def main():
        with socket.create_server((tun_pair.b.ip, 0)) as server:
            client = await asyncio.to_thread(socket.create_connection, server.getsockname(), 5)
            server.accept()[0].close()
            client.close()
        return await tun_pair.packets.wait_for_async(flags="S", direction="a->b")

    syn = asyncio.run(main())  # a loop made inside the test: its threads are inside too
    assert syn.src == tun_pair.a.ip


# --8<-- [end:asyncio-run]
