"""The labeling budget: how many expert cases the money left still pays for.

Plan: 3,000 expert annotations per period (refreshed quarterly), €0.50 per case plus a €0.05 QA
share per case, so a period's cap is 3,000 × €0.55 = €1,650. Money is counted in integer cents
so that the arithmetic never drifts. An expert (or hold-out) label spends one case and
`case + qa` cents; a QA re-read is paid from the QA share already spent with its case.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime


@dataclass(frozen=True)
class LabelBudget:
    cases_per_period: int = 3000
    eur_per_case: float = 0.50
    eur_per_qa: float = 0.05
    period_months: int = 3

    def __post_init__(self) -> None:
        if self.cases_per_period < 0:
            raise ValueError(f"cases_per_period must be >= 0, got {self.cases_per_period}")
        if self.eur_per_case <= 0 or self.eur_per_qa < 0:
            raise ValueError(
                f"eur_per_case must be > 0 and eur_per_qa >= 0, got {self.eur_per_case}, "
                f"{self.eur_per_qa}"
            )
        if self.period_months not in (1, 2, 3, 4, 6, 12):
            raise ValueError(
                f"period_months must divide a year (1, 2, 3, 4, 6 or 12), got {self.period_months}"
            )

    @property
    def cents_per_case(self) -> int:
        return round(100 * (self.eur_per_case + self.eur_per_qa))

    @property
    def cap_cents(self) -> int:
        return self.cases_per_period * self.cents_per_case

    @property
    def cap_eur(self) -> float:
        return self.cap_cents / 100


def cases_affordable(spent_eur: float, budget: LabelBudget, cases_used: int = 0) -> int:
    """Expert cases the period can still pay for, given the money and cases already spent."""
    spent_cents = round(100 * spent_eur)
    by_money = max(0, budget.cap_cents - spent_cents) // budget.cents_per_case
    by_count = max(0, budget.cases_per_period - cases_used)
    return min(by_money, by_count)


def period_start(day: date | datetime, period_months: int) -> date:
    """First day of the budget period that contains `day` (quarters start Jan, Apr, Jul, Oct)."""
    first_month = ((day.month - 1) // period_months) * period_months + 1
    return date(day.year, first_month, 1)


def period_end(start: date, period_months: int) -> date:
    """First day after the period that starts on `start`."""
    months = start.month - 1 + period_months
    return date(start.year + months // 12, months % 12 + 1, 1)
