"""Reads under concurrency. A read-only request makes its database calls on the event loop
(``deps.blocking``: directly on SQLite, on an asyncio driver on PostgreSQL when its
endpoint only reads), every other request in the thread pool; a call on the loop that
waited (for a pooled connection, for a lock) would stall every request at once, including
those holding what it waits for. These tests drive the real app over HTTP with more
concurrent requests than the pool keeps, mixing reads on the loop with requests whose
endpoints run in threads, on both databases."""

from __future__ import annotations

import asyncio
import threading
import time

import anyio
import httpx
import pytest
from sqlalchemy.pool import NullPool
from support import Keys, auth, make_keys, served

from synthray.app.db import session_factory
from synthray.app.deps import INLINE, blocking, runs_inline
from synthray.app.jobs import service as jobs
from synthray.app.jobs.schemas import JobKind
from synthray.config import Settings


def test_only_read_only_sqlite_sessions_run_on_the_loop(settings: Settings) -> None:
    async def where(read_only: bool) -> bool:
        session = session_factory(settings.sqlalchemy_url, read_only)()
        session.info[INLINE] = runs_inline(settings.sqlalchemy_url, read_only)
        loop_thread = threading.get_ident()
        try:
            return await blocking(session, lambda: threading.get_ident() == loop_thread)
        finally:
            session.close()

    on_loop = settings.sqlalchemy_url.startswith("sqlite")
    assert anyio.run(where, True) is on_loop
    assert anyio.run(where, False) is False  # a write may wait for a lock: never inline


