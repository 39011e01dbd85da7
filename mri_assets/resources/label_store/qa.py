"""Quality assurance (mixed into `LabelStore`): a seeded fraction of expert labels is re-queued
as a QA re-read for a different clinician (paid as a QA read, not a case); an undo withdraws the
re-read while it is still queued; the (first read, QA read) pairs give Cohen's kappa, overall
(`qa_pairs`, in `stats`) and per pair of readers."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from datetime import datetime

import sqlalchemy as sa

from mri_assets.core.agreement import cohen_kappa
from mri_assets.resources.label_store.schema import CannotUndo, labels, queue_items


def picked_for_qa(image_id: str, fraction: float, seed: int) -> bool:
    digest = hashlib.sha256(f"qa:{seed}:{image_id}".encode()).hexdigest()
    return int(digest[:8], 16) / 2**32 < fraction


def qa_reason(item_id: int) -> str:
    """The `reason` of the QA re-read queued for item `item_id` (how undo finds it)."""
    return f"qa re-read of item {item_id}"


class QAMixin:
    """QA re-reads and agreement; needs `_read`."""

    @staticmethod
    def _queue_qa(conn: sa.Connection, row, first_annotator: str, now: datetime) -> None:
        conn.execute(
            queue_items.insert().values(
                wave=row.wave,
                image_id=row.image_id,
                priority=row.priority,
                reason=qa_reason(row.id),
                state="queued",
                kind="qa",
                class_set=row.class_set,
                excluded_annotator=first_annotator,
                prediction=row.prediction,
                created_at=now,
            )
        )

    @staticmethod
    def _withdraw_qa_reread(conn: sa.Connection, item_id: int) -> None:
        """Take the QA re-read of `item_id` out of the queue, if there is one; refuse once it
        has been handed out."""
        qa = conn.execute(
            sa.select(queue_items.c.id, queue_items.c.state).where(
                queue_items.c.kind == "qa", queue_items.c.reason == qa_reason(item_id)
            )
        ).first()
        if qa is not None and qa.state != "queued":
            raise CannotUndo(f"item {item_id} is already being re-read for QA")
        if qa is not None:
            conn.execute(queue_items.delete().where(queue_items.c.id == qa.id))

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

    def kappa_per_pair(self) -> list[dict]:
        """Cohen's kappa of each (first reader, QA reader) pair over the images both read."""
        first, second = labels.alias("first"), labels.alias("second")
        query = (
            sa.select(first.c.annotator, second.c.annotator, first.c.label, second.c.label)
            .join(second, second.c.image_id == first.c.image_id)
            .where(first.c.kind == "expert", second.c.kind == "qa")
            .order_by(first.c.id)
        )
        pairs: dict[tuple[str, str], tuple[list[str], list[str]]] = defaultdict(
            lambda: ([], [])
        )
        with self._read() as conn:
            for reader_a, reader_b, label_a, label_b in conn.execute(query):
                key = tuple(sorted((reader_a, reader_b)))
                a_first = key[0] == reader_a
                pairs[key][0].append(label_a if a_first else label_b)
                pairs[key][1].append(label_b if a_first else label_a)
        return [
            {"pair": key, "cases": len(a), "kappa": cohen_kappa(a, b)}
            for key, (a, b) in sorted(pairs.items())
        ]
