"""4b. The burst of comparison 4 over real HTTP: uvicorn, sockets, a separate client.

The in-process burst (:mod:`benchmarks.burst`) creates every request in one event-loop
iteration, so a ``/health/live`` probe waits behind all of them whatever the app does.
Production traffic arrives through sockets; this comparison sends the same burst that way.

Per variant and round, in this order (no sleeps: every step waits for a condition, with
an explicit deadline):

1. A fresh uvicorn process (:class:`benchmarks.http_throughput.UvicornServer`: uvloop,
   httptools, ``--backlog 4096``), pool ``pool_size + max_overflow``, checkout timeout
   ``burst_checkout_timeout``; ``pool_size`` concurrent ``GET /hold?seconds=0`` open the
   pool. A fresh process per variant per round, so its peak RSS is its own.
2. The load generator (``python -m benchmarks.burst_http --client``: uvloop and a minimal
   :class:`asyncio.Protocol`, cheap per connection) raises ``RLIMIT_NOFILE`` to its hard
   limit and opens ``burst_requests`` keep-alive connections, 500 at a time (each batch
   awaited, so the listen backlog never overflows), then prints ``READY``. A connect
   returns once the kernel completed the handshake, so the parent then waits until the
   server's accept queue is empty (``/proc/net/tcp``): the server accepted them all.
3. The prober (``--probe``): one keep-alive connection, a blocking socket, ``GET
   /health/live`` due every 10 ms on a fixed schedule; latency counts from the moment a
   probe was *due* (a late probe is sent right after the previous answer, still measured
   from its due time), so a stall shows in full. It prints ``READY`` after 100 ms of
   baseline.
4. The server's peak RSS is reset (``clear_refs``), its CPU time read, and ``GO`` is sent
   to the client, which writes ``GET /hold?seconds=<burst_hold>`` on every connection as
   fast as it can and records, per connection, when the status line and headers arrived
   (from GO), the status and whether ``Retry-After`` was there; it reads the body, closes,
   and prints one JSON line. Unanswered requests after ``checkout timeout + 30 s`` are
   errors.
5. The prober is stopped with the burst's window (GO to the last answer); the server's
   CPU and peak RSS (``VmHWM``) are read, then, for the library, the connections still
   checked out (``/health/database``, polled until zero or a deadline) and the leaks
   (``dbpool_leaks_total`` on ``/metrics``).

Clocks: client, prober and parent all use ``time.monotonic()`` (``CLOCK_MONOTONIC``,
system-wide on Linux), so the prober's samples can be cut to the burst's window.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import resource
import select
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

from .apps import AppConfig
from .burst import DEADLINE_GRACE, PROBE_EVERY, _leaks_from_metrics, _med, errors_cell
from .burst import LABELS as BURST_LABELS
from .common import (
    REPO_ROOT,
    BenchContext,
    Report,
    Spread,
    Table,
    Target,
    fmt_float,
    fmt_int,
    percentile,
    rotated,
    run_async,
)
from .http_throughput import UvicornServer, free_port

VARIANTS = ("dbpool_instr", "bare", "fastapi_only")
LABELS = {
    "dbpool_instr": BURST_LABELS["dbpool"],
    "bare": BURST_LABELS["bare"],
    "fastapi_only": BURST_LABELS["floor"],
}
HOST = "127.0.0.1"
#: Connections the client opens at a time (each batch awaited): below the backlog, 4096.
CONNECT_BATCH = 500
#: How long the client waits for answers after GO, beyond the checkout timeout.
CLIENT_SLACK = 30.0
#: Probes answered before the prober says READY: its baseline (100 ms at 10 ms).
PROBE_BASELINE = 10
#: How long the prober may take, after STOP, to send the probes a stall kept back.
PROBE_CATCH_UP = 60.0
#: Deadlines of the parent's waits on its helpers and the server.
CONNECT_PHASE_TIMEOUT = 180.0
ACCEPT_TIMEOUT = 30.0
PROBE_READY_TIMEOUT = 30.0


# -- the load generator (a separate process) ----------------------------------------------


def _raise_nofile() -> int:
    """Raise this process's soft ``RLIMIT_NOFILE`` to its hard limit; return the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class _Tracker:
    """What every connection of the client reports to: answers still due after GO."""

    def __init__(self) -> None:
        self.pending = 0
        self.all_done: asyncio.Future[None] | None = None

    def arm(self, pending: int) -> asyncio.Future[None]:
        """From GO on: ``pending`` answers are due; the future resolves at the last one."""
        self.pending = pending
        self.all_done = asyncio.get_running_loop().create_future()
        if pending == 0:
            self.all_done.set_result(None)
        return self.all_done

    def finished(self) -> None:
        self.pending -= 1
        if self.all_done is not None and self.pending == 0 and not self.all_done.done():
            self.all_done.set_result(None)


