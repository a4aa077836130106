"""A trail that survives an audit, tampered with directly in the database on both
backends: the database refuses UPDATE, DELETE (and TRUNCATE) of audit records itself; with
its triggers dropped, as someone with DDL rights could, every alteration, removal,
insertion and cut from the end is found by `synthray audit verify`, which names the first
broken record. The migration chains records written before it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_settings
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError
from support import Keys, auth, synthray_cli

from synthray.app.audit import chain
from synthray.app.audit.service import verify_trail
from synthray.app.db import engine_for
from synthray.config import Settings


@pytest.fixture
def trail(client: TestClient, keys: Keys, settings: Settings) -> Iterator[Settings]:
    """Eight records from real requests: keys created, refusals, a revocation."""
    for i in range(3):
        r = client.post(
            "/v1/keys", json={"name": f"p{i}", "role": "partner"}, headers=auth(keys.admin)
        )
        assert r.status_code == 201
    for _ in range(3):
        assert client.get("/v1/keys", headers=auth(keys.partner)).status_code == 403
    assert client.get("/v1/me", headers=auth("sr_0_nope")).status_code == 401
    newest = client.get("/v1/keys", headers=auth(keys.admin)).json()[-1]["id"]
    assert client.delete(f"/v1/keys/{newest}", headers=auth(keys.admin)).status_code == 200
    verdict = verify_trail(settings.sqlalchemy_url)
    assert verdict.intact and verdict.records == 8, verdict
    yield settings


def _sql(settings: Settings, *statements: str) -> None:
    with engine_for(settings.sqlalchemy_url).begin() as conn:
        for s in statements:
            conn.execute(text(s))


def _without_triggers(settings: Settings, *statements: str) -> None:
    dialect = "postgresql" if settings.sqlalchemy_url.startswith("postgresql") else "sqlite"
    _sql(settings, *chain.drop_triggers(dialect), *statements)


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_events SET outcome = 'ok' WHERE seq = 4",
        "DELETE FROM audit_events WHERE seq = 8",
        "DELETE FROM audit_head",
    ],
)
def test_the_database_refuses_to_change_or_remove_records(trail: Settings, statement: str) -> None:
    with pytest.raises(DBAPIError, match="append-only"):
        _sql(trail, statement)
    assert verify_trail(trail.sqlalchemy_url).intact


def test_emptying_the_trail_is_refused(trail: Settings) -> None:
    """TRUNCATE on PostgreSQL (which skips row triggers); SQLite has only DELETE."""
    postgres = trail.sqlalchemy_url.startswith("postgresql")
    for table in ("audit_events", "audit_head"):
        with pytest.raises(DBAPIError, match="append-only"):
            _sql(trail, f"TRUNCATE {table} CASCADE" if postgres else f"DELETE FROM {table}")
    assert verify_trail(trail.sqlalchemy_url).intact


TAMPERING = {
    "altered detail": (
        ['UPDATE audit_events SET detail = \'{"reason": "nothing"}\' WHERE seq = 5'],
        "record 5 (id 5) was altered",
    ),
    "altered actor": (
        ["UPDATE audit_events SET actor_name = 'someone-else' WHERE seq = 2"],
        "record 2 (id 2) was altered",
    ),
    "removed from the middle": (
        ["DELETE FROM audit_events WHERE seq = 3"],
        "record 3 missing: the trail jumps from 2 to 4",
    ),
    "removed from the end": (
        ["DELETE FROM audit_events WHERE seq >= 7"],
        "records 7 to 8 were removed from the end",
    ),
    "removed, head rolled back": (
        ["DELETE FROM audit_events WHERE seq = 8", "UPDATE audit_head SET seq = 7"],
        "the head (record 7) does not match the last record (7)",
    ),
    "renumbered after a removal": (
        [
            "DELETE FROM audit_events WHERE seq = 4",
            "UPDATE audit_events SET seq = seq - 1 WHERE seq > 4",
        ],
        "record 4 (id 5) does not follow record 3",
    ),
    "inserted at the end": (
        [
            "INSERT INTO audit_events (seq, at, action, object_type, outcome, detail, prev_hash,"
            " hash) VALUES (9, '2026-01-01 00:00:00', 'approve_export', 'export', 'ok', '{}',"
            " '" + "a" * 64 + "', '" + "b" * 64 + "')"
        ],
        "record 9 (id 9) does not follow record 8",
    ),
}


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_verify_names_the_first_broken_record(trail: Settings, case: str) -> None:
    statements, expected = TAMPERING[case]
    _without_triggers(trail, *statements)
    verdict = verify_trail(trail.sqlalchemy_url)
    assert not verdict.intact and expected in str(verdict.problem), verdict
    done = synthray_cli(trail, "audit", "verify")
    assert done.returncode == 1 and expected in done.stderr, done.stderr


def test_cli_verify_and_export_an_intact_trail(trail: Settings) -> None:
    done = synthray_cli(trail, "audit", "verify")
    assert done.returncode == 0, done.stderr
    assert "audit trail intact: 8 records, head 8" in done.stderr
    exported = synthray_cli(trail, "audit", "export", "--after", "5").stdout
    lines = [json.loads(x) for x in exported.splitlines()]
    assert [x["seq"] for x in lines] == [6, 7, 8]
    assert lines[0]["prev_hash"] and lines[1]["prev_hash"] == lines[0]["hash"]


def test_concurrent_writers_keep_one_chain(
    client: TestClient, keys: Keys, settings: Settings
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def refused(_: int) -> int:
        return client.get("/v1/keys", headers=auth(keys.partner)).status_code

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(refused, range(40))) == {403}
    verdict = verify_trail(settings.sqlalchemy_url)
    assert verdict.intact and verdict.records == 40 and verdict.head_seq == 40, verdict


def test_the_migration_chains_records_written_before_it(tmp_path: Path) -> None:
    from alembic import command

    from synthray.migrations import alembic_config, upgrade

    url = f"sqlite:///{tmp_path / 'old.db'}"
    command.upgrade(alembic_config(url), "0004")
    engine = create_engine(url)
    with engine.begin() as conn:
        for i in range(3):
            conn.execute(
                text(
                    "INSERT INTO audit_events (at, action, object_type, object_id, outcome, "
                    "detail) VALUES (:at, 'create_key', 'api_key', :oid, 'ok', :detail)"
                ),
                {
                    "at": f"2026-0{i + 1}-01 10:00:00.000000",
                    "oid": str(i),
                    "detail": '{"role": "partner"}',
                },
            )
    engine.dispose()
    upgrade(url)
    verdict = verify_trail(url)
    assert verdict.intact and verdict.records == 3 and verdict.head_seq == 3, verdict
    s = make_settings(tmp_path, url)
    with pytest.raises(DBAPIError, match="append-only"):
        _sql(s, "DELETE FROM audit_events")
