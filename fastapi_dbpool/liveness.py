"""Liveness answered outside the event loop: a probe port that reports the loop's lag.

The app's ``/health/live`` is an ordinary request: while the event loop works through a
burst of thousands, the probe waits its turn with them (seconds, measured in
docs/performance.md), and a kubelet whose liveness probe times out restarts a pod that
is only busy. With ``DB_LIVENESS_PORT`` set, a small process of its own
(:mod:`fastapi_dbpool.liveness_child`) serves ``GET /health/live`` on that port. It
answers within milliseconds however busy the loop is, and it says what the in-loop route
cannot: whether the loop still runs. A callback on the loop stamps the time every
:data:`HEARTBEAT` seconds into a shared file; the probe answers 200 while the last stamp
is younger than ``DB_LIVENESS_MAX_LAG`` seconds, and 503 once the loop has not run that
long (a blocking call, a deadlock: what liveness probes are for).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

from .errors import ConfigurationError
from .liveness_child import LIVE_PATH, STAMP

logger = logging.getLogger("fastapi_dbpool")

#: Seconds between two stamps of the loop's heartbeat.
HEARTBEAT = 0.1

_CHILD = Path(__file__).with_name("liveness_child.py")


class LoopHeartbeat:
    """The event loop's pulse: a callback on the loop stamps ``time.monotonic()``.

    The stamp goes to ``last`` and, once :meth:`share` gave it one, to a file the
    liveness process reads (``liveness_child.SharedHeartbeat.lag``).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float = HEARTBEAT) -> None:
        self.loop = loop
        self.interval = interval
        self.last = time.monotonic()
        self._file: IO[bytes] | None = None
        self._handle: asyncio.TimerHandle | None = None

    def share(self) -> int:
        """A file descriptor of the shared stamp (an unlinked temporary file)."""
        if self._file is None:
            self._file = tempfile.TemporaryFile(prefix="dbpool-heartbeat-")  # noqa: SIM115 (closed by stop)
            self._file.write(STAMP.pack(self.last))
            self._file.flush()
        return self._file.fileno()

    def start(self) -> None:
        self._stamp()

    def _stamp(self) -> None:
        self.last = time.monotonic()
        if self._file is not None:
            os.pwrite(self._file.fileno(), STAMP.pack(self.last), 0)
        self._handle = self.loop.call_later(self.interval, self._stamp)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._file is not None:
            self._file.close()
            self._file = None


class LivenessServer:
    """``GET /health/live`` on its own port, answered by a process from the heartbeat.

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
        self._process: subprocess.Popen[bytes] | None = None
        self._stop_w: int | None = None

    def start(self) -> None:
        """Bind the port and start the process that answers on it.

        Raises:
            ConfigurationError: The port cannot be bound (in use by another program,
                not permitted), or the process cannot start.
        """
        listener = _bind(self.host, self.port)
        try:
            self.port = listener.getsockname()[1]
            stamp_fd = self.heartbeat.share()
            stop_r, stop_w = os.pipe()
            try:
                self._process = subprocess.Popen(
                    [
                        sys.executable,
                        "-I",  # isolated: no site-packages, no PYTHON* variables
                        str(_CHILD),
                        str(listener.fileno()),
                        str(stamp_fd),
                        str(stop_r),
                        repr(self.heartbeat.interval),
                        repr(self.max_lag),
                    ],
                    pass_fds=(listener.fileno(), stamp_fd, stop_r),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,  # stderr stays the app's: tracebacks show
                    close_fds=True,
                )
            except OSError as exc:
                os.close(stop_w)
                raise ConfigurationError(
                    f"DB_LIVENESS_PORT: the liveness process could not start: {exc}"
                ) from None
            finally:
                os.close(stop_r)
            self._stop_w = stop_w
        finally:
            listener.close()  # the process has its own copy
        self.heartbeat.start()
        logger.info(
            "liveness probe on %s:%d%s (503 past %.1fs of event-loop lag)",
            self.host,
            self.port,
            LIVE_PATH,
            self.max_lag,
            extra={"port": self.port},
        )

    async def stop(self) -> None:
        """Stop answering: the process exits and the port closes."""
        self.heartbeat.stop()
        if self._stop_w is not None:
            os.close(self._stop_w)  # EOF on its pipe: the process exits
            self._stop_w = None
        process, self._process = self._process, None
        if process is None:
            return
        try:
            await asyncio.to_thread(process.wait, 5)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            # Several worker processes of one pod (WEB_CONCURRENCY > 1) each bind it; the
            # kernel hands each probe to one of them.
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind((host, port))
        listener.listen(64)
    except OSError as exc:
        listener.close()
        raise ConfigurationError(
            f"DB_LIVENESS_PORT ({port}) cannot be bound on {host}: {exc.strerror or exc}"
        ) from None
    return listener