class _BurstConnection(asyncio.Protocol):
    """One keep-alive connection sending one request: the least work per response.

    Parses only the status line and the header block (``Retry-After``,
    ``Content-Length``, chunked encoding), counts body bytes, and closes once the body
    is complete.
    """

    __slots__ = (
        "body_left",
        "chunked",
        "done",
        "error",
        "head",
        "header_at",
        "retry_after",
        "status",
        "tail",
        "tracker",
        "transport",
    )

    def __init__(self, tracker: _Tracker) -> None:
        self.tracker = tracker
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.tail = b""
        self.status = 0
        self.header_at = math.nan
        self.retry_after = False
        self.chunked = False
        self.body_left = -1  # -1: headers not read yet; -2: read until EOF
        self.done = False
        self.error = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        if self.body_left == -1:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            self.header_at = time.monotonic()
            block = self.head[:end].lower()
            data = self.head[end + 4 :]
            self.head = b""
            try:
                self.status = int(block[9:12])
            except ValueError:
                self.status = -1
            self.retry_after = b"\r\nretry-after:" in block
            self.chunked = b"\r\ntransfer-encoding: chunked" in block
            length_at = block.find(b"\r\ncontent-length:")
            if self.chunked:
                self.body_left = 0
            elif length_at >= 0:
                line_end = block.find(b"\r\n", length_at + 2)
                value = block[length_at + 17 : line_end if line_end >= 0 else None]
                self.body_left = int(value.strip() or b"0")
            else:
                self.body_left = -2
        if self.chunked:
            self.tail = (self.tail + data)[-5:]
            if self.tail == b"0\r\n\r\n":
                self._complete()
        elif self.body_left >= 0:
            self.body_left -= len(data)
            if self.body_left <= 0:
                self._complete()

    def _complete(self) -> None:
        self.done = True
        if self.transport is not None:
            self.transport.close()
        self.tracker.finished()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done:
            return
        if self.body_left == -2:  # no length: the body ends at EOF
            self._complete()
            return
        self.done = True
        self.error = f"reset ({type(exc).__name__})" if exc else "EOF without a full answer"
        self.tracker.finished()


def _summary(values: list[float], scale: float = 1.0) -> dict[str, float]:
    return {
        "p50": percentile(values, 50) * scale,
        "p99": percentile(values, 99) * scale,
        "max": max(values, default=math.nan) * scale,
    }


async def _client(port: int, requests: int, hold: float, deadline: float, wait: float) -> None:
    nofile = _raise_nofile()
    loop = asyncio.get_running_loop()
    tracker = _Tracker()
    connections: list[_BurstConnection] = []
    connect_errors: dict[str, int] = {}
    started = time.monotonic()
    for first in range(0, requests, CONNECT_BATCH):
        batch = min(CONNECT_BATCH, requests - first)
        opened = await asyncio.gather(
            *(
                loop.create_connection(lambda: _BurstConnection(tracker), HOST, port)
                for _ in range(batch)
            ),
            return_exceptions=True,
        )
        for item in opened:
            if isinstance(item, BaseException):
                kind = f"connect: {type(item).__name__}"
                connect_errors[kind] = connect_errors.get(kind, 0) + 1
            else:
                connections.append(item[1])
    connect_s = time.monotonic() - started
    ready = {"connected": len(connections), "connect_s": connect_s, "nofile": nofile}
    print("READY " + json.dumps(ready), flush=True)
    # Nothing to do on the loop until GO: the connections are idle.
    if sys.stdin.buffer.readline().strip() != b"GO":
        raise SystemExit("no GO on stdin")
    all_done = tracker.arm(sum(not conn.done for conn in connections))
    request = f"GET /hold?seconds={hold} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    go = time.monotonic()
    for conn in connections:
        if not conn.done and conn.transport is not None:
            conn.transport.write(request)
    write_s = time.monotonic() - go
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(all_done), wait)
    statuses: dict[str, int] = {}
    errors = dict(connect_errors)
    latencies: list[float] = []
    shed_ra = shed_no_ra = within = 0
    for conn in connections:
        if not conn.done or conn.error:
            kind = conn.error or f"no answer within {wait:g} s"
            errors[kind] = errors.get(kind, 0) + 1
            if conn.transport is not None:
                conn.transport.abort()
            continue
        latency = conn.header_at - go
        latencies.append(latency)
        statuses[str(conn.status)] = statuses.get(str(conn.status), 0) + 1
        if conn.status == 503:
            if conn.retry_after:
                shed_ra += 1
            else:
                shed_no_ra += 1
        if (conn.status == 200 or (conn.status == 503 and conn.retry_after)) and (
            latency <= deadline
        ):
            within += 1
    print(
        json.dumps(
            {
                **ready,
                "requests": requests,
                "go_at": go,
                "write_s": write_s,
                "statuses": statuses,
                "shed_503": shed_ra,
                "shed_503_no_retry_after": shed_no_ra,
                "connection_errors": errors,
                "within_deadline": within,
                "last_answer_s": max(latencies, default=math.nan),
                "latency_s": _summary(latencies),
            }
        ),
        flush=True,
    )


