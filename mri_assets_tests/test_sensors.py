import functools
import json

import dagster as dg
import pytest

from mri_assets.assets.support.partitions import WAVES
from mri_assets.core.home import MriHome
from mri_assets.definitions import build_defs
from mri_assets.definitions.sensors import ari_drift_sensor, retrain_sensor, wave_sensor
from mri_assets.deployment import Deployment, DeploymentError
from mri_assets.resources.settings import ClusteringSettings, RetrainSettings


@pytest.fixture
def instance(tmp_path):
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as test_instance:
        yield test_instance


def _clusters(instance, wave, ari, model_id="resnet18:none:abc"):
    instance.add_dynamic_partitions(WAVES, [wave]) if not instance.has_dynamic_partition(WAVES, wave) else None
    instance.report_runless_asset_event(dg.AssetMaterialization(
        asset_key="clusters", partition=wave,
        metadata={"ari_k4": ari if ari is not None else "not computable", "model_id": model_id}))


def _tick(sensor, instance, cursor, **resources):
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources) as context:
        result = sensor(context)
    return result


def test_drift_sensor_requests_once_for_a_drifted_wave_and_never_for_a_stable_one(instance):
    settings = ClusteringSettings()
    _clusters(instance, "pilot", 0.80)
    _clusters(instance, "scale", 0.78)
    first = _tick(ari_drift_sensor, instance, None, clustering=settings)
    assert first.run_requests == []
    _clusters(instance, "full-1", 0.60)
    second = _tick(ari_drift_sensor, instance, first.cursor, clustering=settings)
    assert [(r.partition_key, r.run_key) for r in second.run_requests] == [("full-1", "ari-drift:full-1:1")]
    _clusters(instance, "full-1", 0.61)
    third = _tick(ari_drift_sensor, instance, second.cursor, clustering=settings)
    assert third.run_requests == []
    again = _tick(ari_drift_sensor, instance, second.cursor, clustering=settings)
    assert again.run_requests == []


def test_drift_at_exactly_ten_percent_is_not_drift(instance):
    _clusters(instance, "pilot", 0.80)
    _clusters(instance, "scale", 0.72)
    result = _tick(ari_drift_sensor, instance, None, clustering=ClusteringSettings())
    assert result.run_requests == []


def test_drift_is_refused_across_model_ids_and_without_labels(instance):
    _clusters(instance, "pilot", 0.80)
    _clusters(instance, "scale", 0.10, model_id="resnet50:imagenet:def")
    _clusters(instance, "full-1", None)
    result = _tick(ari_drift_sensor, instance, None, clustering=ClusteringSettings())
    assert result.run_requests == []


def test_pinned_baseline_wave_is_used(instance):
    _clusters(instance, "pilot", 0.50)
    _clusters(instance, "scale", 0.90)
    _clusters(instance, "full-1", 0.75)
    pinned = ClusteringSettings(baseline_wave="scale")
    result = _tick(ari_drift_sensor, instance, None, clustering=pinned)
    assert [r.partition_key for r in result.run_requests] == ["full-1"]


def _manifest(instance, wave, ok):
    if not instance.has_dynamic_partition(WAVES, wave):
        instance.add_dynamic_partitions(WAVES, [wave])
    instance.report_runless_asset_event(dg.AssetMaterialization(
        asset_key="manifest", partition=wave, metadata={"ok": ok}))


@pytest.fixture
def labels(tmp_path, instance):
    """A label store with one clinician, and a function that queues and labels `n` slices of a
    wave (`open_left` more stay queued)."""
    from mri_assets_tests.triage.conftest import CLASSES, add_users, make_store

    store = make_store(f"sqlite:///{tmp_path / 'labels.db'}")
    add_users(store, ["alice"])

    def label(wave: str, n: int, open_left: int = 0, clustered: bool = True) -> None:
        if clustered:  # what retraining needs besides the labels: the wave's embeddings
            instance.report_runless_asset_event(
                dg.AssetMaterialization(asset_key="clusters", partition=wave))
        ids = [f"{wave}-{i:04d}-{n}" for i in range(n + open_left)]
        store.enqueue(wave, [{"image_id": i, "priority": 1.0} for i in ids], CLASSES)
        for _ in range(n):
            item = store.lease_next("alice")
            store.submit_label(item["id"], "alice", "coronal", 2.0)

    yield store, label
    store.dispose()


def test_retrain_sensor_requests_once_per_threshold_crossing(instance, labels):
    store, label = labels
    settings = RetrainSettings(every_slices=1000)
    tick = functools.partial(_tick, retrain_sensor, instance, retrain=settings, label_store=store)
    _manifest(instance, "pilot", 600)
    first = tick(None)
    assert first.run_requests == []
    _manifest(instance, "scale", 500)
    label("scale", 3)
    second = tick(first.cursor)
    assert [(r.partition_key, r.run_key) for r in second.run_requests] == [("scale", "retrain:1")]
    _manifest(instance, "scale", 500)
    third = tick(second.cursor)
    assert third.run_requests == []
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="classifier", partition="scale"))
    _manifest(instance, "full-1", 999)
    fourth = tick(third.cursor)
    assert fourth.run_requests == []
    _manifest(instance, "full-2", 1)
    label("full-2", 2)
    fifth = tick(fourth.cursor)
    assert [r.run_key for r in fifth.run_requests] == ["retrain:2"]


