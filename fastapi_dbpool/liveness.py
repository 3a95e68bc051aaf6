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

The thread holds the GIL only while it answers a probe (parsing a request line and
writing ~60 bytes); it waits in ``accept``/``recv`` otherwise, which release it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .errors import ConfigurationError

logger = logging.getLogger("fastapi_dbpool")

#: Seconds between two stamps of the loop's heartbeat.
HEARTBEAT = 0.1

#: The probe's path on the liveness port.
LIVE_PATH = "/health/live"


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


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Several worker processes of one pod (WEB_CONCURRENCY > 1) each bind the port; the
    # kernel hands each probe to one of them (see docs/health-and-kubernetes.md).
    allow_reuse_port = True

    def __init__(self, address: tuple[str, int], heartbeat: LoopHeartbeat, max_lag: float):
        self.heartbeat = heartbeat
        self.max_lag = max_lag
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        if self.allow_reuse_port and hasattr(socket, "SO_REUSEPORT"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive, as the kubelet and load balancers use
    server_version = "fastapi-dbpool"
    sys_version = ""

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != LIVE_PATH:
            self._answer(404, {"detail": "not found"})
            return
        lag = self.server.heartbeat.lag()
        if lag < self.server.max_lag:
            self._answer(200, {"status": "ok", "event_loop_lag": round(lag, 3)})
        else:
            self._answer(503, {"status": "stalled", "event_loop_lag": round(lag, 3)})

    def do_HEAD(self) -> None:
        self.do_GET()

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        # No access log: a probe every few seconds would flood it.
        return


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
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind the port and start answering.

        Raises:
            ConfigurationError: The port cannot be bound (in use by another program,
                not permitted).
        """
        try:
            server = _Server((self.host, self.port), self.heartbeat, self.max_lag)
        except OSError as exc:
            raise ConfigurationError(
                f"DB_LIVENESS_PORT ({self.port}) cannot be bound on {self.host}: "
                f"{exc.strerror or exc}"
            ) from None
        self._server = server
        self.port = server.server_address[1]
        self.heartbeat.start()
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.5},
            name="fastapi_dbpool.liveness",
            daemon=True,
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
        """Stop answering and close the port (waits for the thread, off the loop)."""
        self.heartbeat.stop()
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        await asyncio.to_thread(server.shutdown)
        server.server_close()
        if thread is not None:
            await asyncio.to_thread(thread.join)
