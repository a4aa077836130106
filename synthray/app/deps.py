"""Dependency aliases used by every router (short, uniform signatures)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Annotated, Any, TypeVar

import anyio
from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from synthray.app.audit import service as audit
from synthray.app.auth import oidc
from synthray.app.auth import service as auth_service
from synthray.app.auth.schemas import Principal, Role
from synthray.app.db import (
    AUTOCOMMITS,
    abandon,
    commit,
    database_slots,
    finish,
    session_factory,
)
from synthray.app.errors import Forbidden, Unauthorized
from synthray.app.storage import BlobStore
from synthray.app.web import service as web
from synthray.config import Settings

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


# Dependencies that do no I/O are ``async def``: FastAPI runs a plain ``def`` dependency in
# its thread pool, and those hops were a large share of a small request's cost.
async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def writes_on_read(endpoint: F) -> F:
    """Mark a GET endpoint that writes (it audits who viewed or downloaded something)."""
    endpoint.__synthray_writes__ = True  # type: ignore[attr-defined]
    return endpoint


# A request's session carries this flag when its database calls may run on the event loop,
# and this key when it is the sync face of an AsyncSession (``db.read_engine``).
INLINE = "synthray_inline"
ON_ASYNC_DRIVER = "synthray_async_session"
RETRIED = "synthray_retried"  # a call on a dead pooled connection was made again
# A request that writes SQLite: the first-come first-served queue its transactions wait in
# (see _write_gate), and whether it holds its turn now.
WRITE_GATE = "synthray_write_gate"
HOLDS_GATE = "synthray_holds_gate"


async def get_session(request: Request, settings: SettingsDep) -> AsyncIterator[Session]:
    """One transaction per request, committed before the response is sent. A GET or HEAD
    reads only, unless its endpoint is marked with :func:`writes_on_read`.

    Making the session does no I/O (it connects at its first statement), so it is made on
    the event loop. Its database calls go through :func:`blocking`: a read-only request on
    SQLite makes them on the event loop; a read-only request on PostgreSQL whose endpoint
    is marked :func:`reads_only` makes them on the event loop too, on an asyncio
    driver (``db.read_engine``); every other request makes them in the thread pool."""
    url = settings.sqlalchemy_url
    route = request.scope.get("route")
    endpoint = getattr(route, "endpoint", None)
    read_only = request.method in ("GET", "HEAD") and not getattr(
        endpoint, "__synthray_writes__", False
    )
    per_loop: dict[asyncio.AbstractEventLoop, AsyncEngine] = request.app.state.read_engines
    engine = per_loop.get(asyncio.get_running_loop())  # PostgreSQL only
    if engine is not None and _on_async_driver(request, settings, read_only, endpoint):
        reader = AsyncSession(engine, expire_on_commit=False)
        session = reader.sync_session
        session.info[ON_ASYNC_DRIVER] = reader
        session.info[AUTOCOMMITS] = True
        limit: AbstractAsyncContextManager[object] = contextlib.nullcontext()
    else:
        session = session_factory(url, read_only)()
        session.info[INLINE] = runs_inline(url, read_only)
        if not read_only and url.startswith("sqlite"):
            session.info[WRITE_GATE] = _write_gate(url)
        limit = _database_slots(url)
    async with limit:
        try:
            yield session
        except BaseException:
            with anyio.CancelScope(shield=True):  # a client that went away still frees it
                await blocking(session, abandon, session)
            raise
        with anyio.CancelScope(shield=True):
            await blocking(session, finish, session)


def _on_async_driver(request: Request, settings: Settings, read_only: bool, endpoint: Any) -> bool:
    """Whether a PostgreSQL request's session is an AsyncSession: a read whose every
    database call goes through :func:`blocking` (an endpoint marked :func:`reads_only`),
    and whose caller is not verified against the identity provider (that may fetch its
    keys over the network, in a thread, where an asyncio session cannot be used)."""
    return (
        read_only
        and getattr(endpoint, "__synthray_reads_only__", False)
        and not presents_identity_token(request, settings)
    )


def presents_identity_token(request: Request, settings: Settings) -> bool:
    """Whether the request's bearer credential is to be verified as an identity-provider
    token (OIDC is configured and it has a JWT's shape) rather than looked up as a key."""
    if not settings.oidc_issuer:
        return False
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and oidc.looks_like_jwt(credentials.strip())


# Per event loop (their waiters belong to the loop they wait on): the database slots and
# the SQLite write gates, keyed by kind and database URL.
_per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, str], Any]]
_per_loop = weakref.WeakKeyDictionary()


