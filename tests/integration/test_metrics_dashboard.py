"""The shipped dashboard and alerts query only what /metrics really exposes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.test_metrics import build

DOCS = Path(__file__).resolve().parents[2] / "docs"
DASHBOARD = DOCS / "grafana" / "dbpool-dashboard.json"
ALERTS = DOCS / "prometheus" / "dbpool-alerts.yml"

#: Labels Prometheus adds to every scraped series (and Kubernetes service discovery).
TARGET_LABELS = {"job", "instance", "namespace", "pod"}
#: A metric name with its label matchers (``name{...}``) or a range (``name[5m]``).
SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?:\{([^}]*)\}|\[)")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*"([^"]*)"')
SUFFIXES = {"counter": ("", "_created"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(dashboard["panels"]) for t in p.get("targets", [])]


def alert_exprs() -> dict[str, str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return {r["alert"]: r["expr"] for group in rules["groups"] for r in group["rules"]}


class Exposed:
    """Sample names and label values a real /metrics answer has (or declares)."""

    def __init__(self, exposition: str) -> None:
        self.names: set[str] = set()
        self.labels: dict[str, dict[str, set[str]]] = {}
        for line in exposition.splitlines():
            # Declared families count even without samples yet (dbpool_leaks_total).
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split()
                self.names.update(name + suffix for suffix in SUFFIXES.get(kind, ("",)))
        for family in text_string_to_metric_families(exposition):
            for sample in family.samples:
                self.names.add(sample.name)
                for label, value in sample.labels.items():
                    self.labels.setdefault(sample.name, {}).setdefault(label, set()).add(value)

    def problems(self, expr: str) -> list[str]:
        found = []
        selectors = SELECTOR.findall(expr)
        if not selectors:
            found.append(f"no metric selector in {expr!r}")
        for name, matchers in selectors:
            if name not in self.names:
                found.append(f"{name} is not exposed")
                continue
            known = self.labels.get(name)
            for label, value in MATCHER.findall(matchers):
                if label in TARGET_LABELS or known is None:
                    continue
                if label not in known:
                    found.append(f"{name} has no label {label}")
                elif "$" not in value and "|" not in value and value not in known[label]:
                    found.append(f'{name} has no {label}="{value}"')
        return found


@pytest.fixture
async def exposed(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Exposed:
    from tests.helpers.apps import client_for

    app = build("install", database_url, monkeypatch, CollectorRegistry())
    async with client_for(app) as client:
        assert (await client.get("/items/1")).status_code == 200
        assert (await client.get("/slow")).status_code == 504
        response = await client.get("/metrics")
    return Exposed(response.text)


def test_dashboard_is_a_grafana_dashboard() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "fastapi-dbpool"
    ids = [p["id"] for p in panels(dashboard["panels"])]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard["panels"]):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "job", "instance", "database"} <= variables
    titles = " ".join(p["title"].lower() for p in panels(dashboard["panels"]))
    for topic in (
        "used and idle vs max",
        "waiting",
        "p50 / p99",
        "checkout timeouts",
        "leaks",
        "circuit breaker state",
        "statement timeouts",
        "per pod",
    ):
        assert topic in titles, topic


async def test_dashboard_queries_only_exposed_metrics(exposed: Exposed) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = dashboard_exprs(dashboard)
    assert len(exprs) >= 15
    problems = {expr: exposed.problems(expr) for expr in exprs}
    assert not {expr: p for expr, p in problems.items() if p}
    for variable in dashboard["templating"]["list"]:
        query = variable.get("definition", "")
        for name in re.findall(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", query):
            assert name in exposed.names, name


async def test_alerts_query_only_exposed_metrics(exposed: Exposed) -> None:
    problems = {alert: exposed.problems(expr) for alert, expr in alert_exprs().items()}
    assert not {alert: p for alert, p in problems.items() if p}


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not found: apt-get install -y --no-install-recommends prometheus")
    dashboard = json.loads(DASHBOARD.read_text())
    # Grafana's variables, as Grafana would fill them in.
    filled = [
        expr.replace("$__rate_interval", "5m").replace("$job", ".*").replace("$instance", ".*")
        .replace("$database", ".*")
        for expr in dashboard_exprs(dashboard)
    ]  # fmt: skip
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:panel_{i}", "expr": expr}
                    for i, expr in enumerate(filled)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
