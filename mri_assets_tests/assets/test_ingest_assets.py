import io
import zlib
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest
from PIL import Image

from mri_assets.assets.support.partitions import wave_shard_key
from mri_assets.core.sample_data import PLANTED_PATIENT_NAME
from mri_assets.core.slice_shards import manifest_key, read_npy, slice_keys
from mri_assets.resources.landing import is_raw_file, land_wave
from mri_assets.resources.object_store import LocalObjectStore, S3ObjectStore
from mri_assets.resources.settings import DEV_SALT
from mri_assets.triage.slice_reader import SliceReader
from mri_assets_tests.assets.wave_fixtures import land_sample_wave, local_defs, materialize


@pytest.fixture
def instance(tmp_path):
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as test_instance:
        yield test_instance


def _check_result(result, name):
    evaluations = result.get_asset_check_evaluations()
    return next(e for e in evaluations if e.check_name == name)


def test_manifest_reconciles_quarantines_bad_files_and_packs_slices(mri_home, tmp_path, instance):
    defs = local_defs(mri_home)
    store = defs.resources["object_store"]
    land_sample_wave(store, tmp_path, "pilot", n_slices=60)
    result = materialize(defs, instance, ["manifest"], "pilot")
    check = _check_result(result, "counts_reconcile")
    assert check.passed, check.metadata
    manifest = defs.load_asset_value("manifest", partition_key="pilot", instance=instance)
    listed = [i.key for i in store.list("raw/pilot/") if is_raw_file(i.key)]
    assert set(manifest["source_key"]) == set(listed)
    quarantined = manifest.filter(pl.col("status") == "quarantined")
    assert quarantined.height >= 3 and quarantined["reason"].null_count() == 0
    assert any("truncated" in r.lower() for r in quarantined["reason"].to_list())
    ok = manifest.filter(pl.col("status") == "ok")
    shard = int(ok["shard"][0])
    materialize(defs, instance, ["slices"], wave_shard_key("pilot", shard))
    npy_key, index_key = slice_keys("pilot", shard)
    pixels = read_npy(store.local_path(npy_key))
    index = pl.read_parquet(store.local_path(index_key))
    assert pixels.shape[1:] == (256, 256) and pixels.dtype.name == "uint8"
    assert sorted(index["image_id"]) == sorted(ok.filter(pl.col("shard") == shard)["image_id"])
    # the triage page finds each slice of a real wave (its shard, then its row) and shows it
    reader = SliceReader(store)
    for image_id, row in index.select("image_id", "row").head(5).iter_rows():
        shown = np.asarray(Image.open(io.BytesIO(reader("pilot", image_id))))
        assert np.array_equal(shown, pixels[row])


def test_planted_patient_name_appears_nowhere_in_the_store(mri_home, tmp_path, instance):
    defs = local_defs(mri_home)
    store = defs.resources["object_store"]
    land_sample_wave(store, tmp_path, "pilot", n_slices=60)
    materialize(defs, instance, ["manifest"], "pilot")
    planted = PLANTED_PATIENT_NAME.split("{")[0].encode()
    files = [p for p in Path(mri_home).rglob("*") if p.is_file()]
    assert files
    assert not [p for p in files if planted in p.read_bytes()]


def test_adding_a_wave_never_moves_a_patient_and_ids_are_stable(mri_home, tmp_path, instance):
    defs = local_defs(mri_home)
    store = defs.resources["object_store"]
    source = land_sample_wave(store, tmp_path, "pilot", n_slices=40)
    materialize(defs, instance, ["manifest"], "pilot")
    first = defs.load_asset_value("manifest", partition_key="pilot", instance=instance)
    land_sample_wave(store, tmp_path, "scale", n_slices=40, seed=1)
    land_wave(LocalObjectStore(root=str(source)), "", store, "scale", DEV_SALT)
    materialize(defs, instance, ["manifest"], "scale")
    materialize(defs, instance, ["manifest"], "pilot")
    again = defs.load_asset_value("manifest", partition_key="pilot", instance=instance)
    second = defs.load_asset_value("manifest", partition_key="scale", instance=instance)
    assert first.select("image_id", "patient_key", "split").equals(
        again.select("image_id", "patient_key", "split"))
    both = first.select("patient_key", "split").unique().join(
        second.select("patient_key", "split").unique(), on="patient_key", suffix="_scale")
    assert both.height > 0
    assert (both["split"] == both["split_scale"]).all()
    assert set(first["image_id"]) <= set(second["image_id"])


@pytest.mark.integration
def test_versioned_s3_manifest_pins_the_original_raw_bytes(
    mri_home, tmp_path, instance, s3_endpoint, versioned_bucket
):
    defs = local_defs(mri_home)
    store = S3ObjectStore(bucket=versioned_bucket, endpoint_url=s3_endpoint,
                          cache_dir=str(tmp_path / "cache"))
    land_sample_wave(store, tmp_path, "pilot", n_slices=30, include_bad=False)
    materialize(defs, instance, ["manifest"], "pilot", resources={"object_store": store})
    manifest = pl.read_parquet(io.BytesIO(store.get_bytes(manifest_key("pilot"))))
    row = manifest.filter(pl.col("status") == "ok").row(0, named=True)
    assert row["source_version"]
    store.put_bytes(row["source_key"], b"overwritten after ingest")
    original = store.get_bytes(row["source_key"], version_id=row["source_version"])
    import hashlib

    assert hashlib.sha256(original).hexdigest() == row["sha256"]
    assert store.get_bytes(row["source_key"]) == b"overwritten after ingest"
    # the shard is the staged `.npy` in the bucket (copied server-side), whatever happened to raw/ since
    shard = int(row["shard"])
    materialize(defs, instance, ["slices"], wave_shard_key("pilot", shard),
                resources={"object_store": store})
    npy_key, index_key = slice_keys("pilot", shard)
    pixels = read_npy(store.local_path(npy_key))
    index = pl.read_parquet(io.BytesIO(store.get_bytes(index_key)))
    wanted = manifest.filter((pl.col("status") == "ok") & (pl.col("shard") == shard))["image_id"]
    assert index["image_id"].to_list() == sorted(wanted.to_list()) and len(pixels) >= index.height
    assert [zlib.crc32(np.ascontiguousarray(pixels[row])) for row in index["row"]] == (
        index["payload_crc32"].to_list())
