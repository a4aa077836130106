"""The schema comes only from the migrations: after `upgrade`, the database matches the
tables the code declares, on both backends, so a table change without a migration fails."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from synthray.app.db import Base, engine_for
from synthray.app.tables import __all__ as every_table  # noqa: F401  (maps every table)


def test_migrations_match_the_declared_tables(database_url: str) -> None:
    with engine_for(database_url).connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], diff
