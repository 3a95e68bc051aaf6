"""The test rig: a shared PostgreSQL, a fresh database per test, private servers to break.

Fixtures:

* ``pg_server`` (session): the shared server, a :class:`tests.helpers.pg.PgServer`. When
  ``DBPOOL_TEST_DATABASE_URL`` is set (for example
  ``postgresql://postgres@127.0.0.1:5432/test``) that server is used (the role needs
  ``CREATEDB``); otherwise an :class:`~fastapi_dbpool.embedded.EmbeddedPostgres` (ephemeral:
  no fsync) is started and stopped at the end. Never stop it.
* ``pg_data_root`` (session): parent of the embedded servers' data directories (pytest's
  basetemp, or when running as root a private temp dir removed at the end; see there).
* ``admin_url`` (session): SQLAlchemy URL (``postgresql+asyncpg``) of the shared server's
  maintenance database.
* ``template_database`` (session): name of the empty template (``dbpool_template``).
* ``database_url`` (function): SQLAlchemy URL of a database created for this test only
  (``CREATE DATABASE test_<uuid> TEMPLATE dbpool_template``), dropped ``WITH (FORCE)``
  afterwards. Its teardown runs ``gc.collect()`` first, so that a connection the test
  leaked is reported (as an unraisable-exception error) against this test, not a later one.
* ``private_pg`` (function): an ``EmbeddedPostgres`` of the test's own, independent of the
  shared one, that the test may ``stop()``, ``kill()`` and ``start()``. For speed, one
  server is shared by the tests of a module: each test gets it running (restarted if an
  earlier test left it stopped or killed), on the same port every time; databases, tables
  and settings made by earlier tests of the module persist. It runs with
  ``synchronous_commit=on`` (unlike the shared server) so that committed data survives
  ``kill()``. Tests needing a pristine cluster or other settings use ``embedded_pg_factory``.
* ``embedded_pg_factory`` (function): ``make(**kwargs)`` starts a new ephemeral
  ``EmbeddedPostgres`` (keyword arguments as for its constructor) in a fresh temp dir
  (~0.5 s: initdb); all are stopped after the test. Note that ``ephemeral`` loses the
  last commits on ``kill()`` unless ``extra_settings={"synchronous_commit": "on"}``.

``EmbeddedPostgres.start/stop/kill`` block; they take tens of milliseconds, but a test that
needs its event loop to keep running meanwhile (an in-process ``FaultProxy``, a served app)
calls them through ``await asyncio.to_thread(...)``.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fastapi_dbpool.embedded import EmbeddedPostgres
from tests.helpers.pg import (
    TEMPLATE_DATABASE,
    PgServer,
    create_database,
    drop_database,
    ensure_template_database,
    run_in_new_loop,
    sqlalchemy_url,
    with_database,
)

DATABASE_URL_ENV = "DBPOOL_TEST_DATABASE_URL"


def _require_pgserver() -> None:
    if importlib.util.find_spec("pgserver") is None:
        pytest.skip("the embedded PostgreSQL needs pgserver: pip install 'fastapi-dbpool[test]'")


@pytest.fixture(scope="session")
def pg_data_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where the embedded servers' data directories go.

    Not below pytest's basetemp when we are root: PostgreSQL then runs as the ``pgserver``
    user, which must traverse every parent directory, and each pytest session that starts
    (a concurrent run, a teammate's) resets ``/tmp/pytest-of-root`` to mode 0700. The
    running servers then PANIC at their next checkpoint ("could not open file
    .../global/pg_control: Permission denied"). So, as root, a directory of our own in the
    system temp dir is used, and removed at the end of the session.
    """
    if os.geteuid() != 0:
        yield tmp_path_factory.getbasetemp()
        return
    root = Path(tempfile.mkdtemp(prefix="dbpool-test-pg-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _new_data_dir(root: Path, name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root)) / "data"


@pytest.fixture(scope="session")
def pg_server(pg_data_root: Path) -> Iterator[PgServer]:
    """The PostgreSQL server shared by the session (external or embedded)."""
    external = os.environ.get(DATABASE_URL_ENV)
    if external:
        yield PgServer(admin_url=sqlalchemy_url(external), embedded=None)
        return
    _require_pgserver()
    server = EmbeddedPostgres(
        _new_data_dir(pg_data_root, "shared"), ephemeral=True, max_connections=100
    )
    server.start()
    try:
        yield PgServer(admin_url=server.url(), embedded=server)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def admin_url(pg_server: PgServer) -> str:
    """SQLAlchemy URL of the shared server's maintenance database."""
    return pg_server.admin_url


@pytest.fixture(scope="session")
def template_database(admin_url: str) -> str:
    """The empty template the per-test databases are cloned from, created once."""
    return run_in_new_loop(lambda: ensure_template_database(admin_url, TEMPLATE_DATABASE))


@pytest.fixture
async def database_url(admin_url: str, template_database: str) -> AsyncIterator[str]:
    """SQLAlchemy URL of a fresh database for this test, dropped afterwards."""
    name = f"test_{uuid.uuid4().hex}"
    await create_database(admin_url, name, template=template_database)
    try:
        yield with_database(admin_url, name)
    finally:
        # Finalize objects the test leaked (a connection never returned to its pool) now,
        # while its event loop runs, so that the "Exception ignored in ..." it causes fails
        # this test's teardown instead of some later, innocent test.
        gc.collect()
        await drop_database(admin_url, name)


@pytest.fixture(scope="module")
def _private_pg_module(pg_data_root: Path) -> Iterator[EmbeddedPostgres]:
    _require_pgserver()
    # synchronous_commit=on: a committed transaction survives kill(), as after a real crash.
    server = EmbeddedPostgres(
        _new_data_dir(pg_data_root, "private"),
        ephemeral=True,
        extra_settings={"synchronous_commit": "on"},
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def private_pg(_private_pg_module: EmbeddedPostgres) -> EmbeddedPostgres:
    """A running PostgreSQL of this module's tests; stop, kill and start it at will."""
    if not _private_pg_module.is_running:
        _private_pg_module.start()
    return _private_pg_module


@pytest.fixture
def embedded_pg_factory(pg_data_root: Path) -> Iterator[Callable[..., EmbeddedPostgres]]:
    """Start extra, fully independent embedded servers; all are stopped after the test."""
    _require_pgserver()
    servers: list[EmbeddedPostgres] = []

    def make(**kwargs: Any) -> EmbeddedPostgres:
        kwargs.setdefault("ephemeral", True)
        server = EmbeddedPostgres(_new_data_dir(pg_data_root, "extra"), **kwargs)
        servers.append(server)
        return server.start()

    try:
        yield make
    finally:
        errors: list[BaseException] = []
        for server in servers:
            try:
                server.stop()
            except Exception as exc:  # stop the others anyway
                errors.append(exc)
        if errors:
            raise errors[0]