# -- the prober (a separate process) ------------------------------------------------------


class _Probe:
    """One keep-alive connection to ``/health/live`` on a blocking socket."""

    REQUEST = b"GET /health/live HTTP/1.1\r\nHost: bench\r\n\r\n"

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock = self._connect()
        self.buffer = b""

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((HOST, self.port), timeout=60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def get(self) -> int:
        """Send one probe and read its answer; the status code."""
        self.sock.sendall(self.REQUEST)
        while b"\r\n\r\n" not in self.buffer:
            self._recv()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        block = head.lower()
        length_at = block.find(b"\r\ncontent-length:")
        length = 0
        if length_at >= 0:
            line_end = block.find(b"\r\n", length_at + 2)
            length = int(block[length_at + 17 : line_end if line_end >= 0 else None])
        while len(self.buffer) < length:
            self._recv()
        self.buffer = self.buffer[length:]
        return int(head[9:12])

    def _recv(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the probe's connection")
        self.buffer += chunk

    def reconnect(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        self.buffer = b""
        self.sock = self._connect()


def _stdin_line(pending: bytearray) -> bytes | None:
    """Read what stdin has (it is readable); a complete line, else None. EOF: b""."""
    chunk = os.read(sys.stdin.fileno(), 4096)
    if not chunk:
        return b""
    pending += chunk
    if b"\n" not in pending:
        return None
    line, _, _ = bytes(pending).partition(b"\n")
    return line + b"\n"


def _prober(port: int) -> None:
    """Probe ``/health/live`` on a fixed schedule until a ``STOP <go> <end>`` line.

    Probes due up to ``<end>`` that a stall kept from being sent are sent after the STOP,
    back to back, each measured from its due time: the window leaves none out.
    """
    probe = _Probe(port)
    samples: list[tuple[float, float]] = []  # (due, latency from due)
    sent: list[float] = []  # due times of every probe sent, answered or not
    errors = non_200 = 0

    def probe_due(due: float) -> None:
        nonlocal errors, non_200
        sent.append(due)
        try:
            status = probe.get()
        except OSError:
            errors += 1
            probe.reconnect()
        else:
            samples.append((due, time.monotonic() - due))
            non_200 += status != 200

    stdin = sys.stdin.fileno()
    pending = bytearray()
    stop: bytes | None = None
    due = time.monotonic()
    while stop is None:
        readable, _, _ = select.select([stdin], [], [], max(0.0, due - time.monotonic()))
        if readable:
            stop = _stdin_line(pending)
            continue
        if time.monotonic() < due:
            continue
        probe_due(due)
        if len(samples) == PROBE_BASELINE:
            print("READY", flush=True)
        due += PROBE_EVERY
    if not stop:
        raise SystemExit("stdin closed without STOP")
    _, go, end = stop.split()
    start, finish = float(go), float(end)
    give_up = time.monotonic() + PROBE_CATCH_UP
    while due <= finish and time.monotonic() < give_up:
        probe_due(due)
        due += PROBE_EVERY
    never_sent = 0
    while due <= finish:
        never_sent += 1
        due += PROBE_EVERY
    window = [lat for d, lat in samples if start <= d <= finish]
    print(
        json.dumps(
            {
                "count": len(samples),
                "errors": errors,
                "non_200": non_200,
                "ms": _summary([lat for _, lat in samples], 1e3),
                "burst_count": len(window),
                "burst_due": sum(start <= d <= finish for d in sent) + never_sent,
                "burst_ms": _summary(window, 1e3),
            }
        ),
        flush=True,
    )


# -- the parent: one burst against one fresh server ---------------------------------------


@dataclass
class HttpBurstResult:
    """What one burst over HTTP did."""

    variant: str
    requests: int
    connected: int = 0
    connect_s: float = math.nan
    accept_wait_s: float = math.nan
    unaccepted: int = 0
    """Connections still in the server's accept queue at GO."""
    server_nofile: int = 0
    client_nofile: int = 0
    write_s: float = math.nan
    statuses: dict[str, int] = field(default_factory=dict)
    served: int = 0
    shed_503: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    within_deadline: int = 0
    last_answer_s: float = math.nan
    latency_p50_s: float = math.nan
    latency_p99_s: float = math.nan
    latency_max_s: float = math.nan
    probe_count: int = 0
    probe_errors: int = 0
    probe_p50_ms: float = math.nan
    probe_p99_ms: float = math.nan
    probe_max_ms: float = math.nan
    burst_probe_count: int = 0
    burst_probe_due: int = 0
    """Probes due between GO and the last answer (burst_probe_count of them answered)."""
    burst_probe_p50_ms: float = math.nan
    burst_probe_p99_ms: float = math.nan
    burst_probe_max_ms: float = math.nan
    liveness_port: bool = False
    """The library's liveness port (DB_LIVENESS_PORT) was probed too (dbpool only)."""
    port_probe_errors: int = 0
    port_burst_probe_count: int = 0
    port_burst_probe_due: int = 0
    port_burst_probe_p50_ms: float = math.nan
    port_burst_probe_p99_ms: float = math.nan
    port_burst_probe_max_ms: float = math.nan
    rss_idle_mib: float = math.nan
    rss_connected_mib: float = math.nan
    peak_rss_mib: float = math.nan
    cpu_s: float = math.nan
    opened_warm: float = math.nan
    checked_out_after: int | None = None
    leaks: float | None = None
    server_log_lines: int = 0
    server_emfile: bool = False


class _Lines:
    """Lines from a child's stdout, each read with a deadline (select + os.read)."""

    def __init__(self, proc: subprocess.Popen[bytes], what: str) -> None:
        assert proc.stdout is not None
        self.fd = proc.stdout.fileno()
        self.what = what
        self.buffer = b""

    def read(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.what}: no line within {timeout:g} s")
            readable, _, _ = select.select([self.fd], [], [], left)
            if readable:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    raise EOFError(f"{self.what} exited")
                self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode()


def _spawn(mode: str, port: int, *extra: str, stderr: Path) -> subprocess.Popen[bytes]:
    with stderr.open("wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "benchmarks.burst_http", mode, "--port", str(port), *extra],
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            bufsize=0,
        )


def _send(proc: subprocess.Popen[bytes], line: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(line.encode() + b"\n")
    proc.stdin.flush()


@contextlib.contextmanager
def _reaped(proc: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    """``proc``, killed (by its pid) if it is still running when the block ends."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


def _proc_kib(pid: int, name: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return float(line.split()[1])
    return math.nan


def _accept_queue(port: int) -> int:
    """Connections waiting in the accept queue of the listening socket on ``port``.

    For a listening socket, ``/proc/net/tcp``'s ``rx_queue`` is its accept queue: the
    connections whose handshake completed and that the server has not accepted yet.
    Listening sockets come first in the file.
    """
    local = f":{port:04X}"
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[1].endswith(local) and fields[3] == "0A":  # 0A: LISTEN
                return int(fields[4].split(":")[1], 16)
    raise RuntimeError(f"no listening socket on port {port}")


def _nofile_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    return 0


def _wait_for(check: Callable[[], bool], timeout: float, every: float = 0.02) -> bool:
    """Poll ``check`` until it holds or ``timeout`` passes; whether it held."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(every)


def _get(port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=10) as response:
        body: bytes = response.read()
        return body


async def _warm(port: int, n: int) -> None:
    """``n`` concurrent ``GET /hold?seconds=0``: connect all, then send all, then read."""
    streams = await asyncio.gather(*(asyncio.open_connection(HOST, port) for _ in range(n)))
    for _, writer in streams:
        writer.write(b"GET /hold?seconds=0 HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
    answers = await asyncio.gather(*(reader.read() for reader, _ in streams))
    for _, writer in streams:
        writer.close()
    bad = [a[:12] for a in answers if not a.startswith(b"HTTP/1.1 200")]
    if bad:
        raise RuntimeError(f"warm-up failed: {bad}")


def _checked_out(port: int) -> int | None:
    """Connections the library's primary pool has checked out (``/health/database``)."""
    try:
        body = json.loads(_get(port, "/health/database"))
        return int(body["databases"]["primary"]["pool"]["checked_out"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_one(ctx: BenchContext, variant: str, log_dir: Path) -> HttpBurstResult:
    """One burst against a fresh uvicorn process of ``variant``."""
    p = ctx.profile
    n = p.burst_requests
    deadline = p.burst_checkout_timeout + DEADLINE_GRACE
    wait = p.burst_checkout_timeout + CLIENT_SLACK
    result = HttpBurstResult(variant=variant, requests=n)
    config = AppConfig(
        url=ctx.database_url,
        pool_size=p.pool_size,
        max_overflow=p.max_overflow,
        checkout_timeout=p.burst_checkout_timeout,
    )
    # The library also answers /health/live on a port of its own, off the event loop
    # (DB_LIVENESS_PORT): probed beside the app's route, by a second prober.
    live_port = free_port() if variant == "dbpool_instr" else None
    extra_env = {"BENCH_LIVENESS_PORT": str(live_port)} if live_port else None
    server = UvicornServer(variant, config, log_dir, extra_env)
    try:
        server.start()
        server.wait_ready()
        assert server.process is not None
        pid = server.process.pid
        result.server_nofile = _nofile_of(pid)
        run_async(lambda: _warm(server.port, p.pool_size))
        result.opened_warm = server.connections_opened()
        result.rss_idle_mib = _proc_kib(pid, "VmRSS") / 1024
        client = _spawn(
            "--client",
            server.port,
            "--requests",
            str(n),
            "--hold",
            str(p.burst_hold),
            "--deadline",
            str(deadline),
            "--wait",
            str(wait),
            stderr=log_dir / f"{variant}-client.err",
        )
        with _reaped(client):
            client_out = _Lines(client, f"burst client ({variant})")
            ready = json.loads(client_out.read(CONNECT_PHASE_TIMEOUT).removeprefix("READY "))
            result.connected = ready["connected"]
            result.connect_s = ready["connect_s"]
            result.client_nofile = ready["nofile"]
            # The client's connect() returns once the kernel completed the handshake:
            # wait until the server has accepted every connection.
            t0 = time.monotonic()
            _wait_for(lambda: _accept_queue(server.port) == 0, ACCEPT_TIMEOUT)
            result.accept_wait_s = time.monotonic() - t0
            result.unaccepted = _accept_queue(server.port)
            ports = [server.port] + ([live_port] if live_port else [])
            with contextlib.ExitStack() as probers:
                outs = []
                for port in ports:
                    prober = probers.enter_context(
                        _reaped(
                            _spawn("--probe", port, stderr=log_dir / f"{variant}-probe-{port}.err")
                        )
                    )
                    outs.append((prober, _Lines(prober, f"prober ({variant}, port {port})")))
                for _, out in outs:
                    if out.read(PROBE_READY_TIMEOUT) != "READY":
                        raise RuntimeError(f"{out.what} did not say READY")
                result.rss_connected_mib = _proc_kib(pid, "VmRSS") / 1024
                with contextlib.suppress(OSError):  # "5" resets VmHWM to the current RSS
                    Path(f"/proc/{pid}/clear_refs").write_text("5")
                cpu0 = server.cpu_seconds()
                _send(client, "GO")
                burst = json.loads(client_out.read(wait + 60))
                result.cpu_s = server.cpu_seconds() - cpu0
                result.peak_rss_mib = _proc_kib(pid, "VmHWM") / 1024
                go, last = burst["go_at"], burst["last_answer_s"]
                end = go + (last if math.isfinite(last) else wait)
                for prober, _ in outs:
                    _send(prober, f"STOP {go!r} {end!r}")
                answers = [json.loads(out.read(PROBE_CATCH_UP + 30)) for _, out in outs]
        _fill(result, burst, answers[0])
        if len(answers) > 1:
            port_probes = answers[1]
            result.liveness_port = True
            result.port_probe_errors = port_probes["errors"] + port_probes["non_200"]
            result.port_burst_probe_count = port_probes["burst_count"]
            result.port_burst_probe_due = port_probes["burst_due"]
            window = port_probes["burst_ms"]
            result.port_burst_probe_p50_ms = window["p50"]
            result.port_burst_probe_p99_ms = window["p99"]
            result.port_burst_probe_max_ms = window["max"]
        if variant == "dbpool_instr":
            # Requests end (and return their connection) just after their response.
            settle = p.burst_hold + DEADLINE_GRACE
            _wait_for(lambda: _checked_out(server.port) == 0, settle)
            result.checked_out_after = _checked_out(server.port)
            result.leaks = _leaks_from_metrics(_get(server.port, "/metrics"))
    finally:
        server.stop()
        log = server.log_tail(limit=1 << 30)
        result.server_log_lines = len(log.splitlines())
        result.server_emfile = "Too many open files" in log
    return result


def _fill(result: HttpBurstResult, burst: dict[str, Any], probes: dict[str, Any]) -> None:
    result.write_s = burst["write_s"]
    result.statuses = burst["statuses"]
    result.served = burst["statuses"].get("200", 0)
    result.shed_503 = burst["shed_503"]
    kinds = dict(burst["connection_errors"])
    if burst["shed_503_no_retry_after"]:
        kinds["503 without Retry-After"] = burst["shed_503_no_retry_after"]
    for status, count in burst["statuses"].items():
        if status not in ("200", "503"):
            kinds[status] = count
    result.error_kinds = kinds
    result.errors = sum(kinds.values())
    result.within_deadline = burst["within_deadline"]
    result.last_answer_s = burst["last_answer_s"]
    latency = burst["latency_s"]
    result.latency_p50_s, result.latency_p99_s = latency["p50"], latency["p99"]
    result.latency_max_s = latency["max"]
    result.probe_count = probes["count"]
    result.probe_errors = probes["errors"] + probes["non_200"]
    result.probe_p50_ms, result.probe_p99_ms = probes["ms"]["p50"], probes["ms"]["p99"]
    result.probe_max_ms = probes["ms"]["max"]
    result.burst_probe_count = probes["burst_count"]
    result.burst_probe_due = probes["burst_due"]
    window = probes["burst_ms"]
    result.burst_probe_p50_ms, result.burst_probe_p99_ms = window["p50"], window["p99"]
    result.burst_probe_max_ms = window["max"]


# -- the comparison -----------------------------------------------------------------------


def run(ctx: BenchContext) -> Report:
    p = ctx.profile
    # The uvicorn servers inherit it: each holds burst_requests sockets at once.
    nofile = _raise_nofile()
    results: dict[str, list[HttpBurstResult]] = {v: [] for v in VARIANTS}
    ctx.log(
        f"burst_http: {p.burst_requests} connections, pool {p.pool_size}+{p.max_overflow}, "
        f"checkout timeout {p.burst_checkout_timeout:g} s, RLIMIT_NOFILE {nofile}"
    )
    with tempfile.TemporaryDirectory(prefix="dbpool-bench-burst-http-") as tmp:
        for r in range(ctx.rounds):
            for variant in rotated(list(VARIANTS), r):
                one = run_one(ctx, variant, Path(tmp))
                results[variant].append(one)
                ctx.log(
                    f"burst_http: {variant}: connected {one.connected} in "
                    f"{one.connect_s:.2f} s, served {one.served}, 503 {one.shed_503}, "
                    f"errors {one.errors}, last answer {one.last_answer_s:.2f} s"
                )
            ctx.log(f"burst_http: round {r + 1}/{ctx.rounds} done")
    report = Report(
        "burst_http", f"4b. Burst of {p.burst_requests:,} concurrent requests over HTTP"
    )
    report.tables.append(burst_table(results, ctx))
    report.targets.extend(burst_targets(results["dbpool_instr"], ctx, results.get("fastapi_only")))
    report.data = {
        "rlimit_nofile": nofile,
        "runs": {v: [asdict(b) for b in bs] for v, bs in results.items()},
    }
    everything = [b for bs in results.values() for b in bs]
    report.notes += [
        "one fresh uvicorn process (uvloop, httptools, 1 worker, --backlog 4096) per "
        "variant per round, pool warmed by pool_size concurrent /hold?seconds=0; the load "
        "generator is another process (uvloop, a minimal asyncio.Protocol) that opens "
        f"every connection first ({CONNECT_BATCH} at a time), then on GO writes one "
        f"GET /hold?seconds={p.burst_hold:g} on each as fast as it can.",
        "latencies count from GO to the response's headers; deadline = checkout timeout "
        f"+ {DEADLINE_GRACE:g} s from GO; 'other errors' = any status but 200 and 503 "
        "with Retry-After, resets, EOFs, no answer; values are medians over rounds.",
        "liveness port: the same prober, another process, on the library's "
        "DB_LIVENESS_PORT (a small process answering from the event loop's heartbeat), beside the "
        "app's route; FastAPI alone and the plain pattern have no such port.",
        f"/health/live: another process, one keep-alive connection, a probe due every "
        f"{PROBE_EVERY * 1e3:.0f} ms, latency from the due time; the columns cover the "
        "probes due between GO and the last answer (those a stall kept back are sent after "
        "the burst, back to back, still measured from their due time).",
        "peak RSS = the server's VmHWM during the burst (reset at GO, with every "
        "connection already accepted); server CPU = its user+system time from GO to the "
        "client's last answer; held after = connections the library's pool still had "
        "checked out (/health/database) after the burst; the plain pattern exposes neither "
        "that nor leaks; server log lines = what the uvicorn process wrote (access log off: "
        "uvicorn's tracebacks of exceptions that escaped the app, the library's records).",
        "server RSS, idle before the client connected / with every connection open, "
        "median MiB: "
        + ", ".join(
            f"{v} {fmt_float(_med(bs, lambda b: b.rss_idle_mib), 0)}"
            f"/{fmt_float(_med(bs, lambda b: b.rss_connected_mib), 0)}"
            for v, bs in results.items()
        )
        + ".",
        f"connect phase: {Spread.of([b.connect_s for b in everything]).median:.2f} s "
        f"median for {p.burst_requests:,} connections, connect failures "
        f"{sum(b.requests - b.connected for b in everything)}, server accepted them "
        f"{Spread.of([b.accept_wait_s for b in everything]).median:.2f} s later (median; "
        f"still in the accept queue at GO: {max(b.unaccepted for b in everything)} at most); "
        f"RLIMIT_NOFILE server {sorted({b.server_nofile for b in everything})}, client "
        f"{sorted({b.client_nofile for b in everything})}; 'Too many open files' in a "
        f"server log: {sum(b.server_emfile for b in everything)} runs.",
    ]
    return report


def burst_table(results: dict[str, list[HttpBurstResult]], ctx: BenchContext) -> Table:
    p = ctx.profile
    n = p.burst_requests
    table = Table(
        f"{n:,} requests at once over HTTP ({n:,} keep-alive connections), pool "
        f"{p.pool_size}+{p.max_overflow}, checkout timeout {p.burst_checkout_timeout:g} s, "
        f"hold {p.burst_hold * 1e3:.0f} ms, {ctx.rounds} rounds (medians)",
        [
            "variant",
            "served",
            "503+Retry-After",
            "other errors",
            "by deadline",
            "last answer s",
            "p99 s",
            "/health/live p50/p99/max ms",
            "liveness port p50/p99/max ms",
            "peak RSS MiB",
            "server CPU s",
            "server log lines",
            "held after",
            "leaks",
        ],
    )
    for variant, runs in results.items():
        leaks = [b.leaks for b in runs if b.leaks is not None]
        held = [b.checked_out_after for b in runs if b.checked_out_after is not None]
        table.add(
            LABELS[variant],
            fmt_int(_med(runs, lambda b: b.served)),
            fmt_int(_med(runs, lambda b: b.shed_503)),
            errors_cell(runs),
            f"{_med(runs, lambda b: b.within_deadline) / n:.1%}",
            fmt_float(_med(runs, lambda b: b.last_answer_s), 2),
            fmt_float(_med(runs, lambda b: b.latency_p99_s), 2),
            f"{fmt_float(_med(runs, lambda b: b.burst_probe_p50_ms), 0)}"
            f"/{fmt_float(_med(runs, lambda b: b.burst_probe_p99_ms), 0)}"
            f"/{fmt_float(_med(runs, lambda b: b.burst_probe_max_ms), 0)}",
            (
                f"{fmt_float(_med(runs, lambda b: b.port_burst_probe_p50_ms), 1)}"
                f"/{fmt_float(_med(runs, lambda b: b.port_burst_probe_p99_ms), 1)}"
                f"/{fmt_float(_med(runs, lambda b: b.port_burst_probe_max_ms), 1)}"
                if all(b.liveness_port for b in runs)
                else "-"
            ),
            fmt_float(_med(runs, lambda b: b.peak_rss_mib), 0),
            fmt_float(_med(runs, lambda b: b.cpu_s), 1),
            fmt_int(_med(runs, lambda b: b.server_log_lines)),
            fmt_int(max(held)) if held else "-",
            fmt_int(max(leaks)) if leaks else "-",
        )
    return table


def burst_targets(
    runs: list[HttpBurstResult],
    ctx: BenchContext,
    floor: list[HttpBurstResult] | None = None,
) -> list[Target]:
    p = ctx.profile
    n = p.burst_requests
    deadline = p.burst_checkout_timeout + DEADLINE_GRACE
    worst = min(b.within_deadline for b in runs)
    errors = sum(b.errors for b in runs)
    leaks = [b.leaks for b in runs]
    held = [b.checked_out_after for b in runs]
    probe_p99 = Spread.of([b.burst_probe_p99_ms for b in runs])
    floor_text = ""
    if floor:
        floor_p99 = Spread.of([b.burst_probe_p99_ms for b in floor])
        floor_last = Spread.of([b.last_answer_s for b in floor])
        floor_text = (
            f"; FastAPI with no database at all: {floor_p99.median:.0f} ms, "
            f"its last answer after {floor_last.median:.1f} s"
        )
    route_text = f"{probe_p99.median:.0f} ms ({probe_p99.low:.0f}-{probe_p99.high:.0f})"
    if all(b.liveness_port for b in runs):
        port_p99 = Spread.of([b.port_burst_probe_p99_ms for b in runs])
        port_errors = sum(b.port_probe_errors for b in runs)
        live = Target(
            "burst over HTTP: /health/live p99 during the burst, liveness port "
            "(DB_LIVENESS_PORT, off the event loop)",
            "< 100 ms, every probe 200",
            f"{port_p99.median:.1f} ms ({port_p99.low:.1f}-{port_p99.high:.1f}), "
            f"{port_errors} not 200; the app's own route: {route_text}{floor_text}",
            port_p99.median < 100 and port_errors == 0,
        )
    else:
        live = Target(
            "burst over HTTP: /health/live p99 during the burst",
            "< 100 ms",
            route_text + floor_text,
            probe_p99.median < 100,
        )
    return [
        Target(
            "burst over HTTP: answered by timeout + 1 s, from GO",
            f"100% by {deadline:g} s",
            f"{worst / n:.1%} (worst round)",
            worst == n,
        ),
        Target("burst over HTTP: errors other than 503", "0", str(errors), errors == 0),
        Target(
            "burst over HTTP: leaks, connections held after",
            "0",
            f"leaks {leaks}, held {held}",
            all(x == 0 for x in leaks) and all(h == 0 for h in held),
        ),
        live,
    ]


# -- entry points of the helper processes -------------------------------------------------


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.burst_http",
        description="the load generator (--client) or the prober (--probe) of burst_http",
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--client", action="store_true")
    mode.add_argument("--probe", action="store_true")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--requests", type=int, default=0)
    parser.add_argument("--hold", type=float, default=0.1)
    parser.add_argument("--deadline", type=float, default=3.0, help="seconds from GO")
    parser.add_argument("--wait", type=float, default=32.0, help="give up after (s from GO)")
    args = parser.parse_args(argv)
    if args.probe:
        _prober(args.port)
    else:
        run_async(lambda: _client(args.port, args.requests, args.hold, args.deadline, args.wait))


if __name__ == "__main__":
    if sys.argv[1:2] in (["--client"], ["--probe"]):
        main(sys.argv[1:])
    else:
        raise SystemExit("run the burst through `python -m benchmarks --only burst_http`")
