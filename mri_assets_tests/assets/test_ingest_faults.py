"""Faults around a wave: incomplete landings, flipped bytes in raw objects and in published shards,
slices repeated across waves, and files that are not MRI or carry patient data."""

import gzip
import hashlib
import shutil
from pathlib import Path

import dagster as dg
import nibabel as nib
import numpy as np
import polars as pl
import pydicom
import pytest

from mri_assets.assets.support.partitions import wave_shard_key
from mri_assets.core.sample_data import build_sample_data
from mri_assets.core.slice_shards import HEADER_BYTES, payload_crc32, read_npy, slice_keys
from mri_assets.resources.landing import land_wave
from mri_assets.resources.object_store import LocalObjectStore
from mri_assets.resources.settings import DEV_SALT
from mri_assets_tests.assets.wave_fixtures import land_sample_wave, local_defs, materialize
from mri_assets_tests.core.bad_inputs import PYDICOM_FILES
from mri_assets_tests.core.test_imaging_inputs import LEGACY_PHI, NIBABEL_DATA, legacy_dicom
from mri_assets_tests.resources.test_landing import CrashingStore


@pytest.fixture
def instance(tmp_path):
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as test_instance:
        yield test_instance


def _manifest(defs, instance, wave) -> pl.DataFrame:
    return defs.load_asset_value("manifest", partition_key=wave, instance=instance)


def _failure(result) -> str:
    failure = next(event for event in result.all_events if event.is_step_failure)
    return failure.step_failure_data.error.message


def _reconciled(result) -> bool:
    return next(e for e in result.get_asset_check_evaluations()
                if e.check_name == "counts_reconcile").passed


def test_only_mr_is_ingested_and_planted_phi_appears_nowhere_in_the_home(mri_home, tmp_path,
                                                                          instance):
    source = tmp_path / "source"  # outside MRI_ASSETS_HOME
    for folder in ("patient-a", "patient-b", "patient-c", "patient-d", "patient-e"):
        (source / folder).mkdir(parents=True)
    (source / "patient-a" / "IM0001").write_bytes(legacy_dicom(LEGACY_PHI))
    (source / "patient-a" / "referral.txt").write_bytes(
        f"Referral: {LEGACY_PHI['PatientName']} ({LEGACY_PHI['PatientID']})\n".encode() * 4)
    shutil.copyfile(PYDICOM_FILES / "CT_small.dcm", source / "patient-b" / "ct.dcm")
    shutil.copyfile(PYDICOM_FILES / "examples_ybr_color.dcm", source / "patient-c" / "us.dcm")
    shutil.copyfile(PYDICOM_FILES / "MR_small_jpeg_ls_lossless.dcm",
                    source / "patient-d" / "jls.dcm")
    anatomy = nib.load(NIBABEL_DATA / "example4d.nii.gz")
    mgh = nib.freesurfer.mghformat.MGHImage(np.asanyarray(anatomy.dataobj)[..., 0], anatomy.affine)
    (source / "patient-e" / "brain.mgz").write_bytes(gzip.compress(mgh.to_bytes(), mtime=0))

    defs = local_defs(mri_home)
    land_wave(LocalObjectStore(root=str(source)), "", defs.resources["object_store"], "mixed",
              DEV_SALT)
    result = materialize(defs, instance, ["manifest"], "mixed")
    assert _reconciled(result)
    manifest = _manifest(defs, instance, "mixed")
    by_file = {key.rsplit("/", 1)[-1]: rows for (key,), rows in manifest.group_by("source_key")}
    assert set(by_file) == {"IM0001", "referral.txt", "ct.dcm", "us.dcm", "jls.dcm", "brain.mgz"}
    legacy = by_file["IM0001"].row(0, named=True)
    assert legacy["status"] == "ok" and legacy["format"] == "dicom"
    # JPEG-LS MR: the same pixels as the (uncompressed) legacy copy of the same scan
    jls = by_file["jls.dcm"].row(0, named=True)
    assert jls["status"] == "duplicate" and jls["duplicate_of"] == legacy["image_id"]
    for name, modality in (("ct.dcm", "CT"), ("us.dcm", "US")):
        row = by_file[name].row(0, named=True)
        assert row["status"] == "quarantined" and f"modality {modality} is not MR" in row["reason"]
    referral = by_file["referral.txt"].row(0, named=True)
    assert referral["status"] == "quarantined" and "withheld at landing" in referral["reason"]
    assert referral["sha256"] == hashlib.sha256(
        (source / "patient-a" / "referral.txt").read_bytes()).hexdigest()
    volume = by_file["brain.mgz"]
    assert volume.height == 24 and (volume["status"] == "ok").sum() >= 20
    assert set(volume["format"].drop_nulls()) == {"mgh"}

    planted = [value.encode() for value in LEGACY_PHI.values()]
    files = [path for path in Path(mri_home).rglob("*") if path.is_file()]
    assert any("raw" in path.parts for path in files) and len(files) > 10
    leaks = [(path, value) for path in files for value in planted if value in path.read_bytes()]
    assert not leaks


