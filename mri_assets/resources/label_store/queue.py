"""The labeling queue (mixed into `LabelStore`): enqueueing a wave's items within the budget,
leases (next item, renew, release, expiry), items flagged for missing pixels, and one item.

Two clinicians never lease the same item: the lease is taken in a write transaction (`FOR
UPDATE SKIP LOCKED` on PostgreSQL, the write lock on SQLite). A lease lasts `lease_seconds`;
an expired one returns to the queue before the next item is handed out.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import datetime, timedelta

import sqlalchemy as sa

from mri_assets.resources.label_store.common import (
    ENQUEUE_KINDS,
    OPEN_STATES,
    checked_held,
    checked_item_id,
    item_dict,
)
from mri_assets.resources.label_store.schema import (
    ItemClosed,
    ItemLeasedToOther,
    LabelStoreError,
    LeaseLost,
    UnknownItem,
    labels,
    queue_items,
    utc_now,
)

MISSING_PIXELS = "missing_pixels"


def validated_class_set(class_set: Sequence[str]) -> list[str]:
    classes = list(class_set)
    if not classes or not all(isinstance(c, str) and c for c in classes):
        raise LabelStoreError(f"class_set must be a non-empty list of class names, got {classes!r}")
    if len(set(classes)) != len(classes):
        raise LabelStoreError(f"class_set has repeated names: {classes!r}")
    return classes


def validated_queue_items(items: Sequence[dict]) -> list[dict]:
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


class QueueMixin:
    """Enqueue, lease, flag; needs `_write`, `_read`, `_sql`, `_audit` and the budget."""

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
        classes = validated_class_set(class_set)
        rows = validated_queue_items(items)
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
        held_ids = checked_held(held)
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
        item = item_dict(row)
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
        row = self._sql(conn, "item", id=checked_item_id(item_id)).first()
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

    def _close_item(self, conn: sa.Connection, item_id: int, state: str) -> None:
        self._sql(conn, "close_item", state=state, id=item_id)

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
        ids = checked_held(item_ids)
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

    def flag_missing_pixels(self, item_id: int, by: str, now: datetime | None = None) -> None:
        """The item's pixels cannot be read: it leaves the queue for everyone, flagged for
        the admin (who can put it back with `requeue_flagged` once the pixels are there)."""
        now = now or utc_now()
        with self._write() as conn:
            row = self._sql(conn, "item", id=checked_item_id(item_id)).first()
            if row is None:
                raise UnknownItem(f"no queue item with id {item_id}")
            values = {"flag": MISSING_PIXELS, "flagged_at": now, "flagged_by": by[:128]}
            if row.state in OPEN_STATES:
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
            {**item_dict(row), "state": row.state, "flag": row.flag,
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
            query = query.where(queue_items.c.id.in_(checked_held(item_ids)))
        with self._write() as conn:
            count = conn.execute(
                query.values(
                    state="queued", flag=None, flagged_at=None, flagged_by=None,
                    lease_owner=None, lease_expires_at=None,
                )
            ).rowcount
            self._audit(conn, by, "requeue_flagged", {"items": count}, now)
        return count

    def item(self, item_id: int) -> dict | None:
        try:
            checked = checked_item_id(item_id)
        except UnknownItem:
            return None
        with self._read() as conn:
            row = conn.execute(sa.select(queue_items).where(queue_items.c.id == checked)).first()
        return None if row is None else {**item_dict(row), "state": row.state, "flag": row.flag}
