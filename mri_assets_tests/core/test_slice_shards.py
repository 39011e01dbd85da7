"""Decoding straight into the shards' `.npy` files and indexing them: pixels, order, crc32, refusals."""

import hashlib
import zlib

import numpy as np
import polars as pl
import pytest

from mri_assets.core.imaging import UnreadableImage, process_object
from mri_assets.core.ingest import DecodeSettings, SourceObject, decode_wave
from mri_assets.core.manifest import ManifestSettings, finish_manifest, image_id_for
from mri_assets.core.sample_data import build_sample_data
from mri_assets.core.slice_shards import (
    HEADER_BYTES,
    create_staged_shard,
    finish_staged_shard,
    read_npy,
    shard_index,
    staged_rows,
)

N_SHARDS = 4


@pytest.fixture(scope="module")
def decoded(tmp_path_factory):
    root = tmp_path_factory.mktemp("landing")
    build_sample_data(root, n_slices=40, seed=3, wave_style="mixed", include_bad=True)
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.name != "labels.csv")
    # the same object twice under two keys: its slices are staged twice, indexed once
    original = next(p for p in paths if p.suffix == ".png" and p.parent.name.startswith("series"))
    copy = root / "zz-copy" / original.name
    copy.parent.mkdir()
    copy.write_bytes(original.read_bytes())
    paths.append(copy)
    sources = [SourceObject(f"raw/w/{p.relative_to(root).as_posix()}", path=str(p)) for p in paths]
    spill = tmp_path_factory.mktemp("spill")
    rows, staged = decode_wave(sources, DecodeSettings("w", N_SHARDS), spill, workers=2)
    manifest = finish_manifest(rows, ManifestSettings(salt="s", n_shards=N_SHARDS))
    return sources, manifest, staged


def _expected_pixels(sources: list[SourceObject]) -> dict[str, np.ndarray]:
    expected = {}
    for source in sources:
        data = source.read()
        try:
            processed = process_object(data, source.key)
        except UnreadableImage:  # the sample's broken files are quarantined: no pixels
            continue
        sha = hashlib.sha256(data).hexdigest()
        for item in processed.slices:
            expected[image_id_for(sha, item.slice_index)] = item.pixels
    return expected


def _wanted(manifest: pl.DataFrame, shard: int) -> pl.DataFrame:
    return manifest.filter((pl.col("status") == "ok") & (pl.col("shard") == shard)).select(
        "image_id", "slice_row", "payload_crc32", "split", "slice_index", source_uri=pl.col("source_key"))


def test_shards_hold_every_ok_slice_once_in_image_id_order_with_worker_crc32(decoded):
    sources, manifest, staged = decoded
    expected = _expected_pixels(sources)
    indexed_ids = []
    for shard in range(N_SHARDS):
        pixels = read_npy(staged.path(shard))
        rows = manifest.filter(pl.col("shard") == shard)["slice_row"].drop_nulls().to_list()
        # two workers appended to the same file: every slice got rows of its own, none torn
        assert sorted(rows) == list(range(len(pixels)))
        index = shard_index(_wanted(manifest, shard), len(pixels))
        assert index["image_id"].to_list() == sorted(index["image_id"].to_list())
        for image_id, row, crc in index.select("image_id", "row", "payload_crc32").iter_rows():
            assert np.array_equal(pixels[row], expected[image_id])
            assert zlib.crc32(np.ascontiguousarray(pixels[row])) == crc
        indexed_ids += index["image_id"].to_list()
    ok = manifest.filter(pl.col("status") == "ok")["image_id"].to_list()
    assert sorted(indexed_ids) == sorted(ok) and len(set(indexed_ids)) == len(indexed_ids)
    assert manifest.filter(pl.col("status") == "duplicate").height > 0
    staged_total = sum(staged.count(shard) for shard in range(N_SHARDS))
    assert staged_total > len(indexed_ids), "duplicates were staged but are not indexed"


def test_staging_files_are_valid_npy_of_their_row_count(decoded):
    _, _, staged = decoded
    for shard in range(N_SHARDS):
        path = staged.path(shard)
        pixels = read_npy(path)
        assert pixels.shape == (staged.count(shard), 256, 256) and pixels.dtype == np.uint8
        assert path.stat().st_size == HEADER_BYTES + pixels.nbytes
        assert staged_rows(path.stat().st_size, 256) == len(pixels)


def test_indexing_refuses_an_incomplete_staging_area(decoded):
    _, manifest, staged = decoded
    shard = int(manifest.filter(pl.col("status") == "ok")["shard"][0])
    wanted = _wanted(manifest, shard)
    n_rows = staged.count(shard)
    unstaged = wanted.with_columns(
        pl.when(pl.int_range(pl.len()) == 0).then(None).otherwise(pl.col("slice_row")).alias("slice_row"))
    with pytest.raises(ValueError, match="not staged"):
        shard_index(unstaged, n_rows)
    with pytest.raises(ValueError, match="shorter than its index"):
        shard_index(wanted, int(wanted["slice_row"].max()))


def test_a_torn_staging_file_is_refused(tmp_path):
    path = tmp_path / "shard-00.npy"
    create_staged_shard(path, 256)
    with open(path, "ab") as handle:
        handle.write(b"\0" * (256 * 256 + 10))
    with pytest.raises(ValueError, match="not a whole number"):
        finish_staged_shard(path, 256)


def test_an_empty_shard_is_an_empty_array(tmp_path):
    path = tmp_path / "shard-00.npy"
    create_staged_shard(path, 256)
    assert finish_staged_shard(path, 256) == 0
    assert read_npy(path).shape == (0, 256, 256)
    wanted = pl.DataFrame(schema={"image_id": pl.String, "slice_row": pl.Int64, "payload_crc32": pl.Int64,
                                  "split": pl.String, "slice_index": pl.Int32, "source_uri": pl.String})
    assert shard_index(wanted, 0).height == 0
