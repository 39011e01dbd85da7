"""Spend-vs-cap burn-down chart for the `wave_costs` metadata."""

from __future__ import annotations

from itertools import accumulate

from mri_assets.core.costs import CATEGORIES, CostLedger, Projection
from mri_assets.core.plots import figure_png

_COLOURS = {"compute": "tab:blue", "storage": "tab:green", "labeling": "tab:orange"}


def _pyplot():
    """pyplot on the Agg backend, imported when a chart is drawn: every Dagster run worker imports
    this module (through the `wave_costs` asset), and most runs draw nothing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def burndown_png(
    ledger: CostLedger, projection: Projection | None = None, *, dpi: int = 80
) -> bytes:
    """Cumulative measured spend per category over the waves, with each cap as a line.

    Waves follow the plan's order (then any other recorded wave). With a projection, a dashed
    segment runs from the last wave with spend to the projected end-of-plan spend.
    """
    rows = ledger.spend_by_wave()
    waves = [row.wave or "(no wave)" for row in rows]
    last_measured = max((i for i, row in enumerate(rows) if row.total > 0), default=-1)
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(8, 4.5), dpi=dpi)
    try:
        for category in CATEGORIES:
            cumulative = list(accumulate(getattr(row, category) for row in rows))
            colour = _COLOURS[category]
            shown = cumulative[: last_measured + 1]
            axis.plot(range(len(shown)), shown, marker="o", color=colour, label=f"{category} spent")
            axis.axhline(
                ledger.caps.for_category(category),
                color=colour,
                linestyle=":",
                label=f"{category} cap €{ledger.caps.for_category(category):,.0f}",
            )
            if projection is not None and last_measured >= 0:
                end = cumulative[last_measured] + projection.by_category()[category]
                axis.plot(
                    [last_measured, len(rows) - 1],
                    [cumulative[last_measured], end],
                    color=colour,
                    linestyle="--",
                    alpha=0.7,
                )
        total_spent = list(accumulate(row.total for row in rows))[: last_measured + 1]
        axis.plot(
            range(len(total_spent)), total_spent, marker="s", color="black", label="total spent"
        )
        axis.axhline(
            ledger.caps.usable_eur,
            color="black",
            linestyle=":",
            label=f"usable budget €{ledger.caps.usable_eur:,.0f}",
        )
        axis.set_xticks(range(len(waves)), waves, rotation=20)
        axis.set_xlabel("wave")
        axis.set_ylabel("cumulative spend (€)")
        axis.set_title("Spend vs caps" + (" (dashed: projected)" if projection else ""))
        axis.legend(fontsize=7, loc="upper left", ncol=2)
        return figure_png(figure)
    finally:
        plt.close(figure)
