"""A wave is carried past its manifest by automation: every sensor and schedule declares its
default status, the automation sensor runs by default, and a wave asset waits for every shard."""

from __future__ import annotations

import dagster as dg
import pytest

from mri_assets.core.home import MriHome
from mri_assets.definitions import build_defs
from mri_assets.partitions import WAVES, shard_partitions, wave_shard_key

WAVE = "w1"
RUNNING = {"wave_sensor", "ari_drift_sensor", "labels_sensor", "retrain_sensor",
           "default_automation_condition_sensor"}


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

        assert _requested(result, "clusters") == _requested(result, "labeling_queue") == set()

        _materialized(instance, "embeddings", shards[-1])
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance,
                                                   cursor=result.cursor)
        # The wave's assets are requested together, in one run, in dependency order.
        for asset in ("pca_model", "clusters", "labeling_queue"):
            assert _requested(result, asset) == {WAVE}, asset


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
