"""A wave is carried past its manifest by automation: every sensor and schedule declares its
default status, the automation sensor runs by default, and a wave asset waits for every shard."""

from __future__ import annotations

import dagster as dg
import pytest

from mri_assets.assets.support.partitions import SMOKE_WAVE, WAVES, shard_partitions, wave_shard_key
from mri_assets.core.home import MriHome
from mri_assets.definitions import build_defs

WAVE = "w1"
RUNNING = {"wave_sensor", "ari_drift_sensor", "labels_sensor", "retrain_sensor",
           "default_automation_condition_sensor", "wave_waits_sensor"}


@pytest.fixture
def defs(tmp_path) -> dg.Definitions:
    return build_defs("local", MriHome(tmp_path / "home"))


def test_every_sensor_and_schedule_runs_by_default(defs):
    repository = defs.get_repository_def()
    sensors = {s.name: s.default_status for s in repository.sensor_defs}
    schedules = {s.name: s.default_status for s in repository.schedule_defs}
    assert set(sensors) == RUNNING
    assert set(sensors.values()) == {dg.DefaultSensorStatus.RUNNING}
    assert set(schedules.values()) == {dg.DefaultScheduleStatus.RUNNING}


def _materialized(instance: dg.DagsterInstance, asset: str, *partitions) -> None:
    for partition in partitions:
        instance.report_runless_asset_event(
            dg.AssetMaterialization(asset_key=asset, partition=str(partition)))


def _requested(result, asset: str) -> set[str]:
    return {str(key) for key in result.get_requested_partitions(dg.AssetKey(asset))}


def test_shards_follow_the_manifest_and_the_wave_waits_for_every_shard(defs):
    shards = [wave_shard_key(WAVE, s) for s in shard_partitions.get_partition_keys()]
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions(WAVES, [WAVE])
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance)
        assert _requested(result, "slices") == set()

        _materialized(instance, "manifest", WAVE)
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance,
                                                   cursor=result.cursor)
        assert _requested(result, "slices") == {str(k) for k in shards}
        assert _requested(result, "gpu_budget") == {WAVE}

        _materialized(instance, "slices", *shards)
        _materialized(instance, "gpu_budget", WAVE)
        _materialized(instance, "embeddings", *shards[:-1])
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance,
                                                   cursor=result.cursor)
        assert _requested(result, "pca_model") == set()

        assert _requested(result, "clusters") == set()

        _materialized(instance, "embeddings", shards[-1])
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance,
                                                   cursor=result.cursor)
        # The wave's assets are requested together, in one run, in dependency order.
        for asset in ("pca_model", "clusters"):
            assert _requested(result, asset) == {WAVE}, asset


def test_the_first_queue_follows_the_slices_beside_the_backbone(defs):
    """The first labeling queue needs no learned feature: it is requested with the backbone
    once every shard's slices are there, never after the embeddings or the clusters."""
    shards = [wave_shard_key(WAVE, s) for s in shard_partitions.get_partition_keys()]
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions(WAVES, [WAVE])
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance)
        _materialized(instance, "manifest", WAVE)
        _materialized(instance, "slices", *shards[:-1])
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance,
                                                   cursor=result.cursor)
        assert _requested(result, "labeling_queue") == set()
        _materialized(instance, "slices", shards[-1])
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance,
                                                   cursor=result.cursor)
        assert _requested(result, "labeling_queue") == _requested(result, "backbone") == {WAVE}


