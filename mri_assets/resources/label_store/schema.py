"""Tables, refusals and the clock of the label store (the schema itself is made by the Alembic
revisions in `resources/migrations/versions/`; these are the SQLAlchemy Core views of it)."""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa


class LabelStoreError(RuntimeError):
    """A label store operation was refused; the message says what to change."""


class UnknownItem(LabelStoreError):
    pass


class LabelNotInClassSet(LabelStoreError):
    pass


class ItemLeasedToOther(LabelStoreError):
    pass


class LeaseLost(LabelStoreError):
    pass


class ItemClosed(LabelStoreError):
    pass


class BudgetExhausted(LabelStoreError):
    """The period's budget is spent; `resumes_on` is the first day of the next period."""

    def __init__(self, message: str, resumes_on=None):
        super().__init__(message)
        self.resumes_on = resumes_on


class AnnotatorExists(LabelStoreError):
    pass


class UnknownAnnotator(LabelStoreError):
    pass


class WeakPassword(LabelStoreError):
    pass


class InvalidUsername(LabelStoreError):
    pass


class CannotUndo(LabelStoreError):
    pass


class LastAdmin(LabelStoreError):
    pass


def utc_now() -> datetime:
    """Naive UTC, the form every timestamp has in the store."""
    return datetime.now(UTC).replace(tzinfo=None)


metadata = sa.MetaData()
queue_items = sa.Table(
    "queue_items",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("wave", sa.String),
    sa.Column("image_id", sa.String),
    sa.Column("priority", sa.Float),
    sa.Column("reason", sa.Text),
    sa.Column("state", sa.String),
    sa.Column("lease_owner", sa.String),
    sa.Column("lease_expires_at", sa.DateTime),
    sa.Column("kind", sa.String),
    sa.Column("class_set", sa.Text),
    sa.Column("excluded_annotator", sa.String),
    sa.Column("prediction", sa.String),
    sa.Column("created_at", sa.DateTime),
    sa.Column("flag", sa.String),
    sa.Column("flagged_at", sa.DateTime),
    sa.Column("flagged_by", sa.String),
)
labels = sa.Table(
    "labels",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("item_id", sa.Integer),
    sa.Column("image_id", sa.String),
    sa.Column("wave", sa.String),
    sa.Column("label", sa.String),
    sa.Column("annotator", sa.String),
    sa.Column("created_at", sa.DateTime),
    sa.Column("seconds_spent", sa.Float),
    sa.Column("kind", sa.String),
)
annotators = sa.Table(
    "annotators",
    metadata,
    sa.Column("username", sa.String, primary_key=True),
    sa.Column("password_hash", sa.Text),
    sa.Column("role", sa.String),
    sa.Column("created_at", sa.DateTime),
    sa.Column("username_key", sa.String),
    sa.Column("disabled_at", sa.DateTime),
    sa.Column("deleted_at", sa.DateTime),
    sa.Column("password_changed_at", sa.DateTime),
)
audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("who", sa.String),
    sa.Column("what", sa.String),
    sa.Column("at", sa.DateTime),
    sa.Column("payload", sa.Text),
)
budget_periods = sa.Table(
    "budget_periods",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("starts_on", sa.Date),
    sa.Column("ends_on", sa.Date),
    sa.Column("cases_cap", sa.Integer),
    sa.Column("cap_cents", sa.Integer),
    sa.Column("cases_used", sa.Integer),
    sa.Column("spent_cents", sa.Integer),
)
sessions = sa.Table(
    "sessions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("token_hash", sa.String),
    sa.Column("username", sa.String),
    sa.Column("csrf", sa.String),
    sa.Column("created_at", sa.DateTime),
    sa.Column("last_seen_at", sa.DateTime),
    sa.Column("expires_at", sa.DateTime),
    sa.Column("ended_at", sa.DateTime),
    sa.Column("end_reason", sa.String),
    sa.Column("client", sa.String),
    sa.Column("user_agent", sa.String),
)
login_throttle = sa.Table(
    "login_throttle",
    metadata,
    sa.Column("key", sa.String, primary_key=True),
    sa.Column("failures", sa.Integer),
    sa.Column("last_failure_at", sa.DateTime),
    sa.Column("locked_until", sa.DateTime),
)
