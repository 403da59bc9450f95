"""FTP in passive and active mode (the seed article's other example).

In active mode the server connects *back* to the client, so the data connection's SYN
travels b->a through the relay. Needs pyftpdlib (`pip install pytest-tunpair[test]`).
"""

import ftplib
import threading

import pytest

pytest.importorskip("pyftpdlib")
from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler
from pyftpdlib.servers import FTPServer
from scapy.layers.inet import TCP


@pytest.fixture
def ftp_server(tun_pair, tmp_path):
    (tmp_path / "data.bin").write_bytes(bytes(range(256)) * 400)
    authorizer = DummyAuthorizer()
    authorizer.add_anonymous(str(tmp_path))
    handler = type("Handler", (FTPHandler,), {"authorizer": authorizer})
    server = FTPServer((tun_pair.b.ip, 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"timeout": 0.05}, daemon=True)
    thread.start()
    yield server
    server.close_all()
    thread.join(5)


@pytest.mark.parametrize("passive", [True, False], ids=["passive", "active"])
def test_ftp_download(tun_pair, ftp_server, passive):
    ftp = ftplib.FTP()
    ftp.connect(tun_pair.b.ip, ftp_server.address[1], timeout=10)
    ftp.login()
    ftp.set_pasv(passive)
    chunks = []
    ftp.retrbinary("RETR data.bin", chunks.append)
    ftp.quit()
    assert b"".join(chunks) == bytes(range(256)) * 400

    syn_from_server = [
        p for p in tun_pair.packets.filter(TCP, direction="b->a") if p.scapy[TCP].flags == "S"
    ]
    assert bool(syn_from_server) == (not passive)
