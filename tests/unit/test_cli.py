"""The diagnostics CLI without a database: parsing, URLs, the oversubscription verdict,
rendering, and /health/database answers served by httpx's MockTransport."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from typing import Any

import httpx
import pytest
from rich.console import Console

from fastapi_dbpool import cli
from fastapi_dbpool.engines import ServerInfo
from fastapi_dbpool.settings import DBPoolSettings
from fastapi_dbpool.sizing import ServerLimits
from tests.helpers.apps import free_port

SIZING_ENV = (
    "DATABASE_URL",
    "POD_COUNT",
    "WEB_CONCURRENCY",
    "DB_ROLLOUT_SURGE",
    "DB_MAX_CONNECTIONS",
    "DB_POOL_SIZE",
    "DB_MAX_OVERFLOW",
    "DB_APPLICATION_NAME",
    "DB_CONNECT_TIMEOUT",
    "DB_STRICT_BUDGET",
)
# max_connections=100 - 3 superuser_reserved: 97 for ordinary roles.
SERVER = ServerInfo(limits=ServerLimits(max_connections=100), version="16.4")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SIZING_ENV:
        monkeypatch.delenv(name, raising=False)


def settings(**values: Any) -> DBPoolSettings:
    values.setdefault("database_url", "postgresql://app@db/app")
    return DBPoolSettings(**values)


# --- arguments ----------------------------------------------------------------------------


def test_check_arguments_are_parsed() -> None:
    argv = "check postgresql://db/app --pods 3 --workers 4 --surge 25% --max-connections 60"
    args = cli.build_parser().parse_args(
        [*argv.split(), "--pool-size=4", "--max-overflow=0", "--json"]
    )
    assert (args.handler, args.database_url) == ("check", "postgresql://db/app")
    assert (args.pods, args.workers, args.surge) == (3, 4, "25%")
    assert (args.max_connections, args.pool_size, args.max_overflow) == (60, 4, 0)
    assert args.json and args.timeout is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["check", "--pods", "0"], "must be at least 1, got 0"),
        (["check", "--workers", "two"], "not a whole number: 'two'"),
        (["check", "--surge", "lots"], "a pod count or a percentage"),
        (["check", "--surge", "-1"], "must not be negative"),
        (["check", "--max-overflow", "-1"], "must be at least 0"),
        (["check", "--timeout", "0"], "more than 0 seconds"),
        (["watch", "http://svc", "--interval", "nan"], "more than 0 seconds"),
        (["status"], "the following arguments are required: URL"),
        (["frobnicate"], "invalid choice"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_usage_errors_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == cli.EXIT_USAGE
    assert message in capsys.readouterr().err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--pods" in out and "[POD_COUNT]" in out


def test_check_without_url_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check"]) == cli.EXIT_USAGE
    assert "DATABASE_URL" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("not a url", "not a valid database URL: 'not a url'"),
        ("mysql://app:s3cret@db/app", "must be a postgresql://"),
        ("postgresql://app:s3cret@db:port/app", "postgresql://app:***@db:port/app"),
        ("postgresql://app:s3cret@/app", "has no host"),
    ],
)
def test_bad_database_url_exits_1_with_the_password_masked(
    url: str, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["check", url]) == cli.EXIT_ERROR
    captured = capsys.readouterr()
    assert captured.out == ""
    assert expected in captured.err
    assert "s3cret" not in captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err


def test_bad_url_from_the_environment_is_masked(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", "mysql://app:s3cret@db/app")
    assert cli.main(["check"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "mysql://app:***@db/app" in err and "s3cret" not in err


def test_unreachable_database_exits_1_quickly_with_the_password_masked(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"postgresql://app:s3cret@127.0.0.1:{free_port()}/app"
    assert cli.main(["check", url, "--timeout", "2"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith(
        "fastapi-dbpool: error: cannot connect to postgresql://app:***@127.0.0.1:"
    )
    assert "connection refused" in err and "s3cret" not in err
    assert err.count("\n") == 1


def test_invalid_sizing_variable_in_the_environment_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("POD_COUNT", "many")
    args = cli.build_parser().parse_args(["check", "postgresql://db/app"])
    with pytest.raises(cli.CLIError) as info:
        cli.check_settings(args, {"POD_COUNT": "many"})
    assert info.value.exit_code == cli.EXIT_USAGE
    assert "POD_COUNT" in str(info.value)


def test_command_line_wins_over_the_environment() -> None:
    args = cli.build_parser().parse_args(["check", "postgresql://db/app", "--pods", "5"])
    env = {"POD_COUNT": "2", "WEB_CONCURRENCY": "3", "DB_STRICT_BUDGET": "true"}
    s = cli.check_settings(args, env)
    assert (s.pod_count, s.web_concurrency) == (5, 3)
    # check reports oversubscription instead of stopping at it
    assert s.strict_budget is False


def test_missing_extra_names_the_pip_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "httpx", None)
    assert cli.main(["status", "http://svc"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "pip install 'fastapi-dbpool[cli]'" in err and "httpx is missing" in err


# --- the verdict: assess() with fake server limits ----------------------------------------


def test_derived_plan_fits() -> None:
    result = cli.assess(settings(pod_count=3, web_concurrency=4), SERVER, {})
    assert result.plan is not None
    assert (result.plan.pool_size, result.plan.max_overflow, result.plan.fleet_peak) == (7, 0, 96)
    assert result.fits and result.exit_code == 0


def test_explicit_sizes_over_the_budget_are_oversubscribed() -> None:
    result = cli.assess(settings(pod_count=3, web_concurrency=4, pool_size=10), SERVER, {})
    assert result.plan is not None and result.plan.oversubscribed
    assert result.exit_code == cli.EXIT_PROBLEM
    assert result.problems == (result.plan.warning,)
    assert "= 132 connections, more than the budget of 97" in result.problems[0]


def test_other_clients_plus_the_fleet_over_the_server_are_oversubscribed() -> None:
    activity = {"billing": 3, "": 1, "fastapi-dbpool": 20}
    result = cli.assess(settings(pod_count=3, web_concurrency=4), SERVER, activity)
    # the service's own 20 connections are replaced by the fleet, not added to it
    assert (result.own, result.others) == (20, 4)
    assert result.exit_code == cli.EXIT_PROBLEM
    assert (
        "96 connections and other clients hold 4 now: 100 is more than the 97"
        in (result.problems[0])
    )
    assert "DB_MAX_CONNECTIONS=93 or less" in result.problems[0]
    # the suggestion is the library's own plan for the lowered budget
    assert result.suggestion is not None
    assert (result.suggestion.budget, result.suggestion.pool_size) == (93, 6)
    assert result.suggestion.fleet_peak + result.others <= 97


def test_other_clients_within_the_headroom_fit() -> None:
    result = cli.assess(
        settings(pod_count=3, web_concurrency=4, max_connections=60), SERVER, {"psql": 30}
    )
    assert result.fits, result.problems


def test_application_name_decides_what_is_the_service() -> None:
    activity = {"orders-api": 50}
    fleet = {"pod_count": 3, "web_concurrency": 4}
    mine = cli.assess(settings(application_name="orders-api", **fleet), SERVER, activity)
    theirs = cli.assess(settings(application_name="other-api", **fleet), SERVER, activity)
    assert mine.fits and not theirs.fits


def test_derived_pool_is_capped_as_at_startup() -> None:
    report = cli.ServerReport(SERVER, True, {})
    result = cli.assess(settings(pool_size_cap=15), SERVER, {})
    assert result.plan is not None and result.plan.capped
    assert (result.plan.pool_size, result.plan.fleet_peak) == (15, 16)
    text = _render(cli.render_check("postgresql://db/app", report, result, "fastapi-dbpool"))
    assert (
        "pool_size=15 max_overflow=0 (derived from the budget, capped by DB_POOL_SIZE_CAP=15)"
        in (text)
    )


def test_budget_above_the_server_is_oversubscribed() -> None:
    result = cli.assess(settings(max_connections=200), SERVER, {})
    assert result.exit_code == cli.EXIT_PROBLEM
    assert "DB_MAX_CONNECTIONS=200 is more than the 97" in result.problems[0]


def test_budget_too_small_for_the_fleet_has_no_plan() -> None:
    result = cli.assess(settings(pod_count=10, web_concurrency=8), SERVER, {})
    assert result.plan is None and result.exit_code == cli.EXIT_PROBLEM
    assert "leaves 1 per process" in result.problems[0]


def test_check_report_renders_every_number() -> None:
    report = cli.ServerReport(
        info=ServerInfo(
            limits=ServerLimits(max_connections=100, reserved_connections=5), version="16.4"
        ),
        has_reserved_connections=True,
        activity={"billing": 3, "fastapi-dbpool": 2},
    )
    s = settings(pod_count=3, web_concurrency=4)
    result = cli.assess(s, report.info, report.activity)
    text = _render(
        cli.render_check("postgresql://app:***@db/app", report, result, "fastapi-dbpool")
    )
    assert "PostgreSQL 16.4 at postgresql://app:***@db/app" in text
    assert "reserved_connections" in text and "available to ordinary roles" in text
    assert "fastapi-dbpool (this service)" in text and "billing" in text
    assert "pool_size=6 max_overflow=0 (derived from the budget)" in text
    assert "fits:" in text
    data = cli.check_json("postgresql://app:***@db/app", report, result)
    assert data["server"]["available"] == 92 and data["server"]["reserved_connections"] == 5
    assert data["connections"] == {
        "by_application": {"billing": 3, "fastapi-dbpool": 2},
        "total": 5,
        "service": 2,
        "others": 3,
    }
    assert data["plan"]["pool_size"] == 6 and data["fits"] is True


def test_reserved_connections_is_na_before_postgresql_16() -> None:
    report = cli.ServerReport(
        info=ServerInfo(limits=ServerLimits(max_connections=100), version="15.7"),
        has_reserved_connections=False,
        activity={},
    )
    result = cli.assess(settings(), report.info, report.activity)
    text = _render(cli.render_check("postgresql://db/app", report, result, "fastapi-dbpool"))
    assert "n/a" in text
    assert cli.check_json("x", report, result)["server"]["reserved_connections"] is None


# --- status and watch -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("http://svc:8000", "http://svc:8000/health/database"),
        ("http://svc:8000/", "http://svc:8000/health/database"),
        ("svc:8000", "http://svc:8000/health/database"),
        ("https://svc/api", "https://svc/api/health/database"),
        ("http://svc/health/database", "http://svc/health/database"),
        ("http://svc/health/database/", "http://svc/health/database"),
    ],
)
def test_health_url(given: str, expected: str) -> None:
    assert cli.health_url(given) == expected


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("ftp://u:s3cret@svc", "not an http:// or https:// URL of a service: 'ftp://u:***@svc'"),
        ("http://u:s3cret@svc:port", "not a valid URL: 'http://u:***@svc:port'"),
    ],
)
def test_bad_service_url_exits_1_masked(
    given: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["status", given]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert message in err and "s3cret" not in err


def health_body(status: str = "ok", **primary: Any) -> dict[str, Any]:
    db: dict[str, Any] = {
        "status": status,
        "circuit_breaker": {"state": "closed", "consecutive_failures": 0, "retry_after": 0.0},
        "pool": {"size": 4, "checked_out": 1, "idle": 3, "overflow": 0, "max": 4, "waiting": 0},
        "probe": {"ok": True, "latency_ms": 0.42, "error": None, "interval": 5.0},
        "sizing": {
            "pool_size": 4,
            "max_overflow": 0,
            "budget": 97,
            "budget_source": "DB_MAX_CONNECTIONS",
            "pods": 3,
            "surge": 0,
            "workers": 4,
            "processes": 12,
            "per_process": 8,
            "fleet_peak": 60,
            "derived": False,
            "oversubscribed": False,
        },
    }
    db.update(primary)
    return {"status": status, "databases": {"primary": db}}


def client_answering(*responses: httpx.Response | Exception) -> httpx.Client:
    answers = list(responses)

    def handler(request: httpx.Request) -> httpx.Response:
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    return httpx.Client(transport=httpx.MockTransport(handler))


URL = "http://svc/health/database"


def test_health_ok_renders_the_table() -> None:
    with client_answering(httpx.Response(200, json=health_body())) as client:
        health = cli.fetch_health(client, URL)
    assert health.exit_code == 0
    text = _render(cli.render_health(health))
    assert "http://svc/health/database  ok (HTTP 200)" in text
    for column in ("database", "status", "breaker", "size", "checked_out", "max", "waiting"):
        assert column in text
    assert "primary" in text and "closed" in text and "ok 0.42 ms" in text
    assert "pool_size=4 max_overflow=0 (explicit); 12 processes" in text


@pytest.mark.parametrize(("status", "code"), [("degraded", 0), ("unavailable", 3), ("draining", 3)])
def test_health_status_decides_the_exit_code(status: str, code: int) -> None:
    body = health_body(
        status,
        circuit_breaker={
            "state": "open",
            "consecutive_failures": 5,
            "failure_threshold": 5,
            "retry_after": 7.5,
            "rejected_calls": 2,
        },
        probe={"ok": False, "latency_ms": None, "error": "ConnectionRefusedError", "interval": 5.0},
    )
    http = 200 if code == 0 else 503
    with client_answering(httpx.Response(http, json=body)) as client:
        health = cli.fetch_health(client, URL)
    assert health.exit_code == code
    text = _render(cli.render_health(health))
    assert f"{status} (HTTP {http})" in text
    row = next(line for line in text.splitlines() if line.startswith("primary "))
    assert row.split() == ["primary", status, "open", "5/5", "4", "1", "0", "4", "0", "failed"]
    assert "primary breaker: open, next trial in 7.5 s; rejected calls: 2" in text
    assert "primary probe:   failed: ConnectionRefusedError (probed every 5 s)" in text


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(404, json={"detail": "Not Found"}),
        httpx.Response(200, text="<html>hello</html>"),
        httpx.Response(200, json=[1, 2]),
    ],
)
def test_an_answer_that_is_not_dbpool_health_exits_1(response: httpx.Response) -> None:
    with client_answering(response) as client, pytest.raises(cli.CLIError) as info:
        cli.fetch_health(client, URL)
    assert info.value.exit_code == cli.EXIT_ERROR
    assert f"answered HTTP {response.status_code}, not a fastapi_dbpool" in str(info.value)


def test_unreachable_service_exits_1_with_the_password_masked(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"http://ops:s3cret@127.0.0.1:{free_port()}"
    assert cli.main(["status", url, "--timeout", "2"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "cannot reach http://ops:***@127.0.0.1:" in err and "connection refused" in err
    assert "s3cret" not in err and err.count("\n") == 1


def test_status_json_prints_the_body(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    body = health_body("unavailable")
    monkeypatch.setattr(
        cli, "_client", lambda args: client_answering(httpx.Response(503, json=body))
    )
    assert cli.main(["status", "http://svc", "--json"]) == cli.EXIT_PROBLEM
    assert json.loads(capsys.readouterr().out) == body


def test_watch_redraws_live_on_a_terminal_and_keeps_polling_when_unreachable() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    client = client_answering(
        httpx.Response(200, json=health_body()),
        httpx.ConnectError("[Errno 111] Connection refused"),
        httpx.Response(503, json=health_body("draining")),
    )
    sleeps: list[float] = []
    with client:
        code = cli.watch(console, client, URL, interval=2.0, count=3, sleep=sleeps.append)
    assert code == cli.EXIT_PROBLEM  # the last refresh: draining
    assert len(sleeps) == 2 and all(0 < s <= 2.0 for s in sleeps)
    text = out.getvalue()
    assert "\x1b[" in text  # drawn in place
    assert "refresh 1 of 3" in text and "refresh 3 of 3" in text
    assert "cannot reach http://svc/health/database: connection refused" in text
    assert "draining" in text


def test_watch_stops_on_ctrl_c_with_the_last_code() -> None:
    console = Console(file=io.StringIO(), width=120)

    def interrupt(seconds: float) -> None:
        raise KeyboardInterrupt

    with client_answering(httpx.Response(200, json=health_body())) as client:
        code = cli.watch(console, client, URL, interval=1.0, count=None, sleep=interrupt)
    assert code == 0


def test_watch_json_prints_one_line_per_refresh() -> None:
    out = io.StringIO()
    console = Console(file=out, width=80)
    client = client_answering(
        httpx.Response(200, json=health_body()), httpx.ConnectError("refused")
    )
    with client:
        code = cli.watch(
            console, client, URL, interval=0.5, count=2, as_json=True, sleep=lambda s: None
        )
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first == health_body()
    assert second["status"] == "unreachable" and "connection refused" in second["error"]
    assert code == cli.EXIT_ERROR


def _render(renderable: Any) -> str:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(renderable)
    out = console.file
    assert isinstance(out, io.StringIO)
    return out.getvalue()


def test_importing_the_package_and_the_cli_needs_neither_rich_nor_httpx() -> None:
    code = (
        "import sys; sys.modules['rich'] = sys.modules['httpx'] = None\n"
        "import fastapi_dbpool, fastapi_dbpool.cli\n"
        "raise SystemExit(fastapi_dbpool.cli.main(['check', 'postgresql://db/app']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == cli.EXIT_ERROR, done.stderr
    assert done.stderr == (
        "fastapi-dbpool: error: the fastapi-dbpool command needs rich and httpx: "
        "pip install 'fastapi-dbpool[cli]' (rich is missing)\n"
    )


def test_status_shows_the_leaks_the_service_reported() -> None:
    body = health_body()
    body["leaks"] = {
        "total": 2,
        "by_kind": {"outlived_request": 1, "used_after_request": 0, "held_too_long": 1},
        "reclaimed": 1,
        "slow_holds": 0,
        "recent": [
            {
                "kind": "outlived_request",
                "database": "primary",
                "held_for": 61.2,
                "route": "/orders/{order_id}",
                "method": "POST",
                "request_id": "r1",
                "task": "syncer",
                "at": 0,
            },
            {
                "kind": "held_too_long",
                "database": "primary",
                "held_for": 31.0,
                "route": None,
                "method": None,
                "request_id": None,
                "task": None,
                "at": 0,
            },
        ],
    }
    with client_answering(httpx.Response(200, json=body)) as client:
        text = _render(cli.render_health(cli.fetch_health(client, URL)))
    assert "2 reported (outlived_request 1, held_too_long 1); reclaimed 1" in text
    assert "outlived_request on primary: held 61.2s by POST /orders/{order_id}, task syncer" in text
    assert "held_too_long on primary: held 31.0s by outside any request" in text


def test_status_without_leaks_says_nothing_of_them() -> None:
    body = health_body()
    body["leaks"] = {"total": 0, "by_kind": {}, "reclaimed": 0, "slow_holds": 0, "recent": []}
    with client_answering(httpx.Response(200, json=body)) as client:
        text = _render(cli.render_health(cli.fetch_health(client, URL)))
    assert "leaks" not in text
