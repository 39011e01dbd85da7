"""The label store: labeling queue, expert labels, annotators, audit log and the labeling budget.

SQLAlchemy Core over SQLite (default: `MRI_ASSETS_HOME/labels.db`, WAL mode, busy timeout) or
PostgreSQL (by URL). The schema is versioned with Alembic (`resources/migrations/`) and brought
to head automatically the first time the store is used.

Every write happens in one transaction that first takes the write lock: `BEGIN IMMEDIATE` on
SQLite, `SELECT ... FOR UPDATE` on the item and the budget row on PostgreSQL. So two clinicians
never lease the same item and concurrent submissions cannot spend past the budget.

`LabelStore` is the one Dagster resource the pipeline and the triage app share. Its behaviour
lives in plain-Python parts, one module per concern, composed here:

| module | holds |
| --- | --- |
| `common.py` | engine, migrations, read/write transactions, audit log, item id checks |
| `statements.py` | the pre-built SQL of the per-request paths |
| `queue.py` | enqueue within the budget, leases (next, renew, release, expiry), flagged items |
| `submissions.py` | label, skip, unsure, undo |
| `qa.py` | QA re-reads and agreement (kappa) |
| `budget.py` | budget periods, what they still pay for, spending and refunds |
| `reports.py` | labels snapshot, progress, stats, audit entries, weekly labels, burn-down |
| `accounts.py`, `sessions.py`, `throttle.py` | accounts, server-side sessions, login throttling |
| `schema.py`, `passwords.py` | tables and refusals; username and password rules |
"""

from __future__ import annotations

import threading
from datetime import datetime

import sqlalchemy as sa
from dagster import ConfigurableResource
from pydantic import PrivateAttr

from mri_assets.resources.label_store.accounts import ROLES, AccountsMixin
from mri_assets.resources.label_store.budget import BudgetMixin
from mri_assets.resources.label_store.common import (
    ENQUEUE_KINDS,
    MAX_HELD,
    MAX_ITEM_ID,
    MIGRATIONS_DIR,
    StoreConnection,
    default_url,
    migration_heads,
)
from mri_assets.resources.label_store.qa import QAMixin
from mri_assets.resources.label_store.queue import MISSING_PIXELS, QueueMixin
from mri_assets.resources.label_store.reports import SNAPSHOT_SCHEMA, ReportsMixin
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
    login_throttle,
    sessions,
    utc_now,
)
from mri_assets.resources.label_store.sessions import (
    SessionInfo,
    SessionsMixin,
    new_session_token,
    token_hash,
)
from mri_assets.resources.label_store.submissions import SubmissionsMixin
from mri_assets.resources.label_store.throttle import LoginOutcome, LoginPolicy, ThrottleMixin

__all__ = [
    "ENQUEUE_KINDS",
    "MAX_HELD",
    "MAX_ITEM_ID",
    "MIGRATIONS_DIR",
    "MISSING_PIXELS",
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
    "default_url",
    "login_throttle",
    "migration_heads",
    "new_session_token",
    "sessions",
    "token_hash",
    "utc_now",
]


class LabelStore(
    QueueMixin,
    SubmissionsMixin,
    QAMixin,
    BudgetMixin,
    ReportsMixin,
    AccountsMixin,
    SessionsMixin,
    ThrottleMixin,
    StoreConnection,
    ConfigurableResource,
):
    """Durable queue + labels for the labeling loop: the configuration and the state of one
    process's connection; what it does is in the parts listed in the module docstring."""

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

    def teardown_after_execution(self, context) -> None:
        """A run leaves no connection open. SQLite folds its write-ahead log into the database
        file when the last connection closes, so a run's labels are in `labels.db` when the run
        ends, not whenever the garbage collector closes a connection later (in a later run, after
        the home was copied or backed up)."""
        self.dispose()
