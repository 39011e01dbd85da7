"""The Dagster code location: the single `defs` of the deployment in this process's environment.

This module is an edge: `defs = build_defs()` reads the `Deployment` once (MRI_ASSETS_PROFILE,
`local` by default, and every other setting) and builds everything from it. A profile changes
resources and the executor only; the assets are the same everywhere.
"""

from __future__ import annotations

import dagster as dg

from mri_assets.core.home import MriHome
from mri_assets.definitions.code_location import resources_for, wave_assets
from mri_assets.definitions.executors import executor_for, shard_runs_for
from mri_assets.definitions.jobs import (
    active_learning_job,
    drift_check_job,
    embed_wave_job,
    ingest_wave_job,
    label_refresh_job,
    retrain_job,
    stage_jobs,
)
from mri_assets.definitions.schedules import monthly_retrain, weekly_drift_check
from mri_assets.definitions.sensors import (
    ari_drift_sensor,
    automation_sensor,
    loop_sensors,
    wave_sensor_for,
)
from mri_assets.definitions.smoke_run import nightly_smoke_job, nightly_smoke_schedule
from mri_assets.definitions.wave_carry import carry_wave_job
from mri_assets.definitions.wave_status import wave_waits_sensor
from mri_assets.deployment import Deployment


def build_defs(deployment: Deployment | str | None = None, home: MriHome | None = None
               ) -> dg.Definitions:
    """The definitions of `deployment`; given a profile name (and home) instead, the deployment of
    this process's environment with that profile (and home)."""
    if not isinstance(deployment, Deployment):
        deployment = Deployment.from_env(profile=deployment, home=home)
    assets = wave_assets()
    shard_runs = shard_runs_for(deployment)
    # One machine: a landed wave's stages in one run (`wave_carry`); a fleet: `ingest_wave`, then
    # automation's runs per shard, whose steps the executor fans out.
    landed = carry_wave_job(deployment) if shard_runs == "per_wave" else ingest_wave_job
    return dg.Definitions(
        assets=assets,
        jobs=[ingest_wave_job, active_learning_job, drift_check_job, label_refresh_job, retrain_job,
              embed_wave_job, nightly_smoke_job(deployment), *stage_jobs(assets),
              *([landed] if landed is not ingest_wave_job else [])],
        sensors=[wave_sensor_for(landed), ari_drift_sensor,
                 *loop_sensors(deployment.loop.sensor_interval_s),
                 automation_sensor(shard_runs), wave_waits_sensor],
        schedules=[weekly_drift_check, monthly_retrain, nightly_smoke_schedule],
        resources=resources_for(deployment),
        executor=executor_for(deployment),
    )


defs = build_defs()
