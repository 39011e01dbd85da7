"""The `backbone` asset: trained on the first wave, adopted by later ones, followed by embeddings."""

import json

import dagster as dg
import pytest
from mlflow.tracking import MlflowClient

from mri_assets.assets.backbone import REGISTERED_BACKBONE, PretrainSettings
from mri_assets.assets.support.backbones import embedding_backbone
from mri_assets.assets.support.partitions import wave_shard_key
from mri_assets.core.backbone import read_backbone_meta
from mri_assets.core.embed import read_embedding_ids
from mri_assets.core.wave_keys import backbone_record_key as record_key
from mri_assets.core.wave_keys import embeddings_key
from mri_assets.core.wave_layout import wave_shard_count
from mri_assets.resources.wave_store import WaveStore
from mri_assets_tests.assets.wave_fixtures import land_sample_wave, local_defs, materialize

TINY = PretrainSettings(policy="first", epochs=1, batch_size=8, min_slices=0)


@pytest.fixture
def instance(tmp_path):
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as test_instance:
        yield test_instance


def _ingest(defs, instance, store, home, wave, seed):
    land_sample_wave(store, home, wave, n_slices=40, seed=seed, include_bad=False)
    materialize(defs, instance, ["manifest"], wave)
    for shard in range(wave_shard_count(store, wave)):
        materialize(defs, instance, ["slices"], wave_shard_key(wave, shard))


def _metadata(result, asset):
    materialization = next(m for m in result.asset_materializations_for_node(asset))
    return {k: v.value for k, v in materialization.metadata.items()}


def test_the_first_wave_trains_a_backbone_that_later_waves_adopt_and_embeddings_record(
    mri_home, tmp_path, instance
):
    defs = local_defs(mri_home)
    store = defs.resources["object_store"]
    _ingest(defs, instance, store, tmp_path, "pilot", seed=0)
    result = materialize(defs, instance, ["backbone"], "pilot", resources={"pretrain": TINY})
    trained = _metadata(result, "backbone")
    assert trained["source"] == "trained" and trained["trained_on"] == "pilot"
    assert trained["model_id"].startswith("resnet18:ssl:") and trained["model_id"].endswith("@128")
    assert trained["steps"] >= 1 and trained["cpu_minutes"] >= 0
    record = WaveStore(store).backbone_record("pilot")
    meta = read_backbone_meta(store.get_bytes(record["checkpoint_key"]))
    assert meta["n_slices"] == trained["slices"] and meta["config_epochs"] == 1
    tracking = defs.resources["mlflow"]
    client = MlflowClient(tracking_uri=tracking.tracking_uri)
    assert client.get_run(trained["mlflow_run_id"]).data.metrics["steps"] == trained["steps"]
    versions = client.search_model_versions(f"name='{REGISTERED_BACKBONE}'")
    assert [v.run_id for v in versions] == [trained["mlflow_run_id"]]

    shard = wave_shard_key("pilot", 0)
    embedded = _metadata(materialize(defs, instance, ["embeddings"], shard), "embeddings")
    assert embedded["model_id"] == trained["model_id"]
    assert embedded["backbone_source"] == "trained backbone of wave pilot"
    _, schema = read_embedding_ids(store.local_path(embeddings_key("pilot", 0)))
    assert schema["model_id"] == trained["model_id"]

    _ingest(defs, instance, store, tmp_path, "scale", seed=1)
    result = materialize(defs, instance, ["backbone"], "scale", resources={"pretrain": TINY})
    adopted = _metadata(result, "backbone")
    assert adopted["source"] == "adopted" and adopted["trained_on"] == "pilot"
    assert adopted["model_id"] == trained["model_id"]
    assert len(client.search_model_versions(f"name='{REGISTERED_BACKBONE}'")) == 1, "no training"
    embedded = _metadata(materialize(defs, instance, ["embeddings"], wave_shard_key("scale", 0)),
                         "embeddings")
    assert embedded["model_id"] == trained["model_id"]

    stale = {**WaveStore(store).backbone_record("scale"), "model_id": "resnet18:ssl:000000000000@128"}
    store.put_bytes(record_key("scale"), json.dumps(stale).encode())
    with pytest.raises(ValueError, match="re-materialize backbone for wave scale"):
        embedding_backbone(WaveStore(store), defs.resources["compute"], "scale")


def test_policy_off_and_waves_without_a_backbone_embed_with_the_compute_weights(
    mri_home, tmp_path, instance
):
    defs = local_defs(mri_home)
    store = defs.resources["object_store"]
    _ingest(defs, instance, store, tmp_path, "pilot", seed=0)
    shard = wave_shard_key("pilot", 0)
    before = _metadata(materialize(defs, instance, ["embeddings"], shard), "embeddings")
    assert before["model_id"].startswith("resnet18:none:")
    assert before["backbone_source"].startswith("compute weights none (no backbone materialization")
    off = materialize(defs, instance, ["backbone"], "pilot",
                      resources={"pretrain": PretrainSettings(policy="off")})
    assert _metadata(off, "backbone")["source"] == "compute"
    after = _metadata(materialize(defs, instance, ["embeddings"], shard), "embeddings")
    assert after["model_id"] == before["model_id"]
    assert "pretrain.policy=off" in after["backbone_source"]
    with pytest.raises(Exception, match="pretrain.policy='sometimes'"):
        materialize(defs, instance, ["backbone"], "pilot",
                    resources={"pretrain": PretrainSettings(policy="sometimes")})


def test_a_step_budget_trains_on_a_patient_spread_sample_and_records_the_budget(
    mri_home, tmp_path, instance
):
    defs = local_defs(mri_home)
    store = defs.resources["object_store"]
    _ingest(defs, instance, store, tmp_path, "pilot", seed=0)
    # 3 steps of 8 slices: the wave (about 30 training slices) is larger than one pass of the
    # budget, so 24 slices are sampled, spread over its patients.
    budget = PretrainSettings(policy="first", steps=3, batch_size=8, min_slices=0)
    trained = _metadata(materialize(defs, instance, ["backbone"], "pilot",
                                    resources={"pretrain": budget}), "backbone")
    assert trained["steps"] == trained["budget_steps"] == 3
    assert trained["slices"] == 24
    assert trained["budget_kind"] in ("cpu-fp32", "cpu-bf16")
    assert trained["estimated_seconds"] > 0 and 0 < trained["share_of_peak"] < 1


def test_the_crop_setting_reaches_the_schedule_and_a_bad_one_names_the_setting():
    assert PretrainSettings().config("cpu-fp32").crop_scale == (0.4, 1.0)
    assert PretrainSettings(crop_min_area=0.2).config("cpu-bf16").crop_scale == (0.2, 1.0)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"pretrain.crop_min_area=.*above 0 and at most 1"):
            PretrainSettings(crop_min_area=bad).config("cpu-fp32")


def test_the_false_negative_setting_reaches_the_schedule_and_a_bad_one_names_the_setting():
    assert PretrainSettings().config("cpu-fp32").drop_nearest_negatives == 0
    assert PretrainSettings(drop_nearest_negatives=8).config("cpu-bf16").drop_nearest_negatives == 8
    with pytest.raises(ValueError, match=r"pretrain.drop_nearest_negatives=-2: use 0"):
        PretrainSettings(drop_nearest_negatives=-2).config("cpu-fp32")
