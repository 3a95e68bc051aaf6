"""The metrics module without a database: what the collector and the mirror make of pools."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families
from prometheus_fastapi_instrumentator import metrics as instrumentator_metrics

from fastapi_dbpool import ConfigurationError, metrics
from fastapi_dbpool.breaker import CircuitBreaker
from fastapi_dbpool.leaks import LeakTracker
from fastapi_dbpool.pool import WAIT_BUCKETS, PoolStats


class FakeDatabase:
    """What the collector reads of a Database: pool_status(), stats, breaker, leaks."""

    def __init__(
        self,
        name: str = "primary",
        *,
        idle: int = 0,
        used: int = 0,
        max_size: int = 4,
        waiting: int = 0,
        leaks: LeakTracker | None = None,
    ) -> None:
        self.name = name
        self.stats = PoolStats()
        self.breaker = CircuitBreaker(name, failure_threshold=1, recovery_timeout=10)
        self.status = {"idle": idle, "checked_out": used, "max": max_size, "waiting": waiting}
        self.leaks = leaks

    def pool_status(self) -> dict[str, int]:
        return dict(self.status)


class FakeProbeResult:
    def __init__(self, ok: bool | None) -> None:
        self.ok = ok


class FakeProbe:
    def __init__(self, ok: bool | None = True) -> None:
        self.result = FakeProbeResult(ok)


class FakeRuntime:
    def __init__(self, *databases: FakeDatabase) -> None:
        self.databases = {db.name: db for db in databases}
        self.probes = {db.name: FakeProbe() for db in databases}


def exposition(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


def samples(text: str, name: str, **labels: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Samples called ``name`` whose labels include ``labels``, by their other labels."""
    return {
        tuple(sorted((k, v) for k, v in s.labels.items() if k not in labels)): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    }


def value(text: str, name: str, **labels: str) -> float | None:
    found = samples(text, name, **labels)
    return sum(found.values()) if found else None


def collected(*runtimes: FakeRuntime) -> tuple[str, list[FakeRuntime]]:
    registry = CollectorRegistry()
    collector = metrics.collector_for(registry)
    for runtime in runtimes:
        collector.attach(runtime)  # type: ignore[arg-type]
    return exposition(registry), list(runtimes)


def test_names_are_the_contracts() -> None:
    assert metrics.CONNECTIONS == "dbpool_connections"
    assert metrics.CONNECTIONS_MAX == "dbpool_connections_max"
    assert metrics.PENDING_REQUESTS == "dbpool_pending_requests"
    assert metrics.CHECKOUT_WAIT == "dbpool_checkout_wait_seconds"
    assert metrics.CHECKOUT_TIMEOUTS == "dbpool_checkout_timeouts_total"
    assert metrics.STATEMENT_TIMEOUTS == "dbpool_statement_timeouts_total"
    assert metrics.LEAKS == "dbpool_leaks_total"
    assert metrics.BREAKER_STATE == "dbpool_circuit_breaker_state"
    assert (metrics.IDLE, metrics.USED) == ("idle", "used")
    assert metrics.BREAKER_STATES == ("closed", "open", "half_open")
    assert (metrics.HTTP_REQUESTS, metrics.HTTP_DURATION) == (
        "http_requests_total",
        "http_request_duration_seconds",
    )


def test_checkout_wait_histogram_reads_as_prometheus_clients_own() -> None:
    observed = [0.00005, 0.0001, 0.0003, 0.001, 0.001, 0.7, 2.5, 31.0]
    db = FakeDatabase()
    reference = CollectorRegistry()
    histogram = Histogram("reference", "same values", buckets=WAIT_BUCKETS, registry=reference)
    for v in observed:
        db.stats.wait_time.observe(v)
        histogram.observe(v)
    ours, _ = collected(FakeRuntime(db))
    theirs = exposition(reference)
    assert samples(ours, "dbpool_checkout_wait_seconds_bucket", database="primary") == samples(
        theirs, "reference_bucket"
    )
    assert value(ours, "dbpool_checkout_wait_seconds_count") == len(observed)
    assert value(ours, "dbpool_checkout_wait_seconds_sum") == pytest.approx(sum(observed))


def test_every_family_is_described_before_anything_is_attached() -> None:
    text, _ = collected()
    types = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert types == {
        "dbpool_connections": "gauge",
        "dbpool_connections_max": "gauge",
        "dbpool_pending_requests": "gauge",
        "dbpool_checkout_wait_seconds": "histogram",
        "dbpool_checkout_timeouts": "counter",
        "dbpool_statement_timeouts": "counter",
        "dbpool_leaks": "counter",
        "dbpool_leaks_reclaimed": "counter",
        "dbpool_circuit_breaker_state": "gauge",
        "dbpool_circuit_breaker_transitions": "counter",
        "dbpool_circuit_breaker_rejections": "counter",
        "dbpool_connect_failures": "counter",
        "dbpool_connection_use_seconds": "histogram",
        "dbpool_connection_create_seconds": "histogram",
        "dbpool_probe_up": "gauge",
    }
    assert not [s for f in text_string_to_metric_families(text) for s in f.samples]


