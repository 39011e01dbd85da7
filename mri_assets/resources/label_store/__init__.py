"""The label store: labeling queue, expert labels, annotators, audit log and the labeling budget.

SQLAlchemy Core over SQLite (default: `MRI_ASSETS_HOME/labels.db`, WAL mode, busy timeout) or
PostgreSQL (by URL). The schema is versioned with Alembic (`resources/migrations/`) and brought
to head automatically the first time the store is used.

Every write happens in one transaction that first takes the write lock: `BEGIN IMMEDIATE` on
SQLite, `SELECT ... FOR UPDATE` on the item and the budget row on PostgreSQL. So two clinicians
never lease the same item and concurrent submissions cannot spend past the budget.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl
import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from dagster import ConfigurableResource
from pydantic import PrivateAttr

from mri_assets.core.agreement import cohen_kappa
from mri_assets.core.budget import LabelBudget, cases_affordable, period_end, period_start
from mri_assets.resources.label_store.accounts import (
    ROLES,
    AccountsMixin,
    LoginOutcome,
    LoginPolicy,
    SessionInfo,
    new_session_token,
    token_hash,
)
from mri_assets.resources.label_store.reports import ReportsMixin
from mri_assets.resources.label_store.schema import (
    AnnotatorExists,
    BudgetExhausted,
    CannotUndo,
    InvalidUsername,
    ItemClosed,
    ItemLeasedToOther,
    LabelNotInClassSet,
    LabelStoreError,
    LastAdmin,
    LeaseLost,
    UnknownAnnotator,
    UnknownItem,
    WeakPassword,
    annotators,
    audit_log,
    budget_periods,
    labels,
    login_throttle,
    queue_items,
    sessions,
    utc_now,
)

__all__ = [
    "ROLES",
    "SNAPSHOT_SCHEMA",
    "AnnotatorExists",
    "BudgetExhausted",
    "CannotUndo",
    "InvalidUsername",
    "ItemClosed",
    "ItemLeasedToOther",
    "LabelNotInClassSet",
    "LabelStore",
    "LabelStoreError",
    "LastAdmin",
    "LeaseLost",
    "LoginOutcome",
    "LoginPolicy",
    "SessionInfo",
    "UnknownAnnotator",
    "UnknownItem",
    "WeakPassword",
    "annotators",
    "audit_log",
    "login_throttle",
    "migration_heads",
    "new_session_token",
    "sessions",
    "token_hash",
    "utc_now",
]

MIGRATIONS_DIR = Path(__file__).parents[1] / "migrations"
ENQUEUE_KINDS = ("expert", "holdout")
MAX_ITEM_ID = 2**31 - 1  # queue item ids are 32-bit integers on PostgreSQL
MAX_HELD = 64
_OPEN_STATES = ("queued", "leased")
MISSING_PIXELS = "missing_pixels"

SNAPSHOT_SCHEMA = {
    "label_id": pl.Int64,
    "item_id": pl.Int64,
    "wave": pl.String,
    "image_id": pl.String,
    "label": pl.String,
    "annotator": pl.String,
    "created_at": pl.Datetime("us"),
    "seconds_spent": pl.Float64,
    "kind": pl.String,
    "queue_kind": pl.String,
}


_ITEM_COLUMNS = (
    "id, wave, image_id, priority, reason, state, lease_owner, lease_expires_at, kind, "
    "class_set, excluded_annotator, prediction"
)


@functools.cache
def _hot_statements(dialect: str) -> dict[str, sa.TextClause]:
    """Pre-built SQL for the per-request paths (lease, submit): no per-call query building."""
    lock = " FOR UPDATE" if dialect == "postgresql" else ""
    skip_locked = " FOR UPDATE SKIP LOCKED" if dialect == "postgresql" else ""
    item_types = {"lease_expires_at": sa.DateTime()}
    return {
        "release_expired": sa.text(
            "UPDATE queue_items SET state = 'queued', lease_owner = NULL, "
            "lease_expires_at = NULL WHERE state = 'leased' AND lease_expires_at <= :now"
        ),
        "own_lease": sa.text(
            f"SELECT {_ITEM_COLUMNS} FROM queue_items WHERE state = 'leased' "
            f"AND lease_owner = :annotator AND id NOT IN :held ORDER BY id LIMIT 1{lock}"
        )
        .bindparams(sa.bindparam("held", expanding=True))
        .columns(**item_types),
        "own_lease_qa": sa.text(
            f"SELECT {_ITEM_COLUMNS} FROM queue_items WHERE state = 'leased' AND kind = 'qa' "
            f"AND lease_owner = :annotator AND id NOT IN :held ORDER BY id LIMIT 1{lock}"
        )
        .bindparams(sa.bindparam("held", expanding=True))
        .columns(**item_types),
        "next_queued": sa.text(
            f"SELECT {_ITEM_COLUMNS} FROM queue_items WHERE state = 'queued' "
            "AND (excluded_annotator IS NULL OR excluded_annotator != :annotator) "
            f"ORDER BY priority DESC, id LIMIT 1{skip_locked}"
        ).columns(**item_types),
        "next_queued_qa": sa.text(
            f"SELECT {_ITEM_COLUMNS} FROM queue_items WHERE state = 'queued' AND kind = 'qa' "
            "AND (excluded_annotator IS NULL OR excluded_annotator != :annotator) "
            f"ORDER BY priority DESC, id LIMIT 1{skip_locked}"
        ).columns(**item_types),
        "lease": sa.text(
            "UPDATE queue_items SET state = 'leased', lease_owner = :annotator, "
            "lease_expires_at = :expires WHERE id = :id"
        ),
        "item": sa.text(f"SELECT {_ITEM_COLUMNS} FROM queue_items WHERE id = :id{lock}").columns(
            **item_types
        ),
        # A closed item keeps its lease owner and end: its labeler may undo until then.
        "close_item": sa.text("UPDATE queue_items SET state = :state WHERE id = :id"),
        "period": sa.text(
            "SELECT id, starts_on, cases_used, spent_cents FROM budget_periods "
            f"WHERE starts_on = :starts_on{lock}"
        ).columns(starts_on=sa.Date()),
        "period_unlocked": sa.text(
            "SELECT id, starts_on, cases_used, spent_cents FROM budget_periods "
            "WHERE starts_on = :starts_on"
        ).columns(starts_on=sa.Date()),
        "spend": sa.text(
            "UPDATE budget_periods SET cases_used = cases_used + 1, "
            "spent_cents = spent_cents + :cents WHERE id = :id"
        ),
        "session": sa.text(
            "SELECT s.id, s.username, s.csrf, s.created_at, s.last_seen_at, s.expires_at, "
            "s.ended_at, s.end_reason, a.role, a.disabled_at, a.deleted_at FROM sessions s "
            "LEFT JOIN annotators a ON a.username = s.username WHERE s.token_hash = :token_hash"
        ).columns(
            created_at=sa.DateTime(),
            last_seen_at=sa.DateTime(),
            expires_at=sa.DateTime(),
            ended_at=sa.DateTime(),
            disabled_at=sa.DateTime(),
            deleted_at=sa.DateTime(),
        ),
        "touch_session": sa.text(
            "UPDATE sessions SET last_seen_at = :now WHERE id = :id AND ended_at IS NULL"
        ).bindparams(sa.bindparam("now", type_=sa.DateTime())),
        "renew": sa.text(
            "UPDATE queue_items SET lease_expires_at = :expires WHERE state = 'leased' "
            "AND lease_owner = :annotator AND id IN :ids"
        ).bindparams(
            sa.bindparam("ids", expanding=True), sa.bindparam("expires", type_=sa.DateTime())
        ),
        "audit": sa.text(
            "INSERT INTO audit_log (who, what, at, payload) VALUES (:who, :what, :at, :payload)"
        ).bindparams(sa.bindparam("at", type_=sa.DateTime())),
    }


def default_url() -> str:
    """There is none: the deployment names the label store (`resources.deployed.label_store_for`,
    SQLite under MRI_ASSETS_HOME unless MRI_ASSETS_LABELS_URL says otherwise)."""
    raise LabelStoreError(
        "LabelStore has no url: build it with resources.deployed.label_store_for(deployment)"
    )


def migration_heads() -> list[str]:
    from alembic.script import ScriptDirectory

    return list(ScriptDirectory(str(MIGRATIONS_DIR)).get_heads())


def _build_engine(url: str) -> sa.Engine:
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


def _checked_item_id(item_id: object) -> int:
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


def _checked_held(held: Sequence[int]) -> list[int]:
    ids = list(held)
    if len(ids) > MAX_HELD:
        raise LabelStoreError(f"held lists at most {MAX_HELD} item ids, got {len(ids)}")
    try:
        return [_checked_item_id(i) for i in ids]
    except UnknownItem as error:
        raise LabelStoreError(f"held: {error}") from None


def _picked_for_qa(image_id: str, fraction: float, seed: int) -> bool:
    digest = hashlib.sha256(f"qa:{seed}:{image_id}".encode()).hexdigest()
    return int(digest[:8], 16) / 2**32 < fraction


def _item_dict(row) -> dict:
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


def _validate_class_set(class_set: Sequence[str]) -> list[str]:
    classes = list(class_set)
    if not classes or not all(isinstance(c, str) and c for c in classes):
        raise LabelStoreError(f"class_set must be a non-empty list of class names, got {classes!r}")
    if len(set(classes)) != len(classes):
        raise LabelStoreError(f"class_set has repeated names: {classes!r}")
    return classes


def _validate_queue_items(items: Sequence[dict]) -> list[dict]:
    rows, seen = [], set()
    for position, item in enumerate(items):
        image_id = item.get("image_id")
        if not isinstance(image_id, str) or not image_id:
            raise LabelStoreError(f"item {position} has no image_id (a non-empty string): {item!r}")
        if image_id in seen:
            raise LabelStoreError(f"image_id {image_id!r} appears twice in one enqueue call")
        seen.add(image_id)
        priority = item.get("priority")
        if not isinstance(priority, int | float) or not math.isfinite(priority):
            raise LabelStoreError(f"item {image_id!r}: priority must be a finite number")
        kind = item.get("kind", "expert")
        if kind not in ENQUEUE_KINDS:
            raise LabelStoreError(
                f"item {image_id!r}: kind must be one of {ENQUEUE_KINDS} (QA items are made by "
                f"the store), got {kind!r}"
            )
        rows.append(
            {
                "image_id": image_id,
                "priority": float(priority),
                "reason": str(item.get("reason", "")),
                "kind": kind,
                "prediction": item.get("prediction"),
            }
        )
    return rows


class LabelStore(AccountsMixin, ReportsMixin, ConfigurableResource):
    """Durable queue + labels for the labeling loop. See the module docstring."""

    url: str = ""
    cases_per_period: int = 3000
    eur_per_case: float = 0.50
    eur_per_qa: float = 0.05
    period_months: int = 3
    qa_fraction: float = 0.10
    qa_seed: int = 0
    argon2_time_cost: int = 3
    argon2_memory_kib: int = 65536

    _engine: sa.Engine | None = PrivateAttr(default=None)
    _engine_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _period_ready: object = PrivateAttr(default=None)
    _released_at: datetime | None = PrivateAttr(default=None)
    _writer_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _throttle_pruned_at: datetime | None = PrivateAttr(default=None)

    @property
    def budget(self) -> LabelBudget:
        return LabelBudget(
            cases_per_period=self.cases_per_period,
            eur_per_case=self.eur_per_case,
            eur_per_qa=self.eur_per_qa,
            period_months=self.period_months,
        )

    @property
    def resolved_url(self) -> str:
        return self.url or default_url()

    @property
    def dialect(self) -> str:
        return self._db().dialect.name

    def _db(self) -> sa.Engine:
        with self._engine_lock:
            if self._engine is None:
                engine = _build_engine(self.resolved_url)
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
        return conn.execute(_hot_statements(conn.dialect.name)[name], params)

    def _audit(
        self, conn: sa.Connection, who: str, what: str, payload: dict, now: datetime
    ) -> None:
        self._sql(
            conn, "audit", who=who, what=what, at=now, payload=json.dumps(payload, sort_keys=True)
        )

    def record_audit(self, who: str, what: str, payload: dict | None = None) -> None:
        with self._write() as conn:
            self._audit(conn, who, what, payload or {}, utc_now())

    # -- budget ---------------------------------------------------------------------------

    def _ensure_period(self, now: datetime):
        starts_on = period_start(now, self.period_months)
        if self._period_ready == starts_on:
            return starts_on
        budget = self.budget
        try:
            with self._write() as conn:
                exists = conn.execute(
                    sa.select(budget_periods.c.id).where(budget_periods.c.starts_on == starts_on)
                ).first()
                if exists is None:
                    conn.execute(
                        budget_periods.insert().values(
                            starts_on=starts_on,
                            ends_on=period_end(starts_on, self.period_months),
                            cases_cap=budget.cases_per_period,
                            cap_cents=budget.cap_cents,
                            cases_used=0,
                            spent_cents=0,
                        )
                    )
        except sa.exc.IntegrityError:
            pass  # another process created the same period row first
        self._period_ready = starts_on
        return starts_on

    def _period_row(self, conn: sa.Connection, now: datetime, lock: bool):
        name = "period" if lock else "period_unlocked"
        return self._sql(conn, name, starts_on=period_start(now, self.period_months)).one()

    def _affordable(self, period) -> int:
        return cases_affordable(period.spent_cents / 100, self.budget, period.cases_used)

    @staticmethod
    def _outstanding_cases(conn: sa.Connection) -> int:
        return conn.execute(
            sa.select(sa.func.count())
            .select_from(queue_items)
            .where(queue_items.c.state.in_(_OPEN_STATES), queue_items.c.kind.in_(ENQUEUE_KINDS))
        ).scalar_one()

    # -- queue ----------------------------------------------------------------------------

    def enqueue(
        self,
        wave: str,
        items: Sequence[dict],
        class_set: Sequence[str],
        now: datetime | None = None,
    ) -> int:
        """Queue new items for `wave`, highest priority first; return how many were queued.

        Image ids already queued (in any state) or labeled are never queued again, and the
        open queue never holds more expert/hold-out cases than the remaining budget pays for.
        How many were offered, already known and over budget goes to the audit log.
        """
        if not isinstance(wave, str) or not wave or "," in wave:
            raise LabelStoreError(f"wave must be a non-empty, comma-free string, got {wave!r}")
        classes = _validate_class_set(class_set)
        rows = _validate_queue_items(items)
        now = now or utc_now()
        self._ensure_period(now)
        with self._write() as conn:
            known = self._known_image_ids(conn, [r["image_id"] for r in rows])
            fresh = sorted(
                (r for r in rows if r["image_id"] not in known), key=lambda r: -r["priority"]
            )
            room = max(
                0,
                self._affordable(self._period_row(conn, now, lock=True))
                - self._outstanding_cases(conn),
            )
            accepted = fresh[:room]
            if accepted:
                conn.execute(
                    queue_items.insert(),
                    [
                        {
                            **row,
                            "wave": wave,
                            "state": "queued",
                            "class_set": json.dumps(classes),
                            "created_at": now,
                        }
                        for row in accepted
                    ],
                )
            self._audit(
                conn,
                "system",
                "enqueue",
                {
                    "wave": wave,
                    "offered": len(rows),
                    "already_known": len(rows) - len(fresh),
                    "over_budget": len(fresh) - len(accepted),
                    "queued": len(accepted),
                },
                now,
            )
        return len(accepted)

    @staticmethod
    def _known_image_ids(conn: sa.Connection, image_ids: list[str]) -> set[str]:
        known: set[str] = set()
        for start in range(0, len(image_ids), 500):
            chunk = image_ids[start : start + 500]
            for table in (queue_items, labels):
                known.update(
                    conn.execute(
                        sa.select(table.c.image_id).where(table.c.image_id.in_(chunk))
                    ).scalars()
                )
        return known

    def lease_next(
        self,
        annotator: str,
        lease_seconds: float = 300,
        held: Sequence[int] = (),
        now: datetime | None = None,
    ) -> dict | None:
        """Lease the next item to `annotator`, or None when nothing is left for them.

        Expired leases return to the queue first (checked at most once a second per process).
        An annotator's own unexpired lease that is not in `held` (the items their page already shows) is handed back before a new item,
        so a reloaded page or restarted server resumes where the clinician was. Once the
        period's budget is spent only QA re-reads (paid already) are handed out. `held` is at
        most 64 item ids.
        """
        held_ids = _checked_held(held)
        now = now or utc_now()
        self._ensure_period(now)
        expires = now + timedelta(seconds=lease_seconds)
        with self._write() as conn:
            if self._released_at is None or abs((now - self._released_at).total_seconds()) >= 1:
                self._release_expired(conn, now)
                self._released_at = now
            qa_only = self._affordable(self._period_row(conn, now, lock=False)) == 0
            row = self._own_lease(conn, annotator, held_ids, qa_only)
            if row is None:
                row = self._next_queued(conn, annotator, qa_only)
            if row is None:
                return None
            self._sql(conn, "lease", annotator=annotator, expires=expires, id=row.id)
        item = _item_dict(row)
        item.update(lease_owner=annotator, lease_expires_at=expires)
        return item

    def _release_expired(self, conn: sa.Connection, now: datetime) -> None:
        self._sql(conn, "release_expired", now=now)

    def _own_lease(
        self, conn: sa.Connection, annotator: str, held: Sequence[int], qa_only: bool = False
    ):
        name = "own_lease_qa" if qa_only else "own_lease"
        return self._sql(conn, name, annotator=annotator, held=list(held) or [-1]).first()

    def _next_queued(self, conn: sa.Connection, annotator: str, qa_only: bool):
        name = "next_queued_qa" if qa_only else "next_queued"
        return self._sql(conn, name, annotator=annotator).first()

    def _leased_item(self, conn: sa.Connection, item_id: int, annotator: str, now: datetime):
        """The item row, locked, if `annotator` holds an unexpired lease on it; else raise."""
        row = self._sql(conn, "item", id=_checked_item_id(item_id)).first()
        if row is None:
            raise UnknownItem(f"no queue item with id {item_id}; fetch items with /api/next")
        if row.state in ("done", "skipped"):
            raise ItemClosed(f"item {item_id} is already {row.state}; fetch the next item")
        lease_live = row.state == "leased" and row.lease_expires_at > now
        if lease_live and row.lease_owner != annotator:
            raise ItemLeasedToOther(
                f"item {item_id} is leased to another annotator; fetch your next item"
            )
        if not lease_live or row.lease_owner != annotator:
            raise LeaseLost(
                f"{annotator!r} holds no live lease on item {item_id} (it expired or was never "
                "taken); fetch the next item and label it before the lease runs out"
            )
        return row

    def submit_label(
        self,
        item_id: int,
        annotator: str,
        label: str,
        seconds_spent: float,
        now: datetime | None = None,
    ) -> int:
        """Record `annotator`'s label for a leased item; return the new label id.

        Checks the class set, the lease and the budget and inserts the label in one
        transaction. A picked fraction of expert labels is re-queued as QA for another
        clinician.
        """
        if (
            not isinstance(seconds_spent, int | float)
            or not math.isfinite(seconds_spent)
            or (seconds_spent < 0)
        ):
            raise LabelStoreError(
                f"seconds_spent must be a finite number >= 0, got {seconds_spent!r}"
            )
        now = now or utc_now()
        self._ensure_period(now)
        with self._write() as conn:
            row = self._leased_item(conn, item_id, annotator, now)
            classes = json.loads(row.class_set)
            if label not in classes:
                raise LabelNotInClassSet(
                    f"label {label!r} is not in wave {row.wave!r}'s class set {classes}"
                )
            label_kind = "qa" if row.kind == "qa" else "expert"
            if label_kind == "expert":
                self._spend_one_case(conn, now)
            label_id = conn.execute(
                labels.insert(),
                {
                    "item_id": row.id,
                    "image_id": row.image_id,
                    "wave": row.wave,
                    "label": label,
                    "annotator": annotator,
                    "created_at": now,
                    "seconds_spent": float(seconds_spent),
                    "kind": label_kind,
                },
            ).inserted_primary_key[0]
            self._close_item(conn, row.id, "done")
            if row.kind == "expert" and _picked_for_qa(
                row.image_id, self.qa_fraction, self.qa_seed
            ):
                self._queue_qa(conn, row, annotator, now)
            self._audit(
                conn,
                annotator,
                "label",
                {"item_id": row.id, "image_id": row.image_id, "label": label, "kind": label_kind},
                now,
            )
        return label_id

    def _spend_one_case(self, conn: sa.Connection, now: datetime) -> None:
        period = self._period_row(conn, now, lock=True)
        if self._affordable(period) < 1:
            resumes_on = period_end(period.starts_on, self.period_months)
            raise BudgetExhausted(
                f"the labeling budget for the period starting {period.starts_on} is spent "
                f"({period.cases_used} cases, €{period.spent_cents / 100:.2f}); labeling "
                f"resumes on {resumes_on.isoformat()} (or raise cases_per_period)",
                resumes_on=resumes_on,
            )
        self._sql(conn, "spend", cents=self.budget.cents_per_case, id=period.id)

    def _close_item(self, conn: sa.Connection, item_id: int, state: str) -> None:
        self._sql(conn, "close_item", state=state, id=item_id)

    @staticmethod
    def _queue_qa(conn: sa.Connection, row, first_annotator: str, now: datetime) -> None:
        conn.execute(
            queue_items.insert().values(
                wave=row.wave,
                image_id=row.image_id,
                priority=row.priority,
                reason=f"qa re-read of item {row.id}",
                state="queued",
                kind="qa",
                class_set=row.class_set,
                excluded_annotator=first_annotator,
                prediction=row.prediction,
                created_at=now,
            )
        )

    def skip(self, item_id: int, annotator: str, now: datetime | None = None) -> None:
        """The clinician cannot or will not label this image: it leaves the queue, unpaid."""
        now = now or utc_now()
        with self._write() as conn:
            row = self._leased_item(conn, item_id, annotator, now)
            self._close_item(conn, row.id, "skipped")
            self._audit(conn, annotator, "skip", {"item_id": row.id, "image_id": row.image_id}, now)

    def mark_unsure(self, item_id: int, annotator: str, now: datetime | None = None) -> None:
        """Unsure: the item goes back to the queue for a different clinician, once.

        A QA item, or one a second clinician is also unsure about, is skipped instead.
        """
        now = now or utc_now()
        with self._write() as conn:
            row = self._leased_item(conn, item_id, annotator, now)
            if row.kind == "qa" or row.excluded_annotator is not None:
                self._close_item(conn, row.id, "skipped")
                outcome = "skipped"
            else:
                conn.execute(
                    queue_items.update()
                    .where(queue_items.c.id == row.id)
                    .values(
                        state="queued",
                        lease_owner=None,
                        lease_expires_at=None,
                        excluded_annotator=annotator,
                    )
                )
                outcome = "requeued"
            self._audit(
                conn,
                annotator,
                "unsure",
                {"item_id": row.id, "image_id": row.image_id, "outcome": outcome},
                now,
            )

    def release(self, item_id: int, annotator: str, now: datetime | None = None) -> None:
        """Give a leased item back to the queue at once (e.g. the budget ran out under it)."""
        now = now or utc_now()
        with self._write() as conn:
            row = self._leased_item(conn, item_id, annotator, now)
            conn.execute(
                queue_items.update()
                .where(queue_items.c.id == row.id)
                .values(state="queued", lease_owner=None, lease_expires_at=None)
            )

    def renew_leases(
        self,
        annotator: str,
        item_ids: Sequence[int],
        lease_seconds: float = 300,
        now: datetime | None = None,
    ) -> dict[int, datetime]:
        """Extend `annotator`'s leases on `item_ids` to now + `lease_seconds`; return the ids
        renewed with their new end (a lease already handed to someone else is not)."""
        ids = _checked_held(item_ids)
        if not ids:
            return {}
        now = now or utc_now()
        expires = now + timedelta(seconds=lease_seconds)
        with self._write() as conn:
            self._sql(conn, "renew", expires=expires, annotator=annotator, ids=ids)
            renewed = conn.execute(
                sa.select(queue_items.c.id).where(
                    queue_items.c.id.in_(ids),
                    queue_items.c.state == "leased",
                    queue_items.c.lease_owner == annotator,
                )
            ).scalars()
            return {item_id: expires for item_id in renewed}

    def undo(self, item_id: int, annotator: str, now: datetime | None = None) -> dict:
        """Take back `annotator`'s label or skip of `item_id` while its lease lasts: the label
        is removed (and its case refunded, its QA re-read withdrawn), the item is leased to
        `annotator` again until the same end; return the item. Only the annotator's latest
        label can be undone, and not once its QA re-read has been handed out."""
        now = now or utc_now()
        with self._write() as conn:
            row = self._sql(conn, "item", id=_checked_item_id(item_id)).first()
            if row is None:
                raise UnknownItem(f"no queue item with id {item_id}")
            lease_live = row.lease_expires_at is not None and row.lease_expires_at > now
            if row.state not in ("done", "skipped") or row.lease_owner != annotator:
                raise CannotUndo(f"item {item_id} has no label or skip of yours to undo")
            if not lease_live:
                raise CannotUndo(f"the lease on item {item_id} has ended: it can no longer be undone")
            flag = conn.execute(
                sa.select(queue_items.c.flag).where(queue_items.c.id == row.id)
            ).scalar()
            if flag is not None:
                raise CannotUndo(f"item {item_id} is flagged ({flag}) for the admin")
            payload = {"item_id": row.id, "image_id": row.image_id, "undone": row.state}
            if row.state == "done":
                payload.update(self._withdraw_label(conn, row, annotator))
            conn.execute(
                queue_items.update().where(queue_items.c.id == row.id).values(state="leased")
            )
            self._audit(conn, annotator, "undo", payload, now)
        item = _item_dict(row)
        item.update(lease_owner=annotator, lease_expires_at=row.lease_expires_at)
        return item

    def _withdraw_label(self, conn: sa.Connection, row, annotator: str) -> dict:
        label = conn.execute(
            sa.select(labels.c.id, labels.c.label, labels.c.kind, labels.c.created_at).where(
                labels.c.item_id == row.id
            )
        ).first()
        if label is None:
            raise CannotUndo(f"item {row.id} has no label to undo")
        latest = conn.execute(
            sa.select(sa.func.max(labels.c.id)).where(labels.c.annotator == annotator)
        ).scalar()
        if latest != label.id:
            raise CannotUndo("only your latest label can be undone")
        qa = conn.execute(
            sa.select(queue_items.c.id, queue_items.c.state).where(
                queue_items.c.kind == "qa", queue_items.c.reason == f"qa re-read of item {row.id}"
            )
        ).first()
        if qa is not None and qa.state != "queued":
            raise CannotUndo(f"item {row.id} is already being re-read for QA")
        if qa is not None:
            conn.execute(queue_items.delete().where(queue_items.c.id == qa.id))
        conn.execute(labels.delete().where(labels.c.id == label.id))
        if label.kind == "expert":
            period = self._period_row(conn, label.created_at, lock=True)
            conn.execute(
                budget_periods.update()
                .where(budget_periods.c.id == period.id)
                .values(
                    cases_used=budget_periods.c.cases_used - 1,
                    spent_cents=budget_periods.c.spent_cents - self.budget.cents_per_case,
                )
            )
        return {"label": label.label, "label_id": label.id, "kind": label.kind}

    def flag_missing_pixels(self, item_id: int, by: str, now: datetime | None = None) -> None:
        """The item's pixels cannot be read: it leaves the queue for everyone, flagged for
        the admin (who can put it back with `requeue_flagged` once the pixels are there)."""
        now = now or utc_now()
        with self._write() as conn:
            row = self._sql(conn, "item", id=_checked_item_id(item_id)).first()
            if row is None:
                raise UnknownItem(f"no queue item with id {item_id}")
            values = {"flag": MISSING_PIXELS, "flagged_at": now, "flagged_by": by[:128]}
            if row.state in _OPEN_STATES:
                values.update(state="skipped", lease_owner=None, lease_expires_at=None)
            conn.execute(queue_items.update().where(queue_items.c.id == row.id).values(**values))
            self._audit(
                conn, by, "flag_missing_pixels",
                {"item_id": row.id, "wave": row.wave, "image_id": row.image_id}, now,
            )

    def flagged_items(self, limit: int = 500) -> list[dict]:
        with self._read() as conn:
            rows = conn.execute(
                sa.select(queue_items)
                .where(queue_items.c.flag.is_not(None))
                .order_by(queue_items.c.flagged_at.desc())
                .limit(limit)
            ).all()
        return [
            {**_item_dict(row), "state": row.state, "flag": row.flag,
             "flagged_at": row.flagged_at, "flagged_by": row.flagged_by}
            for row in rows
        ]

    def requeue_flagged(
        self, item_ids: Sequence[int] | None, by: str, now: datetime | None = None
    ) -> int:
        """Put flagged, skipped items (all of them with `item_ids=None`) back in the queue."""
        now = now or utc_now()
        query = queue_items.update().where(
            queue_items.c.flag.is_not(None), queue_items.c.state == "skipped"
        )
        if item_ids is not None:
            query = query.where(queue_items.c.id.in_(_checked_held(item_ids)))
        with self._write() as conn:
            count = conn.execute(
                query.values(
                    state="queued", flag=None, flagged_at=None, flagged_by=None,
                    lease_owner=None, lease_expires_at=None,
                )
            ).rowcount
            self._audit(conn, by, "requeue_flagged", {"items": count}, now)
        return count

    def queue_status(self, now: datetime | None = None) -> dict:
        """Why there may be nothing to lease: `status` is `budget_spent` when the period's
        budget pays for no more cases, else `open`; `resumes_on` is the next period's start."""
        now = now or utc_now()
        self._ensure_period(now)
        with self._read() as conn:
            period = self._period_row(conn, now, lock=False)
        left = self._affordable(period)
        return {
            "status": "budget_spent" if left == 0 else "open",
            "budget_left_cases": left,
            "resumes_on": period_end(period.starts_on, self.period_months).isoformat(),
        }

    def progress(self, annotator: str, since: datetime, now: datetime | None = None) -> dict:
        """The annotator's labels since `since` and today, the open queue, the budget."""
        now = now or utc_now()
        today = datetime(now.year, now.month, now.day)
        with self._read() as conn:
            session_count = conn.execute(
                sa.select(sa.func.count()).where(
                    labels.c.annotator == annotator, labels.c.created_at >= since
                )
            ).scalar_one()
            today_count = conn.execute(
                sa.select(sa.func.count()).where(
                    labels.c.annotator == annotator, labels.c.created_at >= today
                )
            ).scalar_one()
            open_items = conn.execute(
                sa.select(sa.func.count())
                .select_from(queue_items)
                .where(queue_items.c.state.in_(_OPEN_STATES))
            ).scalar_one()
        return {
            "labeled_this_session": int(session_count),
            "labeled_today": int(today_count),
            "queue_open": int(open_items),
            **self.queue_status(now),
        }

    def item(self, item_id: int) -> dict | None:
        try:
            checked = _checked_item_id(item_id)
        except UnknownItem:
            return None
        with self._read() as conn:
            row = conn.execute(sa.select(queue_items).where(queue_items.c.id == checked)).first()
        return None if row is None else {**_item_dict(row), "state": row.state, "flag": row.flag}

    # -- reading --------------------------------------------------------------------------

    def labels_snapshot(self, wave: str | None = None) -> pl.DataFrame:
        """Every label (of `wave`, or all), oldest first; `queue_kind` tells hold-out apart."""
        query = (
            sa.select(
                labels.c.id.label("label_id"),
                labels.c.item_id,
                labels.c.wave,
                labels.c.image_id,
                labels.c.label,
                labels.c.annotator,
                labels.c.created_at,
                labels.c.seconds_spent,
                labels.c.kind,
                queue_items.c.kind.label("queue_kind"),
            )
            .join(queue_items, queue_items.c.id == labels.c.item_id)
            .order_by(labels.c.id)
        )
        if wave is not None:
            query = query.where(labels.c.wave == wave)
        with self._read() as conn:
            rows = [tuple(r) for r in conn.execute(query)]
        return pl.DataFrame(rows, schema=SNAPSHOT_SCHEMA, orient="row")

    def label_count(self) -> int:
        with self._read() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(labels)).scalar_one()

    def wave_progress(self, wave: str) -> dict[str, int]:
        """How far the clinicians are with `wave`'s queue: `labeled`, its first reads (expert
        and hold-out items; QA re-reads not counted), and `open`, its expert and hold-out items
        still queued or leased."""
        with self._read() as conn:
            labeled = conn.execute(
                sa.select(sa.func.count()).select_from(labels)
                .where(labels.c.wave == wave, labels.c.kind == "expert")
            ).scalar_one()
            still_open = conn.execute(
                sa.select(sa.func.count()).select_from(queue_items)
                .where(queue_items.c.wave == wave, queue_items.c.state.in_(_OPEN_STATES),
                       queue_items.c.kind.in_(ENQUEUE_KINDS))
            ).scalar_one()
        return {"labeled": int(labeled), "open": int(still_open)}

    def qa_pairs(self) -> list[tuple[str, str]]:
        """(first read, QA read) label pairs of every image that has both."""
        first, second = labels.alias("first"), labels.alias("second")
        query = (
            sa.select(first.c.label, second.c.label)
            .join(second, second.c.image_id == first.c.image_id)
            .where(first.c.kind == "expert", second.c.kind == "qa")
            .order_by(first.c.id)
        )
        with self._read() as conn:
            return [(a, b) for a, b in conn.execute(query)]

    def stats(self, now: datetime | None = None) -> dict:
        now = now or utc_now()
        self._ensure_period(now)
        with self._read() as conn:
            queue_size = conn.execute(
                sa.select(sa.func.count())
                .select_from(queue_items)
                .where(queue_items.c.state.in_(_OPEN_STATES))
            ).scalar_one()
            period = self._period_row(conn, now, lock=False)
            per_annotator = dict(
                conn.execute(
                    sa.select(labels.c.annotator, sa.func.count())
                    .group_by(labels.c.annotator)
                    .order_by(labels.c.annotator)
                ).all()
            )
            last_hour = conn.execute(
                sa.select(sa.func.count())
                .select_from(labels)
                .where(labels.c.created_at > now - timedelta(hours=1))
            ).scalar_one()
        pairs = self.qa_pairs()
        return {
            "queue_size": queue_size,
            "budget_left_cases": self._affordable(period),
            "budget_left_eur": (self.budget.cap_cents - period.spent_cents) / 100,
            "budget_spent_eur": period.spent_cents / 100,
            "labels_per_annotator": per_annotator,
            "labels_total": sum(per_annotator.values()),
            "kappa": cohen_kappa([a for a, _ in pairs], [b for _, b in pairs]),
            "qa_pairs": len(pairs),
            "labels_last_hour": last_hour,
        }
