"""Decoding into spill segments and packing shards: pixels, order, crc32 and refusals."""

import hashlib
import zlib
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from mri_assets.core.imaging import UnreadableImage, process_object
from mri_assets.core.ingest import DecodeSettings, SourceObject, decode_wave
from mri_assets.core.manifest import ManifestSettings, finish_manifest, image_id_for
from mri_assets.core.sample_data import build_sample_data
from mri_assets.core.slice_shards import pack_shard, read_npy, read_segment

N_SHARDS = 4


@pytest.fixture(scope="module")
def decoded(tmp_path_factory):
    root = tmp_path_factory.mktemp("landing")
    build_sample_data(root, n_slices=40, seed=3, wave_style="mixed", include_bad=True)
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.name != "labels.csv")
    # the same object twice under two keys: its slices are staged twice, packed once
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
        "image_id", "split", "slice_index", source_uri=pl.col("source_key"))


def test_packed_shards_hold_every_ok_slice_in_image_id_order_with_worker_crc32(decoded, tmp_path):
    sources, manifest, staged = decoded
    expected = _expected_pixels(sources)
    segments = {path.stem: read_segment(path, 256) for path in staged.segment_paths()}
    assert len({name.split("-w")[1] for name in segments}) == 2, "two workers, two writers"
    packed_ids = []
    for shard in range(N_SHARDS):
        out = tmp_path / f"shard-{shard}.npy"
        index = pack_shard(staged.index(shard), segments, _wanted(manifest, shard), out)
        pixels = read_npy(out)
        assert index["image_id"].to_list() == sorted(index["image_id"].to_list())
        assert index["row"].to_list() == list(range(len(pixels)))
        for image_id, row, crc in index.select("image_id", "row", "payload_crc32").iter_rows():
            assert np.array_equal(pixels[row], expected[image_id])
            assert zlib.crc32(np.ascontiguousarray(pixels[row])) == crc
        packed_ids += index["image_id"].to_list()
    ok = manifest.filter(pl.col("status") == "ok")["image_id"].to_list()
    assert sorted(packed_ids) == sorted(ok) and len(set(packed_ids)) == len(packed_ids)
    assert manifest.filter(pl.col("status") == "duplicate").height > 0


def test_packing_refuses_an_incomplete_staging_area(decoded, tmp_path):
    _, manifest, staged = decoded
    shard = int(manifest.filter(pl.col("status") == "ok")["shard"][0])
    segments = {path.stem: read_segment(path, 256) for path in staged.segment_paths()}
    wanted = _wanted(manifest, shard)
    with pytest.raises(ValueError, match="not staged"):
        pack_shard(staged.index(shard).slice(1), segments, wanted, tmp_path / "a.npy")
    missing = staged.index(shard)["segment"][0]
    with pytest.raises(ValueError, match="missing"):
        pack_shard(staged.index(shard), {k: v for k, v in segments.items() if k != missing}, wanted,
                   tmp_path / "b.npy")
    short = {k: v[:0] for k, v in segments.items()}
    with pytest.raises(ValueError, match="shorter than its index"):
        pack_shard(staged.index(shard), short, wanted, tmp_path / "c.npy")


def test_an_empty_shard_packs_to_an_empty_array(decoded, tmp_path):
    _, manifest, staged = decoded
    wanted = _wanted(manifest, 0).clear()
    index = pack_shard(staged.index(0).clear(), {}, wanted, tmp_path / "empty.npy")
    assert index.height == 0 and read_npy(Path(tmp_path / "empty.npy")).shape == (0, 256, 256)