def _loop_local(kind: str, url: str, make: Callable[[], T]) -> T:
    """The running loop's object of ``kind`` for ``url``, made by ``make`` the first time."""
    mine = _per_loop.setdefault(asyncio.get_running_loop(), {})
    if (kind, url) not in mine:
        mine[kind, url] = make()
    result: T = mine[kind, url]
    return result


def _database_slots(url: str) -> AbstractAsyncContextManager[object]:
    """How many requests may hold a database session at once, fewer than the pool's
    connections. A request keeps its connection from its first statement to its commit,
    across thread-pool hops; with more requests in the database than connections, every
    pool thread could end up waiting for a connection held by a request whose next hop
    needs a thread: nothing moves until the pool's timeout (a 503 after 30 s). Requests
    beyond the limit wait here instead, on the event loop, holding nothing."""
    slots = database_slots(url)
    if slots is None:  # acquiring would cost a trip round the event loop for nothing
        return contextlib.nullcontext()
    limiter: anyio.CapacityLimiter = _loop_local("slots", url, lambda: anyio.CapacityLimiter(slots))
    return limiter


def _write_gate(url: str) -> asyncio.Lock:
    """The queue in which this event loop's requests take SQLite's write lock, one
    transaction at a time, in the order they asked (an ``asyncio.Lock`` wakes its waiters
    first come, first served).

    Every write transaction here takes SQLite's lock at BEGIN (``BEGIN IMMEDIATE``). Left
    to SQLite, the requests that find it taken wait in its busy handler, each polling with
    sleeps that grow to 100 ms; whoever polls at the right moment wins, so at 32 concurrent
    submissions most waited milliseconds and some seconds (p99 3.1-3.3 s, docs/measurements.md,
    "Open items in detail").
    They also waited in the thread pool, a thread each. Queued here, they wait on the
    event loop, holding no thread, and SQLite's lock is then contended only by other
    processes (workers, the CLI), which still wait in the busy handler."""
    return _loop_local("write gate", url, asyncio.Lock)


def runs_inline(url: str, read_only: bool) -> bool:
    """Whether a session's calls run on the event loop: reads on SQLite (see blocking)."""
    return read_only and url.startswith("sqlite")


