"""QUIC connection migration under NAT rebinding: aioquic's client behind a NAT, its server
in host b. The NAT moves the client to a new outside port mid-connection; the connection
survives, after the server validated the new path (PATH_CHALLENGE / PATH_RESPONSE).

Run: pytest --tunpair examples/test_quic_migration.py
"""

import asyncio
import datetime
import threading

import pytest

aioquic = pytest.importorskip("aioquic")  # in the test extra: pip install -e '.[test]'

from aioquic.asyncio import QuicConnectionProtocol, connect, serve  # noqa: E402
from aioquic.quic.configuration import QuicConfiguration  # noqa: E402
from aioquic.quic.events import StreamDataReceived  # noqa: E402
from aioquic.quic.logger import QuicLogger  # noqa: E402


def self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "server.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return tmp_path / "cert.pem", tmp_path / "key.pem"


class Upper(QuicConnectionProtocol):
    """The server: answers each stream with its data in capitals."""

    def quic_event_received(self, event):
        if isinstance(event, StreamDataReceived):
            self._quic.send_stream_data(event.stream_id, event.data.upper(), event.end_stream)
            self.transmit()


def frames(logger, kind):
    """Frame types the qlog trace shows ``kind`` ("packet_sent" / "packet_received")."""
    return [
        frame["frame_type"]
        for trace in logger.to_dict()["traces"]
        for event in trace["events"]
        if event["name"].endswith(kind)
        for frame in event["data"].get("frames", [])
    ]


# --8<-- [start:quic]
@pytest.mark.tunpair(hosts=True, ipv6=None)
def test_connection_survives_a_nat_rebind(tun_pair, tmp_path):
    nat = tun_pair.nat(mapping="endpoint-independent")
    cert, key = self_signed(tmp_path)
    server_log = QuicLogger()
    server_config = QuicConfiguration(is_client=False, alpn_protocols=["upper"])
    server_config.load_cert_chain(cert, key)
    server_config.quic_logger = server_log
    listening, stop = threading.Event(), threading.Event()

    def run_server():  # in host b (tun_pair.b.run below), on a thread of its own
        async def main():
            server = await serve(
                tun_pair.b.ip, 4433, configuration=server_config, create_protocol=Upper
            )
            listening.set()
            while not stop.is_set():
                await asyncio.sleep(0.05)
            server.close()

        asyncio.run(main())

    thread = threading.Thread(target=tun_pair.b.run, args=(run_server,))
    thread.start()
    assert listening.wait(10)

    async def client():  # in the test's thread: host a, behind the NAT
        config = QuicConfiguration(is_client=True, alpn_protocols=["upper"])
        config.verify_mode = False  # the self-signed certificate
        async with connect(tun_pair.b.ip, 4433, configuration=config) as conn:

            async def ask(text):
                reader, writer = await conn.create_stream()
                writer.write(text)
                writer.write_eof()
                return await asyncio.wait_for(reader.read(), 10)

            first = await ask(b"before")
            nat.rebind()  # the NAT re-maps: the client's next packets come from a new port
            second = await ask(b"after the rebind")
            return first, second

    try:
        answers = asyncio.run(client())
    finally:
        stop.set()
        thread.join(10)
    assert answers == (b"BEFORE", b"AFTER THE REBIND")  # one connection, both answered
    outside_ports = {t.after[1] for t in nat.translations if t.direction == "a->b"}
    assert len(outside_ports) == 2  # the server saw the client at two addresses
    # The server checked the new path before using it (RFC 9000 section 9).
    assert "path_challenge" in frames(server_log, "packet_sent")
    assert "path_response" in frames(server_log, "packet_received")


# --8<-- [end:quic]
