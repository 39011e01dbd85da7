"""`carry_wave`: a landed wave carried to its first labeling queue and its clusters in one run.

Where one machine does the work (the local profile), every run the daemon starts costs seconds
that are not the wave's work: the automation sensor's next look (its loop passes every 5 s), the
run queue, a new process that imports Dagster and the code location. A 300-slice wave carried
stage by stage by automation made five such runs and spent more of its wall time between them
than in its steps (issue 21). So locally `wave_sensor` requests one run of this job per landed
wave; its op runs the wave's stages one after another in that run's process, each stage a run of
the code location's stage jobs (`local_run.materialize_wave`, as `mri-assets run` and the nightly
smoke do): the runs are recorded, listed under their job and re-executable from the UI, their
GPU steps take the `gpu` pool's slot, and the shard stages are one run over the wave's shards.

The stages, in order: the manifest and the GPU budget, the slices, the first labeling queue (it
needs no backbone, so clinicians label while it trains), the backbone, the embeddings, the PCA
and the clusters. The automation sensor leaves a wave alone until its latest `carry_wave` run
has succeeded (`carried_waves`): no stage is requested twice, and a wave whose run was
terminated stays stopped until the run is re-executed. A wave whose manifest is materialized by
hand is carried by automation as before. Celery and Kubernetes keep `ingest_wave` and a run per
shard, whose steps their executors fan out.
"""

import time

import dagster as dg

from mri_assets.assets.support.partitions import (
    wave_of_partition,
    wave_partitions,
    wave_shard_partitions,
)
from mri_assets.definitions.code_location import resources_for, wave_assets
from mri_assets.definitions.jobs import stage_jobs
from mri_assets.definitions.local_run import materialize_wave, reclaim_dead_runs, wave_shard_keys
from mri_assets.deployment import Deployment

CARRY_WAVE_JOB = "carry_wave"
# One `materialize_wave` call each, in this order (the queue before the backbone: issue 20).
CARRY_STAGES = ("manifest gpu_budget", "slices", "labeling_queue", "backbone", "embeddings",
                "pca_model clusters")


def carried_waves(instance: dg.DagsterInstance) -> set[str]:
    """The waves whose latest `carry_wave` run has not succeeded: queued, running, or stopped
    (failed, canceled). Such a wave's stages are its carry run's to make: automation would
    otherwise request a stage between two of the run's own, or carry on a wave whose run a person
    terminated. Re-executing the carry run (or its failed stage run) finishes the wave."""
    latest: dict[str, dg.DagsterRun] = {}
    for run in instance.get_runs(filters=dg.RunsFilter(job_name=CARRY_WAVE_JOB)):  # newest first
        wave = run.tags.get("dagster/partition")
        if wave is not None and wave not in latest:
            latest[wave] = run
    return {wave for wave, run in latest.items() if run.status != dg.DagsterRunStatus.SUCCESS}


def without_carried(requests: list[dg.RunRequest], carried: set[str]) -> list[dg.RunRequest]:
    """`requests` less those for a partition of a wave in `carried` (its carry run does them)."""
    if not carried:
        return requests
    return [r for r in requests
            if r.partition_key is None or wave_of_partition(str(r.partition_key)) not in carried]


def stage_done(defs: dg.Definitions, instance: dg.DagsterInstance, wave: str,
               selection: str) -> bool:
    """True when every asset of the stage has a materialization for each of the wave's
    partitions (every shard of a shard asset). A carry run re-executed after a failure or a
    terminate resumes at the first stage that is not: it never builds a second labeling queue
    for the wave (each batch spends the labeling budget) nor redoes finished work."""
    graph = defs.resolve_asset_graph()
    for name in selection.split():
        key = dg.AssetKey(name)
        wanted = ({str(k) for k in wave_shard_keys(defs, wave)}
                  if graph.get(key).partitions_def == wave_shard_partitions else {wave})
        if not wanted <= set(instance.get_materialized_partitions(key)):
            return False
    return True


def carry_location_defs(deployment: Deployment) -> dg.Definitions:
    """The deployment's assets, stage jobs and resources, without the jobs that hold this op."""
    assets = wave_assets()
    return dg.Definitions(assets=assets, jobs=stage_jobs(assets),
                          resources=resources_for(deployment))


def carry_wave_job(deployment: Deployment) -> dg.JobDefinition:
    """The `carry_wave` job of `deployment`: one op that runs the wave's stages in its process."""

    @dg.op(name="carry_wave_stages")
    def carry_wave_stages(context: dg.OpExecutionContext) -> dict:
        """Runs `CARRY_STAGES` of the run's wave in order, from the first stage not yet
        materialized (`stage_done`); fails at the first stage that fails, naming it and the runs
        made so far."""
        wave = context.partition_key
        # Stage runs left unfinished by a carry run whose process died (they carry its pid)
        # are marked failed and their pool slots freed, as `mri-assets run` does at its start.
        reclaimed = reclaim_dead_runs(context.instance)
        if reclaimed:
            context.log.info(f"marked {len(reclaimed)} runs of dead processes failed: {reclaimed}")
        defs = carry_location_defs(deployment)
        runs: list[str] = []
        for selection in CARRY_STAGES:
            if stage_done(defs, context.instance, wave, selection):
                context.log.info(f"wave {wave}: {selection} already materialized, skipped")
                continue
            started = time.perf_counter()
            report = materialize_wave(defs, context.instance, wave, selection,
                                      shard_runs="per_wave")
            runs += report.runs
            if not report.success:
                raise dg.Failure(
                    description=f"wave {wave}: stage '{selection}' did not finish "
                    f"({', '.join(report.failed) or report.interrupted}); see its run, re-execute "
                    "it from the UI or run this job again",
                    metadata={"runs": dg.MetadataValue.json(runs)})
            context.log.info(f"wave {wave}: {selection} done in "
                             f"{time.perf_counter() - started:.1f} s (run {report.runs[-1][:8]})")
        return {"wave": wave, "runs": runs}

    @dg.job(name=CARRY_WAVE_JOB, partitions_def=wave_partitions,
            description="A landed wave, manifest -> slices -> first labeling queue -> backbone -> "
            "embeddings -> PCA -> clusters, stage by stage in this run's process (each stage a "
            "run of `wave_assets` or `wave_shard_assets`). Requested by `wave_sensor` in the "
            "local profile.")
    def carry_wave():
        carry_wave_stages()

    return carry_wave


__all__ = [
    "CARRY_STAGES",
    "CARRY_WAVE_JOB",
    "carried_waves",
    "carry_wave_job",
    "wave_of_partition",
    "without_carried",
]
