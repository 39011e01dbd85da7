"""What every part of the label store shares: the engine (SQLite or PostgreSQL, migrated to
head on first use), read and write transactions, the pre-built statements of the hot paths, the
audit log, and the checks of queue item ids.

Every write happens in one transaction that first takes the write lock: `BEGIN IMMEDIATE` on
SQLite, `SELECT ... FOR UPDATE` on the item and the budget row on PostgreSQL.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from datetime import datetime
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig

from mri_assets.resources.label_store.schema import LabelStoreError, UnknownItem, utc_now
from mri_assets.resources.label_store.statements import hot_statements

MIGRATIONS_DIR = Path(__file__).parents[1] / "migrations"
ENQUEUE_KINDS = ("expert", "holdout")
MAX_ITEM_ID = 2**31 - 1  # queue item ids are 32-bit integers on PostgreSQL
MAX_HELD = 64
OPEN_STATES = ("queued", "leased")


def default_url() -> str:
    """There is none: the deployment names the label store (`resources.deployed.label_store_for`,
    SQLite under MRI_ASSETS_HOME unless MRI_ASSETS_LABELS_URL says otherwise)."""
    raise LabelStoreError(
        "LabelStore has no url: build it with resources.deployed.label_store_for(deployment)"
    )


def migration_heads() -> list[str]:
    from alembic.script import ScriptDirectory

    return list(ScriptDirectory(str(MIGRATIONS_DIR)).get_heads())


def build_engine(url: str) -> sa.Engine:
    if not url.startswith("sqlite"):
        return sa.create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
    engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:
        write = connection.get_execution_options().get("label_store_write", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def checked_item_id(item_id: object) -> int:
    """`item_id` as an int, or UnknownItem when it cannot be a queue item id at all."""
    if isinstance(item_id, bool):
        raise UnknownItem(f"no queue item with id {item_id!r}")
    try:
        value = int(item_id)
    except (TypeError, ValueError, OverflowError):
        raise UnknownItem(f"no queue item with id {item_id!r}") from None
    if value != item_id or not 1 <= value <= MAX_ITEM_ID:
        raise UnknownItem(f"no queue item with id {item_id!r} (ids are 1..{MAX_ITEM_ID})")
    return value


def checked_held(held: Sequence[int]) -> list[int]:
    ids = list(held)
    if len(ids) > MAX_HELD:
        raise LabelStoreError(f"held lists at most {MAX_HELD} item ids, got {len(ids)}")
    try:
        return [checked_item_id(i) for i in ids]
    except UnknownItem as error:
        raise LabelStoreError(f"held: {error}") from None


def item_dict(row) -> dict:
    return {
        "id": row.id,
        "wave": row.wave,
        "image_id": row.image_id,
        "priority": row.priority,
        "reason": row.reason,
        "kind": row.kind,
        "class_set": json.loads(row.class_set),
        "prediction": row.prediction,
        "lease_owner": row.lease_owner,
        "lease_expires_at": row.lease_expires_at,
    }


def bounded(text: object, limit: int) -> str:
    return str(text)[:limit]


class StoreConnection:
    """The engine, transactions, statements and audit log; needs the resource's `url` and its
    private `_engine` and locks."""

    @property
    def resolved_url(self) -> str:
        return self.url or default_url()

    @property
    def dialect(self) -> str:
        return self._db().dialect.name

    def _db(self) -> sa.Engine:
        with self._engine_lock:
            if self._engine is None:
                engine = build_engine(self.resolved_url)
                self._migrate(engine)
                self._engine = engine
            return self._engine

    @staticmethod
    def _migrate(engine: sa.Engine) -> None:
        config = AlembicConfig()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        with engine.connect() as connection:
            connection.execution_options(label_store_write=True)
            with connection.begin():
                config.attributes["connection"] = connection
                command.upgrade(config, "head")

    def dispose(self) -> None:
        """Close every pooled connection (the next call reopens)."""
        with self._engine_lock:
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None

    def schema_version(self) -> str | None:
        with self._read() as conn:
            return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()

    @contextmanager
    def _write(self) -> Iterator[sa.Connection]:
        """A write transaction. On SQLite, writers of this process queue on a lock first: a
        waiting thread then wakes as soon as the writer before it commits, instead of polling
        SQLite's busy handler (which sleeps up to 100 ms between tries)."""
        engine = self._db()
        queue = self._writer_lock if engine.dialect.name == "sqlite" else nullcontext()
        with queue, engine.connect() as connection:
            connection.execution_options(label_store_write=True)
            with connection.begin():
                yield connection

    @contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        with self._db().connect() as connection, connection.begin():
            yield connection

    def _sql(self, conn: sa.Connection, name: str, **params):
        return conn.execute(hot_statements(conn.dialect.name)[name], params)

    def _audit(
        self, conn: sa.Connection, who: str, what: str, payload: dict, now: datetime
    ) -> None:
        self._sql(
            conn, "audit", who=who, what=what, at=now, payload=json.dumps(payload, sort_keys=True)
        )

    def record_audit(self, who: str, what: str, payload: dict | None = None) -> None:
        with self._write() as conn:
            self._audit(conn, who, what, payload or {}, utc_now())
