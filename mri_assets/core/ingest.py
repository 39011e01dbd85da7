"""Parallel decoding of a wave's raw objects into manifest rows and staged 256 px slices.

Each raw object is read and decoded exactly once, in a worker process. A worker appends the pixels
of each slice straight to its shard's staging `.npy` (`shard-SS.npy`, opened `O_APPEND`, so the
kernel gives every 64 KiB write its own rows even with several workers appending) and computes the
crc32 while the slice is still in its cache; only manifest rows, which carry each slice's row and
crc32, travel back to the parent.
Memory stays bounded by one object whatever the wave's size, no pixel is copied between processes,
and the staging file is already the shard's final `.npy`.
"""

from __future__ import annotations

import gc
import hashlib
import multiprocessing
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from mri_assets.core.deid import read_withheld
from mri_assets.core.imaging import DEFAULT_MODALITIES, UnreadableImage, process_object
from mri_assets.core.manifest import image_id_for, patient_identifier, shard_for
from mri_assets.core.slice_shards import (
    HEADER_BYTES,
    create_staged_shard,
    finish_staged_shard,
    payload_crc32,
)
from mri_assets.core.volume_formats import DEFAULT_MAX_SLICES
from mri_assets.core.wave_keys import staged_file_name

SLICE_SIZE = 256

@dataclass(frozen=True)
class SourceObject:
    """One raw object: its key, the version read, and either a local path or its bytes."""

    key: str
    version_id: str | None = None
    path: str | None = None
    data: bytes | None = None
    size: int | None = None  # bytes, where the listing gave it
    expected_sha256: str | None = None  # what the landing recorded; None: not checked
    error: str | None = None  # why the object cannot be read (it is quarantined with this)

    def nbytes(self) -> int:
        """The object's length: from the listing, the bytes in hand, or the file (0 if unknown)."""
        if self.size is not None:
            return self.size
        if self.data is not None:
            return len(self.data)
        try:
            return os.stat(self.path).st_size if self.path else 0
        except OSError:
            return 0  # unreadable: decode_source quarantines it with the reason

    def read(self) -> bytes:
        if self.error is not None:
            raise OSError(self.error)
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
    modalities: tuple[str, ...] = DEFAULT_MODALITIES
    max_slices: int = DEFAULT_MAX_SLICES


@dataclass
class ChunkResult:
    """A chunk's manifest rows (an `ok` row carries `slice_row` and `payload_crc32`), and how many
    slices it appended to each shard's staging file."""

    rows: list[dict]
    staged: dict[int, int]


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


def changed_since_landing(key: str, wave: str, sha: str, size: int, landed_sha: str,
                          landed_size: int | None) -> str:
    landed = f"{landed_sha[:16]}…" + (f" ({landed_size} bytes)" if landed_size is not None else "")
    return (f"changed since landing: {key} now has sha256 {sha[:16]}… ({size} bytes), the landing "
            f"recorded {landed}; land the wave again (`mri-assets ingest-wave {wave} --source "
            "PATH_OR_URI`) or restore the object, then re-materialize the manifest")


def decode_source(source: SourceObject, settings: DecodeSettings) -> tuple[list[dict], list[np.ndarray]]:
    """Rows for every slice of one object, and the 256 px pixels of its readable (`ok`) slices."""
    empty: list[np.ndarray] = []
    try:
        data = source.read()
    except OSError as error:
        return [_quarantine_row(source, "", settings, f"cannot read object: {error}")], empty
    sha = hashlib.sha256(data).hexdigest()
    if source.expected_sha256 is not None and sha != source.expected_sha256:
        # the landed id stays: a changed object never gets a new image_id
        return [_quarantine_row(source, source.expected_sha256, settings, changed_since_landing(
            source.key, settings.wave, sha, len(data), source.expected_sha256, source.size))], empty
    withheld = read_withheld(data)
    if withheld is not None:
        return [_quarantine_row(source, withheld["sha256"], settings, withheld["reason"])], empty
    try:
        decoded = process_object(data, source.key, size=settings.size, window=settings.window,
                                 modalities=settings.modalities, max_slices=settings.max_slices)
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


