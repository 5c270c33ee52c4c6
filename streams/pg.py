"""PostgreSQL, the event log's cold tier: one asyncpg pool per process, and versioned SQL
migrations under infra/migrations."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg

from streams.errors import MigrationError, pg_translated

log = logging.getLogger("tickwave.db")

# The repository's infra/migrations (editable installs), else ./infra/migrations (the image).
_DEFAULT_DIR = Path(__file__).resolve().parent.parent / "infra" / "migrations"


def migrations_dir() -> Path:
    explicit = os.environ.get("TICKWAVE_MIGRATIONS_DIR")
    if explicit:
        return Path(explicit)
    return _DEFAULT_DIR if _DEFAULT_DIR.is_dir() else Path.cwd() / "infra" / "migrations"


def migration_files(directory: Path | None = None) -> list[Path]:
    """`NNNN_name.sql` files in order."""
    found = sorted(p for p in (directory or migrations_dir()).glob("*.sql") if p.name[:4].isdigit())
    if not found:
        raise MigrationError(f"no migrations in {directory or migrations_dir()} (set TICKWAVE_MIGRATIONS_DIR)")
    return found


async def create_pool(database_url: str, **options: Any) -> asyncpg.Pool:
    """The process's one pool."""
    options.setdefault("min_size", 1)
    options.setdefault("max_size", 8)
    with pg_translated("connect to PostgreSQL"):
        pool = await asyncpg.create_pool(database_url, **options)
    assert pool is not None
    return pool


@asynccontextmanager
async def connection(database_url: str, **options: Any) -> AsyncIterator[asyncpg.Connection]:
    """One connection of its own (migrations; the relay, whose lock and LISTEN live on it)."""
    with pg_translated("connect to PostgreSQL"):
        conn = await asyncpg.connect(database_url, **options)
    try:
        yield conn
    finally:
        await conn.close()


async def upgrade(database_url: str, directory: Path | None = None) -> list[str]:
    """Apply pending migrations in one transaction under an advisory lock; returns their names.

    Safe to run twice and from several processes at once: the second waits for
    the lock, then finds nothing left to apply.
    """
    files = migration_files(directory)
    async with connection(database_url) as conn:
        async with conn.transaction():
            # one lock per schema, so tests (a schema each) do not serialise on one another
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext('tickwave.migrations.' || current_schema()))"
            )
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
            applied = []
            for path in files:
                if path.name in done:
                    continue
                try:
                    await conn.execute(path.read_text(encoding="utf-8"))
                except asyncpg.PostgresError as exc:
                    raise MigrationError(f"{path.name}: {exc}") from None
                await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", path.name)
                applied.append(path.name)
                log.info("migration applied", extra={"migration": path.name})
    return applied
