"""A wave fans out over wave x shard partitions: a corrupt shard fails and retries alone; the
run plan of a wave per profile (locally one `carry_wave` run whose stages are runs in its
process, a shard stage one run over the shards; on a fleet `ingest_wave`, then a run per shard)."""

from __future__ import annotations

import hashlib

import dagster as dg
import numpy as np
import polars as pl
import pytest

from mri_assets.assets.embeddings import embeddings_key
from mri_assets.assets.support.partitions import (
    SMOKE_WAVE,
    WAVES,
    shard_partitions,
    shard_range_tags,
    wave_shard_key,
)
from mri_assets.core.home import MriHome
from mri_assets.core.sample_data import build_sample_data
from mri_assets.core.slice_shards import manifest_key, slice_keys
from mri_assets.core.wave_layout import wave_shard_count
from mri_assets.definitions import build_defs
from mri_assets.definitions.local_run import QUIET_CONSOLE, dagster_instance
from mri_assets.definitions.sensors import AUTOMATION_SENSOR, group_shard_requests
from mri_assets.definitions.wave_carry import CARRY_STAGES, CARRY_WAVE_JOB, carried_waves
from mri_assets.resources.landing import land_wave
from mri_assets.resources.object_store import LocalObjectStore
from mri_assets.resources.settings import IngestSettings

WAVE = "wave-fanout"
MAX_RETRIES = 2


def _materialize(defs, instance, asset: str, partition_key: str) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        assets=list(defs.assets), selection=[dg.AssetKey(asset)], partition_key=partition_key,
        instance=instance, resources=defs.resources, raise_on_error=False, run_config=QUIET_CONSOLE,
    )


def _wave_with_manifest(mri_home, tmp_path):
    """A 40-slice sample landed as WAVE on the local profile, its manifest materialized: the
    store, the definitions and the (ephemeral) instance."""
    landing = tmp_path / "landing"
    build_sample_data(landing, n_slices=40, seed=0)
    store = LocalObjectStore(root=str(mri_home / "store"))
    land_wave(LocalObjectStore(root=str(landing)), "", store, WAVE, IngestSettings().salt)
    defs = build_defs("local", MriHome(mri_home))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(WAVES, [WAVE])
    assert _materialize(defs, instance, "manifest", WAVE).success
    return store, defs, instance


def _events(instance, run_id: str, event_type: dg.DagsterEventType) -> list:
    return [record.dagster_event for record in instance.all_logs(run_id, of_type=event_type)]


def _corrupt_first_slice(store: LocalObjectStore, shard: int) -> str:
    """Invert the pixels of the shard's first slice on disk; returns that slice's image_id."""
    npy_key, index_key = slice_keys(WAVE, shard)
    pixels = np.load(store.local_path(npy_key), mmap_mode="r+")
    pixels[0] = 255 - pixels[0]
    pixels.flush()
    index = pl.read_parquet(store.local_path(index_key))
    return index.filter(pl.col("row") == 0)["image_id"].item()


@pytest.mark.timeout(400)
def test_a_corrupt_shard_fails_and_retries_alone_while_the_other_shards_materialize(mri_home, tmp_path):
    store, defs, instance = _wave_with_manifest(mri_home, tmp_path)

    manifest = pl.read_parquet(store.local_path(manifest_key(WAVE)))
    shards = sorted(manifest.filter(pl.col("status") == "ok")["shard"].unique().to_list())[:3]
    assert len(shards) == 3, f"sample wave filled only shards {shards}"
    for shard in shards:
        assert _materialize(defs, instance, "slices", str(wave_shard_key(WAVE, shard))).success
    good_first, bad, good_last = shards
    bad_image_id = _corrupt_first_slice(store, bad)

    results = {good_first: _materialize(defs, instance, "embeddings", str(wave_shard_key(WAVE, good_first)))}
    first_bytes = store.local_path(embeddings_key(WAVE, good_first)).read_bytes()
    for shard in (bad, good_last):
        results[shard] = _materialize(defs, instance, "embeddings", str(wave_shard_key(WAVE, shard)))

    assert results[good_first].success and results[good_last].success
    assert not results[bad].success
    failure = _events(instance, results[bad].run_id, dg.DagsterEventType.STEP_FAILURE)
    assert len(failure) == 1
    assert bad_image_id in failure[0].step_failure_data.error.to_string()
    assert len(_events(instance, results[bad].run_id, dg.DagsterEventType.STEP_UP_FOR_RETRY)) == MAX_RETRIES
    for shard in (good_first, good_last):
        assert _events(instance, results[shard].run_id, dg.DagsterEventType.STEP_UP_FOR_RETRY) == []

    records = instance.fetch_materializations(dg.AssetKey("embeddings"), limit=10).records
    assert sorted(r.partition_key for r in records) == sorted(
        str(wave_shard_key(WAVE, s)) for s in (good_first, good_last))
    assert {r.run_id for r in records} == {results[good_first].run_id, results[good_last].run_id}
    assert not store.exists(embeddings_key(WAVE, bad))
    assert store.local_path(embeddings_key(WAVE, good_first)).read_bytes() == first_bytes


