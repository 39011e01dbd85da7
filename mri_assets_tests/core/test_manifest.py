import hashlib

import polars as pl
import pytest

from mri_assets.core.ingest import ROW_SCHEMA
from mri_assets.core.manifest import (
    ManifestError,
    ManifestSettings,
    WaveKeyError,
    finish_manifest,
    image_id_for,
    patient_identifier,
    patient_key_for,
    reconcile,
    shard_for,
    shards_for,
    split_for_patient,
    validate_wave_key,
)

SETTINGS = ManifestSettings(salt="test-salt", split_seed=7, n_shards=16)


def _row(key, sha, index, pixel, patient="folder:p1", status="ok", reason=None):
    return {"source_key": key, "sha256": sha, "slice_index": index, "pixel_sha256": pixel,
            "patient_identifier": patient, "status": status, "reason": reason}


def _rows(rows):
    return pl.DataFrame(rows, schema={k: v for k, v in ROW_SCHEMA.items()})


def test_image_id_is_stable_for_same_bytes_and_slice_index():
    assert image_id_for("ab" * 32, 3) == image_id_for("ab" * 32, 3)
    assert image_id_for("ab" * 32, 3) != image_id_for("ab" * 32, 4)
    assert image_id_for("ab" * 32, 3) != image_id_for("cd" * 32, 3)


def test_vectorised_shards_match_the_scalar_shard_function():
    ids = [image_id_for(hashlib.sha256(str(i).encode()).hexdigest(), i % 7) for i in range(500)]
    vector = shards_for(pl.Series(ids), 16).to_list()
    assert vector == [shard_for(i, 16) for i in ids]
    assert len(set(vector)) == 16


def test_split_is_a_pure_function_of_patient_key_and_seed():
    keys = [patient_key_for(f"folder:p{i}", "salt") for i in range(2000)]
    first = [split_for_patient(k, 1) for k in keys]
    assert first == [split_for_patient(k, 1) for k in keys]
    counts = {s: first.count(s) for s in ("train", "val", "holdout")}
    assert 1450 < counts["train"] < 1750 and 120 < counts["val"] < 280
    assert first != [split_for_patient(k, 2) for k in keys]


def test_all_slices_of_a_patient_share_one_split():
    rows = [_row(f"raw/w/p{p}/f{s}.png", f"{p:02d}{s:062x}", 0, f"px{p}-{s}", f"folder:p{p}")
            for p in range(40) for s in range(5)]
    frame = finish_manifest(_rows(rows), SETTINGS)
    per_patient = frame.group_by("patient_key").agg(pl.col("split").n_unique())
    assert per_patient["split"].max() == 1


def test_exact_duplicates_point_at_the_first_copy():
    rows = [_row("raw/w/a.png", "a" * 64, 0, "same"), _row("raw/w/b.png", "b" * 64, 0, "same"),
            _row("raw/w/c.png", "c" * 64, 0, "other")]
    frame = finish_manifest(_rows(rows), SETTINGS).sort("source_key")
    assert frame["status"].to_list() == ["ok", "duplicate", "ok"]
    assert frame["duplicate_of"][1] == image_id_for("a" * 64, 0)
    assert "same pixels as" in frame["reason"][1]


def test_patient_identifier_never_reaches_the_manifest():
    rows = [_row("raw/w/x.dcm", "a" * 64, 0, "p", patient="dicom:Planted^Name")]
    frame = finish_manifest(_rows(rows), SETTINGS)
    assert "patient_identifier" not in frame.columns
    assert "Planted" not in str(frame.to_dicts())
    assert frame["patient_key"][0] == patient_key_for("dicom:Planted^Name", "test-salt")


def test_patient_identifier_prefers_dicom_then_folder_then_stem():
    assert patient_identifier("raw/w/p7/x.png", "w", "ID1") == "dicom:ID1"
    assert patient_identifier("raw/w/p7/x.png", "w", None) == "folder:p7"
    assert patient_identifier("raw/w/scan01.nii.gz", "w", None) == "file:scan01"


def test_reconciliation_fails_when_a_listed_object_has_no_row():
    rows = [_row("raw/w/a.png", "a" * 64, 0, "x"),
            _row("raw/w/bad.png", "b" * 64, 0, None, status="quarantined", reason="zero bytes")]
    frame = finish_manifest(_rows(rows), SETTINGS)
    assert reconcile(["raw/w/a.png", "raw/w/bad.png"], frame).passed
    broken = reconcile(["raw/w/a.png", "raw/w/bad.png", "raw/w/lost.png"], frame)
    assert not broken.passed and broken.missing_objects == ("raw/w/lost.png",)
    assert "do not reconcile" in broken.describe()


@pytest.mark.parametrize("wave", ["Pilot", "a,b", "-x", "", "wave 1"])
def test_bad_wave_keys_are_refused_with_a_message(wave):
    with pytest.raises(WaveKeyError, match="invalid wave key"):
        validate_wave_key(wave)


def test_good_wave_keys_pass():
    for wave in ("pilot", "full-1", "scale", "2026.11_a"):
        assert validate_wave_key(wave) == wave


def test_split_fractions_must_sum_to_one():
    with pytest.raises(ManifestError, match="sum to 1"):
        ManifestSettings(salt="s", split_fractions=(0.5, 0.1, 0.1))


def test_a_byte_identical_copy_is_a_duplicate_with_the_same_image_id():
    rows = [_row("raw/w/p1/a.dcm", "a" * 64, 0, "same"), _row("raw/w/p2/a.dcm", "a" * 64, 0, "same")]
    frame = finish_manifest(_rows(rows), SETTINGS).sort("source_key")
    assert frame["status"].to_list() == ["ok", "duplicate"]
    assert frame["duplicate_of"][1] == frame["image_id"][0]
