"""The example service, driven in-process against a fresh database per test."""

from __future__ import annotations

import csv
import io
import time
from typing import Any

import httpx
import pytest

from example_app.main import SEED_ITEMS, SLOW_REPORT_TIMEOUT, app
from tests.helpers import wait_until
from tests.helpers.apps import client_for

SEED_NAMES = [item["name"] for item in SEED_ITEMS]


@pytest.fixture(autouse=True)
def example_env(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # example_app.main reads its settings from the environment when its lifespan starts.
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("DB_POOL_SIZE", "4")
    monkeypatch.setenv("DB_MAX_OVERFLOW", "0")
    monkeypatch.setenv("DB_APPLICATION_NAME", "dbpool-test-example")
    monkeypatch.delenv("DB_AUTOCOMMIT", raising=False)


async def checked_out(client: httpx.AsyncClient) -> int:
    health = await client.get("/health/database")
    assert health.status_code == 200, health.text
    pool: dict[str, Any] = health.json()["databases"]["primary"]["pool"]
    return int(pool["checked_out"])


async def test_first_start_creates_and_seeds_the_schema_once() -> None:
    async with client_for(app) as client:
        first = await client.get("/items")
    async with client_for(app) as client:
        second = await client.get("/items")
    assert first.status_code == 200
    assert [item["name"] for item in first.json()] == SEED_NAMES
    # A second start finds the table seeded and adds nothing.
    assert second.json() == first.json()


async def test_crud_round_trip() -> None:
    async with client_for(app) as client:
        created = await client.post("/items", json={"name": "Tea", "price_cents": 200})
        assert created.status_code == 201, created.text
        item = created.json()
        assert item["name"] == "Tea" and item["price_cents"] == 200
        assert item["created_at"] and item["touched_at"] is None
        assert created.headers["location"] == f"/items/{item['id']}"

        # A new request sees the row: the route committed before answering.
        read = await client.get(f"/items/{item['id']}")
        assert read.status_code == 200 and read.json() == item
        price = await client.get(f"/items/{item['id']}/price")
        assert price.status_code == 200
        assert price.json() == {"id": item["id"], "price_cents": 200}

        replaced = await client.put(
            f"/items/{item['id']}", json={"name": "Green tea", "price_cents": 220}
        )
        assert replaced.status_code == 200, replaced.text
        assert replaced.json() == {**item, "name": "Green tea", "price_cents": 220}
        listed = await client.get("/items")
        assert [i["name"] for i in listed.json()] == [*SEED_NAMES, "Green tea"]

        deleted = await client.delete(f"/items/{item['id']}")
        assert deleted.status_code == 204 and deleted.content == b""
        gone = await client.get(f"/items/{item['id']}")
        assert gone.status_code == 404
        assert gone.json() == {"detail": f"item {item['id']} not found"}


async def test_missing_items_answer_404() -> None:
    async with client_for(app) as client:
        responses = [
            await client.get("/items/999999"),
            await client.put("/items/999999", json={"name": "x", "price_cents": 1}),
            await client.delete("/items/999999"),
            await client.post("/items/999999/touch"),
            await client.get("/items/999999/price"),
        ]
        assert [r.status_code for r in responses] == [404, 404, 404, 404, 404]
        assert await checked_out(client) == 0


async def test_invalid_item_is_rejected_before_the_database() -> None:
    async with client_for(app) as client:
        response = await client.post("/items", json={"name": "", "price_cents": -1})
        assert response.status_code == 422
        assert len((await client.get("/items")).json()) == len(SEED_ITEMS)


async def test_export_streams_every_item_as_csv() -> None:
    async with client_for(app) as client:
        async with client.stream("GET", "/items/export.csv") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/csv")
            assert "content-length" not in response.headers
            body = "".join([chunk async for chunk in response.aiter_text()])
        rows = list(csv.reader(io.StringIO(body)))
        assert rows[0] == ["id", "name", "price_cents", "created_at", "touched_at"]
        assert [row[1] for row in rows[1:]] == SEED_NAMES
        # The stream's connection went back to the pool when the body ended.
        assert await checked_out(client) == 0


async def test_slow_report_within_its_timeout_answers() -> None:
    async with client_for(app) as client:
        response = await client.get("/reports/slow", params={"seconds": 0.1})
    assert response.status_code == 200, response.text
    assert response.json() == {
        "seconds": 0.1,
        "item_count": len(SEED_ITEMS),
        "total_price_cents": sum(item["price_cents"] for item in SEED_ITEMS),
    }


async def test_slow_report_past_its_timeout_answers_504() -> None:
    async with client_for(app) as client:
        started = time.monotonic()
        response = await client.get("/reports/slow", params={"seconds": 3})
        elapsed = time.monotonic() - started
        assert response.status_code == 504
        assert response.json() == {"detail": "the database statement exceeded its time limit"}
        # PostgreSQL cancelled the statement at the route's timeout, not after 3 s.
        assert SLOW_REPORT_TIMEOUT <= elapsed < 3.0
        assert await checked_out(client) == 0


async def test_touch_updates_the_item_from_a_background_task() -> None:
    async with client_for(app) as client:
        before = (await client.get("/items/1")).json()
        assert before["touched_at"] is None

        response = await client.post("/items/1/touch")
        assert response.status_code == 202
        assert response.json() == {"item_id": 1, "status": "scheduled"}

        async def touched() -> str | None:
            value: str | None = (await client.get("/items/1")).json()["touched_at"]
            return value

        await wait_until(touched, timeout=5, message="item 1 touched by the background task")
        # The task closed its own session: nothing is left checked out.
        assert await checked_out(client) == 0


async def test_summary_runs_its_queries_on_separate_sessions() -> None:
    async with client_for(app) as client:
        await client.post("/items", json={"name": "Water", "price_cents": 90})
        response = await client.get("/reports/summary")
        assert response.status_code == 200, response.text
        summary = response.json()
        assert summary["item_count"] == len(SEED_ITEMS) + 1
        assert summary["total_price_cents"] == 90 + sum(i["price_cents"] for i in SEED_ITEMS)
        assert summary["cheapest"]["name"] == "Water"
        assert summary["newest"]["name"] == "Water"
        assert await checked_out(client) == 0