@pytest.mark.timeout(400)
def test_a_range_run_materializes_every_shard_with_its_own_figures(mri_home, tmp_path):
    """The local profile's shard runs: one run over a wave's shards steps through each shard and
    records each one's own materialization (count) and stored output."""
    store, defs, instance = _wave_with_manifest(mri_home, tmp_path)
    n_shards = wave_shard_count(store, WAVE)
    assert n_shards > 2

    result = dg.materialize(
        assets=list(defs.assets), selection=[dg.AssetKey("slices")], instance=instance,
        resources=defs.resources, run_config=QUIET_CONSOLE,
        tags=shard_range_tags(WAVE, 0, n_shards - 1),
    )
    assert result.success
    records = instance.fetch_materializations(dg.AssetKey("slices"), limit=100).records
    assert {r.run_id for r in records} == {result.run_id}
    counts = {r.partition_key: r.asset_materialization.metadata["count"].value for r in records}
    manifest = pl.read_parquet(store.local_path(manifest_key(WAVE)))
    expected = manifest.filter(pl.col("status") == "ok").group_by("shard").len()
    assert counts == {str(wave_shard_key(WAVE, s)): n for s, n in expected.iter_rows()
                      } | {str(wave_shard_key(WAVE, s)): 0 for s in range(n_shards)
                           if s not in set(expected["shard"].to_list())}
    for shard in range(n_shards):
        stored = mri_home / "dagster" / "storage" / "slices" / f"{shard:02d}" / WAVE
        assert stored.exists(), stored


def test_a_range_run_of_embeddings_tracks_every_shard_in_dvc_with_the_md5_it_records(
        mri_home, tmp_path):
    """The shards of a range run go to DVC together (one `dvc add`, one `dvc push`, after the last
    shard): each shard's materialization still names its own file and the md5 DVC recorded."""
    store, defs, instance = _wave_with_manifest(mri_home, tmp_path)
    last = wave_shard_count(store, WAVE) - 1
    for asset in ("slices", "embeddings"):
        assert dg.materialize(
            assets=list(defs.assets), selection=[dg.AssetKey(asset)], instance=instance,
            resources=defs.resources, run_config=QUIET_CONSOLE,
            tags=shard_range_tags(WAVE, 0, last)).success

    records = instance.fetch_materializations(dg.AssetKey("embeddings"), limit=100).records
    assert len(records) == last + 1
    dvc = defs.resources["dvc"]
    for record in records:
        shard = int(record.partition_key.split("|")[0])
        metadata = {k: v.value for k, v in record.asset_materialization.metadata.items()}
        stored = store.local_path(embeddings_key(WAVE, shard))
        assert metadata["dvc_path"] == embeddings_key(WAVE, shard)
        assert metadata["dvc_md5"] == dvc.record(metadata["dvc_path"]).md5 == hashlib.md5(
            stored.read_bytes()).hexdigest()


def _automation(defs: dg.Definitions):
    return defs.get_repository_def().get_sensor_def(AUTOMATION_SENSOR)


