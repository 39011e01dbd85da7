"""Parallel decoding of a wave's raw objects into manifest rows and staged 256 px slices.

Each raw object is read and decoded exactly once, in a worker process. A worker appends the pixels
of its slices straight to its own spill segment per shard (`shard-SS-wPID.u8`, raw uint8 rows) and
computes their crc32 while they are still in its cache; only rows and placements travel back to the
parent. Memory stays bounded by one object whatever the wave's size, and no pixel is copied between
processes.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import polars as pl

from mri_assets.core.imaging import UnreadableImage, process_object
from mri_assets.core.manifest import image_id_for, patient_identifier, shard_for

SLICE_SIZE = 256
STAGING_INDEX_SCHEMA: dict[str, pl.DataType] = {
    "image_id": pl.String,
    "segment": pl.String,
    "row": pl.Int64,
    "payload_crc32": pl.Int64,
}


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
    """A chunk's manifest rows, and where each of its readable slices was spilled."""

    rows: list[dict]
    placements: list[tuple[int, str, str, int, int]]  # shard, image_id, segment, row, crc32


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


def decode_source(source: SourceObject, settings: DecodeSettings) -> tuple[list[dict], list[np.ndarray]]:
    """Rows for every slice of one object, and the 256 px pixels of its readable (`ok`) slices."""
    empty: list[np.ndarray] = []
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
    return rows, [item.pixels for item in decoded.slices]


def segment_name(shard: int) -> str:
    """This process's spill segment for `shard`; one writer per segment, so appends never interleave."""
    return f"shard-{shard:02d}-w{os.getpid()}"


class _SpillWriter:
    """Appends slices to this process's segments, one open file per shard, while a chunk lasts."""

    def __init__(self, directory: Path, slice_bytes: int) -> None:
        self.directory = directory
        self.slice_bytes = slice_bytes
        self.segments: dict[int, tuple[str, BinaryIO]] = {}
        self.next_row: dict[int, int] = {}

    def write(self, shard: int, pixels: np.ndarray) -> tuple[str, int, int]:
        """(segment, row, crc32) of one slice appended to the shard's segment."""
        if shard not in self.segments:
            name = segment_name(shard)
            handle = open(self.directory / f"{name}.u8", "ab")  # noqa: SIM115 - closed in close()
            self.segments[shard] = (name, handle)
            self.next_row[shard] = handle.seek(0, os.SEEK_END) // self.slice_bytes
        name, handle = self.segments[shard]
        pixels = np.ascontiguousarray(pixels)
        handle.write(pixels)
        row = self.next_row[shard]
        self.next_row[shard] = row + 1
        return name, row, zlib.crc32(pixels)

    def close(self) -> None:
        for _, handle in self.segments.values():
            handle.close()
        self.segments.clear()


def decode_chunk(sources: list[SourceObject], settings: DecodeSettings, spill_dir: str) -> ChunkResult:
    """Decode a chunk of objects, spilling each object's slices before the next one is read."""
    rows: list[dict] = []
    placements = []
    writer = _SpillWriter(Path(spill_dir), settings.size * settings.size)
    try:
        for source in sources:
            source_rows, pixels = decode_source(source, settings)
            rows.extend(source_rows)
            ok_rows = (row for row in source_rows if row["status"] == "ok")
            for row, item in zip(ok_rows, pixels, strict=True):
                image_id = image_id_for(row["sha256"], row["slice_index"])
                shard = shard_for(image_id, settings.n_shards)
                placements.append((shard, image_id, *writer.write(shard, item)))
    finally:
        writer.close()
    return ChunkResult(rows, placements)


def _chunks(sources: list[SourceObject], chunk_size: int) -> Iterator[list[SourceObject]]:
    for start in range(0, len(sources), chunk_size):
        yield sources[start : start + chunk_size]


def iter_decoded_chunks(
    sources: list[SourceObject], settings: DecodeSettings, workers: int, spill_dir: Path
) -> Iterable[ChunkResult]:
    """Decoded chunks (in no particular order); `workers <= 1` decodes in this process.

    Chunks are small (about 32 per worker) so that a large volume near the end does not leave the
    other workers idle.
    """
    if not sources:
        return
    chunk_size = max(1, min(64, len(sources) // max(1, workers * 32)))
    chunks = list(_chunks(sources, chunk_size))
    if workers <= 1:
        for chunk in chunks:
            yield decode_chunk(chunk, settings, str(spill_dir))
        return
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = [pool.submit(decode_chunk, chunk, settings, str(spill_dir)) for chunk in chunks]
        for future in futures:
            yield future.result()


@dataclass
class StagedSlices:
    """The spill segments of 256 px slices, and per shard where each image id lies in them."""

    directory: Path
    size: int
    placements: dict[int, list[tuple[str, str, int, int]]] = field(default_factory=dict)

    def add(self, chunk: ChunkResult) -> None:
        for shard, image_id, segment, row, crc in chunk.placements:
            self.placements.setdefault(shard, []).append((image_id, segment, row, crc))

    def count(self, shard: int) -> int:
        return len(self.placements.get(shard, []))

    def index(self, shard: int) -> pl.DataFrame:
        """`image_id`, `segment`, `row`, `payload_crc32` of the shard's staged slices."""
        return pl.DataFrame(self.placements.get(shard, []), schema=STAGING_INDEX_SCHEMA, orient="row")

    def segment_paths(self) -> list[Path]:
        return sorted(self.directory.glob("shard-*-w*.u8"))


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
    for chunk in iter_decoded_chunks(sources, settings, workers, staging_dir):
        rows.extend(chunk.rows)
        staged.add(chunk)
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