def test_runtimes_on_one_registry_add_up_by_database_name() -> None:
    a = FakeDatabase(idle=3, used=1, max_size=4, waiting=2)
    b = FakeDatabase(idle=1, used=5, max_size=6)
    replica = FakeDatabase("replica", idle=2, max_size=2)
    a.stats.checkout_timeouts, b.stats.checkout_timeouts = 1, 2
    a.stats.wait_time.observe(0.01)
    b.stats.wait_time.observe(0.02)
    b.breaker.record_failure()  # threshold 1: open
    text, _ = collected(FakeRuntime(a), FakeRuntime(b, replica))
    primary = {"database": "primary"}
    assert samples(text, "dbpool_connections", **primary) == {
        (("state", "idle"),): 4,
        (("state", "used"),): 6,
    }
    assert value(text, "dbpool_connections_max", **primary) == 10
    assert value(text, "dbpool_pending_requests", **primary) == 2
    assert value(text, "dbpool_checkout_timeouts_total", **primary) == 3
    assert value(text, "dbpool_checkout_wait_seconds_count", **primary) == 2
    # One breaker closed, one open: both states read 1.
    assert samples(text, "dbpool_circuit_breaker_state", **primary) == {
        (("state", "closed"),): 1,
        (("state", "open"),): 1,
        (("state", "half_open"),): 0,
    }
    assert value(text, "dbpool_connections_max", database="replica") == 2
    assert samples(text, "dbpool_circuit_breaker_state", database="replica", state="closed")


def tracker() -> LeakTracker:
    return LeakTracker(threshold=30, reclaim_after=None)


def test_leaks_by_kind_every_kind_from_the_start() -> None:
    leaks = tracker()
    primary, replica = FakeDatabase(leaks=leaks), FakeDatabase("replica", leaks=leaks)
    text, _ = collected(FakeRuntime(primary, replica))
    zero = {
        (("kind", "held_too_long"),): 0,
        (("kind", "outlived_request"),): 0,
        (("kind", "used_after_request"),): 0,
    }
    assert samples(text, "dbpool_leaks_total", database="primary") == zero
    # One tracker serves the app's databases; each reads its own counts.
    leaks.counts[("primary", "outlived_request")] = 2
    leaks.counts[("replica", "held_too_long")] = 1
    leaks.reclaimed["primary"] = 1
    text, _ = collected(FakeRuntime(primary, replica))
    assert samples(text, "dbpool_leaks_total", database="primary") == {
        **zero,
        (("kind", "outlived_request"),): 2,
    }
    assert value(text, "dbpool_leaks_total", database="replica") == 1
    assert value(text, "dbpool_leaks_reclaimed_total", database="primary") == 1
    assert value(text, "dbpool_leaks_reclaimed_total", database="replica") == 0


def test_no_leak_tracker_no_leak_samples_but_the_family() -> None:
    text, _ = collected(FakeRuntime(FakeDatabase(leaks=None)))
    types = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert types["dbpool_leaks"] == "counter"
    assert value(text, "dbpool_leaks_total") is None


def test_probe_up_only_once_the_probe_has_run() -> None:
    runtime = FakeRuntime(FakeDatabase())
    runtime.probes["primary"] = FakeProbe(ok=None)
    text, _ = collected(runtime)
    assert value(text, "dbpool_probe_up") is None
    runtime.probes["primary"] = FakeProbe(ok=False)
    text, _ = collected(runtime)
    assert value(text, "dbpool_probe_up") == 0


def test_one_collector_per_registry_gone_with_its_registry() -> None:
    registry, other = CollectorRegistry(), CollectorRegistry()
    collector = metrics.collector_for(registry)
    assert metrics.collector_for(registry) is collector
    assert metrics.collector_for(other) is not collector
    gone = weakref.ref(collector)
    del registry, collector
    gc.collect()
    assert gone() is None


def test_a_runtime_nobody_holds_drops_out() -> None:
    registry = CollectorRegistry()
    runtime = FakeRuntime(FakeDatabase(idle=2))
    metrics.collector_for(registry).attach(runtime)  # type: ignore[arg-type]
    assert value(exposition(registry), "dbpool_connections") == 2
    del runtime
    gc.collect()
    assert value(exposition(registry), "dbpool_connections") is None


def test_a_name_taken_in_the_registry_is_a_configuration_error() -> None:
    registry = CollectorRegistry()
    Gauge("dbpool_connections", "someone else's", registry=registry)
    with pytest.raises(ConfigurationError, match="dbpool_connections"):
        metrics.collector_for(registry)


def test_http_metrics_are_made_once_per_registry() -> None:
    registry = CollectorRegistry()
    first = metrics.http_instrumentation(registry)
    assert metrics.http_instrumentation(registry) is first
    assert metrics.http_instrumentation(CollectorRegistry()) is not first


