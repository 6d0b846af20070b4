"""The migrated schema is exactly the ORM models, on SQLite and on PostgreSQL."""

from __future__ import annotations

import uuid

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text

from app.db import migrate
from app.db.models import Base

TABLES = {
    "api_keys",
    "models",
    "eval_references",
    "jobs",
    "artifacts",
    "job_events",
    "workers",
    "webhook_deliveries",
    "alembic_version",
}


def schema_diff(url: str) -> list:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()


def table_names(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_one_head_and_linear_history():
    script = ScriptDirectory.from_config(migrate.alembic_config("sqlite://"))
    assert len(script.get_heads()) == 1


def test_sqlite_migrated_schema_matches_models(tmp_path):
    url = f"sqlite:///{tmp_path / 'schema.db'}"
    migrate.upgrade(url)
    assert table_names(url) == TABLES
    assert schema_diff(url) == []
    migrate.downgrade(url, "base")
    assert table_names(url) == {"alembic_version"}
    migrate.upgrade(url)
    assert schema_diff(url) == []


def test_postgres_migrated_schema_matches_models(pg_url, service_env):
    # service_env migrated the session database with `python -m app.cli migrate`
    assert TABLES <= table_names(pg_url)
    assert schema_diff(pg_url) == []


def test_postgres_downgrade_and_upgrade(pg_url):
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    name = f"ptq4arvg_mig_{uuid.uuid4().hex[:10]}"
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        migrate.upgrade(url)
        assert schema_diff(url) == []
        migrate.downgrade(url, "base")
        assert table_names(url) == {"alembic_version"}
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
