"""The labeling budget (mixed into `LabelStore`): one row per period (`budget_periods`), made on
first use; how many cases it still pays for, spending one case and refunding it, and why the
queue may be closed (`queue_status`). Concurrent submissions cannot spend past the budget: the
period row is locked (PostgreSQL) or the write lock is held (SQLite) while a case is spent."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa

from mri_assets.core.budget import LabelBudget, cases_affordable, period_end, period_start
from mri_assets.resources.label_store.common import ENQUEUE_KINDS, OPEN_STATES
from mri_assets.resources.label_store.schema import (
    BudgetExhausted,
    budget_periods,
    queue_items,
    utc_now,
)


class BudgetMixin:
    """Periods, affordability and spending; needs `_write`, `_read`, `_sql` and the resource's
    budget fields."""

    @property
    def budget(self) -> LabelBudget:
        return LabelBudget(
            cases_per_period=self.cases_per_period,
            eur_per_case=self.eur_per_case,
            eur_per_qa=self.eur_per_qa,
            period_months=self.period_months,
        )

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
            .where(queue_items.c.state.in_(OPEN_STATES), queue_items.c.kind.in_(ENQUEUE_KINDS))
        ).scalar_one()

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

    def _refund_one_case(self, conn: sa.Connection, spent_at: datetime) -> None:
        """Give back the case an expert label spent in the period of `spent_at`."""
        period = self._period_row(conn, spent_at, lock=True)
        conn.execute(
            budget_periods.update()
            .where(budget_periods.c.id == period.id)
            .values(
                cases_used=budget_periods.c.cases_used - 1,
                spent_cents=budget_periods.c.spent_cents - self.budget.cents_per_case,
            )
        )

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
