"""The backup and restore of docs/deployment.md, run as written on both databases: dump
the database, then copy the blob folder; restore both into a new database and folder,
migrate, verify the store with the CLI, and download an approved bundle from the
restored copy. Then a damaged copy is caught by `synthray store verify`."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from conftest import PG_ADMIN_URL, World, make_settings
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from support import Keys, auth, run_queued, synthray_cli

from synthray.app.db import engine_for
from synthray.app.main import create_app
from synthray.app.storecheck import ensure
from synthray.config import Settings


def _approved_export(client: TestClient, keys: Keys, settings: Settings) -> int:
    op, rev = auth(keys.operator), auth(keys.reviewer)
    r = client.post("/v1/synthesize", json={"model": "m", "per_class": 4, "seed": 5}, headers=op)
    assert r.status_code == 202, r.text
    assert run_queued(settings) == ["succeeded", "succeeded"]
    batch_id = r.json()["batch_id"]
    r = client.post("/v1/exports", json={"batch_id": batch_id, "partner": "partner-a"}, headers=op)
    assert r.status_code == 202, r.text
    assert run_queued(settings) == ["succeeded"]
    export_id = int(r.json()["export_id"])
    assert client.post(f"/v1/exports/{export_id}/approve", headers=rev).status_code == 200
    return export_id


def _drop(url: str, name: str) -> None:
    engine_for(url).dispose()
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _pg(url: str) -> tuple[list[str], str]:
    """libpq connection options and the database name of a SQLAlchemy PostgreSQL URL."""
    rest = url.split("://", 1)[1]
    user_host, name = rest.rsplit("/", 1)
    user, host_port = user_host.split("@")
    host, port = host_port.split(":")
    return ["-h", host, "-p", port, "-U", user], name


def test_a_restored_backup_serves_the_same_bundle(
    client: TestClient,
    keys: Keys,
    settings: Settings,
    trained: World,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    ensure(settings.sqlalchemy_url, settings.blob_dir)  # as `synthray serve` does at start
    export_id = _approved_export(client, keys, settings)
    original = client.get(f"/v1/exports/{export_id}/download", headers=auth(keys.partner))
    assert original.status_code == 200

    # Back up: the database first, then the blob folder.
    backup = tmp_path / "backup"
    backup.mkdir()
    url = settings.sqlalchemy_url
    if url.startswith("sqlite"):
        db_file = url.removeprefix("sqlite:///")
        subprocess.run(
            ["sqlite3", db_file, f".backup {backup / 'synthray.db.bak'}"], check=True, timeout=60
        )
    else:
        conn, name = _pg(url)
        dump = backup / "synthray.dump"
        subprocess.run(
            ["pg_dump", *conn, "--format=custom", "--file", str(dump), name],
            check=True,
            timeout=120,
        )
    subprocess.run(
        ["rsync", "-a", f"{settings.blob_dir}/", f"{backup / 'blobs'}/"], check=True, timeout=120
    )

    # Restore into a new database and a new data folder.
    data = tmp_path / "restored"
    (data / "data").mkdir(parents=True)
    if url.startswith("sqlite"):
        new_url = f"sqlite:///{data / 'data' / 'synthray.db'}"
        shutil.copyfile(backup / "synthray.db.bak", data / "data" / "synthray.db")
    else:
        new_name = f"synthray_restore_{uuid.uuid4().hex[:8]}"
        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{new_name}"'))
        admin.dispose()
        new_url = url.rsplit("/", 1)[0] + f"/{new_name}"
        request.addfinalizer(lambda: _drop(new_url, new_name))
        conn, _ = _pg(url)
        subprocess.run(
            ["pg_restore", *conn, "--dbname", new_name, str(backup / "synthray.dump")],
            check=True,
            timeout=120,
        )
    shutil.copytree(backup / "blobs", data / "data" / "blobs")
    restored = make_settings(data, new_url)

    upgraded = synthray_cli(restored, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    verified = synthray_cli(restored, "store", "verify")
    assert verified.returncode == 0, verified.stderr
    assert "0 problem(s)" in verified.stderr

    with TestClient(create_app(restored), raise_server_exceptions=False) as c:
        assert c.get("/readyz").json()["blob_store"] == "ok"
        again = c.get(f"/v1/exports/{export_id}/download", headers=auth(keys.partner))
    assert again.status_code == 200 and again.content == original.content
    sha = client.get(f"/v1/exports/{export_id}", headers=auth(keys.operator)).json()[
        "bundle_sha256"
    ]
    assert hashlib.sha256(again.content).hexdigest() == sha

    # A damaged copy is found, blob by blob, and named by the row that needs it.
    victim = data / "data" / "blobs" / sha[:2] / sha[2:]
    assert victim.is_file()
    victim.write_bytes(b"not the bundle")
    damaged = synthray_cli(restored, "store", "verify")
    assert damaged.returncode == 1
    assert (
        f"exports.bundle_sha256 (id {export_id}): blob {sha[:12]} does not match" in damaged.stderr
    )
