"""Parallel decoding of a wave's raw objects into manifest rows and staged 256 px slices.

Each raw object is read and decoded exactly once, in a worker process. Workers return the rows and
the pixels of their chunk; the parent appends pixels to one spill file per shard, so memory stays
bounded by a chunk whatever the wave's size.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from mri_assets.core.imaging import UnreadableImage, process_object
from mri_assets.core.manifest import image_id_for, patient_identifier, shard_for

SLICE_SIZE = 256


@dataclass(frozen=True)
class SourceObject:
    """One raw object: its key, the version read, and either a local path or its bytes."""

    key: str
    version_id: str | None = None
    path: str | None = None
    data: bytes | None = None

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        if self.path is None:
            raise ValueError(f"source object {self.key!r} has neither a path nor bytes")
        return Path(self.path).read_bytes()


@dataclass(frozen=True)
class DecodeSettings:
    wave: str
    n_shards: int = 16
    size: int = SLICE_SIZE
    window: tuple[float, float] = (0.5, 99.5)


@dataclass
class ChunkResult:
    rows: list[dict]
    pixels: np.ndarray
    shard_of_pixel: np.ndarray


def _quarantine_row(source: SourceObject, sha: str, settings: DecodeSettings, reason: str) -> dict:
    return {
        "source_key": source.key,
        "source_version": source.version_id,
        "sha256": sha,
        "slice_index": 0,
        "patient_identifier": patient_identifier(source.key, settings.wave, None),
        "status": "quarantined",
        "reason": reason,
    }


def decode_source(source: SourceObject, settings: DecodeSettings) -> tuple[list[dict], np.ndarray]:
    """Rows for every slice of one object, and the 256 px pixels of its readable slices."""
    empty = np.empty((0, settings.size, settings.size), dtype=np.uint8)
    try:
        data = source.read()
    except OSError as error:
        return [_quarantine_row(source, "", settings, f"cannot read object: {error}")], empty
    sha = hashlib.sha256(data).hexdigest()
    try:
        decoded = process_object(data, source.key, size=settings.size, window=settings.window)
    except UnreadableImage as error:
        return [_quarantine_row(source, sha, settings, str(error))], empty
    except Exception as error:  # noqa: BLE001 - a decoder library failing on a broken file is still a broken file
        reason = f"decoder failed: {type(error).__name__}: {error}"
        return [_quarantine_row(source, sha, settings, reason)], empty
    patient = patient_identifier(source.key, settings.wave, decoded.patient_id)
    common = {
        "source_key": source.key,
        "source_version": source.version_id,
        "sha256": sha,
        "patient_identifier": patient,
        "format": decoded.format,
        "normalization": decoded.normalization,
    }
    rows = [
        {
            **common,
            "slice_index": item.slice_index,
            "pixel_sha256": item.pixel_sha256,
            "height": item.height,
            "width": item.width,
            "window_low": item.window_low,
            "window_high": item.window_high,
            "status": "ok",
            "reason": None,
        }
        for item in decoded.slices
    ]
    rows += [
        {**common, "slice_index": index, "status": "quarantined", "reason": reason}
        for index, reason in decoded.quarantined_slices
    ]
    if not decoded.slices:
        return rows, empty
    return rows, np.stack([item.pixels for item in decoded.slices])


def decode_chunk(sources: list[SourceObject], settings: DecodeSettings) -> ChunkResult:
    rows: list[dict] = []
    pixel_blocks: list[np.ndarray] = []
    shards: list[int] = []
    for source in sources:
        source_rows, pixels = decode_source(source, settings)
        rows.extend(source_rows)
        if len(pixels):
            pixel_blocks.append(pixels)
            shards.extend(
                shard_for(image_id_for(row["sha256"], row["slice_index"]), settings.n_shards)
                for row in source_rows
                if row["status"] == "ok"
            )
    if pixel_blocks:
        pixels = np.concatenate(pixel_blocks)
    else:
        pixels = np.empty((0, settings.size, settings.size), dtype=np.uint8)
    return ChunkResult(rows, pixels, np.asarray(shards, dtype=np.int32))


def _chunks(sources: list[SourceObject], chunk_size: int) -> Iterator[list[SourceObject]]:
    for start in range(0, len(sources), chunk_size):
        yield sources[start : start + chunk_size]


def iter_decoded_chunks(
    sources: list[SourceObject], settings: DecodeSettings, workers: int
) -> Iterable[ChunkResult]:
    """Decoded chunks in input order; `workers <= 1` decodes in this process."""
    if not sources:
        return
    chunk_size = max(1, min(64, len(sources) // max(1, workers * 8)))
    chunks = list(_chunks(sources, chunk_size))
    if workers <= 1:
        for chunk in chunks:
            yield decode_chunk(chunk, settings)
        return
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        yield from pool.map(decode_chunk, chunks, [settings] * len(chunks))


@dataclass
class StagedSlices:
    """Spill files of 256 px slices per shard, and the row of each image id in them."""

    directory: Path
    size: int
    counts: dict[int, int] = field(default_factory=dict)
    index: dict[int, list[str]] = field(default_factory=dict)

    def spill_path(self, shard: int) -> Path:
        return self.directory / f"shard-{shard:02d}.u8"

    def append(self, chunk: ChunkResult) -> None:
        ok_rows = [row for row in chunk.rows if row["status"] == "ok"]
        for shard in np.unique(chunk.shard_of_pixel):
            positions = np.flatnonzero(chunk.shard_of_pixel == shard)
            with self.spill_path(int(shard)).open("ab") as handle:
                handle.write(np.ascontiguousarray(chunk.pixels[positions]).tobytes())
            ids = [
                image_id_for(ok_rows[p]["sha256"], ok_rows[p]["slice_index"]) for p in positions
            ]
            self.index.setdefault(int(shard), []).extend(ids)
            self.counts[int(shard)] = self.counts.get(int(shard), 0) + len(positions)

    def shard_array(self, shard: int) -> np.ndarray:
        count = self.counts.get(shard, 0)
        if count == 0:
            return np.empty((0, self.size, self.size), dtype=np.uint8)
        return np.memmap(
            self.spill_path(shard), dtype=np.uint8, mode="r", shape=(count, self.size, self.size)
        )


def decode_wave(
    sources: list[SourceObject],
    settings: DecodeSettings,
    staging_dir: Path,
    workers: int,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[pl.DataFrame, StagedSlices]:
    """Decode every object once; return the per-slice rows and the staged pixels per shard."""
    staging_dir.mkdir(parents=True, exist_ok=True)
    staged = StagedSlices(staging_dir, settings.size)
    rows: list[dict] = []
    for chunk in iter_decoded_chunks(sources, settings, workers):
        rows.extend(chunk.rows)
        staged.append(chunk)
        if on_progress is not None:
            on_progress(len({row["source_key"] for row in chunk.rows}))
    return rows_frame(rows), staged


ROW_SCHEMA: dict[str, pl.DataType] = {
    "source_key": pl.String,
    "source_version": pl.String,
    "sha256": pl.String,
    "slice_index": pl.Int32,
    "patient_identifier": pl.String,
    "format": pl.String,
    "normalization": pl.String,
    "pixel_sha256": pl.String,
    "height": pl.Int32,
    "width": pl.Int32,
    "window_low": pl.Float32,
    "window_high": pl.Float32,
    "status": pl.String,
    "reason": pl.String,
}


def rows_frame(rows: list[dict]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=ROW_SCHEMA)


def payload_crc32(pixels: np.ndarray) -> np.ndarray:
    """crc32 of each slice's bytes: the embedding loader verifies it."""
    return np.array([zlib.crc32(np.ascontiguousarray(p).tobytes()) for p in pixels], dtype=np.uint32)
