"""What the pipeline, the metrics and the admin page read from the label store (mixed into
`LabelStore`): the labels snapshot the assets train on, a wave's progress, a clinician's
progress, the queue and budget stats, the audit log with filters, labels per class and annotator
over time, the budget burn-down of the current period, and a class's example slice."""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import date, datetime, timedelta

import polars as pl
import sqlalchemy as sa

from mri_assets.core.agreement import cohen_kappa
from mri_assets.core.budget import period_end, period_start
from mri_assets.resources.label_store.common import ENQUEUE_KINDS, OPEN_STATES
from mri_assets.resources.label_store.schema import (
    audit_log,
    budget_periods,
    labels,
    queue_items,
    utc_now,
)

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


def _week_of(moment: datetime) -> date:
    day = moment.date()
    return day - timedelta(days=day.weekday())


class ReportsMixin:
    """Read-only reports; needs `_read`, the budget (`_ensure_period`, `_period_row`,
    `_affordable`) and `qa_pairs`."""

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
                .where(queue_items.c.wave == wave, queue_items.c.state.in_(OPEN_STATES),
                       queue_items.c.kind.in_(ENQUEUE_KINDS))
            ).scalar_one()
        return {"labeled": int(labeled), "open": int(still_open)}

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
                .where(queue_items.c.state.in_(OPEN_STATES))
            ).scalar_one()
        return {
            "labeled_this_session": int(session_count),
            "labeled_today": int(today_count),
            "queue_open": int(open_items),
            **self.queue_status(now),
        }

    def stats(self, now: datetime | None = None) -> dict:
        now = now or utc_now()
        self._ensure_period(now)
        with self._read() as conn:
            queue_size = conn.execute(
                sa.select(sa.func.count())
                .select_from(queue_items)
                .where(queue_items.c.state.in_(OPEN_STATES))
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

    def audit_entries(
        self,
        who: str | None = None,
        what: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        before_id: int | None = None,
        limit: int = 100,
    ) -> list[dict]:
        """Audit rows, newest first, filtered by actor, action and time; `before_id` pages."""
        query = sa.select(audit_log).order_by(audit_log.c.id.desc()).limit(max(1, min(limit, 500)))
        if who:
            query = query.where(audit_log.c.who == who)
        if what:
            query = query.where(audit_log.c.what == what)
        if since is not None:
            query = query.where(audit_log.c.at >= since)
        if until is not None:
            query = query.where(audit_log.c.at < until)
        if before_id is not None:
            query = query.where(audit_log.c.id < before_id)
        with self._read() as conn:
            rows = conn.execute(query).all()
        return [
            {"id": r.id, "who": r.who, "what": r.what, "at": r.at, "payload": json.loads(r.payload)}
            for r in rows
        ]

    def audit_actions(self) -> list[str]:
        with self._read() as conn:
            return sorted(conn.execute(sa.select(audit_log.c.what).distinct()).scalars())

    def labels_by_week(self, weeks: int = 12, now: datetime | None = None) -> dict:
        """Labels per ISO week (Monday) of the last `weeks` weeks: per class and per annotator.

        {"weeks": [date, ...], "by_class": {label: [count per week]},
         "by_annotator": {annotator: [count per week]}}
        """
        now = now or utc_now()
        first = _week_of(now) - timedelta(weeks=weeks - 1)
        with self._read() as conn:
            rows = conn.execute(
                sa.select(labels.c.created_at, labels.c.label, labels.c.annotator).where(
                    labels.c.created_at >= datetime(first.year, first.month, first.day)
                )
            ).all()
        week_list = [first + timedelta(weeks=k) for k in range(weeks)]
        index = {week: k for k, week in enumerate(week_list)}
        by_class: dict[str, list[int]] = defaultdict(lambda: [0] * weeks)
        by_annotator: dict[str, list[int]] = defaultdict(lambda: [0] * weeks)
        for created_at, label, annotator in rows:
            k = index.get(_week_of(created_at))
            if k is not None:
                by_class[label][k] += 1
                by_annotator[annotator][k] += 1
        return {
            "weeks": week_list,
            "by_class": dict(sorted(by_class.items())),
            "by_annotator": dict(sorted(by_annotator.items())),
        }

    def burn_down(self, now: datetime | None = None) -> dict:
        """The current period's budget: cap, and € left at the end of each day so far."""
        now = now or utc_now()
        self._ensure_period(now)
        starts_on = period_start(now, self.period_months)
        ends_on = period_end(starts_on, self.period_months)
        with self._read() as conn:
            cap_cents = conn.execute(
                sa.select(budget_periods.c.cap_cents).where(
                    budget_periods.c.starts_on == starts_on
                )
            ).scalar_one()
            spent_days = conn.execute(
                sa.select(labels.c.created_at).where(
                    labels.c.kind == "expert",
                    labels.c.created_at >= datetime(starts_on.year, starts_on.month, 1),
                )
            ).scalars()
            per_day: dict[date, int] = defaultdict(int)
            for created_at in spent_days:
                per_day[created_at.date()] += self.budget.cents_per_case
        left, points = cap_cents, [(starts_on, cap_cents / 100)]
        day = starts_on
        while day <= now.date():
            left -= per_day.get(day, 0)
            points.append((day + timedelta(days=1), left / 100))
            day += timedelta(days=1)
        return {
            "starts_on": starts_on,
            "ends_on": ends_on,
            "cap_eur": cap_cents / 100,
            "left_eur": left / 100,
            "points": points,
        }

    def example_of(self, label: str) -> tuple[str, str] | None:
        """(wave, image_id) of the latest expert label `label`, to show as its example."""
        with self._read() as conn:
            row = conn.execute(
                sa.select(labels.c.wave, labels.c.image_id)
                .where(labels.c.label == label, labels.c.kind == "expert")
                .order_by(labels.c.id.desc())
                .limit(1)
            ).first()
        return None if row is None else (row.wave, row.image_id)
