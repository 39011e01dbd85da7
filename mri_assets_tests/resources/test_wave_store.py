"""`WaveStore` on the local folder and on S3 (a real moto server): typed readers and writers, a
wave's objects with their sizes, the landed waves."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from mri_assets.core import wave_keys as keys
from mri_assets.core.clustering import fit_streaming_pca
from mri_assets.core.embed import read_embeddings, write_embeddings
from mri_assets.core.wave_layout import WaveLayout
from mri_assets.resources.object_store import LocalObjectStore, ObjectStore, S3ObjectStore
from mri_assets.resources.wave_store import WaveStore


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalObjectStore(root=str(tmp_path / "store"))
    return S3ObjectStore(bucket=request.getfixturevalue("versioned_bucket"), prefix="tenant",
                         endpoint_url=request.getfixturevalue("s3_endpoint"),
                         cache_dir=str(tmp_path / "cache"))


def _frame_bytes(frame: pl.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    return buffer.getvalue()


def test_results_round_trip_and_are_stored_as_the_assets_store_them(store: ObjectStore):
    waves = WaveStore(store)
    clusters = pl.DataFrame({"image_id": ["a", "b"], "cluster_k2": [0, 1]})
    waves.put_clusters("pilot", clusters)
    assert store.get_bytes(keys.clusters_key("pilot")) == _frame_bytes(clusters)
    assert waves.clusters("pilot").equals(clusters)

    record = waves.put_backbone_record("pilot", {"source": "compute", "model_id": "m"})
    assert store.get_bytes(keys.backbone_record_key("pilot")) == json.dumps(
        record, sort_keys=True, indent=1).encode()
    assert waves.backbone_record("pilot") == record
    assert waves.backbone_record("epi") is None

    waves.put_baseline("pilot", {"f1": np.float32(0.5)})
    assert waves.baseline("pilot") == {"f1": 0.5}
    waves.put_checkpoint("pilot", b"weights")
    assert waves.has_checkpoint("pilot") and not waves.has_checkpoint("epi")
    assert waves.checkpoint("pilot") == b"weights"
    waves.put_backbone("pilot", b"backbone")
    assert waves.backbone("pilot") == b"backbone"

    rows = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    pca = fit_streaming_pca(iter([rows]), 0.9)
    data = waves.put_pca("pilot", pca)
    assert store.get_bytes(keys.pca_key("pilot")) == data == pca.to_bytes()
    assert waves.pca("pilot").to_bytes() == data


def test_manifest_layout_and_embeddings_read_back(store: ObjectStore, tmp_path: Path):
    waves = WaveStore(store)
    manifest = pl.DataFrame({"image_id": ["a", "b", "c"], "shard": [0, 1, 1], "status": ["ok"] * 3})
    store.put_bytes(keys.manifest_key("pilot"), _frame_bytes(manifest))
    assert waves.has_manifest("pilot") and not waves.has_manifest("epi")
    assert waves.manifest("pilot", columns=["image_id"]).equals(manifest.select("image_id"))
    assert pl.read_parquet(waves.manifest_path("pilot")).equals(manifest)
    assert waves.shard_count("pilot") == 2  # no layout yet: from the manifest's shards
    waves.put_layout(WaveLayout("pilot", 4))
    assert waves.shard_count("pilot") == 4

    vectors = np.arange(12, dtype=np.float16).reshape(3, 4)
    path = write_embeddings(tmp_path / "shard.arrow", ["a", "b", "c"], vectors, "model-1")
    waves.put_embeddings("pilot", 1, path)
    table = waves.embeddings("pilot", 1)
    assert table.column("image_id").to_pylist() == ["a", "b", "c"]
    ids, read = read_embeddings(waves.embeddings_path("pilot", 1))[:2]
    assert list(ids) == ["a", "b", "c"] and np.array_equal(read, vectors)


def test_a_wave_lists_exactly_its_objects_with_their_sizes(store: ObjectStore):
    waves = WaveStore(store)
    mine = {keys.raw_key("pilot", "p1/a.dcm"): 11, keys.landing_marker_key("pilot"): 2,
            keys.slice_keys("pilot", 0)[0]: 30, keys.pca_key("pilot"): 4,
            keys.checkpoint_key("pilot"): 5, keys.truth_key("pilot"): 6}
    others = {keys.pca_key("pilot.2"): 100, keys.raw_key("pilot.2", "a.dcm"): 200,
              "dvc-remote/files/md5/ab/cd": 300, keys.manifest_key("epi"): 400}
    for key, size in {**mine, **others}.items():
        store.put_bytes(key, b"x" * size)
    assert {info.key: info.size for info in waves.objects("pilot")} == mine
    assert waves.bytes_by_wave({"pilot", "epi"}) == {"pilot": 58, "epi": 400, "": 600}


def test_landed_waves_are_those_with_a_marker_at_the_top_of_their_landing(store: ObjectStore):
    for key in (keys.landing_marker_key("pilot"), keys.raw_key("epi", "a.dcm"),
                keys.raw_key("epi", "site/_READY"), "raw/Bad Name/_READY",
                keys.landing_marker_key("full.1")):
        store.put_bytes(key, b"{}")
    assert WaveStore(store).landed_waves() == ["Bad Name", "full.1", "pilot"]
    assert WaveStore(store).landing_marker("pilot") == {}
    assert WaveStore(store).landing_marker("epi") is None
