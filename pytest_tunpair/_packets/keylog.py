"""A pair's TLS/QUIC key log: an NSS key log file (``SSLKEYLOGFILE``) that exists only as
long as the pair and whose secrets end up only inside the pcapng files written for it.

The file lives in a private directory (mode 0700, only this user) that :meth:`KeyLog.close`
removes with it. Writers open it by path: curl's and other OpenSSL-based tools'
``SSLKEYLOGFILE``, Python's ``ssl`` ``keylog_filename``, aioquic's ``secrets_log_file``.
A writer that comes after the close finds no directory (``ENOENT``) rather than writing
secrets somewhere that outlives the pair. (An unnamed ``O_TMPFILE`` reached through
``/proc/PID/fd/N`` was the other candidate: after the close that number names whatever
file the process opens next, and a late writer would append secrets to it.)
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading

__all__ = ["KeyLog"]

# Bytes read per pread(): a key log holds a few hundred bytes per connection.
_MAX_READ = 1 << 20


def _read_from(fd: int, offset: int) -> bytes:
    chunks = []
    while chunk := os.pread(fd, _MAX_READ, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


class KeyLog:
    """An NSS key log file for one pair: ``path`` for the writers, :meth:`secrets` for the
    pcapng writer. :meth:`close` keeps what was written (for files written after the pair
    closed: a failed test's pcap holds teardown's traffic) and frees the file."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: bytes | None = None
        self._dir = tempfile.mkdtemp(prefix="tunpair-keylog-")  # 0700
        self.path = os.path.join(self._dir, "sslkeylog.txt")
        """The key log file's path (``SSLKEYLOGFILE``), valid until :meth:`close`."""
        # Created now, so that readers and "a"-mode writers find it, and 0600 whatever the
        # writers' umask.
        self._fd: int | None = os.open(self.path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)

    @property
    def closed(self) -> bool:
        return self._fd is None

    def read(self, offset: int = 0) -> tuple[bytes, int]:
        """The whole lines written from byte ``offset`` on, and the offset after them: a
        line still being written waits for its newline."""
        with self._lock:
            if self._fd is None:
                data = (self._kept or b"")[offset:]
            else:
                data = _read_from(self._fd, offset)
        end = data.rfind(b"\n") + 1
        return data[:end], offset + end

    def secrets(self) -> bytes:
        """Every whole line written so far (after :meth:`close`: until then)."""
        return self.read(0)[0]

    def close(self) -> None:
        """Keep the secrets in memory, remove the file and its directory."""
        with self._lock:
            fd, self._fd = self._fd, None
            if fd is None:
                return
            try:
                self._kept = _read_from(fd, 0)
            finally:
                os.close(fd)
                shutil.rmtree(self._dir, ignore_errors=True)

    def __repr__(self) -> str:
        return f"<KeyLog {self.path}{' closed' if self.closed else ''}>"
