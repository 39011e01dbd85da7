"""What the admin page reads from the label store (mixed into `LabelStore`): the audit log with
filters, labels per class and annotator over time, Cohen's kappa per pair of readers, and the
budget burn-down of the current period."""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import date, datetime, timedelta

import sqlalchemy as sa

from mri_assets.core.agreement import cohen_kappa
from mri_assets.core.budget import period_end, period_start
from mri_assets.resources.label_store.schema import audit_log, budget_periods, labels, utc_now


def _week_of(moment: datetime) -> date:
    day = moment.date()
    return day - timedelta(days=day.weekday())


class ReportsMixin:
    """Read-only reports; needs `_read`, `budget`, `period_months`, `_ensure_period`."""

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