def test_a_clusters_refresh_does_not_queue_another_batch(defs):
    """New labels refresh the wave's clusters (`label_refresh`); that must not spend the labeling
    budget on another batch: later batches are requested (`active_learning`), not automated."""
    shards = [wave_shard_key(WAVE, s) for s in shard_partitions.get_partition_keys()]
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions(WAVES, [WAVE])
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance)
        _materialized(instance, "manifest", WAVE)
        _materialized(instance, "slices", *shards)
        _materialized(instance, "gpu_budget", WAVE)
        _materialized(instance, "embeddings", *shards)
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance,
                                                   cursor=result.cursor)
        assert _requested(result, "labeling_queue") == {WAVE}
        _materialized(instance, "pca_model", WAVE)
        _materialized(instance, "clusters", WAVE)
        _materialized(instance, "labeling_queue", WAVE)
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance,
                                                   cursor=result.cursor)
        assert _requested(result, "labeling_queue") == set()

        _materialized(instance, "expert_labels", WAVE)
        _materialized(instance, "clusters", WAVE)  # what label_refresh does
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance,
                                                   cursor=result.cursor)
        assert _requested(result, "labeling_queue") == set()


def test_automation_never_acts_on_the_smoke_wave(defs):
    """The smoke wave is materialized by its own job only: whatever of it is materialized,
    automation requests none of its partitions (and still carries a real wave beside it)."""
    shards = [s for s in shard_partitions.get_partition_keys()]
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions(WAVES, [SMOKE_WAVE, WAVE])
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance)
        _materialized(instance, "manifest", SMOKE_WAVE, WAVE)
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance,
                                                   cursor=result.cursor)
        assert _requested(result, "slices") == {str(wave_shard_key(WAVE, s)) for s in shards}
        assert _requested(result, "gpu_budget") == {WAVE}

        # The smoke job materializes its own chain down to clusters: nothing follows it.
        _materialized(instance, "slices", *(wave_shard_key(SMOKE_WAVE, s) for s in shards))
        _materialized(instance, "gpu_budget", SMOKE_WAVE)
        _materialized(instance, "embeddings", *(wave_shard_key(SMOKE_WAVE, s) for s in shards))
        _materialized(instance, "pca_model", SMOKE_WAVE)
        _materialized(instance, "clusters", SMOKE_WAVE)
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance,
                                                   cursor=result.cursor)
        requested: set[str] = set()
        for asset in ("slices", "gpu_budget", "backbone", "embeddings", "pca_model", "clusters",
                      "labeling_queue"):
            requested |= {p for p in _requested(result, asset) if SMOKE_WAVE in p}
        assert requested == set()


def test_the_smoke_wave_never_reaches_the_cost_ledger(tmp_path):
    from mri_assets.assets.costs import measured_ledger
    from mri_assets.resources.cost_settings import CostSettings
    from mri_assets.resources.label_store import LabelStore
    from mri_assets.resources.object_store import LocalObjectStore

    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions(WAVES, [SMOKE_WAVE, WAVE])
        for wave, seconds in ((SMOKE_WAVE, 500.0), (WAVE, 36.0)):
            instance.report_runless_asset_event(dg.AssetMaterialization(
                asset_key="embeddings", partition=str(wave_shard_key(wave, 0)),
                metadata={"seconds": seconds, "images": 100}))
        store = LocalObjectStore(root=str(tmp_path / "store"))
        ledger = measured_ledger(instance, CostSettings(), store,
                                 LabelStore(url=f"sqlite:///{tmp_path / 'labels.db'}"))
        assert ledger.gpu_hours("embedding") * 3600 == pytest.approx(36.0)
        assert ledger.images_embedded() == 100


def test_the_budget_checked_with_the_manifest_is_not_requested_again(defs):
    """`ingest_wave` materializes `manifest` and `gpu_budget` in one run (one run start less per
    wave): automation then asks for the shards, not for the budget again."""
    assert set(defs.resolve_job_def("ingest_wave").asset_layer.executable_asset_keys) >= {
        dg.AssetKey("manifest"), dg.AssetKey("gpu_budget")}
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions(WAVES, [WAVE])
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance)
        _materialized(instance, "manifest", WAVE)
        _materialized(instance, "gpu_budget", WAVE)
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance,
                                                   cursor=result.cursor)
        assert _requested(result, "gpu_budget") == set()
        assert len(_requested(result, "slices")) == len(shard_partitions.get_partition_keys())
