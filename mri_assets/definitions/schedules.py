"""Schedules: the plan's maintenance cadence (weekly drift checks, monthly retraining, nightly smoke)."""

import dagster as dg

from mri_assets.assets.support.partitions import SMOKE_WAVE, WAVES
from mri_assets.definitions.jobs import drift_check_job, retrain_job


def latest_wave(instance: dg.DagsterInstance) -> str | None:
    """The wave added last, never the nightly smoke's."""
    waves = [wave for wave in instance.get_dynamic_partitions(WAVES) if wave != SMOKE_WAVE]
    return waves[-1] if waves else None


def _latest_wave_request(context: dg.ScheduleEvaluationContext, name: str, period: str):
    """One run per latest wave and period (`period` formats the tick time into the run key)."""
    wave = latest_wave(context.instance)
    if wave is None:
        return dg.SkipReason("no wave yet")
    tick = context.scheduled_execution_time.strftime(period)
    return dg.RunRequest(run_key=f"{name}:{wave}:{tick}", partition_key=wave)


@dg.schedule(job=drift_check_job, cron_schedule="0 6 * * 1", execution_timezone="UTC",
             default_status=dg.DefaultScheduleStatus.RUNNING)
def weekly_drift_check(context: dg.ScheduleEvaluationContext):
    """Every Monday 06:00 UTC: re-cluster the latest wave; `ari_drift_sensor` judges the result."""
    return _latest_wave_request(context, "weekly-drift", "%Y-%m-%d")


@dg.schedule(job=retrain_job, cron_schedule="0 3 1 * *", execution_timezone="UTC",
             default_status=dg.DefaultScheduleStatus.RUNNING)
def monthly_retrain(context: dg.ScheduleEvaluationContext):
    """The plan's maintenance cadence: the 1st of every month, 03:00 UTC, retrain on the latest wave."""
    return _latest_wave_request(context, "monthly-retrain", "%Y-%m")
