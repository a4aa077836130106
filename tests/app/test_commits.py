"""``deps.commits``: a submitting endpoint and its commit run in one call, so that its
transaction (and, on SQLite, its turn at the write gate) is over before the request's
dependencies wind up and the response goes out; an endpoint that refuses commits nothing.

The probe routes are added to the real application, on a scratch table of the test's
database; a plain route, committed only when the session's dependency ends, shows that
the probe tells the two apart.

No ``from __future__ import annotations`` here: the probe routes' annotations name local
objects, which FastAPI could not resolve from strings."""

from collections.abc import Iterator
from typing import Annotated, Any

import pytest
from fastapi import Depends
from fastapi.testclient import TestClient
from sqlalchemy import text

from synthray.app.db import engine_for
from synthray.app.deps import HOLDS_GATE, WRITE_GATE, SessionDep, blocking, commits
from synthray.app.errors import Conflict
from synthray.app.main import create_app
from synthray.config import Settings

PROBE = "commits_probe"


@pytest.fixture
def probed(settings: Settings) -> Iterator[tuple[TestClient, list[tuple[bool, ...]]]]:
    """The application with two probe routes, and what each request's session looked like
    once its endpoint had returned: (still in a transaction, holding its turn at the write
    gate, the gate locked at all)."""
    engine = engine_for(settings.sqlalchemy_url)
    with engine.begin() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {PROBE}"))
        conn.execute(text(f"CREATE TABLE {PROBE} (n integer)"))
    seen: list[tuple[bool, ...]] = []

    def after_endpoint(session: SessionDep) -> Iterator[None]:
        yield  # set up after the session, so wound up before the session's own commit
        gate = session.info.get(WRITE_GATE)  # SQLite only
        held = bool(session.info.get(HOLDS_GATE))
        seen.append((session.in_transaction(), held, gate is not None and gate.locked()))

    probe = Annotated[None, Depends(after_endpoint, scope="function")]

    def write(n: int, session: SessionDep, _: probe) -> dict[str, Any]:
        session.execute(text(f"INSERT INTO {PROBE} (n) VALUES (:n)"), {"n": n})
        if n < 0:
            raise Conflict("refused after writing")
        return {"n": n}

    async def plain(n: int, session: SessionDep, _: probe) -> dict[str, Any]:
        # As a request's other database calls run (deps.blocking), committed only when the
        # session's dependency ends.
        return await blocking(session, write, n, session, None)

    app = create_app(settings)
    app.add_api_route("/probe/commits", commits(write), methods=["POST"])
    app.add_api_route("/probe/plain", plain, methods=["POST"])
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            yield client, seen
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"DROP TABLE {PROBE}"))


def _stored(settings: Settings) -> list[int]:
    with engine_for(settings.sqlalchemy_url).connect() as conn:
        return sorted(n for (n,) in conn.execute(text(f"SELECT n FROM {PROBE}")))


def test_a_submission_commits_in_its_endpoints_own_call(
    settings: Settings, probed: tuple[TestClient, list[tuple[bool, ...]]]
) -> None:
    client, seen = probed
    sqlite = settings.sqlalchemy_url.startswith("sqlite")

    r = client.post("/probe/plain", params={"n": 1})
    assert r.status_code == 200, r.text
    # Without the decorator the transaction, and on SQLite the gate, outlive the endpoint.
    assert seen.pop() == (True, sqlite, sqlite)
    assert _stored(settings) == [1]  # committed by the time the request completes

    r = client.post("/probe/commits", params={"n": 2})
    assert r.status_code == 200, r.text
    assert seen.pop() == (False, False, False)  # committed, and the gate free, in its call
    assert _stored(settings) == [1, 2]

    r = client.post("/probe/commits", params={"n": -1})
    assert r.status_code == 409, r.text
    assert r.json()["detail"] == "refused after writing"
    assert _stored(settings) == [1, 2]  # the refusal's write was rolled back
    assert not seen  # a refusal does not wind the probe up normally

    # Nothing was left held: the next submission goes through at once.
    r = client.post("/probe/commits", params={"n": 3})
    assert r.status_code == 200, r.text
    assert seen.pop() == (False, False, False)
    assert _stored(settings) == [1, 2, 3]
