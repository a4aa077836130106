"""Shared fixtures: real SQLite files and a real PostgreSQL database, built by Alembic.

Every API test runs once per backend. Each backend's database is created once per test
session by the migrations, and emptied after every test, so tests never see each
other's rows.

Expensive state is built once: the ``trained`` fixture's world (a dataset ingested through
the API and a generator trained by the worker's own code) is made once per backend per
session, then copied into each test that asks for it: the database by file copy (SQLite)
or ``CREATE DATABASE ... TEMPLATE`` (PostgreSQL), the blob store by copying its folder.
A test may change its copy freely.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from support import NIH_INGEST, Keys, auth, copy_subset, make_keys, plant_bad_rows, run_queued

from synthray.app.audit import chain
from synthray.app.db import Base, engine_for
from synthray.app.main import create_app
from synthray.config import Settings
from synthray.migrations import upgrade

PG_ADMIN_URL = os.environ.get(
    "SYNTHRAY_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("SYNTHRAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("sqlite") / "synthray.db"
    url = f"sqlite:///{path}"
    upgrade(url)
    return url


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    name = f"synthray_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    upgrade(url)
    yield url
    engine_for(url).dispose()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _empty(url: str) -> None:
    tables = [t.name for t in reversed(Base.metadata.sorted_tables)]
    # The audit tables refuse DELETE and TRUNCATE (triggers): a test database is emptied
    # with them switched off (PostgreSQL) or dropped and created again (SQLite).
    with engine_for(url).begin() as conn:
        if url.startswith("postgresql"):
            conn.execute(text("SET LOCAL session_replication_role = replica"))
            conn.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
        else:
            for statement in chain.drop_triggers("sqlite"):
                conn.execute(text(statement))
            for t in tables:
                conn.execute(text(f"DELETE FROM {t}"))
            for statement in chain.triggers("sqlite"):
                conn.execute(text(statement))


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> Iterator[str]:
    url: str = request.getfixturevalue(f"{request.param}_url")
    yield url
    _empty(url)


def make_settings(folder: Path, database_url: str, **overrides: Any) -> Settings:
    """Settings for a test: its own data folder and import root, tiny model budgets."""
    import_root = folder / "import"
    import_root.mkdir(parents=True, exist_ok=True)
    values: dict[str, Any] = {
        "dev_mode": True,
        "data_dir": folder / "data",
        "database_url": database_url,
        "broker_url": "embedded",
        "import_root": import_root,
        "quality_encoder_steps": 10,
        "quality_samples_per_class": 10,
        "copydetect_seconds": 2,
        "copydetect_steps": 4,
        "audit_planted_per_family": 2,
        # Test datasets hold a few dozen images: a record share over a dozen synthetic
        # images is too noisy to bound (the flagged-fraction rule is still tested).
        "max_dcr_train_share": 1.0,
        # A dozen images per class hold only a few patients; the refusal of thin classes
        # has its own test.
        "min_class_patients": 1,
    }
    return Settings(**(values | overrides))


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return make_settings(tmp_path, database_url)


@pytest.fixture
def keys(request: pytest.FixtureRequest, settings: Settings) -> Keys:
    if "trained" in request.fixturenames:  # the world's keys, restored with its database
        world: World = request.getfixturevalue("trained")
        return world.keys
    return make_keys(settings)


# ------------------------------------------------------------------- the trained world


@dataclass
class World:
    """A dataset "nih" ingested through the API (with rows that must be skipped) and a
    generator "m" v1 trained for 3 steps, with quality metrics."""

    keys: Keys
    ingest: dict[str, Any]  # the ingest job, as GET /v1/jobs/{id} shows it
    train: dict[str, Any]  # the train job
    data_dir: Path
    database: str  # SQLite file path, or PostgreSQL database name


def _build_world(folder: Path, url: str, database: str) -> World:
    upgrade(url)
    settings = make_settings(folder, url)
    assert settings.import_root is not None
    keys = make_keys(settings)
    # One film per patient: the membership audit counts patients, and needs held-out
    # patients of every class to form its groups.
    plant_bad_rows(copy_subset(settings.import_root, per_class=12, one_per_patient=True))
    h = auth(keys.operator)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        r = c.post("/v1/datasets", json={"name": "nih", "source": "nih", **NIH_INGEST}, headers=h)
        assert r.status_code == 202, r.text
        ingest_id = r.json()["job_id"]
        assert run_queued(settings) == ["succeeded"]
        r = c.post(
            "/v1/train",
            json={"dataset": "nih", "model_name": "m", "max_steps": 3, "batch_size": 8},
            headers=h,
        )
        assert r.status_code == 202, r.text
        train_id = r.json()["job_id"]
        assert run_queued(settings) == ["succeeded"]
        ingest = c.get(f"/v1/jobs/{ingest_id}", headers=h).json()
        train = c.get(f"/v1/jobs/{train_id}", headers=h).json()
    assert ingest["state"] == train["state"] == "succeeded", (ingest, train)
    engine_for(url).dispose()  # a template database must have no open connection
    return World(keys, ingest, train, settings.data_dir, database)


@pytest.fixture(scope="session")
def _worlds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, World]]:
    """Worlds by backend, built on first use."""
    worlds: dict[str, World] = {}
    yield worlds
    if "postgres" in worlds:
        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{worlds["postgres"].database}"'))
        admin.dispose()


def _world(backend: str, worlds: dict[str, World], tmp_path_factory: Any) -> World:
    if backend not in worlds:
        folder = tmp_path_factory.mktemp(f"world-{backend}")
        if backend == "sqlite":
            path = folder / "world.db"
            worlds[backend] = _build_world(folder, f"sqlite:///{path}", str(path))
        else:
            name = f"synthray_world_{uuid.uuid4().hex[:10]}"
            admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
            admin.dispose()
            url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
            worlds[backend] = _build_world(folder, url, name)
    return worlds[backend]


def _restore(world: World, url: str, data_dir: Path) -> None:
    """Make the database at ``url`` and ``data_dir`` copies of the world's."""
    engine_for(url).dispose()
    if url.startswith("sqlite"):
        path = Path(url.removeprefix("sqlite:///"))
        for suffix in ("-wal", "-shm"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)
        shutil.copyfile(world.database, path)
        wal = Path(world.database + "-wal")  # closing the last connection usually empties it
        if wal.exists():
            shutil.copyfile(wal, path.with_name(path.name + "-wal"))
    else:
        name = url.rsplit("/", 1)[1]
        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{world.database}"'))
        admin.dispose()
    shutil.copytree(world.data_dir, data_dir, dirs_exist_ok=True)


@pytest.fixture
def trained(
    settings: Settings,
    database_url: str,
    _worlds: dict[str, World],
    tmp_path_factory: pytest.TempPathFactory,
) -> World:
    """This test's database and data folder hold a copy of the trained world."""
    backend = "sqlite" if database_url.startswith("sqlite") else "postgres"
    world = _world(backend, _worlds, tmp_path_factory)
    _restore(world, database_url, settings.data_dir)
    return world


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c
