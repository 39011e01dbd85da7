"""`/metrics` for Prometheus: the queue and budget gauges, behind `Authorization: Bearer
<metrics_token>` (with no token configured it always answers 401)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from mri_assets.triage import auth
from mri_assets.triage.context import Context

router = APIRouter()


def metrics_text(stats: dict) -> str:
    gauges = {
        "mri_triage_queue_size": ("Items queued or leased", stats["queue_size"]),
        "mri_triage_labels_last_hour": (
            "Labels submitted in the last hour",
            stats["labels_last_hour"],
        ),
        "mri_triage_labels_total": ("Labels in the store", stats["labels_total"]),
        "mri_triage_budget_left_cases": (
            "Expert cases the budget still pays for",
            stats["budget_left_cases"],
        ),
        "mri_triage_budget_left_eur": ("Labeling budget left in EUR", stats["budget_left_eur"]),
    }
    lines = []
    for name, (help_text, value) in gauges.items():
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {float(value)}"]
    return "\n".join(lines) + "\n"


@router.get("/metrics")
def metrics(request: Request, ctx: Context):
    if not auth.bearer_ok(request, ctx.settings.metrics_token):
        return PlainTextResponse(
            "metrics need 'Authorization: Bearer <MRI_ASSETS_METRICS_TOKEN>'\n",
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
    return PlainTextResponse(
        metrics_text(ctx.label_store.stats()), media_type="text/plain; version=0.0.4"
    )
