"""An in-process asyncio TCP proxy for fault injection.

Put a :class:`FaultProxy` between a client (asyncpg, a SQLAlchemy engine) and PostgreSQL,
then switch its mode while the test runs::

    proxy = FaultProxy("127.0.0.1", pg_port)
    await proxy.start()
    engine = create_async_engine(proxy.url_for(database_url))
    proxy.refuse()       # new connects fail with ECONNREFUSED
    proxy.passthrough()  # service restored, same port
    await proxy.stop()

The proxy runs in the test's event loop, so it only forwards bytes while that loop runs
(``await`` something); blocking calls in the test freeze it too.

Modes (exactly one is active; each call replaces the previous mode):

* :meth:`FaultProxy.passthrough` forwards everything.
* :meth:`FaultProxy.refuse` closes the listening socket: connects get ``ECONNREFUSED``.
  Open connections keep working. Leaving the mode listens again on the same port.
* :meth:`FaultProxy.blackhole` is a network partition: new connections are accepted but
  get no answer, and open connections stop forwarding in both directions without being
  closed. Bytes are held (like TCP retransmission would), so they are delivered if the
  mode is left.
* :meth:`FaultProxy.delay` adds latency to every chunk, in each direction.

:meth:`FaultProxy.reset_all` is an action, not a mode: it resets (TCP RST) every open
connection on both sides, client and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self

from sqlalchemy.engine import URL, make_url

from fastapi_dbpool.embedded import find_free_port

__all__ = ["FaultProxy", "ProxyMode"]

logger = logging.getLogger("fastapi_dbpool.tests.proxy")

ProxyMode = Literal["passthrough", "refuse", "blackhole", "delay"]

_CHUNK = 65536
_LINGER_RESET = struct.pack("ii", 1, 0)


def _reset_transport(transport: asyncio.BaseTransport | None) -> None:
    """Close ``transport`` with an RST (``SO_LINGER`` 0) instead of a FIN."""
    if transport is None or transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    if isinstance(transport, asyncio.WriteTransport):
        transport.abort()
    else:
        transport.close()


@dataclass(eq=False)
class _Connection:
    client: asyncio.StreamWriter
    task: asyncio.Task[Any] | None
    upstream: asyncio.StreamWriter | None = None
    reset: bool = False

    def rst(self) -> None:
        """Reset both sides and make the handler task finish (it swallows the cancel)."""
        if self.reset:
            return
        self.reset = True
        _reset_transport(self.client.transport)
        if self.upstream is not None:
            _reset_transport(self.upstream.transport)
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()


class FaultProxy:
    """A TCP proxy to ``target_host:target_port`` whose behaviour tests switch at runtime.

    Attributes:
        connections_accepted: Client connections accepted since :meth:`start`.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        port: int | None = None,
    ) -> None:
        """Configure the proxy (it listens only after :meth:`start`).

        Args:
            target_host: Where to forward connections to.
            target_port: Port to forward connections to.
            listen_host: Address to listen on.
            port: Port to listen on; a free one when ``None``.
        """
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self._port = port
        self.connections_accepted = 0
        self._mode: ProxyMode = "passthrough"
        self._delay = 0.0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._connections: set[_Connection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listen_sock: socket.socket | None = None
        self._server: asyncio.Server | None = None
        self._listener_task: asyncio.Task[None] | None = None
        self._started = False

    # ------------------------------------------------------------------ info

    @property
    def port(self) -> int:
        """The port the proxy listens on (fixed for the proxy's lifetime)."""
        if self._port is None:
            raise RuntimeError("the proxy has not been started")
        return self._port

    @property
    def mode(self) -> ProxyMode:
        """The current mode."""
        return self._mode

    @property
    def connections_open(self) -> int:
        """Client connections currently open through the proxy."""
        return len(self._connections)

    def url_for(self, url: str | URL) -> str:
        """Return ``url`` (SQLAlchemy or libpq style) rewritten to go through the proxy.

        Args:
            url: A database URL whose host and port are replaced; the rest is kept.

        Returns:
            The rewritten URL, password included.
        """
        rewritten = make_url(url).set(host=self.listen_host, port=self.port)
        return rewritten.render_as_string(hide_password=False)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> Self:
        """Start listening (in passthrough mode).

        Returns:
            ``self``.
        """
        if self._started:
            return self
        self._loop = asyncio.get_running_loop()
        for attempt in range(20):
            if self._port is None or attempt:
                self._port = find_free_port(self.listen_host)
            try:
                self._open_listener()
                break
            except OSError:
                if attempt == 19:
                    raise
        self._started = True
        if self._listener_task is not None:
            await asyncio.shield(self._listener_task)
        return self

    async def stop(self) -> None:
        """Stop listening and reset every connection (RST); wait for the handlers to end."""
        if not self._started:
            return
        self._started = False
        self._close_listener()
        self._flowing.set()
        tasks = [conn.task for conn in self._connections if conn.task is not None]
        for conn in list(self._connections):
            conn.rst()
        if self._listener_task is not None:
            tasks.append(self._listener_task)
            self._listener_task = None
        await asyncio.gather(*tasks, return_exceptions=True)
        # Let the transports run connection_lost (which closes their sockets).
        await asyncio.sleep(0)

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # ------------------------------------------------------------------ modes

    def passthrough(self) -> None:
        """Forward everything; listen again if the proxy was refusing."""
        self._set_mode("passthrough", delay=0.0)

    def refuse(self) -> None:
        """Stop listening: new connects fail with ``ECONNREFUSED`` at once.

        Connections already open keep working (and flowing, if they were blackholed).
        """
        self._set_mode("refuse", delay=0.0)

    def blackhole(self) -> None:
        """Partition the network: accept but ignore new connections, freeze open ones.

        Nothing is closed and nothing is answered; held bytes are delivered once another
        mode is selected. Like a real partition, the proxy does not notice a client giving
        up meanwhile: such connections still count in :attr:`connections_open` until the
        mode changes.
        """
        self._set_mode("blackhole", delay=0.0)

    def delay(self, seconds: float) -> None:
        """Add ``seconds`` of latency to every chunk forwarded, in each direction.

        Args:
            seconds: The added one-way latency; a request/response round trip grows by at
                least twice that.
        """
        if seconds < 0:
            raise ValueError("delay must be >= 0")
        self._set_mode("delay", delay=seconds)

    def reset_all(self) -> None:
        """Reset (TCP RST) every open connection now, on the client and PostgreSQL sides.

        The mode is unchanged. The RSTs go out on the event loop's next iteration, before
        any I/O the caller awaits next.
        """
        for conn in list(self._connections):
            conn.rst()

    def _set_mode(self, mode: ProxyMode, *, delay: float) -> None:
        if not self._started:
            raise RuntimeError("start the proxy first")
        logger.debug("proxy %s: mode %s (delay %s)", self._port, mode, delay)
        self._mode = mode
        self._delay = delay
        if mode == "refuse":
            self._close_listener()
        else:
            self._open_listener()
        if mode == "blackhole":
            self._flowing.clear()
        else:
            self._flowing.set()

    # ------------------------------------------------------------------ listener

    def _open_listener(self) -> None:
        """Listen on the fixed port, synchronously.

        The kernel accepts (completes handshakes) from ``listen()`` on, so the proxy is
        reachable when this returns; the asyncio server that takes connections off the
        backlog is set up by a task on the next loop iteration.
        """
        if self._listen_sock is not None:
            return
        family = socket.AF_INET6 if ":" in self.listen_host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.listen_host, self.port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._listen_sock = sock
        assert self._loop is not None
        self._listener_task = self._loop.create_task(self._serve(sock))

    async def _serve(self, sock: socket.socket) -> None:
        # start_serving=False: creating the server completes without yielding, so the server
        # is recorded before it registers with the loop and _close_listener can always
        # close it.
        server = await asyncio.start_server(self._on_client, sock=sock, start_serving=False)
        if self._listen_sock is not sock:
            server.close()
            return
        self._server = server
        await server.start_serving()

    def _close_listener(self) -> None:
        sock, self._listen_sock = self._listen_sock, None
        if sock is None:
            return
        if self._server is not None:
            self._server.close()  # removes the reader and closes the socket right now
            self._server = None
        else:
            if self._listener_task is not None:
                self._listener_task.cancel()
            sock.close()

    # ------------------------------------------------------------------ forwarding

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Connection(client=writer, task=asyncio.current_task())
        self._connections.add(conn)
        self.connections_accepted += 1
        pumps: list[asyncio.Task[None]] = []
        try:
            await self._flowing.wait()  # blackhole: accepted, never answered
            if not self._started:
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    self.target_host, self.target_port
                )
            except OSError as exc:
                logger.debug("proxy %s: upstream connect failed: %s", self._port, exc)
                conn.rst()
                return
            conn.upstream = up_writer
            pumps = [
                asyncio.create_task(self._pump(conn, reader, up_writer)),
                asyncio.create_task(self._pump(conn, up_reader, writer)),
            ]
            await asyncio.wait(pumps)
        except asyncio.CancelledError:
            # rst() or stop() cancelled us: finish normally so that asyncio's stream
            # callback does not log the cancellation.
            pass
        except Exception:  # pragma: no cover - keep the event loop's log clean
            logger.exception("proxy %s: connection handler failed", self._port)
        finally:
            for pump in pumps:
                pump.cancel()
            if pumps:
                await asyncio.gather(*pumps, return_exceptions=True)
            self._connections.discard(conn)
            for w in (conn.client, conn.upstream):
                if w is not None and not w.transport.is_closing():
                    w.close()

    async def _pump(
        self, conn: _Connection, src: asyncio.StreamReader, dst: asyncio.StreamWriter
    ) -> None:
        try:
            while True:
                await self._flowing.wait()
                data = await src.read(_CHUNK)
                if not data:
                    break
                if self._delay > 0:
                    await asyncio.sleep(self._delay)
                await self._flowing.wait()
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError) as exc:
            # One side reset: reset the other side too, as a middlebox would.
            logger.debug("proxy %s: %s", self._port, exc)
            conn.rst()
            return
        # EOF from src: half-close towards dst; the other direction goes on until its EOF.
        if dst.can_write_eof() and not dst.transport.is_closing():
            with contextlib.suppress(OSError):
                dst.write_eof()
