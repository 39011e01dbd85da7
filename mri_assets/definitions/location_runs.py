"""Runs of the code location, executed in this process: how `mri-assets run` starts its runs.

Dagster re-executes a run from the UI only when the run names the code location and job it came
from (its remote job origin); the runs of `execute_in_process` (and of `execute_job`) name none,
so their "Re-execute" stays greyed out. Here each stage of `local_run.materialize_wave` is a run
of one of the code location's named stage jobs (`jobs.STAGE_JOBS`), subset to the stage's assets
and partition, and recorded with the origins a run launched from the UI has: job `wave_assets`
or `wave_shard_assets` of location `mri_assets` (workspace.yaml: module `mri_assets.definitions`,
attribute `defs`). The UI lists it under that job and re-executes it like any of its runs.

The run itself executes in this process, with the in-process executor, as `execute_in_process`
does: its steps use the definitions this process built from the deployment the command read
(`--home` and the demo's figures included), so nothing has to travel to a step process through
the environment. A re-execution from the UI runs where the webserver's code location runs, with
the deployment of that process (`make dev`'s environment) and the executor of its profile.

The Dagster internals this takes live in `dagster_private` (the one module allowed them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from mri_assets.definitions.dagster_private import execute_as_location_run, job_origins
from mri_assets.definitions.jobs import STAGE_JOBS

# The code location as workspace.yaml declares it (`make dev`, the webserver, the daemon).
LOCATION_NAME = "mri_assets"
LOCATION_MODULE = "mri_assets.definitions"
DEFINITIONS_ATTRIBUTE = "defs"
WORKING_DIRECTORY = str(Path(__file__).resolve().parents[2])


@dataclass(frozen=True)
class LocationStage:
    """One stage of a wave as a subset of a code location job (`job`: the resolved stage job of
    the definitions the command built; `keys`: the stage's assets)."""

    job: dg.JobDefinition
    keys: frozenset[dg.AssetKey]

    @property
    def name(self) -> str:
        return self.job.name

    def execute_in_process(
        self,
        *,
        run_config: Mapping[str, object],
        instance: dg.DagsterInstance,
        partition_key: str | None = None,
        raise_on_error: bool = False,
        run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ):
        """What `JobDefinition.execute_in_process` does (same arguments; a result with `success`
        and `run_id`), but the run is created as a run of the code location's job."""
        origins = job_origins(module=LOCATION_MODULE, attribute=DEFINITIONS_ATTRIBUTE,
                              working_directory=WORKING_DIRECTORY, location_name=LOCATION_NAME,
                              job_name=self.job.name)
        return execute_as_location_run(
            self.job, self.keys, origins, run_config=run_config, instance=instance,
            partition_key=partition_key, raise_on_error=raise_on_error, run_id=run_id, tags=tags)


def location_stage(defs: dg.Definitions, kind: str,
                   keys: Sequence[dg.AssetKey]) -> LocationStage | None:
    """The stage as a run of the code location's job for `kind` ("wave", "shard"), when `defs`
    holds that job (the definitions of `definitions.build_defs` do); else None."""
    name = STAGE_JOBS.get(kind)
    if name is None or name not in {job.name for job in defs.jobs or []}:
        return None
    return LocationStage(defs.resolve_job_def(name), frozenset(keys))
