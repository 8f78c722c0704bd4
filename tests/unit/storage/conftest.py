"""Fixtures for the storage contract suite (see `backends`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from tests.unit.storage.backends import PG_URL, PgDatabase, PgSchema, pg_reachable


@pytest.fixture(scope="session")
def pg_database() -> Iterator[PgDatabase]:
    why = pg_reachable()
    if why is not None:
        pytest.skip(why)
    admin = sa.create_engine(PG_URL.replace("postgresql://", "postgresql+psycopg://"))
    yield PgDatabase(admin)
    admin.dispose()


@pytest.fixture(scope="session")
def pg_schema(pg_database: PgDatabase) -> Iterator[PgSchema]:
    """One migrated schema for the whole run, dropped at the end."""
    from portcullis.storage.migrations import upgrade

    schema = pg_database.schema()
    engine = schema.engine()
    try:
        upgrade(engine)
    finally:
        engine.dispose()
    yield schema
    pg_database.drop(schema)


@pytest.fixture
def fresh_pg(pg_schema: PgSchema) -> PgSchema:
    """The run's schema, emptied (every table truncated) for this test."""
    pg_schema.truncate()
    return pg_schema
