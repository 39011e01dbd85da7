"""A wave keeps the shard count it was written with; readers take it from the wave's layout.

The shard partition dimension is read when `mri_assets.assets.support.partitions` is imported (the tests run
with MRI_ASSETS_SHARDS=4), so the 16-shard wave is written by the `mri-assets` command in a
subprocess, and everything after runs here, with 4.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from mri_assets.assets.retraining import wave_slice_rows
from mri_assets.assets.support.partitions import N_SHARDS
from mri_assets.core.manifest import shard_for
from mri_assets.core.slice_shards import manifest_key
from mri_assets.core.wave_layout import WaveLayout, layout_key, wave_layout, wave_shard_count
from mri_assets.definitions import build_defs
from mri_assets.definitions.local_run import dagster_instance, materialize_wave, wave_shard_keys
from mri_assets.deployment import Deployment
from mri_assets.resources.object_store import LocalObjectStore
from mri_assets.triage.slice_reader import SliceReader
from mri_assets_tests.assets.wave_fixtures import land_sample_wave

WAVE = "pilot"
WRITTEN_WITH = 16


def _cli(home: Path, shards: int, *args: str) -> None:
    env = {**os.environ, "MRI_ASSETS_HOME": str(home), "MRI_ASSETS_SHARDS": str(shards),
           "DVC_NO_ANALYTICS": "1"}
    env.pop("PUSHGATEWAY_URL", None)
    subprocess.run([sys.executable, "-m", "mri_assets.cli", *args], env=env, check=True,
                   capture_output=True, timeout=900)


def test_a_wave_without_layout_takes_its_count_from_the_manifest(tmp_path):
    store = LocalObjectStore(root=str(tmp_path))
    store.put_bytes(manifest_key("old"), _parquet(pl.DataFrame({"shard": [0, 7, 3]})))
    assert wave_layout(store, "old") == WaveLayout("old", 8)
    store.put_bytes(layout_key("old"), WaveLayout("old", 16).to_json())
    assert wave_shard_count(store, "old") == 16


def _parquet(frame: pl.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    return buffer.getvalue()


@pytest.mark.timeout(900)
def test_lowering_the_shard_setting_hides_no_shard_of_a_wave_written_with_sixteen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    assert N_SHARDS < WRITTEN_WITH
    home = tmp_path / "home"
    monkeypatch.setenv("MRI_ASSETS_HOME", str(home))
    deployment = Deployment.from_env()
    store = build_defs(deployment).resources["object_store"]
    land_sample_wave(store, tmp_path, WAVE, n_slices=40, include_bad=False)
    _cli(home, WRITTEN_WITH, "run", WAVE, "--select", "manifest slices gpu_budget embeddings")

    assert wave_shard_count(store, WAVE) == WRITTEN_WITH
    manifest = pl.read_parquet(io.BytesIO(store.get_bytes(manifest_key(WAVE))))
    ok = manifest.filter(pl.col("status") == "ok")
    assert ok["shard"].max() >= N_SHARDS  # slices the 4-shard dimension cannot name

    defs = build_defs(deployment)
    instance = dagster_instance(deployment.home)
    assert materialize_wave(defs, instance, WAVE, "pca_model clusters").success
    clusters = defs.load_asset_value("clusters", partition_key=WAVE, instance=instance)
    assert sorted(clusters["image_id"]) == sorted(ok["image_id"])

    rows = wave_slice_rows(store, WAVE)(ok["image_id"].to_list())
    assert len(rows) == ok.height

    far = ok.filter(pl.col("shard") >= N_SHARDS).row(0, named=True)
    assert shard_for(far["image_id"], WRITTEN_WITH) == far["shard"]
    png = SliceReader(store)(WAVE, far["image_id"])
    assert np.asarray(Image.open(io.BytesIO(png))).shape == (256, 256)

    with pytest.raises(ValueError, match=f"written with {WRITTEN_WITH} shards"):
        wave_shard_keys(defs, WAVE)
