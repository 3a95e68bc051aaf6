"""Pool sizing: plan_pool, surge_pods, ServerLimits and engines.decide_budget. Pure, no I/O."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any

import pytest

from fastapi_dbpool.engines import ServerInfo, decide_budget
from fastapi_dbpool.errors import ConfigurationError
from fastapi_dbpool.settings import DBPoolSettings
from fastapi_dbpool.sizing import (
    PROBE_CONNECTIONS,
    BudgetError,
    PoolBudget,
    ServerLimits,
    plan_pool,
    surge_pods,
)

# ServerLimits(max_connections=100): 100 - 3 superuser_reserved = 97 for ordinary roles.
WORKED_BUDGET = 97


def _plan(**kwargs: Any) -> PoolBudget:
    kwargs.setdefault("budget_source", "test")
    return plan_pool(**kwargs)


# --------------------------------------------------------------------------------------
# plan_pool: the table
# --------------------------------------------------------------------------------------

# (inputs, expected pool_size, max_overflow, processes, per_process, fleet_peak, derived)
PLANS: list[Any] = [
    pytest.param(
        {"budget": 97, "pods": 1, "workers": 1},
        (96, 0, 1, 97, 97, True),
        id="single-pod-single-worker",
    ),
    pytest.param(
        {"budget": WORKED_BUDGET, "pods": 3, "workers": 4},
        (7, 0, 12, 8, 96, True),
        id="worked-example-3-pods-x-4-workers-max-connections-100",
    ),
    pytest.param(
        {"budget": WORKED_BUDGET, "pods": 3, "workers": 4, "surge": surge_pods(3, "1")},
        (5, 0, 16, 6, 96, True),
        id="surge-count-1",
    ),
    pytest.param(
        {"budget": WORKED_BUDGET, "pods": 3, "workers": 4, "surge": surge_pods(3, "25%")},
        (5, 0, 16, 6, 96, True),
        id="surge-25-percent-of-3-rounds-up-to-1",
    ),
    pytest.param(
        {"budget": WORKED_BUDGET, "pods": 10, "workers": 2, "surge": surge_pods(10, "25%")},
        (2, 0, 26, 3, 78, True),
        id="surge-25-percent-of-10-rounds-up-to-3",
    ),
    pytest.param(
        {"budget": 24, "pods": 3, "workers": 4},
        (1, 0, 12, 2, 24, True),
        id="exactly-two-per-process",
    ),
    pytest.param(
        {"budget": 5000, "pods": 1, "workers": 1},
        (4999, 0, 1, 5000, 5000, True),
        id="large-budget-one-process",
    ),
    pytest.param(
        {"budget": WORKED_BUDGET, "pods": 3, "workers": 4, "pool_size": 5, "max_overflow": 2},
        (5, 2, 12, 8, 96, False),
        id="explicit-sizes-within-budget",
    ),
    pytest.param(
        {"budget": WORKED_BUDGET, "pods": 3, "workers": 4, "pool_size": 4},
        (4, 0, 12, 8, 60, False),
        id="explicit-pool-size-only",
    ),
    pytest.param(
        {"budget": WORKED_BUDGET, "pods": 3, "workers": 4, "max_overflow": 3},
        (7, 3, 12, 8, 132, False),
        id="explicit-overflow-only-oversubscribes",
    ),
    pytest.param(
        {"budget": WORKED_BUDGET, "pods": 3, "workers": 4, "pool_size": 10, "max_overflow": 5},
        (10, 5, 12, 8, 192, False),
        id="explicit-sizes-oversubscribe-non-strict",
    ),
]


@pytest.mark.parametrize(("inputs", "expected"), PLANS)
def test_plan_pool(inputs: dict[str, Any], expected: tuple[int, ...]) -> None:
    plan = _plan(**inputs)

    got = (
        plan.pool_size,
        plan.max_overflow,
        plan.processes,
        plan.per_process,
        plan.fleet_peak,
        plan.derived,
    )
    assert got == expected
    assert plan.max_size == plan.pool_size + plan.max_overflow
    assert plan.probe_connections == PROBE_CONNECTIONS == 1
    assert plan.oversubscribed == (plan.fleet_peak > plan.budget)
    assert (plan.warning is not None) == plan.oversubscribed
    if plan.derived:
        assert plan.fleet_peak <= plan.budget


def test_worked_example_every_number() -> None:
    budget = ServerLimits(max_connections=100).available
    plan = plan_pool(
        budget=budget,
        budget_source="server max_connections=100 - 3 superuser_reserved - 0 reserved",
        pods=3,
        workers=4,
    )
    assert budget == 97
    assert plan.as_dict() == {
        "pool_size": 7,
        "max_overflow": 0,
        "budget": 97,
        "budget_source": "server max_connections=100 - 3 superuser_reserved - 0 reserved",
        "pods": 3,
        "surge": 0,
        "workers": 4,
        "processes": 12,
        "per_process": 8,
        "fleet_peak": 96,
        "derived": True,
        "oversubscribed": False,
        "capped": False,
    }
    assert plan.describe() == (
        "pool_size=7 max_overflow=0 (derived); budget 97 connections "
        "(server max_connections=100 - 3 superuser_reserved - 0 reserved) over "
        "3 pods + 0 surge x 4 workers = 12 processes, 8 each (1 for the health probe); "
        "fleet peak 96"
    )


def test_oversubscription_warning_names_the_numbers() -> None:
    plan = plan_pool(
        budget=97,
        budget_source="DB_MAX_CONNECTIONS",
        pods=3,
        workers=4,
        pool_size=10,
        max_overflow=5,
    )
    assert plan.oversubscribed
    assert plan.warning == (
        "DB_POOL_SIZE=10 + DB_MAX_OVERFLOW=5 (+1 probe) x 12 processes "
        "(3 pods + 0 surge x 4 workers) = 192 connections, more than the budget of 97 "
        "(DB_MAX_CONNECTIONS)"
    )
    assert "(explicit)" in plan.describe()


def test_oversubscription_is_an_error_when_strict() -> None:
    with pytest.raises(BudgetError) as info:
        plan_pool(
            budget=97,
            budget_source="DB_MAX_CONNECTIONS",
            pods=3,
            workers=4,
            surge=1,
            pool_size=10,
            max_overflow=5,
            strict=True,
        )
    message = str(info.value)
    for fragment in ("DB_POOL_SIZE=10", "DB_MAX_OVERFLOW=5", "16 processes", "= 256", "97"):
        assert fragment in message


def test_strict_accepts_explicit_sizes_that_fit() -> None:
    plan = _plan(budget=96, pods=3, workers=4, pool_size=5, max_overflow=2, strict=True)
    assert plan.fleet_peak == 96
    assert not plan.oversubscribed


def test_strict_rejects_one_connection_over() -> None:
    with pytest.raises(BudgetError, match="= 96 connections, more than the budget of 95"):
        _plan(budget=95, pods=3, workers=4, pool_size=5, max_overflow=2, strict=True)


def test_strict_does_not_change_derived_sizes() -> None:
    assert _plan(budget=97, pods=3, workers=4, strict=True) == _plan(budget=97, pods=3, workers=4)


@pytest.mark.parametrize(
    ("budget", "pods", "workers", "surge", "per_process"),
    [
        (20, 3, 4, 0, 1),
        (23, 3, 4, 0, 1),
        (0, 1, 1, 0, 0),
        (1, 1, 1, 0, 1),
        (97, 10, 8, 3, 0),
    ],
    ids=["20-over-12", "one-short-of-two-each", "zero-budget", "one-connection", "with-surge"],
)
def test_budget_too_small(
    budget: int, pods: int, workers: int, surge: int, per_process: int
) -> None:
    processes = (pods + surge) * workers
    with pytest.raises(BudgetError) as info:
        plan_pool(
            budget=budget,
            budget_source="DB_MAX_CONNECTIONS",
            pods=pods,
            workers=workers,
            surge=surge,
        )
    message = str(info.value)
    assert f"budget of {budget} connections (DB_MAX_CONNECTIONS)" in message
    assert f"over {processes} processes ({pods} pods + {surge} surge x {workers} workers)" in (
        message
    )
    assert f"leaves {per_process} per process" in message
    assert "DB_MAX_CONNECTIONS" in message and "WEB_CONCURRENCY" in message


def test_explicit_sizes_start_even_when_the_budget_cannot_fit_them() -> None:
    plan = _plan(budget=5, pods=3, workers=4, pool_size=2)
    assert plan.pool_size == 2
    assert plan.per_process == 0
    assert plan.oversubscribed


@pytest.mark.parametrize(
    "inputs",
    [
        {"budget": 97, "pods": 0, "workers": 4},
        {"budget": 97, "pods": 3, "workers": 0},
        {"budget": 97, "pods": -1, "workers": 4},
        {"budget": 97, "pods": 3, "workers": 4, "surge": -1},
        {"budget": -1, "pods": 3, "workers": 4},
        {"budget": 97, "pods": 0, "workers": 4, "pool_size": 5},
    ],
    ids=[
        "zero-pods",
        "zero-workers",
        "negative-pods",
        "negative-surge",
        "negative-budget",
        "zero-pods-explicit",
    ],
)
def test_invalid_inputs(inputs: dict[str, Any]) -> None:
    with pytest.raises(BudgetError) as info:
        _plan(**inputs)
    message = str(info.value)
    for key in ("pods", "workers", "budget"):
        if key in inputs:
            assert f"{key} ({inputs[key]})" in message
    assert f"surge ({inputs.get('surge', 0)})" in message


def test_budget_error_is_a_value_error() -> None:
    assert issubclass(BudgetError, ValueError)


# --------------------------------------------------------------------------------------
# The invariant, over a grid
# --------------------------------------------------------------------------------------


def test_derived_sizes_never_exceed_the_budget() -> None:
    checked = refused = 0
    for budget, pods, workers, surge in itertools.product(
        range(0, 260, 3), range(1, 13), range(1, 9), range(0, 4)
    ):
        processes = (pods + surge) * workers
        try:
            plan = plan_pool(
                budget=budget, budget_source="grid", pods=pods, workers=workers, surge=surge
            )
        except BudgetError:
            # Refused only when a process could not get one pooled plus one probe connection.
            assert budget < processes * (1 + PROBE_CONNECTIONS)
            refused += 1
            continue
        checked += 1
        assert plan.processes == processes
        assert plan.max_overflow == 0
        assert plan.pool_size >= 1
        # The invariant: the fleet at its worst (every process full, surge running).
        assert processes * (plan.pool_size + plan.max_overflow + PROBE_CONNECTIONS) <= budget
        assert plan.fleet_peak <= budget
        # ...and the share is not wasted: one more connection each would not fit.
        assert processes * (plan.pool_size + 1 + PROBE_CONNECTIONS) > budget
    assert checked > 1000 and refused > 1000


def test_explicit_sizes_are_flagged_exactly_when_they_oversubscribe() -> None:
    for budget, pods, workers, size, overflow in itertools.product(
        (10, 50, 97, 500), (1, 3, 7), (1, 2, 4), (1, 3, 8), (0, 2, 5)
    ):
        plan = plan_pool(
            budget=budget,
            budget_source="grid",
            pods=pods,
            workers=workers,
            pool_size=size,
            max_overflow=overflow,
        )
        need = pods * workers * (size + overflow + PROBE_CONNECTIONS)
        assert plan.oversubscribed == (need > budget)
        assert plan.fleet_peak == need
        assert (plan.pool_size, plan.max_overflow) == (size, overflow)


# --------------------------------------------------------------------------------------
# surge_pods
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pods", "surge", "expected"),
    [
        (3, "0", 0),
        (3, "1", 1),
        (3, " 2 ", 2),
        (3, 2, 2),
        (3, "25%", 1),
        (4, "25%", 1),
        (5, "25%", 2),
        (10, "25%", 3),
        (3, "100%", 3),
        (3, "0%", 0),
        (1, "1%", 1),
    ],
)
def test_surge_pods(pods: int, surge: str | int, expected: int) -> None:
    assert surge_pods(pods, surge) == expected


@pytest.mark.parametrize("surge", ["", "abc", "%", "1.5", "25%%"])
def test_surge_pods_rejects_garbage(surge: str) -> None:
    with pytest.raises(ValueError):
        surge_pods(3, surge)


# --------------------------------------------------------------------------------------
# ServerLimits
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limits", "available"),
    [
        (ServerLimits(max_connections=100), 97),
        (ServerLimits(max_connections=100, superuser_reserved_connections=3), 97),
        (ServerLimits(max_connections=100, superuser_reserved_connections=0), 100),
        # PostgreSQL 16: reserved_connections (pg_use_reserved_connections) comes off too.
        (ServerLimits(max_connections=100, reserved_connections=5), 92),
        (ServerLimits(500, superuser_reserved_connections=10, reserved_connections=20), 470),
        (ServerLimits(max_connections=3), 0),
        (ServerLimits(max_connections=2, reserved_connections=5), 0),
    ],
    ids=["default", "superuser-3", "no-reserve", "pg16-reserved", "both", "all-reserved", "clamp"],
)
def test_server_limits_available(limits: ServerLimits, available: int) -> None:
    assert limits.available == available


# --------------------------------------------------------------------------------------
# engines.decide_budget: the server's limits meet the settings
# --------------------------------------------------------------------------------------


def _server(max_connections: int = 100, reserved: int = 0) -> ServerInfo:
    return ServerInfo(
        limits=ServerLimits(max_connections=max_connections, reserved_connections=reserved),
        version="16.4",
    )


def test_budget_from_the_server() -> None:
    plan = decide_budget("primary", DBPoolSettings(pod_count=3, web_concurrency=4), _server())
    assert (plan.budget, plan.pool_size, plan.max_overflow, plan.fleet_peak) == (97, 7, 0, 96)
    assert plan.budget_source == ("server max_connections=100 - 3 superuser_reserved - 0 reserved")


def test_budget_from_a_pg16_server_with_reserved_connections() -> None:
    plan = decide_budget("primary", DBPoolSettings(pod_count=3), _server(100, reserved=10))
    assert plan.budget == 87
    assert "10 reserved" in plan.budget_source


def test_budget_uses_the_surge_setting() -> None:
    settings = DBPoolSettings(pod_count=3, web_concurrency=4, rollout_surge="25%")
    plan = decide_budget("primary", settings, _server())
    assert (plan.surge, plan.processes, plan.pool_size) == (1, 16, 5)


def test_db_max_connections_within_the_server(caplog: pytest.LogCaptureFixture) -> None:
    settings = DBPoolSettings(pod_count=3, web_concurrency=4, max_connections=50)
    with caplog.at_level(logging.WARNING, logger="fastapi_dbpool"):
        plan = decide_budget("primary", settings, _server())
    assert (plan.budget, plan.budget_source, plan.pool_size) == (50, "DB_MAX_CONNECTIONS", 3)
    assert caplog.records == []


def test_db_max_connections_above_the_server_warns(caplog: pytest.LogCaptureFixture) -> None:
    settings = DBPoolSettings(pod_count=3, web_concurrency=4, max_connections=150)
    with caplog.at_level(logging.WARNING, logger="fastapi_dbpool"):
        plan = decide_budget("primary", settings, _server())
    assert plan.budget == 150  # the operator's number is used, with a warning
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert record.name == "fastapi_dbpool"
    message = record.getMessage()
    assert "DB_MAX_CONNECTIONS=150" in message
    assert "97" in message
    assert "max_connections=100" in message


def test_db_max_connections_above_the_server_is_an_error_when_strict() -> None:
    settings = DBPoolSettings(max_connections=150, strict_budget=True)
    with pytest.raises(ConfigurationError) as info:
        decide_budget("primary", settings, _server())
    message = str(info.value)
    assert "DB_MAX_CONNECTIONS=150" in message
    assert "97" in message


def test_db_max_connections_equal_to_the_server_is_fine_when_strict() -> None:
    plan = decide_budget(
        "primary", DBPoolSettings(max_connections=97, strict_budget=True), _server()
    )
    assert plan.budget == 97


def test_db_max_connections_without_a_server() -> None:
    plan = decide_budget("primary", DBPoolSettings(pod_count=2, max_connections=40), None)
    assert (plan.budget, plan.budget_source, plan.pool_size) == (40, "DB_MAX_CONNECTIONS", 19)


def test_no_server_and_nothing_explicit_is_an_error() -> None:
    with pytest.raises(ConfigurationError) as info:
        decide_budget("primary", DBPoolSettings(), None)
    message = str(info.value)
    assert "DB_MAX_CONNECTIONS" in message
    assert "primary" in message


def test_no_server_with_explicit_pool_size_trusts_it() -> None:
    plan = decide_budget("primary", DBPoolSettings(pool_size=6, max_overflow=1), None)
    assert (plan.pool_size, plan.max_overflow, plan.derived) == (6, 1, False)
    assert not plan.oversubscribed
    assert "unknown" in plan.budget_source


def test_budget_too_small_becomes_a_configuration_error() -> None:
    settings = DBPoolSettings(pod_count=3, web_concurrency=4)
    with pytest.raises(ConfigurationError) as info:
        decide_budget("primary", settings, _server(max_connections=20))
    message = str(info.value)
    assert message.startswith("primary database: a budget of 17 connections")
    assert "12 processes" in message


def test_strict_oversubscription_becomes_a_configuration_error() -> None:
    settings = DBPoolSettings(
        pod_count=3, web_concurrency=4, pool_size=10, max_overflow=5, strict_budget=True
    )
    with pytest.raises(ConfigurationError, match=r"^primary database: DB_POOL_SIZE=10"):
        decide_budget("primary", settings, _server())


def test_non_strict_oversubscription_returns_the_warning() -> None:
    settings = DBPoolSettings(pod_count=3, web_concurrency=4, pool_size=10, max_overflow=5)
    plan = decide_budget("primary", settings, _server())
    assert plan.oversubscribed
    assert plan.warning is not None and "192 connections" in plan.warning


def test_replica_ignores_db_max_connections(caplog: pytest.LogCaptureFixture) -> None:
    settings = DBPoolSettings(
        pod_count=3, web_concurrency=4, max_connections=40, strict_budget=True
    )
    with caplog.at_level(logging.WARNING, logger="fastapi_dbpool"):
        replica = decide_budget("replica", settings, _server(max_connections=200))
        primary = decide_budget("primary", settings, _server(max_connections=200))
    assert (replica.budget, replica.pool_size) == (197, 15)
    assert replica.budget_source.startswith("server max_connections=200")
    assert (primary.budget, primary.budget_source, primary.pool_size) == (
        40,
        "DB_MAX_CONNECTIONS",
        2,
    )
    assert caplog.records == []


def test_replica_uses_its_own_servers_limits() -> None:
    settings = DBPoolSettings(pod_count=2, web_concurrency=2)
    replica = decide_budget("replica", settings, _server(max_connections=50, reserved=2))
    assert (replica.budget, replica.per_process, replica.pool_size) == (45, 11, 10)


def test_unreachable_replica_error_gives_advice_that_works() -> None:
    """Currently FAILS: for a replica that cannot be reached at startup the error says
    "set DB_MAX_CONNECTIONS (or DB_POOL_SIZE)", but the replica ignores DB_MAX_CONNECTIONS:
    a user who follows the advice gets the same error again (see report)."""
    settings = DBPoolSettings(max_connections=40)
    with pytest.raises(ConfigurationError) as info:
        decide_budget("replica", settings, None)
    message = str(info.value)
    assert "replica" in message
    assert "DB_POOL_SIZE" in message
    assert "DB_MAX_CONNECTIONS" not in message


def test_pool_sizing_doc_shows_the_real_log_lines() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "pool-sizing.md").read_text(encoding="utf-8")
    for surge in ("0", "25%"):
        settings = DBPoolSettings(pod_count=3, web_concurrency=4, rollout_surge=surge)
        plan = decide_budget("primary", settings, _server())
        assert f"primary pool: {plan.describe()}\n" in doc
    oversubscribed = decide_budget(
        "primary",
        DBPoolSettings(pod_count=3, web_concurrency=4, pool_size=10, max_overflow=5),
        _server(),
    )
    assert f"primary pool oversubscribes its budget: {oversubscribed.warning}\n" in doc


def test_derived_pool_is_capped_but_explicit_sizes_are_not() -> None:
    capped = plan_pool(budget=997, budget_source="test", pods=1, workers=1, cap=20)
    assert (capped.pool_size, capped.max_overflow, capped.capped) == (20, 0, True)
    assert "capped by DB_POOL_SIZE_CAP" in capped.describe()
    under = plan_pool(budget=97, budget_source="test", pods=3, workers=4, cap=20)
    assert (under.pool_size, under.capped) == (7, False)
    explicit = plan_pool(budget=997, budget_source="test", pods=1, workers=1, pool_size=50, cap=20)
    assert explicit.pool_size == 50
