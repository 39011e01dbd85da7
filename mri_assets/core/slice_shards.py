"""Slice shards: a uint8 (N, 256, 256) `.npy` (memmap-able, lossless) plus an index Parquet.

The `.npy` of a shard is written once, by the decoding workers of the `manifest` step: each
appends its slices to the shard's staging file (`O_APPEND`, one 64 KiB write per slice) and
records the row it landed on. Rows are therefore in arrival order; the index, sorted by
`image_id`, says where each slice lies, and a row no index entry points at (the pixels of a slice
later found to be a duplicate) is never read. The manifest carries each slice's `slice_row` and
`payload_crc32`; the `slices` step only checks them against the file, writes the shard index and
links the file into place: no pixel is copied.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
from isal import isal_zlib

# The shards' keys are built in `core.wave_keys` (still importable from here).
from mri_assets.core.wave_keys import (  # noqa: F401
    manifest_key,
    shard_name,
    slice_keys,
    staged_pixels_key,
    staging_prefix,
)

INDEX_COLUMNS = ("image_id", "row", "payload_crc32", "split", "slice_index", "source_uri")
# The staging file's `.npy` header is reserved at this fixed length before any slice is appended,
# and rewritten in place with the final row count once the workers are done.
HEADER_BYTES = 128


def payload_crc32(pixels: np.ndarray | bytes) -> int:
    """`zlib.crc32` of a slice's bytes (same polynomial, same value) through ISA-L, several times
    faster: the decoding workers and the embedding loader checksum every slice."""
    return isal_zlib.crc32(pixels)


def npy_header(n_rows: int, size: int) -> bytes:
    """The `.npy` (format 1.0) header of a uint8 (n_rows, size, size) array, padded to HEADER_BYTES."""
    buffer = io.BytesIO()
    header = {"descr": "|u1", "fortran_order": False, "shape": (n_rows, size, size)}
    np.lib.format.write_array_header_1_0(buffer, header)
    raw = buffer.getvalue()
    if len(raw) != HEADER_BYTES:  # numpy pads to a multiple of 64 bytes: 128 for any real count
        raise ValueError(f"a shard of {n_rows} rows gets a {len(raw)}-byte .npy header, "
                         f"{HEADER_BYTES} are reserved: use more shards")
    return raw


def create_staged_shard(path: Path, size: int) -> None:
    """An empty staging file with its header reserved (a valid 0-row array until finished)."""
    with open(path, "xb") as handle:
        handle.write(npy_header(0, size))


def finish_staged_shard(path: Path, size: int) -> int:
    """Write the final row count into the staging file's header; return that count."""
    slice_bytes = size * size
    body = path.stat().st_size - HEADER_BYTES
    if body < 0 or body % slice_bytes:
        raise ValueError(f"{path}: {body} bytes after the header is not a whole number of "
                         f"{size}x{size} slices; the decoding was interrupted, re-materialize the manifest")
    n_rows = body // slice_bytes
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, npy_header(n_rows, size), 0)
    finally:
        os.close(fd)
    return n_rows


def staged_rows(n_bytes: int, size: int) -> int:
    """Rows in a finished staging file of `n_bytes` bytes."""
    return max(0, n_bytes - HEADER_BYTES) // (size * size)


def manifest_shard_rows(manifest: Path | pl.LazyFrame, shard: int) -> pl.DataFrame:
    """The `ok` rows of one shard, as `shard_index` takes them, read from the manifest (its
    Parquet file, or a scan of it)."""
    return (
        (manifest if isinstance(manifest, pl.LazyFrame) else pl.scan_parquet(manifest))
        .filter((pl.col("shard") == shard) & (pl.col("status") == "ok"))
        .select("image_id", "slice_row", "payload_crc32", "split", "slice_index", "source_uri")
        .collect()
    )


def shard_index(wanted: pl.DataFrame, n_rows: int) -> pl.DataFrame:
    """The index of one shard: its `ok` slices in image_id order, each with its row in the `.npy`.

    `wanted` holds the manifest rows of the shard with status `ok` (`image_id`, `slice_row`,
    `payload_crc32`, `split`, `slice_index`, `source_uri`) and `n_rows` is the number of rows in
    the staged `.npy`. Every wanted slice must lie inside the file, otherwise the staging area is
    incomplete and indexing refuses. The crc32 is the one the decoding worker computed, so the
    embedding loader's check covers every copy made since.
    """
    located = wanted.sort("image_id")
    missing = located.filter(pl.col("slice_row").is_null())["image_id"]
    if missing.len():
        raise ValueError(
            f"{missing.len()} slices of the manifest are not staged (first: {missing.head(3).to_list()}); "
            "re-materialize the wave's manifest"
        )
    last_row = located["slice_row"].max()
    if last_row is not None and last_row >= n_rows:
        raise ValueError(
            f"the staged .npy holds {n_rows} slices but the manifest points at row {last_row}: "
            "the file is shorter than its index; re-materialize the wave's manifest"
        )
    return located.select(
        "image_id",
        pl.col("slice_row").cast(pl.Int64).alias("row"),
        pl.col("payload_crc32").cast(pl.Int64),
        "split",
        "slice_index",
        "source_uri",
    )


def corrupt_rows(
    read_rows: Callable[[int, int], bytes], index: pl.DataFrame, size: int, block_rows: int = 256
) -> pl.DataFrame:
    """The index rows whose bytes in the shard no longer match their crc32 (`image_id`, `row`,
    `payload_crc32`, `found_crc32`). `read_rows(first, count)` returns the bytes of `count`
    consecutive rows of the `.npy` from row `first`; the file is read once, in order, a block of
    `block_rows` rows at a time (16 MiB at 256 px), whatever the shard's size."""
    slice_bytes = size * size
    ordered = index.select("image_id", "row", "payload_crc32").sort("row")
    rows = ordered["row"].to_numpy()
    expected = ordered["payload_crc32"].to_numpy()
    bad: list[tuple[int, int]] = []
    position = 0
    while position < len(rows):
        first = int(rows[position])
        end = int(np.searchsorted(rows, first + block_rows, side="left"))
        last = int(rows[end - 1])
        block = read_rows(first, last - first + 1)
        for at in range(position, end):
            offset = (int(rows[at]) - first) * slice_bytes
            found = payload_crc32(block[offset : offset + slice_bytes])
            if found != int(expected[at]):
                bad.append((at, found))
        position = end
    if not bad:
        return ordered.head(0).with_columns(pl.lit(None, dtype=pl.Int64).alias("found_crc32"))
    return ordered[[at for at, _ in bad]].with_columns(
        pl.Series("found_crc32", [found for _, found in bad], dtype=pl.Int64))


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