def test_a_due_retraining_waits_until_the_latest_waves_queue_is_labeled(instance, labels):
    """Slices alone do not retrain: a wave with no labels yet, or with queued items still open,
    keeps the crossing waiting (not used up) until its clinicians are done."""
    store, label = labels
    settings = RetrainSettings(every_slices=100)
    tick = functools.partial(_tick, retrain_sensor, instance, retrain=settings, label_store=store)
    _manifest(instance, "pilot", 300)
    before_labels = tick(None)
    assert before_labels.run_requests == []
    assert "0 labels" in before_labels.skip_reason.skip_message
    label("pilot", 4, open_left=2)
    half_done = tick(before_labels.cursor)
    assert half_done.run_requests == []
    assert "2 queued items still open" in half_done.skip_reason.skip_message
    for _ in range(2):
        item = store.lease_next("alice")
        store.submit_label(item["id"], "alice", "sagittal", 2.0)
    done = tick(half_done.cursor)
    assert [(r.partition_key, r.run_key) for r in done.run_requests] == [("pilot", "retrain:1")]
    assert tick(done.cursor).run_requests == []


def test_wave_sensor_adds_partitions_for_ready_markers_once(instance, tmp_path):
    defs = build_defs("local", MriHome(tmp_path / "home"))
    store = defs.resources["object_store"]
    store.put_bytes("raw/pilot/a.png", b"x")
    store.put_bytes("raw/pilot/_READY", json.dumps({"wave": "pilot"}).encode())
    store.put_bytes("raw/Bad,Wave/_READY", b"{}")
    store.put_bytes("raw/pending/a.png", b"x")
    result = _tick(wave_sensor, instance, None, object_store=store)
    assert [r.run_key for r in result.run_requests] == ["pilot"]
    assert result.dynamic_partitions_requests[0].partition_keys == ["pilot"]
    instance.add_dynamic_partitions(WAVES, ["pilot"])
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="manifest", partition="pilot"))
    assert not isinstance(_tick(wave_sensor, instance, None, object_store=store), dg.SensorResult)


def test_a_wave_landed_by_the_command_takes_the_same_path_as_one_dropped_in_the_bucket(
    instance, tmp_path
):
    """`mri-assets ingest-wave` adds the partition itself; its ingestion run still comes from
    the sensor, with the same run key (Dagster launches one run per key)."""
    defs = build_defs("local", MriHome(tmp_path / "home"))
    store = defs.resources["object_store"]
    store.put_bytes("raw/cli/a.png", b"x")
    store.put_bytes("raw/cli/_READY", b"{}")
    instance.add_dynamic_partitions(WAVES, ["cli"])
    result = _tick(wave_sensor, instance, None, object_store=store)
    assert [(r.run_key, r.partition_key) for r in result.run_requests] == [("cli", "cli")]
    assert result.dynamic_partitions_requests == []


def test_maintenance_schedules_request_the_latest_wave_once_per_period(instance):
    from datetime import UTC, datetime

    from mri_assets.definitions.schedules import monthly_retrain, weekly_drift_check

    monday = datetime(2026, 11, 30, 6, tzinfo=UTC)
    empty = weekly_drift_check(dg.build_schedule_context(instance=instance, scheduled_execution_time=monday))
    assert isinstance(empty, dg.SkipReason)
    instance.add_dynamic_partitions(WAVES, ["pilot", "scale"])
    drift = weekly_drift_check(dg.build_schedule_context(instance=instance, scheduled_execution_time=monday))
    assert (drift.partition_key, drift.run_key) == ("scale", "weekly-drift:scale:2026-11-30")
    first = datetime(2026, 12, 1, 3, tzinfo=UTC)
    retrain = monthly_retrain(dg.build_schedule_context(instance=instance, scheduled_execution_time=first))
    assert (retrain.partition_key, retrain.run_key) == ("scale", "monthly-retrain:scale:2026-12")


def test_a_due_retraining_waits_for_the_waves_clusters(instance, labels):
    """The first queue comes before the backbone: labels can be in before the wave's
    embeddings, which pseudo-labels need; the crossing waits for the clusters."""
    store, label = labels
    settings = RetrainSettings(every_slices=100)
    tick = functools.partial(_tick, retrain_sensor, instance, retrain=settings, label_store=store)
    _manifest(instance, "pilot", 300)
    label("pilot", 3, clustered=False)
    waiting = tick(None)
    assert waiting.run_requests == []
    assert "waits for the wave's clusters" in waiting.skip_reason.skip_message
    instance.report_runless_asset_event(dg.AssetMaterialization(asset_key="clusters",
                                                                partition="pilot"))
    done = tick(waiting.cursor)
    assert [(r.partition_key, r.run_key) for r in done.run_requests] == [("pilot", "retrain:1")]


def test_the_loop_sensors_look_as_often_as_the_deployment_says(tmp_path):
    home = MriHome(tmp_path / "home")

    def intervals(environ):
        defs = build_defs(Deployment.from_env(environ, profile="local", home=home))
        return {sensor.name: sensor.minimum_interval_seconds for sensor in defs.sensors
                if sensor.name in ("labels_sensor", "retrain_sensor")}

    assert intervals({}) == {"labels_sensor": 120, "retrain_sensor": 120}
    assert intervals({"MRI_ASSETS_LOOP_SENSOR_INTERVAL": "20"}) == {
        "labels_sensor": 20, "retrain_sensor": 20}
    with pytest.raises(DeploymentError, match="MRI_ASSETS_LOOP_SENSOR_INTERVAL='1'.*from 5 to"):
        Deployment.from_env({"MRI_ASSETS_LOOP_SENSOR_INTERVAL": "1"})