def staged_shard_path(directory: Path | str, shard: int) -> str:
    return os.path.join(directory, staged_file_name(shard))


class _ShardAppender:
    """Appends slices to the shards' staging files, one descriptor per shard, while a chunk lasts."""

    def __init__(self, directory: str, slice_bytes: int) -> None:
        self.directory = directory
        self.slice_bytes = slice_bytes
        self.descriptors: dict[int, int] = {}

    def write(self, shard: int, pixels: np.ndarray) -> tuple[int, int]:
        """(row, crc32) of one slice appended to the shard's staging file."""
        fd = self.descriptors.get(shard)
        if fd is None:
            fd = os.open(staged_shard_path(self.directory, shard), os.O_WRONLY | os.O_APPEND)
            self.descriptors[shard] = fd
        pixels = np.ascontiguousarray(pixels)
        written = os.write(fd, pixels)
        if written != self.slice_bytes:
            raise OSError(f"short write to the staging file of shard {shard}: {written} of "
                          f"{self.slice_bytes} bytes (disk full?)")
        # O_APPEND moved this descriptor's offset to the end of this very write
        end = os.lseek(fd, 0, os.SEEK_CUR)
        return (end - HEADER_BYTES) // self.slice_bytes - 1, payload_crc32(pixels)

    def close(self) -> None:
        for fd in self.descriptors.values():
            os.close(fd)
        self.descriptors.clear()


def decode_chunk(sources: list[SourceObject], settings: DecodeSettings, spill_dir: str) -> ChunkResult:
    """Decode a chunk of objects, spilling each object's slices before the next one is read."""
    rows: list[dict] = []
    staged: dict[int, int] = {}
    writer = _ShardAppender(spill_dir, settings.size * settings.size)
    try:
        for source in sources:
            source_rows, pixels = decode_source(source, settings)
            rows.extend(source_rows)
            ok_rows = (row for row in source_rows if row["status"] == "ok")
            for row, item in zip(ok_rows, pixels, strict=True):
                image_id = image_id_for(row["sha256"], row["slice_index"])
                shard = shard_for(image_id, settings.n_shards)
                row["slice_row"], row["payload_crc32"] = writer.write(shard, item)
                staged[shard] = staged.get(shard, 0) + 1
    finally:
        writer.close()
    return ChunkResult(rows, staged)


