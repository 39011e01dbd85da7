"""The nightly smoke run: a fixed sample as the `smoke` wave, ingestion -> embeddings -> clusters,
then the `smoke_reproduces` check. Used by the `nightly_smoke` job and `mri-assets smoke`; both
hand in the deployment they were started with (the job's op is built for the deployment of its
code location).

The wave's assets have different partitions (wave, wave x shard), which one Dagster run cannot
hold; so the job's single op runs them stage by stage in this process (`materialize_wave`), each
stage a run of its own on the same instance, then the check as its own run.
"""

import time
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

from mri_assets.assets.clustering import clusters, pca_model
from mri_assets.assets.embeddings import embeddings
from mri_assets.assets.smoke import (
    REFERENCE_DIR,
    SMOKE_CHECK,
    SMOKE_SEED,
    SMOKE_SLICES,
    SMOKE_WAVE,
    TRUTH_KEY,
    current_fingerprint,
    smoke_device_type,
    smoke_reproduces,
    write_reference,
)
from mri_assets.assets.support.partitions import WAVES
from mri_assets.core.home import MriHome
from mri_assets.definitions.code_location import resources_for, wave_assets
from mri_assets.definitions.local_run import QUIET_CONSOLE, materialize_wave
from mri_assets.deployment import Deployment
from mri_assets.resources.compute import ComputeResource
from mri_assets.resources.settings import DEV_SALT, IngestSettings

SMOKE_MODEL = {"arch": "resnet18", "weights": "none", "seed": 0, "input_size": 128,
               "checkpoint_key": None}
NIGHTLY_SMOKE_JOB = "nightly_smoke"
SMOKE_ASSETS = ("manifest", "slices", "gpu_budget", "embeddings", "pca_model", "clusters")


def smoke_compute(compute: ComputeResource) -> ComputeResource:
    """The profile's device and loader settings with the smoke's fixed model.

    The reference holds one model (seeded weights, 128 px input), so a CPU node and a GPU node
    compare the same model: exactly on the same device type, by cosine across device types.
    """
    fields = {name: getattr(compute, name) for name in ComputeResource.model_fields}
    return ComputeResource(**{**fields, **SMOKE_MODEL})


def smoke_ingest(ingest: IngestSettings) -> IngestSettings:
    """The profile's ingest settings with the development salt.

    The smoke sample is synthetic, so its patient keys (and from them the splits) must not depend
    on a deployment's secret salt; every other setting is the deployment's own, so a changed
    window or split is a real change that the smoke reports.
    """
    fields = {name: getattr(ingest, name) for name in IngestSettings.model_fields}
    return IngestSettings(**{**fields, "salt": DEV_SALT})


def smoke_defs(defs: dg.Definitions) -> dg.Definitions:
    """The deployment's definitions cut down to the smoke path (ingestion -> clusters), with
    `smoke_reproduces`, which only this path registers."""
    wanted = {dg.AssetKey(name) for name in SMOKE_ASSETS}
    return dg.Definitions(
        assets=[a for a in defs.assets or [] if set(a.keys) <= wanted],
        asset_checks=[smoke_reproduces],
        resources={**defs.resources, "compute": smoke_compute(defs.resources["compute"]),
                   "ingest": smoke_ingest(defs.resources["ingest"])},
    )


@dataclass
class SmokeReport:
    passed: bool
    seconds: float
    detail: str
    runs: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)


def land_smoke_sample(defs: dg.Definitions, home: MriHome, n_slices: int = SMOKE_SLICES) -> None:
    """Build the fixed sample (once per home) and land it as `raw/smoke/`, with its ground truth."""
    from mri_assets.core.sample_data import build_sample_data
    from mri_assets.resources.landing import land_wave
    from mri_assets.resources.object_store import LocalObjectStore

    sample_dir = home.root / "sample" / f"{SMOKE_WAVE}-{n_slices}-{SMOKE_SEED}"
    if not (sample_dir / "labels.csv").exists():
        build_sample_data(sample_dir, n_slices=n_slices, seed=SMOKE_SEED, wave_style="t1")
    store = defs.resources["object_store"]
    salt = defs.resources["ingest"].salt
    land_wave(LocalObjectStore(root=str(sample_dir)), "", store, SMOKE_WAVE, salt)
    store.put_bytes(TRUTH_KEY, (sample_dir / "labels.csv").read_bytes())


