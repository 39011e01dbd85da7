"""The IO manager over the `WaveStore` on the S3 object store (a real moto server): a wave runs
from landing to clusters, each stored value lies once at its layout key in the bucket, and the
assets downstream receive them as inputs."""

from __future__ import annotations

import dagster as dg
import polars as pl
import pytest

from mri_assets.core import wave_keys as keys
from mri_assets.core.home import MriHome
from mri_assets.definitions import build_defs
from mri_assets.definitions.local_run import dagster_instance, materialize_wave
from mri_assets.deployment import Deployment
from mri_assets.resources.object_store import S3ObjectStore
from mri_assets.resources.wave_io import STORED
from mri_assets.resources.wave_store import WaveStore
from mri_assets_tests.assets.wave_fixtures import land_sample_wave

WAVE = "pilot"


@pytest.mark.integration
def test_a_wave_on_s3_stores_each_value_once_at_its_key_and_passes_it_on(
    tmp_path, s3_endpoint, versioned_bucket
):
    home = tmp_path / "home"
    deployment = Deployment.from_env({
        "MRI_ASSETS_HOME": str(home), "MRI_ASSETS_S3_BUCKET": versioned_bucket,
        "MRI_ASSETS_S3_PREFIX": "site-a", "MRI_ASSETS_S3_ENDPOINT_URL": s3_endpoint,
        "MRI_ASSETS_SHARDS": "4", "DVC_NO_ANALYTICS": "1",
    })
    defs = build_defs(deployment)
    store = defs.resources["object_store"]
    assert isinstance(store, S3ObjectStore), "MRI_ASSETS_S3_BUCKET must put the wave on S3"
    land_sample_wave(store, tmp_path, WAVE, n_slices=40, include_bad=False)
    instance = dagster_instance(MriHome(home))

    for selection in ("manifest slices labeling_queue", "gpu_budget embeddings pca_model clusters",
                      "labeling_queue"):
        report = materialize_wave(defs, instance, WAVE, selection)
        assert report.success, f"{selection}: {report.failed}"

    waves = WaveStore(store)
    stored = {"manifest": keys.manifest_key(WAVE), "pca_model": keys.pca_key(WAVE),
              "clusters": keys.clusters_key(WAVE)}
    for name, key in stored.items():
        assert store.exists(key), f"{name} is not in the bucket at {key}"
    # Stored once: the run storage's IO manager holds no copy of any value of the layout.
    storage = home / "dagster" / "storage"
    pickled = {path.relative_to(storage).parts[0] for path in storage.rglob("*") if path.is_file()}
    assert "slices" in pickled, f"the run storage is not at {storage}: it holds {pickled}"
    assert not pickled & set(STORED), f"values of the layout also pickled in {storage}: {pickled}"

    # What a consumer loads is what the bucket holds.
    manifest = defs.load_asset_value("manifest", partition_key=WAVE, instance=instance)
    assert manifest.equals(waves.manifest(WAVE))
    assert manifest.filter(pl.col("status") == "ok").height == 40
    clusters = defs.load_asset_value("clusters", partition_key=WAVE, instance=instance)
    assert clusters.equals(waves.clusters(WAVE)) and clusters.height == 40
    pca = defs.load_asset_value("pca_model", partition_key=WAVE, instance=instance)
    assert pca.to_bytes() == store.get_bytes(keys.pca_key(WAVE))

    # The first queue ran before the wave had clusters (its input was None); the second got them.
    queues = instance.fetch_materializations(dg.AssetKey("labeling_queue"), limit=2).records
    details = [record.asset_materialization.metadata["selection_detail"].value
               for record in reversed(queues)]
    assert "no clusters yet" in details[0]
    assert "no clusters yet" not in details[1], details[1]
