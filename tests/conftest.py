"""Shared fixtures: real SQLite files and a real PostgreSQL database, built by Alembic.

Every API test runs once per backend. Each backend's database is created once per test
session by the migrations, and emptied after every test, so tests never see each
other's rows.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from support import Keys, make_keys

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
    with engine_for(url).begin() as conn:
        if url.startswith("postgresql"):
            conn.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
        else:
            for t in tables:
                conn.execute(text(f"DELETE FROM {t}"))


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> Iterator[str]:
    url: str = request.getfixturevalue(f"{request.param}_url")
    yield url
    _empty(url)


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    import_root = tmp_path / "import"
    import_root.mkdir()
    return Settings(
        dev_mode=True,
        data_dir=tmp_path / "data",
        database_url=database_url,
        broker_url="embedded",
        import_root=import_root,
        quality_encoder_steps=10,
        quality_samples_per_class=10,
        copydetect_seconds=2,
        copydetect_steps=4,
        # Test datasets hold a few dozen images: a record share over a dozen synthetic
        # images is too noisy to bound (the flagged-fraction rule is still tested).
        max_dcr_train_share=1.0,
    )


@pytest.fixture
def keys(settings: Settings) -> Keys:
    return make_keys(settings)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c
