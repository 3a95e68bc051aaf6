"""The shipped Prometheus alerting rules: valid, and doing what docs/alerts.md says.

promtool comes with Debian's ``prometheus`` package
(``apt-get install -y --no-install-recommends prometheus``); without it these tests skip.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

RULES_DIR = Path(__file__).resolve().parents[2] / "docs" / "prometheus"
RULES = RULES_DIR / "dbpool-alerts.yml"
RULE_TESTS = RULES_DIR / "dbpool-alerts.test.yml"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip(
            "promtool not found: install Debian's prometheus package "
            "(apt-get install -y --no-install-recommends prometheus) to test the alert rules"
        )
    return path


def run(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *args], cwd=RULES_DIR, capture_output=True, text=True, timeout=120
    )


def test_rules_are_valid(promtool: str) -> None:
    result = run(promtool, "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 6 rules found" in result.stdout


def test_rules_pass_their_promql_unit_tests(promtool: str) -> None:
    result = run(promtool, "test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_unit_test_and_a_section_in_the_docs() -> None:
    alerts = [
        line.split(":", 1)[1].strip()
        for line in RULES.read_text().splitlines()
        if line.strip().startswith("- alert:")
    ]
    tested = RULE_TESTS.read_text()
    docs = (RULES_DIR.parent / "alerts.md").read_text()
    assert len(alerts) == 6
    for alert in alerts:
        assert f"alertname: {alert}" in tested, alert
        assert f"## {alert}" in docs, alert