def test_a_wave_is_refused_until_its_interrupted_landing_completes(mri_home, tmp_path, instance):
    defs = local_defs(mri_home)
    store = defs.resources["object_store"]
    source = tmp_path / "sample"
    build_sample_data(source, n_slices=30, seed=0)
    crashing = CrashingStore(root=store.root, survive=7)
    with pytest.raises(OSError, match="simulated crash"):
        land_wave(LocalObjectStore(root=str(source)), "", crashing, "w1", DEV_SALT)
    assert len(store.list("raw/w1/")) == 7

    result = materialize(defs, instance, ["manifest"], "w1", raise_on_error=False)
    assert not result.success
    message = _failure(result)
    assert "wave w1 has no complete landing" in message
    assert "mri-assets ingest-wave w1 --source" in message
    assert len(message.strip().splitlines()) == 1  # one line, no traceback
    assert not store.exists("manifests/w1/manifest.parquet")

    report = land_wave(LocalObjectStore(root=str(source)), "", store, "w1", DEV_SALT)
    assert report.skipped_same_checksum == 7 and report.copied == report.listed - 7
    result = materialize(defs, instance, ["manifest"], "w1")
    assert _reconciled(result)
    manifest = _manifest(defs, instance, "w1")
    assert manifest["source_key"].n_unique() == report.listed


def test_a_flipped_byte_in_a_raw_object_is_quarantined_under_its_landed_id_and_relanding_repairs_it(
        mri_home, tmp_path, instance):
    defs = local_defs(mri_home)
    store = defs.resources["object_store"]
    source = land_sample_wave(store, tmp_path, "w1", n_slices=30, include_bad=False)
    materialize(defs, instance, ["manifest"], "w1")
    before = _manifest(defs, instance, "w1")
    row = before.filter((pl.col("status") == "ok") & (pl.col("format") == "dicom")).row(0, named=True)
    path = store.local_path(row["source_key"])
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01  # inside the pixel data: the header still reads, the pixels differ
    path.write_bytes(bytes(data))

    materialize(defs, instance, ["manifest"], "w1")
    after = _manifest(defs, instance, "w1")
    flipped = after.filter(pl.col("source_key") == row["source_key"]).row(0, named=True)
    assert flipped["status"] == "quarantined"
    assert flipped["reason"].startswith(f"changed since landing: {row['source_key']}")
    assert "ingest-wave w1" in flipped["reason"]
    assert flipped["image_id"] == row["image_id"] and flipped["sha256"] == row["sha256"]
    assert set(after["image_id"]) <= set(before["image_id"])  # never a new id

    report = land_wave(LocalObjectStore(root=str(source)), "", store, "w1", DEV_SALT)
    assert report.copied == 1
    materialize(defs, instance, ["manifest"], "w1")
    repaired = _manifest(defs, instance, "w1")
    assert repaired.select("image_id", "status").equals(before.select("image_id", "status"))


