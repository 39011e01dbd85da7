"""Slice shards: a uint8 (N, 256, 256) `.npy` (memmap-able, lossless) plus an index Parquet."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from mri_assets.core.ingest import payload_crc32

INDEX_COLUMNS = ("image_id", "row", "payload_crc32", "split", "slice_index", "source_uri")


def shard_name(shard: int) -> str:
    return f"shard-{shard:02d}"


def staging_keys(wave: str, shard: int) -> tuple[str, str]:
    return f"staging/{wave}/{shard_name(shard)}.npy", f"staging/{wave}/{shard_name(shard)}.parquet"


def slice_keys(wave: str, shard: int) -> tuple[str, str]:
    return f"slices/{wave}/{shard_name(shard)}.npy", f"slices/{wave}/{shard_name(shard)}.parquet"


def manifest_key(wave: str) -> str:
    return f"manifests/{wave}/manifest.parquet"


@dataclass(frozen=True)
class PackedShard:
    pixels: np.ndarray
    index: pl.DataFrame

    @property
    def count(self) -> int:
        return self.index.height


def pack_shard(staged: np.ndarray, staged_ids: list[str], wanted: pl.DataFrame) -> PackedShard:
    """The `ok` slices of one shard in image_id order, with their crc32 for verification.

    `wanted` holds the manifest rows of the shard with status `ok`; every one of them must have
    been staged, otherwise the staging area is incomplete and packing refuses.
    """
    position = {image_id: row for row, image_id in enumerate(staged_ids)}
    wanted = wanted.sort("image_id")
    missing = [i for i in wanted["image_id"].to_list() if i not in position]
    if missing:
        raise ValueError(
            f"{len(missing)} slices of the manifest are not staged (first: {missing[:3]}); "
            "re-materialize the wave's manifest"
        )
    rows = np.array([position[i] for i in wanted["image_id"].to_list()], dtype=np.int64)
    pixels = np.ascontiguousarray(staged[rows]) if len(rows) else staged[:0]
    index = wanted.select("image_id", "split", "slice_index", "source_uri").with_columns(
        pl.Series("row", np.arange(len(rows), dtype=np.int64)),
        pl.Series("payload_crc32", payload_crc32(pixels).astype(np.int64)),
    )
    return PackedShard(pixels, index.select(INDEX_COLUMNS))


def write_npy(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, pixels, allow_pickle=False)
    return path


def read_npy(path: Path) -> np.ndarray:
    return np.load(path, mmap_mode="r", allow_pickle=False)


def slice_locations(indexes: list[pl.DataFrame]) -> pl.DataFrame:
    """`image_id`, `shard`, `row` over a wave's shard indexes (shard = position in the list)."""
    frames = [
        index.select("image_id", "row").with_columns(pl.lit(shard, dtype=pl.Int64).alias("shard"))
        for shard, index in enumerate(indexes)
    ]
    return pl.concat(frames) if frames else pl.DataFrame(
        schema={"image_id": pl.String, "row": pl.Int64, "shard": pl.Int64})


def locate(locations: pl.DataFrame, image_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(shard, row) of each image id, in the given order; an unknown id is an error."""
    wanted = pl.DataFrame({"image_id": image_ids}).with_row_index("order")
    found = wanted.join(locations, on="image_id", how="left").sort("order")
    missing = found.filter(pl.col("row").is_null())["image_id"].to_list()
    if missing:
        raise ValueError(f"{len(missing)} image ids have no slice in the wave's shards "
                         f"(first: {missing[:3]}); re-materialize the wave's slices")
    return found["shard"].to_numpy(), found["row"].to_numpy()
