"""The benchmarks, run with tiny sizes so that they cannot rot (they are not tests).

One ``python -m benchmarks --profile smoke`` run exercises every comparison end to end
(uvicorn servers, the Python load generator, worker processes, JSON results); wrk's Lua
script is checked on its own when wrk is installed.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPARISONS = {
    "http",
    "http_pairs",
    "overhead",
    "inproc_pairs",
    "instructions",
    "http_instructions",
    "checkout",
    "burst",
    "burst_http",
    "memory",
    "features",
}


async def test_every_benchmark_runs_with_tiny_sizes(database_url: str, tmp_path: Path) -> None:
    env = {**os.environ, "DBPOOL_BENCH_DATABASE_URL": database_url}
    proc = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--profile",
            "smoke",
            "--no-wrk",
            "--quiet",
            "--results-dir",
            str(tmp_path),
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = {
        data["name"]: data
        for data in (json.loads(p.read_text()) for p in await asyncio.to_thread(_results, tmp_path))
        if "name" in data
    }
    assert set(results) == COMPARISONS
    for name, data in results.items():
        assert data["tables"], name
        assert all(table["rows"] for table in data["tables"]), name
    # Every request of the tiny burst got a response: served, or 503 with Retry-After.
    for run in results["burst"]["data"]["dbpool"]:
        assert run["served"] + run["shed_503"] == run["requests"], run
        assert run["checked_out_after"] == 0, run
    # The same over HTTP: every connection opened, every request answered, the probe ran.
    for runs in results["burst_http"]["data"]["runs"].values():
        for run in runs:
            assert run["connected"] == run["requests"], run
            assert run["served"] + run["shed_503"] + run["errors"] == run["requests"], run
            assert 0 < run["burst_probe_count"] == run["burst_probe_due"], run
    for run in results["burst_http"]["data"]["runs"]["dbpool_instr"]:
        assert run["served"] + run["shed_503"] == run["requests"], run
        assert run["checked_out_after"] == 0, run
        # The library's liveness port was probed beside the route, and answered 200.
        assert run["liveness_port"], run
        assert 0 < run["port_burst_probe_count"] == run["port_burst_probe_due"], run
        assert run["port_probe_errors"] == 0, run
    # The read-only variant (Depends(dbpool.session(read_only=True))) ran and answered 200.
    assert results["http"]["features"]["read_only_routes"] == "implemented (read_only)"
    for case, by_variant in results["http"]["data"]["runs"].items():
        assert by_variant["dbpool_ro"], case
        assert all(r["non_2xx"] == 0 and r["requests"] > 0 for r in by_variant["dbpool_ro"]), case
        # /bench/opened answered on every server (NaN when it did not).
        assert all(r["connections_opened"] >= 0 for rs in by_variant.values() for r in rs), case
    # Head to head (1b): the four variants ran in every round of every case, and each
    # target variant's speed against both baselines was computed from them.
    pairs = results["http_pairs"]["data"]
    for case, by_variant in pairs["runs"].items():
        assert set(by_variant) == {"bare", "production", "dbpool", "dbpool_instr"}, case
        assert all(len(runs) == pairs["rounds"] for runs in by_variant.values()), case
        assert all(
            r["non_2xx"] == 0 and r["requests"] > 0 for rs in by_variant.values() for r in rs
        )
        speed = pairs["speed"][case]["dbpool"]["vs_bare"]
        assert speed["pairs"] == pairs["rounds"] and speed["median"] > 0, speed
    # In-process head to head (2d): every variant's worker (and the A/A control's) answered
    # every batch, per set; only the library's workers can have validated a connection.
    inproc = results["inproc_pairs"]["data"]
    assert len(inproc["batches"]) == inproc["generations"] >= 1
    for generation in inproc["batches"]:
        for by_variant in generation.values():
            assert set(by_variant) == {"bare", "production", "dbpool", "dbpool_instr", "bare_again"}
            for name, batches in by_variant.items():
                assert len(batches) == inproc["rounds_per_generation"]
                assert all(b["errors"] == 0 and b["cpu_us"] > 0 for b in batches), batches
                if not name.startswith("dbpool"):
                    assert all(b["validations"] == 0 for b in batches), batches
    # Instructions were counted by callgrind for every batch (when valgrind is there).
    if shutil.which("valgrind"):
        parts = results["instructions"]["data"]["parts"]
        assert {p["variant"] for p in parts} == {"bare", "production", "dbpool"}
        assert all(p["instructions"] > 100_000 * p["requests"] for p in parts), parts
        assert all(p["errors"] == 0 for p in parts), parts
    # The driver_connection variant ran over HTTP and answered 200.
    for case, by_variant in results["http"]["data"]["runs"].items():
        assert by_variant["dbpool_driver"], case
        assert all(r["non_2xx"] == 0 and r["requests"] > 0 for r in by_variant["dbpool_driver"])
    # The servers' instructions over HTTP were counted (when valgrind is there).
    if shutil.which("valgrind"):
        counts = results["http_instructions"]["data"]["counts"]
        assert {c["variant"] for c in counts} == {"bare", "production", "dbpool"}
        assert all(c["per_request"] > 100_000 and c["errors"] == 0 for c in counts), counts
    for route, by_variant in results["overhead"]["data"]["batches"].items():
        assert by_variant["dbpool_ro"], route
        assert all(b["errors"] == 0 for b in by_variant["dbpool_ro"]), route
    assert "Targets of issue 5" in proc.stdout
    assert "read-only route" in proc.stdout


def _results(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.json"))


class _Ok(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = b'{"ok": true}' if self.path.startswith("/items/") else b"no"
        self.send_response(200 if body != b"no" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_wrk_script_reports_templated_requests(http_server: int) -> None:
    from benchmarks.loadgen import run_wrk

    result = run_wrk(http_server, "/items/{id}", connections=2, duration=1, max_id=100)
    assert result.requests > 0
    assert result.non_2xx == 0
    assert result.p99_ms >= result.p50_ms > 0
