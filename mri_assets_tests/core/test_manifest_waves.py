"""Duplicates across waves: earlier manifests are the index, scanned without loading them."""

import polars as pl

from mri_assets.core.manifest import ManifestSettings, earlier_ok_slices, finish_manifest


def _manifest(path, wave, rows):
    pl.DataFrame(rows, schema={"image_id": pl.String, "pixel_sha256": pl.String,
                               "status": pl.String}, orient="row").with_columns(
        pl.lit(wave).alias("wave")).write_parquet(path)
    return (wave, str(path))


def test_the_earliest_wave_with_the_slice_ok_is_the_reference(tmp_path):
    first = _manifest(tmp_path / "a.parquet", "a", [("a1-00000", "p1", "ok"),
                                                    ("a2-00000", "p2", "quarantined"),
                                                    ("a3-00000", "p3", "ok")])
    second = _manifest(tmp_path / "b.parquet", "b", [("b1-00000", "p1", "ok"),
                                                     ("b2-00000", "p2", "ok"),
                                                     ("b9-00000", "p9", "ok")])
    found = earlier_ok_slices([first, second], pl.Series(["p1", "p2", "p4", None]))
    assert found.sort("pixel_sha256").rows() == [("p1", "a1-00000", "a"), ("p2", "b2-00000", "b")]
    assert earlier_ok_slices([], pl.Series(["p1"])).height == 0


def test_every_copy_in_the_new_wave_points_at_the_earlier_wave():
    rows = pl.DataFrame({
        "source_key": ["raw/w/x.png", "raw/w/y.png", "raw/w/z.png", "raw/w/q.png"],
        "sha256": ["1" * 64, "2" * 64, "3" * 64, "4" * 64],
        "slice_index": [0, 0, 0, 0],
        "patient_identifier": ["file:x", "file:y", "file:z", "file:q"],
        "pixel_sha256": ["p1", "p1", "p5", None],
        "status": ["ok", "ok", "ok", "quarantined"],
        "reason": [None, None, None, "bad"],
    })
    earlier = pl.DataFrame({"pixel_sha256": ["p1"], "image_id": ["abc-00000"], "wave": ["pilot"]})
    frame = finish_manifest(rows, ManifestSettings(salt="s", n_shards=4), earlier)
    assert frame["status"].to_list() == ["quarantined", "duplicate", "duplicate", "ok"]
    assert frame["duplicate_of"].to_list() == [None, "abc-00000", "abc-00000", None]
    assert frame["reason"][1] == "same pixels as abc-00000 of wave pilot"
