"""A minimal HTTP/3 server and client on aioquic's API (its example server is not in its
wheel): enough for one GET through the pair, with the secrets going to a key log.

Both ends run in the calling thread's network namespace: the server on a thread started
from it (threads inherit the namespace of the thread that starts them), the client in the
caller.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import threading
from pathlib import Path
from typing import Any, TextIO

from aioquic.asyncio import QuicConnectionProtocol, connect, serve
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import QuicEvent

BODY = b"hello over h3\n"


def make_certificate(directory: Path, ip: str) -> tuple[Path, Path]:
    """A self-signed certificate for ``ip`` (and its key), made with ``cryptography``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tunpair test")])
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
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class _ServerProtocol(QuicConnectionProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._http = H3Connection(self._quic)

    def quic_event_received(self, event: QuicEvent) -> None:
        for http_event in self._http.handle_event(event):
            if isinstance(http_event, HeadersReceived) and http_event.stream_ended:
                self._http.send_headers(
                    http_event.stream_id,
                    [(b":status", b"200"), (b"content-type", b"text/plain")],
                )
                self._http.send_data(http_event.stream_id, BODY, end_stream=True)
                self.transmit()


class H3Server:
    """``with H3Server(ip, port, cert, key):`` an HTTP/3 server answering every GET with
    :data:`BODY`, on a thread of its own."""

    def __init__(self, ip: str, port: int, cert: Path, key: Path) -> None:
        self.ip, self.port = ip, port
        self.config = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN)
        self.config.load_cert_chain(str(cert), str(key))
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="h3 server", daemon=True)

    def _run(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            server = loop.run_until_complete(
                serve(
                    self.ip, self.port, configuration=self.config, create_protocol=_ServerProtocol
                )
            )
        except BaseException as exc:
            self._failed = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            server.close()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def __enter__(self) -> H3Server:
        self._thread.start()
        self._ready.wait(10)
        if self._failed is not None:
            raise self._failed
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


class _ClientProtocol(QuicConnectionProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.http = H3Connection(self._quic)
        self.events: dict[int, list[H3Event]] = {}
        self.done: dict[int, asyncio.Future[list[H3Event]]] = {}

    def quic_event_received(self, event: QuicEvent) -> None:
        for http_event in self.http.handle_event(event):
            if isinstance(http_event, (HeadersReceived, DataReceived)):
                sid = http_event.stream_id
                self.events.setdefault(sid, []).append(http_event)
                if http_event.stream_ended and sid in self.done:
                    self.done[sid].set_result(self.events[sid])

    async def get(self, authority: str, path: str) -> list[H3Event]:
        sid = self._quic.get_next_available_stream_id()
        self.done[sid] = asyncio.get_running_loop().create_future()
        self.http.send_headers(
            sid,
            [
                (b":method", b"GET"),
                (b":scheme", b"https"),
                (b":authority", authority.encode()),
                (b":path", path.encode()),
            ],
            end_stream=True,
        )
        self.transmit()
        return await asyncio.wait_for(self.done[sid], 10)


def h3_get(ip: str, port: int, path: str, *, cafile: Path, secrets: TextIO) -> tuple[int, bytes]:
    """GET ``path`` over HTTP/3; (status, body). The secrets go to ``secrets``."""
    config = QuicConfiguration(
        is_client=True, alpn_protocols=H3_ALPN, secrets_log_file=secrets, server_name=ip
    )
    config.load_verify_locations(str(cafile))

    async def run() -> tuple[int, bytes]:
        async with connect(
            ip, port, configuration=config, create_protocol=_ClientProtocol
        ) as client:
            assert isinstance(client, _ClientProtocol)
            events = await client.get(f"{ip}:{port}", path)
        status = 0
        body = b""
        for e in events:
            if isinstance(e, HeadersReceived):
                status = int(dict(e.headers)[b":status"])
            elif isinstance(e, DataReceived):
                body += e.data
        return status, body

    return asyncio.run(run())
