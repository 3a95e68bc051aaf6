"""Load generators for the HTTP comparison: wrk when installed, else a small Python one.

Both run in a process of their own, keep ``connections`` keep-alive connections busy for
a fixed time (closed loop: each connection sends its next request when the previous one
is answered) and give the same numbers: requests, duration, non-2xx answers, socket
errors and latency percentiles. A path containing ``{id}`` gets a different item id on
every request.

``python -m benchmarks.loadgen --port P --path /items/{id} --max-id 10000 -c 32 -d 2``
prints the Python generator's result as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

#: wrk's Lua hooks: one id per request for templated paths; a JSON line at the end.
_WRK_SCRIPT = """
local prefix, suffix, max_id = %(prefix)q, %(suffix)q, %(max_id)d
local counter = 0
request = function()
  if max_id > 0 then
    counter = counter + 1
    return wrk.format("GET", prefix .. ((counter * 7919) %% max_id + 1) .. suffix)
  end
  return wrk.format("GET", prefix)
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%%d,"duration_s":%%f,"non_2xx":%%d,"socket_errors":%%d,' ..
    '"p50_ms":%%f,"p90_ms":%%f,"p99_ms":%%f,"max_ms":%%f}\\n',
    summary.requests, summary.duration / 1e6, e.status,
    e.connect + e.read + e.write + e.timeout,
    latency:percentile(50) / 1e3, latency:percentile(90) / 1e3,
    latency:percentile(99) / 1e3, latency.max / 1e3))
end
"""


@dataclass(frozen=True)
class LoadResult:
    """What one load run measured."""

    requests: int
    duration_s: float
    non_2xx: int
    socket_errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else math.nan


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def run_wrk(
    port: int, path: str, *, connections: int, duration: float, max_id: int = 0
) -> LoadResult:
    """One wrk run (1 thread: the machine has few cores, the server needs one)."""
    prefix, _, suffix = path.partition("{id}")
    script = _WRK_SCRIPT.replace("%(prefix)q", _lua_string(prefix))
    script = script.replace("%(suffix)q", _lua_string(suffix))
    script = script.replace("%(max_id)d", str(max_id if "{id}" in path else 0))
    script = script.replace("%%", "%")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
        script_path = f.name
    try:
        seconds = max(1, round(duration))  # wrk takes whole seconds
        out = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{seconds}s",
                "--timeout",
                "10s",
                "-s",
                script_path,
                f"http://127.0.0.1:{port}",
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 30,
            check=True,
        ).stdout
    finally:
        Path(script_path).unlink(missing_ok=True)
    for line in out.splitlines():
        if line.startswith("WRKJSON "):
            return LoadResult(**json.loads(line[len("WRKJSON ") :]))
    raise RuntimeError(f"wrk gave no result:\n{out}")


def run_python(
    port: int, path: str, *, connections: int, duration: float, max_id: int = 0
) -> LoadResult:
    """One run of the Python generator, in a process of its own."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.loadgen",
            "--port",
            str(port),
            "--path",
            path,
            "--max-id",
            str(max_id),
            "-c",
            str(connections),
            "-d",
            str(duration),
        ],
        capture_output=True,
        text=True,
        timeout=duration + 60,
        check=True,
    ).stdout
    return LoadResult(**json.loads(out))


async def _generate(
    port: int, path: str, connections: int, duration: float, max_id: int
) -> LoadResult:
    prefix, templated, suffix = path.partition("{id}")
    counter = itertools.count(1)
    latencies: list[float] = []
    non_2xx = 0
    errors = 0

    def next_path() -> bytes:
        if not templated or max_id <= 0:
            return prefix.encode()
        return f"{prefix}{(next(counter) * 7919) % max_id + 1}{suffix}".encode()

    started = time.perf_counter()
    deadline = started + duration

    async def connection() -> None:
        nonlocal non_2xx, errors
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            errors += 1
            return
        try:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                writer.write(b"GET " + next_path() + b" HTTP/1.1\r\nHost: bench\r\n\r\n")
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                if time.perf_counter() <= deadline:
                    latencies.append(time.perf_counter() - t0)
                    if head[9:10] != b"2":
                        non_2xx += 1
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            errors += 1
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(connections)))
    elapsed = min(time.perf_counter(), deadline) - started
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        if not ordered:
            return math.nan
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] * 1e3

    return LoadResult(
        requests=len(ordered),
        duration_s=elapsed,
        non_2xx=non_2xx,
        socket_errors=errors,
        p50_ms=pct(50),
        p90_ms=pct(90),
        p99_ms=pct(99),
        max_ms=ordered[-1] * 1e3 if ordered else math.nan,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loadgen")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/select1")
    parser.add_argument("--max-id", type=int, default=0)
    parser.add_argument("-c", "--connections", type=int, default=32)
    parser.add_argument("-d", "--duration", type=float, default=2.0)
    args = parser.parse_args(argv)
    coro = _generate(args.port, args.path, args.connections, args.duration, args.max_id)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(coro)
    else:
        result = uvloop.run(coro)
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    main()
