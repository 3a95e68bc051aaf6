"""Liveness answered outside the event loop: a probe port that reports the loop's lag.

The app's ``/health/live`` is an ordinary request: while the event loop works through a
burst of thousands, the probe waits its turn with them (seconds, measured in
docs/performance.md), and a kubelet whose liveness probe times out restarts a pod that
is only busy. With ``DB_LIVENESS_PORT`` set, a thread of its own serves ``GET
/health/live`` on that port. It answers within milliseconds however busy the loop is,
and it says what the in-loop route cannot: whether the loop still runs. A callback on
the loop stamps the time every :data:`HEARTBEAT` seconds; the probe answers 200 while
the last stamp is younger than ``DB_LIVENESS_MAX_LAG`` seconds, and 503 once the loop
has not run that long (a blocking call, a deadlock: what liveness probes are for).

The thread holds the GIL only while it answers a probe (splitting a request line and
writing ~200 bytes); it waits in ``select`` otherwise, which releases it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import selectors
import socket
import threading
import time
from typing import Any

from .errors import ConfigurationError

logger = logging.getLogger("fastapi_dbpool")

#: Seconds between two stamps of the loop's heartbeat.
HEARTBEAT = 0.1

#: The probe's path on the liveness port.
LIVE_PATH = "/health/live"
_LIVE_PATH_BYTES = LIVE_PATH.encode()


class LoopHeartbeat:
    """The event loop's pulse: a callback on the loop stamps ``time.monotonic()``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float = HEARTBEAT) -> None:
        self.loop = loop
        self.interval = interval
        self.last = time.monotonic()
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.last = time.monotonic()
        self._handle = self.loop.call_later(self.interval, self._beat)

    def _beat(self) -> None:
        self.last = time.monotonic()
        self._handle = self.loop.call_later(self.interval, self._beat)

    def lag(self) -> float:
        """Seconds the loop is late: how long past its due time the next stamp is."""
        return max(0.0, time.monotonic() - self.last - self.interval)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


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


class _ProbeServer:
    """A minimal HTTP/1.1 server on one thread: a selector, no per-connection threads.

    Every probe costs the thread a few GIL acquisitions (wake-up, read, write) and a few
    microseconds of Python in between: while the event loop's thread is busy, each
    acquisition waits for the interpreter's switch interval (5 ms), so the fewer the
    better. (``http.server`` parsed headers with the email package and took the GIL a
    dozen times a probe.)
    """

    #: Largest request head read before the connection is dropped.
    MAX_HEAD = 8192

    def __init__(self, host: str, port: int, heartbeat: LoopHeartbeat, max_lag: float) -> None:
        self.heartbeat = heartbeat
        self.max_lag = max_lag
        listener = socket.socket(
            socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM
        )
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if hasattr(socket, "SO_REUSEPORT"):
                # Several worker processes of one pod (WEB_CONCURRENCY > 1) each bind it;
                # the kernel hands each probe to one of them.
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            listener.bind((host, port))
            listener.listen(64)
        except BaseException:
            listener.close()
            raise
        listener.setblocking(False)
        self.listener = listener
        self.port: int = listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector.register(self._wake_r, selectors.EVENT_READ, "stop")
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
            self._wake_r.close()
            self._wake_w.close()

    def stop(self) -> None:
        """Make :meth:`serve` return (from any thread)."""
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

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


class LivenessServer:
    """``GET /health/live`` on its own port, answered by a thread from the heartbeat.

    Args:
        host: Address to listen on (``DB_LIVENESS_HOST``).
        port: Port to listen on (``DB_LIVENESS_PORT``); 0 picks a free one.
        heartbeat: The loop's heartbeat, started by :meth:`start`.
        max_lag: Seconds of loop lag from which the probe answers 503
            (``DB_LIVENESS_MAX_LAG``).
    """

    def __init__(self, host: str, port: int, heartbeat: LoopHeartbeat, max_lag: float) -> None:
        self.host = host
        self.port = port
        self.heartbeat = heartbeat
        self.max_lag = max_lag
        self._server: _ProbeServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind the port and start answering.

        Raises:
            ConfigurationError: The port cannot be bound (in use by another program,
                not permitted).
        """
        try:
            server = _ProbeServer(self.host, self.port, self.heartbeat, self.max_lag)
        except OSError as exc:
            raise ConfigurationError(
                f"DB_LIVENESS_PORT ({self.port}) cannot be bound on {self.host}: "
                f"{exc.strerror or exc}"
            ) from None
        self._server = server
        self.port = server.port
        self.heartbeat.start()
        self._thread = threading.Thread(
            target=server.serve, name="fastapi_dbpool.liveness", daemon=True
        )
        self._thread.start()
        logger.info(
            "liveness probe on %s:%d%s (503 past %.1fs of event-loop lag)",
            self.host,
            self.port,
            LIVE_PATH,
            self.max_lag,
            extra={"port": self.port},
        )

    async def stop(self) -> None:
        """Stop answering and close the port."""
        self.heartbeat.stop()
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.stop()
        if thread is not None:
            await asyncio.to_thread(thread.join)