def _tick(sensor, instance, repository, cursor):
    context = dg.build_sensor_context(instance=instance, repository_def=repository, cursor=cursor)
    return sensor.evaluate_tick(context)


@pytest.mark.parametrize("profile, executor, per_shard", [
    ("local", "in_process", False), ("celery", "celery", True), ("k8s", "k8s", True)])
def test_the_run_plan_of_a_wave_per_profile(profile, executor, per_shard, tmp_path, monkeypatch):
    """What a landed wave's shards make: locally one run over the wave's shards whose steps run
    in the run's process; on Celery and Kubernetes a run per shard, each step a task or a pod."""
    monkeypatch.setenv("MRI_ASSETS_S3_BUCKET", "mri-assets-test")
    defs = build_defs(profile, MriHome(tmp_path / "home"))
    repository = defs.get_repository_def()
    sensor = _automation(defs)
    assert sensor.shard_runs == ("per_shard" if per_shard else "per_wave")
    # What a landed wave's marker starts: its stages in one run locally, its manifest elsewhere.
    assert defs.resolve_sensor_def("wave_sensor").job_name == (
        "ingest_wave" if per_shard else CARRY_WAVE_JOB)
    assert repository.get_job("wave_shard_assets").executor_def.name == executor
    shards = shard_partitions.get_partition_keys()
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions(WAVES, [WAVE, SMOKE_WAVE])
        first = _tick(sensor, instance, repository, None)
        for wave in (WAVE, SMOKE_WAVE):
            instance.report_runless_asset_event(
                dg.AssetMaterialization(asset_key="manifest", partition=wave))
        plan = _tick(sensor, instance, repository, first.cursor).run_requests
    slices = [r for r in plan if dg.AssetKey("slices") in (r.asset_selection or [])]
    assert not any(SMOKE_WAVE in str(r.partition_key) + str(r.tags) for r in plan)
    if per_shard:
        assert sorted(r.partition_key for r in slices) == sorted(
            str(wave_shard_key(WAVE, s)) for s in shards)
    else:
        assert len(slices) == 1 and slices[0].partition_key is None
        assert slices[0].tags | shard_range_tags(WAVE, 0, len(shards) - 1) == slices[0].tags
    assert [r.partition_key for r in plan if r not in slices] == [WAVE]  # gpu_budget


def test_shard_requests_become_one_run_per_span_of_consecutive_shards():
    def request(shard: int, asset: str = "embeddings") -> dg.RunRequest:
        return dg.RunRequest(asset_selection=[dg.AssetKey(asset)],
                             partition_key=str(wave_shard_key(WAVE, shard)),
                             tags={"dagster/max_runtime": "60"})

    wave_request = dg.RunRequest(asset_selection=[dg.AssetKey("pca_model")], partition_key=WAVE)
    grouped = group_shard_requests([request(0), request(1), request(2), request(5), request(7),
                                    request(8), request(4, "slices"), wave_request])
    rows = [(r.asset_selection[0].to_user_string(), r.partition_key,
             r.tags.get("dagster/asset_partition_range_start"),
             r.tags.get("dagster/asset_partition_range_end"),
             r.tags.get("dagster/max_runtime")) for r in grouped]
    plan = sorted(rows, key=lambda row: tuple(value or "" for value in row))
    assert plan == [
        ("embeddings", None, f"00|{WAVE}", f"02|{WAVE}", "60"),
        ("embeddings", None, f"07|{WAVE}", f"08|{WAVE}", "60"),
        ("embeddings", f"05|{WAVE}", None, None, "60"),
        ("pca_model", WAVE, None, None, None),
        ("slices", f"04|{WAVE}", None, None, "60"),
    ]


def _carry_run(defs: dg.Definitions, instance: dg.DagsterInstance, wave: str,
               status: dg.DagsterRunStatus) -> dg.DagsterRun:
    return instance.create_run_for_job(job_def=defs.resolve_job_def(CARRY_WAVE_JOB),
                                       status=status, tags={"dagster/partition": wave})