def test_many_concurrent_reads_and_threaded_requests_all_finish(settings: Settings) -> None:
    keys: Keys = make_keys(settings)
    from synthray.app.db import session_scope

    with session_scope(settings.sqlalchemy_url) as s:
        job_id = jobs.create(s, settings, JobKind.export, {"test": True}, None).id
    # 96 at once, more than the pool keeps (16) and the thread pool runs (40): job reads
    # (on the loop on SQLite), a batch report that does not exist (a plain endpoint, in a
    # thread), key listings and unauthenticated reads (refused and audited in a thread).
    paths = [
        (f"/v1/jobs/{job_id}", auth(keys.operator), 200),
        ("/v1/batches/999999/report", auth(keys.operator), 404),
        ("/v1/keys", auth(keys.admin), 200),
        (f"/v1/jobs/{job_id}", {}, 401),
    ]

    async def hammer(base: str) -> list[tuple[int, int]]:
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:

            async def one(i: int) -> tuple[int, int]:
                path, headers, expected = paths[i % len(paths)]
                r = await client.get(path, headers=headers)
                return r.status_code, expected

            return await asyncio.gather(*(one(i) for i in range(96)))

    with served(settings) as base:
        start = time.monotonic()
        answers = asyncio.run(hammer(base))
        seconds = time.monotonic() - start
    assert [got for got, _ in answers] == [want for _, want in answers]
    # A stall would last the pool's 30 s timeout; 96 small requests take well under that.
    assert seconds < 20, seconds


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_read_on_the_loop_does_not_wait_behind_a_writer(settings: Settings) -> None:
    """A transaction holding SQLite's write lock (another process's job, a long import)
    must not hold up reads: under WAL they read the last committed state."""
    keys: Keys = make_keys(settings)
    from synthray.app.db import engine_for

    with served(settings) as base, engine_for(settings.sqlalchemy_url).connect() as writer:
        writer.exec_driver_sql("SELECT 1")  # begun IMMEDIATE: the write lock is held
        start = time.monotonic()
        r = httpx.get(f"{base}/v1/jobs", headers=auth(keys.operator), timeout=30)
        assert r.status_code == 200 and r.json() == []
        assert time.monotonic() - start < 5
        writer.rollback()


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_postgres_reads_use_the_asyncio_pool_and_its_stop_closes_it(settings: Settings) -> None:
    """A read-only request on PostgreSQL whose endpoint only reads waits on the database
    on the event loop (asyncpg, ``db.read_engine``); its connections carry
    their own application name, and are closed when the application stops. A refused read
    is audited through the same connection."""
    keys: Keys = make_keys(settings)
    from sqlalchemy import create_engine, text

    from synthray.app.audit import service as audit
    from synthray.app.db import READ_POOL_NAME, session_scope

    with session_scope(settings.sqlalchemy_url) as s:
        job_id = jobs.create(s, settings, JobKind.export, {"test": True}, None).id
    observer = create_engine(settings.sqlalchemy_url, poolclass=NullPool)

    def read_connections() -> int:
        with observer.connect() as conn:
            query = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            n = conn.execute(text(query + " AND application_name = :n"), {"n": READ_POOL_NAME})
            return int(n.scalar_one())

    try:
        with served(settings) as base:
            assert read_connections() == 0
            r = httpx.get(f"{base}/v1/jobs/{job_id}", headers=auth(keys.operator), timeout=30)
            assert r.status_code == 200 and r.json()["id"] == job_id
            assert read_connections() >= 1
            refused = httpx.get(f"{base}/v1/keys", headers=auth(keys.operator), timeout=30)
            assert refused.status_code == 403
            gone = httpx.get(f"{base}/v1/jobs/{job_id}", headers=auth("sr_nope"), timeout=30)
            assert gone.status_code == 401
        assert read_connections() == 0
    finally:
        observer.dispose()
    with session_scope(settings.sqlalchemy_url, read_only=True) as s:
        refusals = [e for e in audit.list_events(s, 10) if e.outcome == "refused"]
    assert {e.object_id for e in refusals} == {"GET /v1/keys", f"GET /v1/jobs/{job_id}"}


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
@pytest.mark.parametrize(("options", "driver"), [("", "asyncpg"), ("?sslmode=disable", "psycopg")])
def test_the_read_pool_is_on_asyncpg_unless_the_url_has_libpq_options(
    settings: Settings, options: str, driver: str
) -> None:
    """asyncpg names libpq's URL options otherwise (``ssl``, not ``sslmode``): a site whose
    database URL carries them keeps psycopg's asyncio driver, and either connects."""
    from sqlalchemy import text

    from synthray.app.db import READ_POOL_NAME, read_engine

    async def one_read() -> tuple[str, str]:
        engine = read_engine(settings.sqlalchemy_url + options)
        assert engine is not None
        try:
            async with engine.connect() as conn:
                name = await conn.execute(text("SELECT current_setting('application_name')"))
                return engine.dialect.driver, name.scalar_one()
        finally:
            await engine.dispose()

    assert asyncio.run(one_read()) == (driver, READ_POOL_NAME)


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_writes_on_the_autocommit_read_pool_commit_together_or_not_at_all(
    settings: Settings,
) -> None:
    """The read pool's statements autocommit (``db.read_engine``); an audited refusal on it
    opens a transaction first (``db.begin_writes``), so its three statements (the chain's
    head, the record, the head's hash) are undone together by a rollback. The control: the
    same writes without it are each committed at once and survive the rollback."""
    from sqlalchemy.ext.asyncio import AsyncSession

    from synthray.app.audit import service as audit
    from synthray.app.db import AUTOCOMMITS, begin_writes, read_engine

    def events() -> int:
        with session_factory(settings.sqlalchemy_url, True)() as s:
            return len(audit.list_events(s, 100))

    async def write_then_roll_back(begin: bool) -> None:
        engine = read_engine(settings.sqlalchemy_url)
        assert engine is not None
        reader = AsyncSession(engine, expire_on_commit=False)
        session = reader.sync_session
        session.info[AUTOCOMMITS] = True

        def work(_: object) -> None:
            if begin:
                begin_writes(session)
            audit.record(session, None, "probe", "route", "GET /x", "refused")
            session.flush()
            session.rollback()

        try:
            await reader.run_sync(work)
        finally:
            await reader.close()
            await engine.dispose()

    before = events()
    asyncio.run(write_then_roll_back(begin=True))
    assert events() == before
    asyncio.run(write_then_roll_back(begin=False))
    assert events() == before + 1
