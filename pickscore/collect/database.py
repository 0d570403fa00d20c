"""The collection database itself: its URL (a bare path is a SQLite file), an engine with SQLite's pragmas, the
schema migrated with the package's Alembic scripts, and the one dialect-specific statement the store needs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session

from pickscore.errors import NotFound

MIGRATIONS = Path(__file__).with_name("migrations")


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer; commits survive a kill
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()


def database_url(url: str) -> str:
    """``url`` as SQLAlchemy takes it: a bare path is a SQLite file."""
    return url if "://" in url else f"sqlite:///{url}"


def sqlite_file(url: str) -> Path | None:
    """The file a SQLite URL (or bare path) names; None for a database server or an in-memory database."""
    parsed = make_url(database_url(url))
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def open_engine(url: str, create: bool = True) -> Engine:
    """An engine for ``url`` (a bare path is a SQLite file), its schema migrated to the newest revision; without
    ``create``, a SQLite file that does not exist is refused (NotFound names it) instead of made."""
    url = database_url(url)
    path = sqlite_file(url)
    if not create and path is not None and not path.is_file():
        raise NotFound(f"database {path}: no such SQLite file (`pickscore collect --db {path}` makes it)")
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True)
    migrate(engine)
    return engine


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision`` with the package's Alembic scripts (a no-op when it is there)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def insert_ignore(session: Session, table, rows: list[dict[str, Any]]) -> None:
    """INSERT ... ON CONFLICT DO NOTHING on SQLite and PostgreSQL: concurrent writers of one image both succeed."""
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    insert = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}.get(dialect)
    if insert is None:
        raise ValueError(f"collect: databases are SQLite or PostgreSQL, not {dialect}")
    session.execute(insert(table).on_conflict_do_nothing(), rows)