def test_automation_requests_nothing_for_a_wave_its_carry_run_is_carrying(tmp_path):
    """Until a wave's latest `carry_wave` run has succeeded, the automation sensor leaves that
    wave to it (it would otherwise request a stage between two of the run's own, or go on with a
    wave whose run was terminated); other waves are automated as before."""
    defs = build_defs("local", MriHome(tmp_path / "home"))
    repository = defs.get_repository_def()
    sensor = _automation(defs)
    other = "wave-by-hand"
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions(WAVES, [WAVE, other])
        first = _tick(sensor, instance, repository, None)
        run = _carry_run(defs, instance, WAVE, dg.DagsterRunStatus.STARTED)
        assert carried_waves(instance) == {WAVE}
        for wave in (WAVE, other):
            instance.report_runless_asset_event(
                dg.AssetMaterialization(asset_key="manifest", partition=wave))
        plan = _tick(sensor, instance, repository, first.cursor).run_requests
        assert plan, "the wave materialized by hand is automated"
        assert not any(WAVE in str(r.partition_key) + str(r.tags) for r in plan)
        assert {r.partition_key for r in plan if r.partition_key} == {other}

        # Terminated or failed: the wave stays with its run until a re-execution succeeds.
        instance.report_run_failed(run)
        assert carried_waves(instance) == {WAVE}
        again = _carry_run(defs, instance, WAVE, dg.DagsterRunStatus.SUCCESS)
        assert instance.get_run_by_id(again.run_id).status == dg.DagsterRunStatus.SUCCESS
        assert carried_waves(instance) == set()


@pytest.mark.timeout(600)
def test_a_carry_wave_run_makes_the_wave_stage_by_stage_queue_before_backbone(mri_home, tmp_path):
    """The local profile's run for a landed wave: every stage of `CARRY_STAGES` materialized for
    the wave, each a run of the code location's stage jobs made in this run's process, the
    shard stages one run over the wave's shards, and the first labeling queue before the
    backbone (it needs none); run again, it resumes where the wave stands."""
    landing = tmp_path / "landing"
    build_sample_data(landing, n_slices=40, seed=0)
    store = LocalObjectStore(root=str(mri_home / "store"))
    land_wave(LocalObjectStore(root=str(landing)), "", store, WAVE, IngestSettings().salt)
    defs = build_defs("local", MriHome(mri_home))
    with dagster_instance(MriHome(mri_home)) as instance:
        instance.add_dynamic_partitions(WAVES, [WAVE])
        result = defs.resolve_job_def(CARRY_WAVE_JOB).execute_in_process(
            partition_key=WAVE, instance=instance, run_config=QUIET_CONSOLE)
        assert result.success
        output = result.output_for_node("carry_wave_stages")
        stage_runs = [instance.get_run_by_id(run_id) for run_id in output["runs"]]
        assert len(stage_runs) == len(CARRY_STAGES)
        assert {run.job_name for run in stage_runs} == {"wave_assets", "wave_shard_assets"}
        assert all(run.status == dg.DagsterRunStatus.SUCCESS for run in stage_runs)
        last = wave_shard_count(store, WAVE) - 1
        for run in stage_runs:
            if run.job_name == "wave_shard_assets":
                assert run.tags | shard_range_tags(WAVE, 0, last) == run.tags
        first_seen = {}
        for stage in CARRY_STAGES:
            for asset in stage.split():
                records = instance.fetch_materializations(dg.AssetKey(asset), limit=100).records
                assert records, f"{asset} was not materialized"
                first_seen[asset] = min(r.storage_id for r in records)
        assert first_seen["labeling_queue"] < first_seen["backbone"] < first_seen["embeddings"]

        # Re-executed (after a terminate, say), the run resumes at the first stage not yet
        # materialized: here none, so no stage runs and no second queue spends the budget.
        queues = len(instance.fetch_materializations(dg.AssetKey("labeling_queue"), limit=10).records)
        again = defs.resolve_job_def(CARRY_WAVE_JOB).execute_in_process(
            partition_key=WAVE, instance=instance, run_config=QUIET_CONSOLE)
        assert again.success and again.output_for_node("carry_wave_stages")["runs"] == []
        assert len(instance.fetch_materializations(dg.AssetKey("labeling_queue"), limit=10).records
                   ) == queues == 1
