"""Engine, sessions and the unit-of-work rules.

The request owns the transaction: services only ``flush``; the session dependency
commits once when the endpoint returns (or rolls back on error), and only then runs
the callbacks registered with :func:`on_commit` (for example: publish a job id to
the broker). A worker therefore never looks for a row that is not committed yet.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, TypeVar

from sqlalchemy import JSON, DateTime, Engine, MetaData, create_engine, event, make_url, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

log = logging.getLogger(__name__)

READ_ONLY = "synthray_read_only"
# In a session's ``info``: its statements autocommit (see :func:`read_engine`).
AUTOCOMMITS = "synthray_autocommits"

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC timestamps on both SQLite (which drops tzinfo) and PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON, list[Any]: JSON}


def utcnow() -> datetime:
    return datetime.now(UTC)


def _sqlite_pragmas(engine: Engine) -> None:
    """WAL, foreign keys, a busy timeout, and BEGIN IMMEDIATE for every transaction.

    pysqlite defers BEGIN until the first write, so a read-then-write transaction can
    fail with "database is locked" when it upgrades; taking the write lock at BEGIN
    makes concurrent writers (API, worker heartbeats) queue on busy_timeout instead.
    A transaction that only reads (``session_scope(url, read_only=True)``, which sets the
    ``READ_ONLY`` execution option on its connection) begins deferred: under WAL it reads
    a snapshot and waits for nobody.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _rec: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        read_only = conn.get_execution_options().get(READ_ONLY, False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


_ENGINES: list[Engine] = []
PG_POOL_SIZE = 5
PG_POOL_OVERFLOW = 15
# Connections a process may open beyond its requests' sessions: a bearer token's first
# sign-in (recorded in a short transaction of its own), the metrics and readiness probes.
POOL_HEADROOM = 4
# The asyncio pool for read-only requests (``read_engine``): a request waiting for one of
# its connections waits on the event loop, holding nothing, so it needs no slots. At 32
# concurrent reads on 2 cores: 5 kept gave 432-459 reads/s (p99 178-213 ms), 15 kept
# 472-493 (p99 146-152 ms), 10 kept 461 (p99 162 ms) for two thirds of the connections.
# Later, on asyncpg (three alternating rounds, a Xeon with AMX): 32 kept against 10 gave
# 562-616 against 549-619 reads/s, p99 151-180 against 200-300 ms and p50 42-46 against
# 33-37 ms: the API's one core is the limit, not the connections.
PG_READ_POOL_SIZE = 10
PG_READ_POOL_OVERFLOW = 5
READ_POOL_NAME = "synthray-api-reads"  # its connections' application_name in pg_stat_activity


def database_slots(url: str) -> int | None:
    """How many API requests may hold a session at once (``deps.get_session``): the
    PostgreSQL pool less some headroom; no limit on SQLite, whose pool never makes anyone
    wait (its writers queue on the database's own lock)."""
    if url.startswith("sqlite"):
        return None
    return PG_POOL_SIZE + PG_POOL_OVERFLOW - POOL_HEADROOM


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        # Never wait for a pooled connection: the API reads SQLite on its event loop
        # (``deps.blocking``), where a wait would stall every request, including the ones
        # holding the connections it waits for. Opening another SQLite connection costs
        # a file open; 16 are kept.
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=16,
            max_overflow=-1,
        )
        _sqlite_pragmas(engine)
    else:
        engine = create_engine(
            url, pool_pre_ping=True, pool_size=PG_POOL_SIZE, max_overflow=PG_POOL_OVERFLOW
        )
    _ENGINES.append(engine)
    return engine


def _forget_inherited_connections() -> None:
    """In a forked child (Celery's pool processes, ingest's decoders): drop the pools the
    parent filled, without closing the parent's connections. Two processes on one
    PostgreSQL connection corrupt each other's statements ("prepared statement already
    exists", failed UPDATEs); the child opens its own connections when it needs them."""
    for engine in _ENGINES:
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_forget_inherited_connections)


