"""HTTP/2 over TLS through the tunnel, asserted on decrypted: the pair's key log.

A small HTTP/2 server (the h2 library, TLS from the stdlib) on b, httpx as the client on a
with ``tun_pair.ssl_context()``, which logs the session's secrets to ``tun_pair.keylog``.
``packets.tls_records()`` decrypts the capture with them; ``packets.to_pcap()`` embeds them,
so the file opens decrypted in Wireshark. The same key log takes a QUIC client's secrets
(aioquic's ``secrets_log_file``): the pcapng then opens decrypted as QUIC.

Run: pytest --tunpair examples/
"""

import asyncio
import datetime
import ipaddress
import socket
import ssl
import threading

import httpx
import pytest
from aioquic.asyncio import connect, serve
from aioquic.quic.configuration import QuicConfiguration
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import RequestReceived
from hpack import Decoder
from hyperframe.frame import Frame, HeadersFrame


def make_certificate(directory, ip):
    """A self-signed certificate for ``ip``: (certificate file, key file)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tunpair example")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def serve_h2(listener, context):
    """Answer the requests of one HTTP/2 connection with 200 "hello over h2"."""
    sock, _ = listener.accept()
    with context.wrap_socket(sock, server_side=True) as tls:
        conn = H2Connection(H2Configuration(client_side=False))
        conn.initiate_connection()
        tls.sendall(conn.data_to_send())
        while data := tls.recv(65536):
            for event in conn.receive_data(data):
                if isinstance(event, RequestReceived):
                    body = b"hello over h2\n"
                    conn.send_headers(
                        event.stream_id,
                        [(":status", "200"), ("content-length", str(len(body)))],
                    )
                    conn.send_data(event.stream_id, body, end_stream=True)
            tls.sendall(conn.data_to_send())


@pytest.fixture
def h2_server(tun_pair, tmp_path):
    """An HTTP/2 server on b (asking for tun_pair first puts it in the test's namespace)."""
    cert, key = make_certificate(tmp_path, tun_pair.b.ip)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2"])
    with socket.create_server((tun_pair.b.ip, 0)) as listener:
        thread = threading.Thread(target=serve_h2, args=(listener, context), daemon=True)
        thread.start()
        yield f"https://{tun_pair.b.ip}:{listener.getsockname()[1]}", cert
        thread.join(10)


def http2_headers(stream: bytes):
    """The header lists of the HEADERS frames in an HTTP/2 byte stream (one direction)."""
    if stream.startswith(b"PRI * HTTP/2.0"):
        stream = stream[24:]  # the client's connection preface
    decoder = Decoder()  # HPACK keeps a table per direction: decode every block in order
    headers = []
    while len(stream) >= 9:
        frame, length = Frame.parse_frame_header(memoryview(stream[:9]))
        frame.parse_body(memoryview(stream[9 : 9 + length]))
        if isinstance(frame, HeadersFrame):
            headers.append(decoder.decode(frame.data))
        stream = stream[9 + length :]
    return headers


# --8<-- [start:tls]
def test_http2_request_decrypted_from_the_capture(tun_pair, h2_server, tmp_path):
    url, cert = h2_server
    # The client's TLS secrets go to the pair's key log.
    with httpx.Client(http2=True, verify=tun_pair.ssl_context(cafile=cert)) as client:
        response = client.get(f"{url}/hello")
    assert response.http_version == "HTTP/2" and response.text == "hello over h2\n"
    tun_pair.packets.wait_quiet()

    records = tun_pair.packets.tls_records()
    assert all(r.decrypted for r in records if r.encrypted)
    sent = b"".join(
        r.data for r in records if r.direction == "a->b" and r.type == "application_data"
    )
    (request,) = http2_headers(sent)
    assert (":method", "GET") in request and (":path", "/hello") in request

    # The secrets travel inside the file: Wireshark and tshark open it decrypted.
    tun_pair.packets.to_pcap(tmp_path / "h2.pcapng")
    # --8<-- [end:tls]


async def quic_ping(tun_pair, cert, key, port=4433):
    """A QUIC handshake and a PING between a server on b and a client on a (aioquic)."""
    server_config = QuicConfiguration(is_client=False, alpn_protocols=["tunpair"])
    server_config.load_cert_chain(cert, key)
    server = await serve(tun_pair.b.ip, port, configuration=server_config)
    try:
        # --8<-- [start:quic]
        with open(tun_pair.keylog, "a") as secrets:
            config = QuicConfiguration(alpn_protocols=["tunpair"], secrets_log_file=secrets)
            config.load_verify_locations(cert)
            async with connect(tun_pair.b.ip, port, configuration=config) as client:
                await client.ping()
        # --8<-- [end:quic]
    finally:
        server.close()


def test_quic_secrets_go_into_the_capture(tun_pair, tmp_path):
    cert, key = make_certificate(tmp_path, tun_pair.b.ip)
    asyncio.run(quic_ping(tun_pair, cert, key))
    tun_pair.packets.wait_quiet()
    assert b"CLIENT_TRAFFIC_SECRET_0 " in tun_pair.packets.secrets()
    tun_pair.packets.to_pcap(tmp_path / "quic.pcapng")  # opens decrypted as QUIC
