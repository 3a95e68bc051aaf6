"""The liveness port's own process: answers ``GET /health/live`` from the heartbeat.

Run by :mod:`fastapi_dbpool.liveness` as ``python .../liveness_child.py``: a script with
the standard library only (it does not import the package, so it starts in ~30 ms and
holds ~10 MiB). The parent passes it the listening socket (bound by the parent, so a
port in use stops the app's startup), a shared file of 8 bytes where the event loop
stamps ``time.monotonic()`` (system-wide on Linux), and a pipe whose closing tells it
to exit. A process of its own, because a thread of the app's would need the app's GIL
for every read and write, and under a burst the event loop's thread holds it: a thread
answered in 130-340 ms there, where this answers in milliseconds.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import selectors
import socket
import struct
import sys
import time
from typing import Any, Protocol

#: The probe's path on the liveness port.
LIVE_PATH = "/health/live"
_LIVE_PATH_BYTES = LIVE_PATH.encode()
#: Layout of the shared heartbeat: one double, ``time.monotonic()`` of the last stamp.
STAMP = struct.Struct("d")


class Heartbeat(Protocol):
    def lag(self) -> float: ...


class SharedHeartbeat:
    """The event loop's last stamp, read from the file the parent writes it to."""

    def __init__(self, fd: int, interval: float) -> None:
        self.interval = interval
        self._map = mmap.mmap(fd, STAMP.size, access=mmap.ACCESS_READ)

    def lag(self) -> float:
        """Seconds the loop is late: how long past its due time the next stamp is."""
        last: float = STAMP.unpack_from(self._map, 0)[0]
        return max(0.0, time.monotonic() - last - self.interval)


_REASONS = {200: b"OK", 404: b"Not Found", 405: b"Method Not Allowed", 503: b"Service Unavailable"}


def _response(status: int, body: dict[str, Any], keep_alive: bool, head: bool) -> bytes:
    data = json.dumps(body).encode()
    lines = [
        b"HTTP/1.1 %d %s" % (status, _REASONS[status]),
        b"Content-Type: application/json",
        b"Content-Length: %d" % len(data),
        b"Cache-Control: no-store",
        b"Connection: " + (b"keep-alive" if keep_alive else b"close"),
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + (b"" if head else data)


class ProbeServer:
    """A minimal HTTP/1.1 server: one selector, keep-alive, ``GET /health/live`` only."""

    #: Largest request head read before the connection is dropped.
    MAX_HEAD = 8192

    def __init__(self, listener: socket.socket, heartbeat: Heartbeat, max_lag: float, stop: int):
        self.heartbeat = heartbeat
        self.max_lag = max_lag
        listener.setblocking(False)
        self.listener = listener
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ, None)
        # The parent's end of this pipe closes when the parent exits or stops the probe.
        self._selector.register(stop, selectors.EVENT_READ, "stop")
        self._buffers: dict[socket.socket, bytes] = {}

    def serve(self) -> None:
        try:
            while True:
                for key, _ in self._selector.select():
                    if key.data == "stop":
                        return
                    if key.data is None:
                        self._accept()
                    else:
                        self._read(key.fileobj)  # type: ignore[arg-type]
        finally:
            for conn in list(self._buffers):
                self._drop(conn)
            self._selector.close()
            self.listener.close()

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:  # gone before we took it, or out of file descriptors
            return
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffers[conn] = b""
        self._selector.register(conn, selectors.EVENT_READ, "conn")

    def _drop(self, conn: socket.socket) -> None:
        self._buffers.pop(conn, None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn)
        conn.close()

    def _read(self, conn: socket.socket) -> None:
        try:
            chunk = conn.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(conn)
            return
        buffer = self._buffers[conn] + chunk
        while True:
            head, sep, rest = buffer.partition(b"\r\n\r\n")
            if not sep:
                break
            buffer = rest
            if not self._answer(conn, head):
                self._drop(conn)
                return
        if len(buffer) > self.MAX_HEAD:
            self._drop(conn)
            return
        self._buffers[conn] = buffer

    def _answer(self, conn: socket.socket, head: bytes) -> bool:
        """Answer one request (its head; probes have no body); whether to keep the
        connection open."""
        request_line, _, headers = head.partition(b"\r\n")
        parts = request_line.split()
        lowered = headers.lower()
        keep_alive = (
            len(parts) == 3
            and parts[2] == b"HTTP/1.1"
            and b"connection: close" not in lowered
            and b"content-length" not in lowered  # a body: not a probe, not parsed here
            and b"transfer-encoding" not in lowered
        )
        body: dict[str, Any]
        method = parts[0] if parts else b""
        path = parts[1].split(b"?", 1)[0] if len(parts) > 1 else b""
        if method not in (b"GET", b"HEAD"):
            status, body = 405, {"detail": "method not allowed"}
        elif path != _LIVE_PATH_BYTES:
            status, body = 404, {"detail": "not found"}
        else:
            lag = round(self.heartbeat.lag(), 3)
            if lag < self.max_lag:
                status, body = 200, {"status": "ok", "event_loop_lag": lag}
            else:
                status, body = 503, {"status": "stalled", "event_loop_lag": lag}
        try:
            conn.sendall(_response(status, body, keep_alive, method == b"HEAD"))
        except OSError:
            return False
        return keep_alive


def main(argv: list[str]) -> None:
    """``liveness_child.py LISTEN_FD STAMP_FD STOP_FD INTERVAL MAX_LAG``."""
    listen_fd, stamp_fd, stop_fd = (int(a) for a in argv[:3])
    interval, max_lag = float(argv[3]), float(argv[4])
    listener = socket.socket(fileno=listen_fd)
    ProbeServer(listener, SharedHeartbeat(stamp_fd, interval), max_lag, stop_fd).serve()


if __name__ == "__main__":
    main(sys.argv[1:])
