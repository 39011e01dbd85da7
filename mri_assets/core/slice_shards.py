"""Slice shards: a uint8 (N, 256, 256) `.npy` (memmap-able, lossless) plus an index Parquet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

INDEX_COLUMNS = ("image_id", "row", "payload_crc32", "split", "slice_index", "source_uri")


def shard_name(shard: int) -> str:
    return f"shard-{shard:02d}"


def staging_prefix(wave: str) -> str:
    return f"staging/{wave}/"


def staging_index_key(wave: str, shard: int) -> str:
    """The shard's staging index: `image_id`, `segment`, `row`, `payload_crc32`."""
    return f"{staging_prefix(wave)}{shard_name(shard)}.parquet"


def segment_key(wave: str, segment: str) -> str:
    """A spill segment: raw uint8 rows of `size` x `size` pixels, no header."""
    return f"{staging_prefix(wave)}{segment}.u8"


def read_segment(path: Path, size: int) -> np.ndarray:
    count = path.stat().st_size // (size * size)
    if count == 0:
        return np.empty((0, size, size), dtype=np.uint8)
    # a plain ndarray view of the map: indexing it row by row skips np.memmap's per-row bookkeeping
    return np.memmap(path, dtype=np.uint8, mode="r", shape=(count, size, size)).view(np.ndarray)


def slice_keys(wave: str, shard: int) -> tuple[str, str]:
    return f"slices/{wave}/{shard_name(shard)}.npy", f"slices/{wave}/{shard_name(shard)}.parquet"


def manifest_key(wave: str) -> str:
    return f"manifests/{wave}/manifest.parquet"


def pack_shard(
    staged: pl.DataFrame,
    segments: dict[str, np.ndarray],
    wanted: pl.DataFrame,
    out: Path,
    size: int = 256,
) -> pl.DataFrame:
    """Write the `ok` slices of one shard, in image_id order, to the `.npy` file `out`; return its index.

    `staged` is the shard's staging index (`image_id`, `segment`, `row`, `payload_crc32`),
    `segments` maps each segment name to its pixels, and `wanted` holds the manifest rows of the
    shard with status `ok`. Every wanted slice must have been staged, otherwise the staging area is
    incomplete and packing refuses. Each slice is copied once, from its segment into `out`; its
    crc32 is the one the decoding worker computed, so the embedding loader's check covers every
    copy made since.
    """
    located = (
        wanted.lazy()
        .join(staged.lazy().unique("image_id", keep="first"), on="image_id", how="left")
        .sort("image_id")
        .with_row_index("out_row")
        .collect()
    )
    segment_of, row_of = located["segment"].to_list(), located["row"].to_list()
    if None in segment_of:
        missing = [i for i, s in zip(located["image_id"].to_list(), segment_of, strict=True) if s is None]
        raise ValueError(
            f"{len(missing)} slices of the manifest are not staged (first: {missing[:3]}); "
            "re-materialize the wave's manifest"
        )
    absent = sorted(set(segment_of) - set(segments))
    if absent:
        raise ValueError(f"staging segments {absent} are missing; re-materialize the wave's manifest")
    out.parent.mkdir(parents=True, exist_ok=True)
    header = {"descr": "|u1", "fortran_order": False, "shape": (located.height, size, size)}
    with open(out, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        for segment, row in zip(segment_of, row_of, strict=True):
            source = segments[segment]
            if row >= len(source):
                raise ValueError(f"staging segment {segment!r} is shorter than its index; "
                                 "re-materialize the wave's manifest")
            handle.write(source[row])
    return located.select(
        "image_id",
        pl.col("out_row").cast(pl.Int64).alias("row"),
        "payload_crc32",
        "split",
        "slice_index",
        "source_uri",
    )


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