def _chunks(sources: list[SourceObject], parts: int, most: int = 64) -> list[list[SourceObject]]:
    """About `parts` chunks of similar size in bytes (a proxy for decoding time), largest objects
    first: a large volume starts early instead of leaving the other workers idle at the end, and
    the small objects that come last even out the finish. At most `most` objects per chunk."""
    sized = sorted(((source.nbytes(), position) for position, source in enumerate(sources)), reverse=True)
    budget = max(1, sum(size for size, _ in sized) // max(1, parts))
    chunks: list[list[SourceObject]] = []
    current: list[SourceObject] = []
    current_bytes = 0
    for size, position in sized:
        if current and (current_bytes + size > budget or len(current) == most):
            chunks.append(current)
            current, current_bytes = [], 0
        current.append(sources[position])
        current_bytes += size
    if current:
        chunks.append(current)
    return chunks


def iter_decoded_chunks(
    sources: list[SourceObject], settings: DecodeSettings, workers: int, spill_dir: Path
) -> Iterable[ChunkResult]:
    """Decoded chunks (in no particular order); `workers <= 1` decodes in this process.

    About 8 chunks per worker, largest objects first (see `_chunks`): few enough that handing
    them out costs the parent little, many enough to even out the finish.
    """
    if not sources:
        return
    chunks = _chunks(sources, max(1, workers) * 8)
    if workers <= 1:
        for chunk in chunks:
            yield decode_chunk(chunk, settings, str(spill_dir))
        return
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork"))
    try:
        # the workers are forked at the first submit; frozen, the parent's objects stay out of
        # their garbage collector, so its pages are not copied into every worker on write
        gc.freeze()
        try:
            futures = [pool.submit(decode_chunk, chunk, settings, str(spill_dir)) for chunk in chunks]
        finally:
            gc.unfreeze()
        for future in futures:
            yield future.result()
    finally:
        # every result is in (or the wave failed): the workers' exit is joined in the background
        pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class StagedSlices:
    """The staging `.npy` of every shard, and how many slices the workers appended to each."""

    directory: Path
    size: int
    counts: dict[int, int] = field(default_factory=dict)

    def add(self, chunk: ChunkResult) -> None:
        for shard, count in chunk.staged.items():
            self.counts[shard] = self.counts.get(shard, 0) + count

    def count(self, shard: int) -> int:
        return self.counts.get(shard, 0)

    def path(self, shard: int) -> Path:
        return Path(staged_shard_path(self.directory, shard))


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
    for shard in range(settings.n_shards):
        create_staged_shard(staged.path(shard), settings.size)
    rows: list[dict] = []
    for chunk in iter_decoded_chunks(sources, settings, workers, staging_dir):
        rows.extend(chunk.rows)
        staged.add(chunk)
        if on_progress is not None:
            on_progress(len({row["source_key"] for row in chunk.rows}))
    for shard in range(settings.n_shards):
        n_rows = finish_staged_shard(staged.path(shard), settings.size)
        if n_rows != staged.count(shard):
            raise RuntimeError(f"shard {shard}: {n_rows} slices in its staging file but "
                               f"{staged.count(shard)} reported by the workers")
    return rows_frame(rows), staged


class RebuildError(RuntimeError):
    """Slices that cannot be decoded again to the pixels their crc32 recorded."""


REDECODE_COLUMNS = ("image_id", "slice_row", "source_key", "source_version", "sha256",
                    "slice_index", "payload_crc32")


def redecode_slices(
    rows: pl.DataFrame,
    settings: DecodeSettings,
    read: Callable[[str, str | None], bytes],
    write: Callable[[int, np.ndarray], None],
) -> int:
    """Decode the slices of `rows` (manifest rows with `REDECODE_COLUMNS`) again from their raw
    objects and `write(slice_row, pixels)` each one; return how many were written.

    Each object is read at the version the manifest pinned (`read(key, version)`) and must still
    have the manifest's sha256; each slice must come back with the crc32 the decoding worker
    recorded. Anything else raises `RebuildError` naming the object or slice. One object is
    decoded at a time, so memory stays bounded by the largest object.
    """
    written = 0
    groups = rows.select(REDECODE_COLUMNS).group_by(
        ["source_key", "source_version", "sha256"], maintain_order=True)
    for (key, version, sha), group in groups:
        try:
            data = read(key, version)
        except (OSError, RuntimeError, ValueError) as error:
            raise RebuildError(f"cannot read raw object {key}: {error}") from error
        found = hashlib.sha256(data).hexdigest()
        if found != sha:
            raise RebuildError(f"raw object {key} changed since the manifest was built (sha256 "
                               f"{found[:16]}…, manifest {sha[:16]}…)")
        try:
            decoded = process_object(data, key, size=settings.size, window=settings.window,
                                     modalities=settings.modalities,
                                     max_slices=settings.max_slices)
        except UnreadableImage as error:
            raise RebuildError(f"raw object {key} no longer decodes: {error}") from error
        by_index = {item.slice_index: item.pixels for item in decoded.slices}
        for image_id, row, slice_index, crc in group.select(
                "image_id", "slice_row", "slice_index", "payload_crc32").iter_rows():
            pixels = by_index.get(slice_index)
            if pixels is None or payload_crc32(pixels) != crc:
                raise RebuildError(f"slice {image_id} of {key} decodes to other pixels than the "
                                   "manifest recorded (decoder or window settings changed?)")
            write(int(row), pixels)
            written += 1
    return written


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
    "slice_row": pl.Int64,
    "payload_crc32": pl.Int64,
    "status": pl.String,
    "reason": pl.String,
}


def rows_frame(rows: list[dict]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=ROW_SCHEMA)