def read_engine(url: str) -> AsyncEngine | None:
    """An engine on asyncpg for the API's read-only requests on PostgreSQL
    (``deps.get_session``), None on SQLite. asyncpg served 15% more status reads per second
    than psycopg's asyncio driver on 2 cores (744 and 723 against 634 and 629 in two
    alternating runs, 32 connections; the API's one core is the limit), so it is used
    unless the database URL carries libpq options (``?sslmode=...``), which asyncpg does not
    take under those names: such a site keeps psycopg's asyncio driver. A read then waits
    on the database on the event loop, through SQLAlchemy's greenlet bridge, instead of
    taking a thread-pool hop per call. Its pool belongs to the event loop it is used on,
    so the application's lifespan makes one per serving loop and disposes it when the loop
    stops. Making it does no I/O.

    Its connections autocommit: a status read is then its two SELECTs and nothing else,
    where a transaction added a BEGIN and a COMMIT, and the pool's liveness ping a fifth
    round trip, each costing the API's one core more Python than the query itself. At READ
    COMMITTED, PostgreSQL's default, every statement sees its own snapshot anyway, so a
    read-only transaction bought no consistency. Writes that must commit together (an
    audited refusal) begin a transaction first (:func:`begin_writes`). A pooled
    connection that died with a database restart is not pinged before use: the read that
    meets it is retried once on a fresh one (``deps.off_loop``)."""
    if not url.startswith("postgresql"):
        return None
    u = make_url(url)
    args: dict[str, Any]
    if u.query:  # libpq options (sslmode, ...) that asyncpg names otherwise: keep psycopg
        u, args = u.set(drivername="postgresql+psycopg"), {"application_name": READ_POOL_NAME}
    else:
        u = u.set(drivername="postgresql+asyncpg")
        args = {"server_settings": {"application_name": READ_POOL_NAME}}
    return create_async_engine(
        u,
        isolation_level="AUTOCOMMIT",
        pool_size=PG_READ_POOL_SIZE,
        max_overflow=PG_READ_POOL_OVERFLOW,
        connect_args=args,
    )


@lru_cache(maxsize=8)
def engine_for(url: str) -> Engine:
    return make_engine(url)


@lru_cache(maxsize=16)
def session_factory(url: str, read_only: bool = False) -> sessionmaker[Session]:
    """Sessions on ``url``'s engine; ``read_only`` ones begin their transactions with the
    ``READ_ONLY`` option (deferred on SQLite). Making a session does no I/O: it connects
    at its first statement."""
    engine = engine_for(url)
    if read_only:
        engine = engine.execution_options(**{READ_ONLY: True})
    return sessionmaker(bind=engine, expire_on_commit=False)


T = TypeVar("T", bound=Base)


def lock_or_create(session: Session, table: type[T], **key: Any) -> T:
    """The row of ``table`` with these unique ``key`` values, created if missing and held
    until the transaction ends, so that numbering its children (version n + 1) cannot race.

    On PostgreSQL, ``INSERT ... ON CONFLICT DO NOTHING`` then ``SELECT ... FOR UPDATE``: a
    second request for the same new name waits for the first to commit instead of failing
    on the unique index, then reads the versions the first one added. SQLite needs no lock:
    every transaction here takes its write lock at BEGIN (``BEGIN IMMEDIATE``).
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(pg_insert(table).values(**key).on_conflict_do_nothing())
    stmt = select(table).filter_by(**key).with_for_update()
    row = session.scalars(stmt.execution_options(populate_existing=True)).one_or_none()
    if row is None:
        row = table(**key)
        session.add(row)
        session.flush()
    return row


def begin_writes(session: Session) -> None:
    """Open a transaction on a session whose statements otherwise autocommit (one made on
    :func:`read_engine`, marked with ``AUTOCOMMITS`` in its ``info``), so that the writes
    that follow commit together or not at all; a no-op on any other session, whose
    statements run in a transaction already. Call it where none is open (after a commit
    or a rollback): the isolation level is chosen as a transaction begins."""
    if session.info.get(AUTOCOMMITS):
        session.connection(execution_options={"isolation_level": "READ COMMITTED"})


def on_commit(session: Session, fn: Callable[[], None]) -> None:
    """Run ``fn`` after the session's transaction commits (never if it rolls back)."""
    session.info.setdefault("after_commit", []).append(fn)


def commit(session: Session) -> None:
    """Commit, then run the after-commit callbacks registered on this session."""
    session.commit()
    callbacks: list[Callable[[], None]] = session.info.pop("after_commit", [])
    for fn in callbacks:
        try:
            fn()
        except Exception:  # the row is committed; the job sweeper re-publishes it
            log.exception("after-commit callback failed")


@contextlib.contextmanager
def session_scope(url: str, *, read_only: bool = False) -> Iterator[Session]:
    """A unit of work (a request, a worker step, a CLI verb): commit on success.

    ``read_only`` promises that the unit writes nothing, so that on SQLite it does not take
    the write lock (a write in it would have to upgrade the lock and may fail under load).
    """
    session = session_factory(url, read_only)()
    try:
        yield session
    except BaseException:
        abandon(session)
        raise
    finish(session)


def finish(session: Session) -> None:
    """Commit (with the after-commit callbacks) and close: a request's unit of work done."""
    try:
        commit(session)
    except BaseException:
        abandon(session)  # closes it
        raise
    session.close()


def abandon(session: Session) -> None:
    """Roll back, forget the after-commit callbacks, close."""
    try:
        session.rollback()
    finally:
        session.info.pop("after_commit", None)
        session.close()