def test_http_metrics_someone_else_registered_are_a_configuration_error() -> None:
    registry = CollectorRegistry()
    assert instrumentator_metrics.default(registry=registry) is not None
    with pytest.raises(ConfigurationError, match="DB_HTTP_METRICS=false"):
        metrics.http_instrumentation(registry)


def test_multiprocess_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    assert metrics.multiprocess_dir() is None
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "missing"))
    with pytest.raises(ConfigurationError, match="PROMETHEUS_MULTIPROC_DIR is not a directory"):
        metrics.multiprocess_dir()
    # This test process imported prometheus_client without the variable: single-process.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    with pytest.raises(ConfigurationError, match="imported before"):
        metrics.multiprocess_dir()


def test_adding_bucket_counts_equals_observing_one_by_one() -> None:
    observed = [0.0002, 0.0002, 0.004, 0.3, 0.3, 0.3, 12.0, 99.0]
    stats = PoolStats()
    one_by_one = Histogram("h", "h", buckets=WAIT_BUCKETS, registry=None)
    at_once = Histogram("h", "h", buckets=WAIT_BUCKETS, registry=None)
    for v in observed:
        stats.wait_time.observe(v)
        one_by_one.observe(v)
    metrics._add_observations(at_once, list(stats.wait_time.counts), stats.wait_time.sum)

    def read(h: Histogram) -> list[tuple[str, dict[str, str], float]]:
        return [
            (s.name, s.labels, s.value)
            for m in h.collect()
            for s in m.samples
            if not s.name.endswith("_created")
        ]

    assert read(at_once) == read(one_by_one)


def mirror_registry(mirror: Any) -> CollectorRegistry:
    registry = CollectorRegistry()
    for attribute in [*vars(mirror).values(), *mirror.histograms.values()]:
        if isinstance(attribute, MetricWrapperBase):
            registry.register(attribute)
    return registry


COMPARED = (
    ("dbpool_connections", {"state": "idle"}),
    ("dbpool_connections", {"state": "used"}),
    ("dbpool_connections_max", {}),
    ("dbpool_pending_requests", {}),
    ("dbpool_checkout_timeouts_total", {}),
    ("dbpool_statement_timeouts_total", {}),
    ("dbpool_leaks_total", {"kind": "outlived_request"}),
    ("dbpool_leaks_total", {"kind": "held_too_long"}),
    ("dbpool_leaks_reclaimed_total", {}),
    ("dbpool_circuit_breaker_state", {"state": "open"}),
    ("dbpool_circuit_breaker_state", {"state": "closed"}),
    ("dbpool_circuit_breaker_transitions_total", {"from": "closed", "to": "open"}),
    ("dbpool_checkout_wait_seconds_bucket", {"le": "0.001"}),
    ("dbpool_checkout_wait_seconds_bucket", {"le": "+Inf"}),
    ("dbpool_checkout_wait_seconds_sum", {}),
    ("dbpool_connection_use_seconds_count", {}),
    ("dbpool_probe_up", {}),
)


def test_the_multiprocess_mirror_writes_what_the_collector_reads() -> None:
    # In this single-process test run the mirror's metrics live in memory; the logic that
    # fills them (gauges set, counters and histograms grown by what is new) is the same.
    mirror = metrics._ProcessMirror()
    registry = mirror_registry(mirror)
    leaks = tracker()
    leaks.counts[("primary", "outlived_request")] = 1
    db = FakeDatabase(idle=3, used=1, waiting=2, leaks=leaks)
    runtime = FakeRuntime(db)
    mirror.attach(runtime)  # type: ignore[arg-type]

    def agree() -> None:
        mirrored, read = exposition(registry), collected(runtime)[0]
        for name, labels in COMPARED:
            assert value(mirrored, name, database="primary", **labels) == pytest.approx(
                value(read, name, database="primary", **labels)
            ), (name, labels)

    db.stats.wait_time.observe(0.0005)
    db.stats.checkout_timeouts = 2
    mirror.sync()
    agree()
    mirror.sync()  # nothing new: nothing counted twice
    agree()
    db.stats.wait_time.observe(3.0)
    db.stats.use_time.observe(0.2)
    db.stats.checkout_timeouts = 5
    db.stats.statement_timeouts = 1
    leaks.counts[("primary", "outlived_request")] = 4
    leaks.reclaimed["primary"] = 2
    db.status.update(idle=0, used=4)
    db.breaker.record_failure()
    mirror.sync()
    agree()

    mirror.detach(runtime)  # type: ignore[arg-type]
    mirror.sync()
    after = exposition(registry)
    # A file cannot forget a series: the gauges of a database nobody has read 0 ...
    assert value(after, "dbpool_connections", database="primary") == 0
    assert value(after, "dbpool_connections_max", database="primary") == 0
    assert value(after, "dbpool_circuit_breaker_state", database="primary") == 0
    # ... and what was counted stays counted.
    assert value(after, "dbpool_checkout_timeouts_total", database="primary") == 5
    assert value(after, "dbpool_checkout_wait_seconds_count", database="primary") == 2