def test_a_flipped_byte_in_a_published_shard_is_found_by_slices_and_rebuilt_from_raw(
        mri_home, tmp_path, instance):
    from mri_assets.core.embed import CorruptSliceError, SliceShard

    defs = local_defs(mri_home)
    store = defs.resources["object_store"]
    land_sample_wave(store, tmp_path, "w1", n_slices=30, include_bad=False)
    materialize(defs, instance, ["manifest"], "w1")
    manifest = _manifest(defs, instance, "w1")
    shard = int(manifest.filter(pl.col("status") == "ok")["shard"][0])
    materialize(defs, instance, ["slices"], wave_shard_key("w1", shard))
    npy_key, index_key = slice_keys("w1", shard)
    index = pl.read_parquet(store.local_path(index_key))
    original = np.array(read_npy(store.local_path(npy_key)))
    image_id, row = index.row(index.height // 2, named=True)["image_id"], index["row"][
        index.height // 2]
    with open(store.local_path(npy_key), "r+b") as handle:  # bit rot in the published file
        handle.seek(HEADER_BYTES + row * 256 * 256 + 40_000)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0x10]))

    loader = SliceShard(store.local_path(npy_key), store.local_path(index_key))
    with pytest.raises(CorruptSliceError, match="re-materialize this slices shard") as info:
        loader.__getitems__(list(range(len(loader))))
    assert info.value.image_id == image_id

    result = materialize(defs, instance, ["slices"], wave_shard_key("w1", shard))  # the advice
    metadata = result.get_asset_materialization_events()[0].materialization.metadata
    assert metadata["rebuilt_rows"].value == 1
    assert metadata["rebuilt_image_ids"].value == [image_id]
    repaired = read_npy(store.local_path(npy_key))
    np.testing.assert_array_equal(repaired, original)
    assert all(payload_crc32(repaired[r]) == crc
               for r, crc in pl.read_parquet(store.local_path(index_key))
               .select("row", "payload_crc32").iter_rows())
    SliceShard(store.local_path(npy_key), store.local_path(index_key)).__getitems__(
        list(range(index.height)))


def test_slices_already_ok_in_an_earlier_wave_are_duplicates_of_its_ids(mri_home, tmp_path,
                                                                         instance):
    defs = local_defs(mri_home)
    store = defs.resources["object_store"]
    first_source = land_sample_wave(store, tmp_path, "pilot", n_slices=30, include_bad=False)
    materialize(defs, instance, ["manifest"], "pilot")
    pilot = _manifest(defs, instance, "pilot")
    pilot_ok = pilot.filter(pl.col("status") == "ok")

    second = tmp_path / "second"
    build_sample_data(second, n_slices=20, seed=7, include_bad=False)
    repeated = sorted(first_source.rglob("*.png"))[:3]
    for path in repeated:  # the same bytes again
        target = second / "repeat" / path.relative_to(first_source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    dicom = min(first_source.rglob("*.dcm"))  # the same pixels in other bytes
    recoded = pydicom.dcmread(dicom)
    recoded.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    (second / "recoded").mkdir()
    recoded.save_as(second / "recoded" / "slice.dcm", enforce_file_format=True)
    land_wave(LocalObjectStore(root=str(second)), "", store, "scale", DEV_SALT)

    result = materialize(defs, instance, ["manifest"], "scale")
    assert _reconciled(result)
    scale = _manifest(defs, instance, "scale")
    again = scale.filter(pl.col("source_key").str.contains("/repeat/|/recoded/"))
    assert again.height == 4
    assert (again["status"] == "duplicate").all()
    assert set(again["duplicate_of"]) <= set(pilot_ok["image_id"])
    assert all(reason.endswith("of wave pilot") for reason in again["reason"])
    recoded_row = again.filter(pl.col("source_key").str.contains("/recoded/")).row(0, named=True)
    assert recoded_row["image_id"] != recoded_row["duplicate_of"]  # other bytes, same pixels
    assert not set(scale.filter(pl.col("status") == "ok")["pixel_sha256"]) & set(
        pilot_ok["pixel_sha256"])
    metadata = result.get_asset_materialization_events()[0].materialization.metadata
    assert metadata["duplicates_of_earlier_waves"].value == 4

    # the earlier wave keeps its slices: re-running it never makes them duplicates of the later one
    materialize(defs, instance, ["manifest"], "pilot")
    assert _manifest(defs, instance, "pilot").select("image_id", "status").equals(
        pilot.select("image_id", "status"))


def test_a_bad_ingest_setting_fails_the_manifest_in_one_line(mri_home, tmp_path, instance):
    from mri_assets.resources.settings import IngestSettings

    defs = local_defs(mri_home)
    land_sample_wave(defs.resources["object_store"], tmp_path, "w1", n_slices=10)
    result = materialize(defs, instance, ["manifest"], "w1", raise_on_error=False,
                         resources={"ingest": IngestSettings(allowed_modalities=["M R"])})
    message = _failure(result)
    assert "ingest.allowed_modalities" in message and len(message.strip().splitlines()) == 1