def check_smoke(
    defs: dg.Definitions, instance: dg.DagsterInstance, reference_dir: Path = REFERENCE_DIR
) -> tuple[bool, str, str, dict]:
    """Run `smoke_reproduces` for the smoke wave: (passed, description, run id, metadata)."""
    result = dg.materialize(
        # `clusters` carries the check; its inputs come along unselected, as the job needs them
        assets=[embeddings, pca_model, clusters, smoke_reproduces],
        selection=dg.AssetSelection.checks(dg.AssetCheckKey(dg.AssetKey("clusters"), SMOKE_CHECK)),
        instance=instance,
        resources=defs.resources,
        raise_on_error=False,
        run_config={**QUIET_CONSOLE, "ops": {smoke_reproduces.node_def.name: {
            "config": {"reference_dir": str(reference_dir)}}}},
    )
    evaluations = result.get_asset_check_evaluations()
    if not evaluations:
        failure = next((e for e in result.all_events if e.is_step_failure), None)
        error = failure.step_failure_data.error.message if failure else "no evaluation"
        return False, f"{SMOKE_CHECK} did not run: {error}", result.run_id, {}
    evaluation = evaluations[0]
    metadata = {k: v.value for k, v in evaluation.metadata.items()}
    return evaluation.passed, evaluation.description or "", result.run_id, metadata


def run_smoke(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    home: MriHome,
    update_reference: bool = False,
    reference_dir: Path = REFERENCE_DIR,
    n_slices: int = SMOKE_SLICES,
    check_only: bool = False,
) -> SmokeReport:
    """Land, materialize and check the smoke wave; with `update_reference`, rewrite the reference.

    `check_only` compares what the store holds now, without re-materializing the wave.
    """
    started = time.perf_counter()
    defs = smoke_defs(defs)
    if check_only:
        passed, detail, run_id, metadata = check_smoke(defs, instance, reference_dir)
        return SmokeReport(passed, time.perf_counter() - started, detail, [run_id], metadata)
    land_smoke_sample(defs, home, n_slices)
    if not instance.has_dynamic_partition(WAVES, SMOKE_WAVE):
        instance.add_dynamic_partitions(WAVES, [SMOKE_WAVE])
    wave_report = materialize_wave(defs, instance, SMOKE_WAVE)
    if not wave_report.success:
        return SmokeReport(False, time.perf_counter() - started,
                           f"smoke wave failed at {wave_report.failed}", wave_report.runs)
    if update_reference:
        store = defs.resources["object_store"]
        fingerprint, embeddings = current_fingerprint(
            store, SMOKE_WAVE, smoke_device_type(defs.resources["compute"])
        )
        paths = write_reference(fingerprint, embeddings, reference_dir)
        return SmokeReport(True, time.perf_counter() - started,
                           f"reference written: {', '.join(str(p) for p in paths)}", wave_report.runs)
    passed, detail, run_id, metadata = check_smoke(defs, instance, reference_dir)
    return SmokeReport(passed, time.perf_counter() - started, detail,
                       [*wave_report.runs, run_id], metadata)


def smoke_location_defs(deployment: Deployment) -> dg.Definitions:
    """The deployment's assets and resources, without the jobs (one of which holds this op)."""
    return dg.Definitions(assets=wave_assets(), resources=resources_for(deployment))


def nightly_smoke_job(deployment: Deployment) -> dg.JobDefinition:
    """The `nightly_smoke` job of `deployment`: one op that runs the smoke wave on its instance."""

    @dg.op(name="smoke_wave_reproduces")
    def smoke_wave_reproduces(context: dg.OpExecutionContext) -> dict:
        """Runs the smoke wave on this instance; fails with the differing items on a mismatch."""
        report = run_smoke(smoke_location_defs(deployment), context.instance,
                           deployment.home.ensure())
        context.log.info(f"smoke: {'pass' if report.passed else 'FAIL'} in {report.seconds:.1f} s")
        if not report.passed:
            raise dg.Failure(description=report.detail, metadata={
                "runs": dg.MetadataValue.json(report.runs),
                "mismatches": dg.MetadataValue.json(report.metadata.get("mismatches", [])),
            })
        return {"seconds": round(report.seconds, 1), "runs": report.runs}

    @dg.job(name=NIGHTLY_SMOKE_JOB, tags={"dagster/max_runtime": str(30 * 60)},
            description="The fixed 1,000-slice smoke wave, ingest -> clusters, against its reference.")
    def nightly_smoke():
        smoke_wave_reproduces()

    return nightly_smoke


@dg.schedule(job_name=NIGHTLY_SMOKE_JOB, cron_schedule="30 2 * * *", execution_timezone="UTC",
             default_status=dg.DefaultScheduleStatus.RUNNING)
def nightly_smoke_schedule(context: dg.ScheduleEvaluationContext):
    """Every night 02:30 UTC; one run per day (`run_key`)."""
    day = context.scheduled_execution_time.strftime("%Y-%m-%d")
    return dg.RunRequest(run_key=f"nightly-smoke:{day}")
