"""What a clinician answers on a leased item (mixed into `LabelStore`): a label (checked
against the wave's class set, paid from the budget, picked for a QA re-read by a fraction),
a skip, unsure (back to the queue for a different clinician, once), and undo while the lease
lasts. Each is one write transaction that checks the lease first."""

from __future__ import annotations

import json
import math
from datetime import datetime

import sqlalchemy as sa

from mri_assets.resources.label_store.common import checked_item_id, item_dict
from mri_assets.resources.label_store.qa import picked_for_qa
from mri_assets.resources.label_store.schema import (
    CannotUndo,
    LabelNotInClassSet,
    LabelStoreError,
    UnknownItem,
    labels,
    queue_items,
    utc_now,
)


class SubmissionsMixin:
    """Label, skip, unsure, undo; needs the queue (`_leased_item`, `_close_item`), the budget
    and QA."""

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
            if row.kind == "expert" and picked_for_qa(
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

    def undo(self, item_id: int, annotator: str, now: datetime | None = None) -> dict:
        """Take back `annotator`'s label or skip of `item_id` while its lease lasts: the label
        is removed (and its case refunded, its QA re-read withdrawn), the item is leased to
        `annotator` again until the same end; return the item. Only the annotator's latest
        label can be undone, and not once its QA re-read has been handed out."""
        now = now or utc_now()
        with self._write() as conn:
            row = self._sql(conn, "item", id=checked_item_id(item_id)).first()
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
        item = item_dict(row)
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
        self._withdraw_qa_reread(conn, row.id)
        conn.execute(labels.delete().where(labels.c.id == label.id))
        if label.kind == "expert":
            self._refund_one_case(conn, label.created_at)
        return {"label": label.label, "label_id": label.id, "kind": label.kind}
