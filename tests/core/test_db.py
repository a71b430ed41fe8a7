"""open_database: Alembic creates the schema on a fresh SQLite file, in WAL mode, idempotently."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from horde_services.core import db

HEAD = "0004"


def url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


async def tables(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as conn:
        return set(await conn.run_sync(lambda c: sa.inspect(c).get_table_names()))


async def scalar(engine: AsyncEngine, sql: str) -> object:
    async with engine.connect() as conn:
        return (await conn.execute(sa.text(sql))).scalar_one()


async def test_open_database_creates_schema_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "state" / "nested" / "validator.db"  # parent directories do not exist yet
    engine = await db.open_database(url(path))
    try:
        assert path.is_file()
        assert await tables(engine) == {*db.metadata.tables, "alembic_version"}
        assert await scalar(engine, "SELECT version_num FROM alembic_version") == HEAD
        assert str(await scalar(engine, "PRAGMA journal_mode")).lower() == "wal"
        assert await scalar(engine, "PRAGMA foreign_keys") == 1
        assert await scalar(engine, "PRAGMA busy_timeout") == 5000
    finally:
        await engine.dispose()
    # WAL is a property of the file: a plain connection sees it too.
    plain = sa.create_engine(f"sqlite:///{path}")
    try:
        with plain.connect() as conn:
            assert conn.execute(sa.text("PRAGMA journal_mode")).scalar_one() == "wal"
    finally:
        plain.dispose()


async def test_migrations_match_the_metadata(tmp_path: Path) -> None:
    """Every column the code declares exists in the migrated schema."""
    engine = await db.open_database(url(tmp_path / "x.db"))
    try:
        async with engine.connect() as conn:

            def columns(c: sa.Connection) -> dict[str, set[str]]:
                insp = sa.inspect(c)
                return {t: {col["name"] for col in insp.get_columns(t)} for t in db.metadata.tables}

            migrated = await conn.run_sync(columns)
        for name, table in db.metadata.tables.items():
            assert migrated[name] == {c.name for c in table.columns}, name
    finally:
        await engine.dispose()


async def test_open_database_twice_is_idempotent_and_keeps_data(tmp_path: Path) -> None:
    target = url(tmp_path / "miner.db")
    engine = await db.open_database(target)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                db.weight_settings.insert().values(reference="r1", weights_json="{}", created_ns=1)
            )
    finally:
        await engine.dispose()

    engine = await db.open_database(target)
    try:
        assert await tables(engine) == {*db.metadata.tables, "alembic_version"}
        assert await scalar(engine, "SELECT count(*) FROM alembic_version") == 1
        assert await scalar(engine, "SELECT version_num FROM alembic_version") == HEAD
        async with engine.connect() as conn:
            rows = (await conn.execute(sa.select(db.weight_settings.c.reference))).all()
        assert [r.reference for r in rows] == ["r1"]
    finally:
        await engine.dispose()


async def test_the_migrations_build_exactly_the_models_schema(tmp_path: Path) -> None:
    """Alembic's autogenerate finds nothing to add or drop after the migrations: every model
    change (tables, columns, indexes) has its migration."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    engine = await db.open_database(url(tmp_path / "schema.db"))
    try:
        async with engine.connect() as conn:
            diff = await conn.run_sync(
                lambda c: compare_metadata(MigrationContext.configure(c), db.metadata)
            )
    finally:
        await engine.dispose()
    assert diff == []
