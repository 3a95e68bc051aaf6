"""Pure pod/worker connection-budget arithmetic. No I/O here.

The budget is what the whole service may hold on one PostgreSQL server, across every
pod and every worker process. Each process keeps one connection of the budget for its
background health probe; the rest is its pool. During a rolling update Kubernetes runs
up to ``surge`` extra pods at once, so the budget is split over ``pods + surge`` pods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Connections each process keeps outside the request pool (the health probe's own).
PROBE_CONNECTIONS = 1


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """What the server allows, read from ``pg_settings`` at startup."""

    max_connections: int
    superuser_reserved_connections: int = 3
    reserved_connections: int = 0

    @property
    def available(self) -> int:
        """Connections an ordinary (non-superuser, non-reserved) role may open."""
        return max(
            0,
            self.max_connections - self.superuser_reserved_connections - self.reserved_connections,
        )


@dataclass(frozen=True, slots=True)
class PoolBudget:
    """The sizing decision for one process, with the numbers it came from."""

    pool_size: int
    max_overflow: int
    budget: int
    budget_source: str
    pods: int
    surge: int
    workers: int
    processes: int
    per_process: int
    probe_connections: int
    derived: bool
    oversubscribed: bool
    warning: str | None = None
    capped: bool = False

    @property
    def max_size(self) -> int:
        """Most connections the request pool of this process may hold."""
        return self.pool_size + self.max_overflow

    @property
    def fleet_peak(self) -> int:
        """Connections the whole fleet may hold at the worst moment of a rollout."""
        return self.processes * (self.max_size + self.probe_connections)

    def describe(self) -> str:
        """One readable line, logged at startup."""
        how = "derived" if self.derived else "explicit"
        if self.capped:
            how = "derived, capped by DB_POOL_SIZE_CAP"
        return (
            f"pool_size={self.pool_size} max_overflow={self.max_overflow} ({how}); "
            f"budget {self.budget} connections ({self.budget_source}) over "
            f"{self.pods} pods + {self.surge} surge x {self.workers} workers = "
            f"{self.processes} processes, {self.per_process} each "
            f"({self.probe_connections} for the health probe); "
            f"fleet peak {self.fleet_peak}"
        )

    def as_dict(self) -> dict[str, int | str | bool | None]:
        """The decision as plain JSON-able data (for /health/database)."""
        return {
            "pool_size": self.pool_size,
            "max_overflow": self.max_overflow,
            "budget": self.budget,
            "budget_source": self.budget_source,
            "pods": self.pods,
            "surge": self.surge,
            "workers": self.workers,
            "processes": self.processes,
            "per_process": self.per_process,
            "fleet_peak": self.fleet_peak,
            "derived": self.derived,
            "oversubscribed": self.oversubscribed,
            "capped": self.capped,
        }


class BudgetError(ValueError):
    """The budget cannot fit the fleet; the message names the numbers."""


def surge_pods(pods: int, surge: str | int) -> int:
    """Extra pods a rolling update may run: an absolute count or a percentage of ``pods``.

    Kubernetes rounds a percentage ``maxSurge`` up, so do we.
    """
    if isinstance(surge, int):
        return surge
    text = surge.strip()
    if text.endswith("%"):
        percent = float(text[:-1])
        if not 0 <= percent < math.inf:
            raise ValueError(f"surge percentage must be finite and at least 0, got {surge!r}")
        return math.ceil(pods * percent / 100)
    return int(text)


def plan_pool(
    *,
    budget: int,
    budget_source: str,
    pods: int,
    workers: int,
    surge: int = 0,
    pool_size: int | None = None,
    max_overflow: int | None = None,
    strict: bool = False,
    cap: int | None = None,
) -> PoolBudget:
    """Decide one process's ``pool_size`` and ``max_overflow`` from the fleet budget.

    With no explicit sizes, each process gets an equal share of the budget, less one
    connection for its health probe, as a fixed-size pool (``max_overflow=0``): a pool that
    keeps its connections open serves bursts without paying 4-6 ms per new connection, and
    its whole capacity is usable under sustained load. Explicit sizes win; when they
    oversubscribe the budget the result carries a warning, or :class:`BudgetError` is
    raised when ``strict``.

    Args:
        budget: Connections the whole service may use on this server.
        budget_source: Where the budget came from, for messages.
        pods: Pods sharing the database (the HPA maximum).
        workers: Worker processes per pod.
        surge: Extra pods during a rolling update.
        pool_size: Explicit per-process pool size, or None to derive.
        max_overflow: Explicit per-process overflow, or None to derive.
        strict: Raise instead of warning when explicit sizes oversubscribe the budget.
        cap: Most connections a derived pool gets, however large its share (a share of
            a big server is often more than one process can use well).

    Raises:
        BudgetError: The budget leaves no connection for a process, or (strict) explicit
            sizes oversubscribe it.
    """
    if pods < 1 or workers < 1 or surge < 0 or budget < 0:
        raise BudgetError(
            f"pods ({pods}) and workers ({workers}) must be at least 1, "
            f"surge ({surge}) and budget ({budget}) at least 0"
        )
    processes = (pods + surge) * workers
    per_process = budget // processes
    explicit = pool_size is not None or max_overflow is not None

    if not explicit:
        room = per_process - PROBE_CONNECTIONS
        if room < 1:
            raise BudgetError(
                f"a budget of {budget} connections ({budget_source}) over {processes} "
                f"processes ({pods} pods + {surge} surge x {workers} workers) leaves "
                f"{per_process} per process, fewer than the {1 + PROBE_CONNECTIONS} each "
                "needs (one pooled connection and one for the health probe); raise "
                "DB_MAX_CONNECTIONS or the server's max_connections, or lower POD_COUNT "
                "or WEB_CONCURRENCY"
            )
        return PoolBudget(
            pool_size=room if cap is None else min(room, cap),
            max_overflow=0,
            budget=budget,
            budget_source=budget_source,
            pods=pods,
            surge=surge,
            workers=workers,
            processes=processes,
            per_process=per_process,
            probe_connections=PROBE_CONNECTIONS,
            derived=True,
            oversubscribed=False,
            capped=cap is not None and room > cap,
        )

    size = pool_size if pool_size is not None else max(1, per_process - PROBE_CONNECTIONS)
    overflow = max_overflow if max_overflow is not None else 0
    need = processes * (size + overflow + PROBE_CONNECTIONS)
    oversubscribed = need > budget
    warning = None
    if oversubscribed:
        warning = (
            f"DB_POOL_SIZE={size} + DB_MAX_OVERFLOW={overflow} (+{PROBE_CONNECTIONS} probe) "
            f"x {processes} processes ({pods} pods + {surge} surge x {workers} workers) "
            f"= {need} connections, more than the budget of {budget} ({budget_source})"
        )
        if strict:
            raise BudgetError(warning)
    return PoolBudget(
        pool_size=size,
        max_overflow=overflow,
        budget=budget,
        budget_source=budget_source,
        pods=pods,
        surge=surge,
        workers=workers,
        processes=processes,
        per_process=per_process,
        probe_connections=PROBE_CONNECTIONS,
        derived=False,
        oversubscribed=oversubscribed,
        warning=warning,
    )
