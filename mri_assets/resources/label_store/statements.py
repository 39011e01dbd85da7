"""Pre-built SQL for the per-request paths of the label store (lease, submit, session, audit):
no query is built per call. `FOR UPDATE` (and `SKIP LOCKED` for the next item) on PostgreSQL;
SQLite serialises writers with `BEGIN IMMEDIATE` instead."""

from __future__ import annotations

import functools

import sqlalchemy as sa

ITEM_COLUMNS = (
    "id, wave, image_id, priority, reason, state, lease_owner, lease_expires_at, kind, "
    "class_set, excluded_annotator, prediction"
)
_ITEM_TYPES = {"lease_expires_at": sa.DateTime()}


def _held_item(where: str, lock: str) -> sa.TextClause:
    return (
        sa.text(
            f"SELECT {ITEM_COLUMNS} FROM queue_items WHERE state = 'leased'{where} "
            f"AND lease_owner = :annotator AND id NOT IN :held ORDER BY id LIMIT 1{lock}"
        )
        .bindparams(sa.bindparam("held", expanding=True))
        .columns(**_ITEM_TYPES)
    )


def _queued_item(where: str, skip_locked: str) -> sa.TextClause:
    return sa.text(
        f"SELECT {ITEM_COLUMNS} FROM queue_items WHERE state = 'queued'{where} "
        "AND (excluded_annotator IS NULL OR excluded_annotator != :annotator) "
        f"ORDER BY priority DESC, id LIMIT 1{skip_locked}"
    ).columns(**_ITEM_TYPES)


def _queue_statements(lock: str, skip_locked: str) -> dict[str, sa.TextClause]:
    qa_only = " AND kind = 'qa'"
    return {
        "release_expired": sa.text(
            "UPDATE queue_items SET state = 'queued', lease_owner = NULL, "
            "lease_expires_at = NULL WHERE state = 'leased' AND lease_expires_at <= :now"
        ),
        "own_lease": _held_item("", lock),
        "own_lease_qa": _held_item(qa_only, lock),
        "next_queued": _queued_item("", skip_locked),
        "next_queued_qa": _queued_item(qa_only, skip_locked),
        "lease": sa.text(
            "UPDATE queue_items SET state = 'leased', lease_owner = :annotator, "
            "lease_expires_at = :expires WHERE id = :id"
        ),
        "item": sa.text(f"SELECT {ITEM_COLUMNS} FROM queue_items WHERE id = :id{lock}").columns(
            **_ITEM_TYPES
        ),
        # A closed item keeps its lease owner and end: its labeler may undo until then.
        "close_item": sa.text("UPDATE queue_items SET state = :state WHERE id = :id"),
        "renew": sa.text(
            "UPDATE queue_items SET lease_expires_at = :expires WHERE state = 'leased' "
            "AND lease_owner = :annotator AND id IN :ids"
        ).bindparams(
            sa.bindparam("ids", expanding=True), sa.bindparam("expires", type_=sa.DateTime())
        ),
    }


def _budget_statements(lock: str) -> dict[str, sa.TextClause]:
    period = "SELECT id, starts_on, cases_used, spent_cents FROM budget_periods "
    return {
        "period": sa.text(f"{period}WHERE starts_on = :starts_on{lock}").columns(
            starts_on=sa.Date()
        ),
        "period_unlocked": sa.text(f"{period}WHERE starts_on = :starts_on").columns(
            starts_on=sa.Date()
        ),
        "spend": sa.text(
            "UPDATE budget_periods SET cases_used = cases_used + 1, "
            "spent_cents = spent_cents + :cents WHERE id = :id"
        ),
    }


def _session_statements() -> dict[str, sa.TextClause]:
    return {
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
    }


@functools.cache
def hot_statements(dialect: str) -> dict[str, sa.TextClause]:
    """Every pre-built statement by name, for `dialect` ("postgresql" locks rows)."""
    lock = " FOR UPDATE" if dialect == "postgresql" else ""
    skip_locked = " FOR UPDATE SKIP LOCKED" if dialect == "postgresql" else ""
    audit = sa.text(
        "INSERT INTO audit_log (who, what, at, payload) VALUES (:who, :what, :at, :payload)"
    ).bindparams(sa.bindparam("at", type_=sa.DateTime()))
    return {
        **_queue_statements(lock, skip_locked),
        **_budget_statements(lock),
        **_session_statements(),
        "audit": audit,
    }