async def blocking(session: Session, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, which uses ``session``: on the event loop when the session
    is a read-only one on SQLite, else in the thread pool.

    SQLite runs in this process: a read under WAL waits for no lock and takes tens of
    microseconds of CPU, like parsing a JSON body. Handing it to a thread costs more than
    that (a hop each way, and the GIL handed back and forth) and buys no parallelism,
    since the work holds the GIL. A write may wait for SQLite's write lock and a
    PostgreSQL call waits on the network: those go through :func:`off_loop`."""
    if session.info.get(INLINE):
        return fn(*args, **kwargs)
    return await off_loop(session, fn, *args, **kwargs)


async def off_loop(session: Session, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, which uses ``session`` and may wait: for a session on the
    asyncio driver, in SQLAlchemy's greenlet bridge (its waits are awaited on the event
    loop, and ``fn`` may write: a refusal is audited in the request's own session); for
    any other session, in the thread pool."""
    reader: AsyncSession | None = session.info.get(ON_ASYNC_DRIVER)
    if reader is None:
        gate: asyncio.Lock | None = session.info.get(WRITE_GATE)
        if gate is None:
            return await run_in_threadpool(fn, *args, **kwargs)
        return await _through_gate(gate, session, fn, *args, **kwargs)
    try:
        return await _on_reader(reader, fn, *args, **kwargs)
    except DBAPIError as exc:
        # A pooled connection the database closed (a restart) fails its first statement;
        # the pool then drops every connection as old as it. The read pool does not ping
        # before use (``db.read_engine``), so such a call is made again, once per request,
        # on a fresh connection: its session only reads, and a refusal it audits was
        # rolled back with the dead connection. A database still down fails again (503).
        if not exc.connection_invalidated or session.info.get(RETRIED):
            raise
        session.info[RETRIED] = True
        await reader.rollback()
        return await _on_reader(reader, fn, *args, **kwargs)


async def _on_reader(reader: AsyncSession, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    try:
        return await reader.run_sync(lambda _: fn(*args, **kwargs))
    except OSError as exc:
        # asyncpg raises a refused or failed connect as the socket's own error, where
        # psycopg raises OperationalError: either way the database cannot be reached (503).
        # The reader's endpoints read no files, so an OSError here is the connection's.
        raise OperationalError("connecting to the database", None, exc) from exc


async def _through_gate(
    gate: asyncio.Lock, session: Session, fn: Callable[..., T], /, *args: Any, **kwargs: Any
) -> T:
    """:func:`off_loop` for a request that writes SQLite: its transaction waits its turn in
    ``gate`` on the event loop before its first statement, and gives the turn up on the
    loop once the transaction has ended (committed or rolled back). A transaction begun
    outside the gate goes on without it: waiting for the gate while holding SQLite's lock
    would deadlock with the gate's holder, which waits for that lock."""
    if not session.info.get(HOLDS_GATE) and not session.in_transaction():
        await gate.acquire()
        session.info[HOLDS_GATE] = True
    try:
        return await run_in_threadpool(fn, *args, **kwargs)
    finally:
        if session.info.get(HOLDS_GATE) and not session.in_transaction():
            session.info[HOLDS_GATE] = False
            gate.release()


def reads_only(endpoint: Callable[..., T]) -> Callable[..., Awaitable[T]]:
    """Run a plain ``def`` endpoint through :func:`blocking` with its ``session`` argument:
    for endpoints that only read the database (no files, no network), so that a read on
    SQLite takes no thread-pool hop. FastAPI reads the parameters from the wrapped
    function's signature."""

    @functools.wraps(endpoint)
    async def run(*args: Any, **kwargs: Any) -> T:
        return await blocking(kwargs["session"], endpoint, *args, **kwargs)

    run.__synthray_reads_only__ = True  # type: ignore[attr-defined]
    return run


def commits(endpoint: Callable[..., T]) -> Callable[..., Awaitable[T]]:
    """Run a plain ``def`` endpoint that writes and then commit its transaction, in one call
    through :func:`blocking` (one thread-pool hop), instead of committing in a later hop
    when the session's dependency ends. The row locks its writes take (a dataset's, while
    a version is numbered) and, on SQLite, the write gate are then held for that one hop,
    not across a trip round a busy event loop between the endpoint and the commit, which
    is what every other submission of the same dataset waits for. Still committed before
    the response goes out; an endpoint that raises commits nothing. For endpoints whose
    result needs no further database work once committed (sessions here do not expire
    their objects on commit)."""

    @functools.wraps(endpoint)
    async def run(*args: Any, **kwargs: Any) -> T:
        session: Session = kwargs["session"]

        def work() -> T:
            result = endpoint(*args, **kwargs)
            commit(session)
            return result

        return await blocking(session, work)

    return run


# scope="function": the commit above runs when the endpoint returns, before the
# response goes out, so a client never sees a 2xx for a transaction that then fails.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


async def get_blobs(settings: SettingsDep) -> BlobStore:
    return BlobStore(settings.blob_dir)


BlobsDep = Annotated[BlobStore, Depends(get_blobs)]

_bearer = HTTPBearer(auto_error=False, description="API key as a bearer token")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key")


async def caller(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    header: Annotated[str | None, Security(_header)],
) -> Principal | Unauthorized | Forbidden:
    """The caller's principal (an API key, or an identity-provider token when OIDC is
    configured), or the 401/403 to answer (for endpoints that audit failed attempts).

    A signed-in browser's session cookie stands in for the key on GET and HEAD only (the
    pages' images, the partner's download, live job progress): a request that changes
    something comes with a key, or through a page form that carries the CSRF token."""
    key = bearer.credentials if bearer else header
    if key and bearer and presents_identity_token(request, settings):
        # Verifying may fetch the provider's keys over the network: never on the loop, nor
        # holding the write gate (its transaction on SQLite then goes on without the gate).
        return await run_in_threadpool(identify, request, session, settings, key, True)
    return await blocking(session, identify, request, session, settings, key, False)


def identify(
    request: Request, session: Session, settings: Settings, key: str | None, token: bool
) -> Principal | Unauthorized | Forbidden:
    """:func:`caller`'s work, given the API key or (``token``) the identity-provider token
    the request presented."""
    if not key:
        cookie = web.cookie_name(web.COOKIE, web.secure_cookies(request.url.scheme, settings))
        if request.method in ("GET", "HEAD") and cookie in request.cookies:
            signed_in = web.browser(session, settings, request.cookies[cookie])
            if signed_in is not None:
                return signed_in.principal
        return Unauthorized("missing API key (Authorization: Bearer <key> or X-API-Key)")
    if token:
        try:
            return oidc.authenticate(session, settings, key)
        except oidc.TokenRefused as refused:
            kind = Forbidden if refused.forbidden else Unauthorized
            return kind(f"identity token refused: {refused.reason}")
    principal = auth_service.authenticate(session, settings.secret_key, key)
    if principal is None:
        return Unauthorized("invalid or revoked API key")
    return principal


CallerDep = Annotated[Principal | Unauthorized | Forbidden, Depends(caller)]


def refuse_route(request: Request, session: Session, who: Principal | None, reason: str) -> None:
    """Audit a refused request (committed at once; the request itself ends in an error):
    its method and path (printable characters, at most 64), never its body or query."""
    path = "".join(c for c in request.url.path if c.isprintable())
    audit.record_refusal(session, who, "request", "route", f"{request.method} {path}"[:64], reason)


async def current_principal(request: Request, session: SessionDep, who: CallerDep) -> Principal:
    if isinstance(who, Unauthorized | Forbidden):
        reason = who.detail[:200] if who.detail.startswith("identity") else "no valid API key"
        await off_loop(session, refuse_route, request, session, None, reason)
        raise who
    return who


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]


def require(*roles: Role) -> Callable[..., Awaitable[Principal]]:
    allowed = set(roles) | {Role.admin}

    async def check(
        request: Request, session: SessionDep, principal: CurrentPrincipal
    ) -> Principal:
        if principal.role not in allowed:
            names = ", ".join(sorted(r.value for r in allowed))
            reason = f"role {principal.role} lacks the right"
            await off_loop(session, refuse_route, request, session, principal, reason)
            raise Forbidden(f"this action needs role: {names}")
        return principal

    return check


AdminDep = Annotated[Principal, Depends(require(Role.admin))]
OperatorDep = Annotated[Principal, Depends(require(Role.operator))]
ReviewerDep = Annotated[Principal, Depends(require(Role.reviewer))]
StaffDep = Annotated[Principal, Depends(require(Role.operator, Role.reviewer))]


def multipart_body(field: str, description: str) -> dict[str, object]:
    """OpenAPI description of an upload: a JSON text field and one file part (the
    endpoints read the stream themselves, so FastAPI cannot infer it)."""
    return {
        "requestBody": {
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": [field, "file"],
                        "properties": {
                            field: {
                                "type": "string",
                                "maxLength": 65536,
                                "description": description,
                            },
                            "file": {"type": "string", "format": "binary"},
                        },
                    }
                }
            },
            "required": True,
        }
    }
