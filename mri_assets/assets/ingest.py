"""Ingestion: the wave's manifest (checksums, splits, quarantine) and its 256 px slice shards."""


import os
import shutil
import time
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl

from mri_assets.assets.support.automation import EAGER
from mri_assets.assets.support.locations import stored_at
from mri_assets.assets.support.monitoring import manifest_gauges, push_figures
from mri_assets.assets.support.partitions import (
    N_SHARDS,
    each_shard,
    earlier_waves,
    wave_and_shard,
    wave_partitions,
    wave_shard_partitions,
)
from mri_assets.core.ingest import (
    REDECODE_COLUMNS,
    SLICE_SIZE,
    DecodeSettings,
    RebuildError,
    SourceObject,
    StagedSlices,
    decode_wave,
    redecode_slices,
)
from mri_assets.core.manifest import (
    earlier_ok_slices,
    finish_manifest,
    raw_prefix,
    reconcile,
)
from mri_assets.core.progress import Progress
from mri_assets.core.slice_shards import (
    HEADER_BYTES,
    corrupt_rows,
    manifest_key,
    manifest_shard_rows,
    shard_index,
    slice_keys,
    staged_pixels_key,
    staged_rows,
    staging_prefix,
)
from mri_assets.core.wave_layout import WaveLayout, wave_shard_count, write_wave_layout
from mri_assets.resources.landing import LandingError, is_raw_file, landed_objects
from mri_assets.resources.metrics import MetricsResource
from mri_assets.resources.object_store import LocalObjectStore, ObjectStore, ObjectStoreError
from mri_assets.resources.settings import IngestSettings
from mri_assets.resources.wave_io import WAVE_IO_MANAGER

RECONCILE_CHECK = "counts_reconcile"


def list_raw_sources(store: ObjectStore, wave: str) -> list[SourceObject]:
    """The objects of the wave's complete landing, each with the sha256 the landing recorded and
    pinned to the version read (where the store versions). Raises `LandingError` (saying what to
    run) when the wave has no complete landing."""
    landed = landed_objects(store, wave)
    sources = []
    local = isinstance(store, LocalObjectStore)
    for key, size, sha in landed.iter_rows():
        try:
            if local:
                sources.append(SourceObject(key, None, path=str(store.local_path(key)), size=size,
                                            expected_sha256=sha))
                continue
            data, version = store.get_versioned(key)
            sources.append(SourceObject(key, version, data=data, size=size, expected_sha256=sha))
        except ObjectStoreError as error:
            if store.exists(key):
                raise
            sources.append(SourceObject(key, None, size=size, expected_sha256=sha, error=(
                f"listed by the landing but missing from the store ({error}); land the wave "
                f"again (`mri-assets ingest-wave {wave} --source PATH_OR_URI`)")))
    return sources


def unlanded_objects(store: ObjectStore, wave: str, sources: list[SourceObject],
                     warn=None) -> list[str]:
    """Raw objects under the wave's prefix that its landing does not list (left out of the wave),
    said to `warn` when there are any."""
    listed = {source.key for source in sources}
    prefix = raw_prefix(wave)
    unlisted = [info.key for info in store.list(prefix)
                if info.key not in listed and is_raw_file(info.key[len(prefix):])]
    if unlisted and warn is not None:
        warn(f"wave {wave}: {len(unlisted)} objects under {prefix} are not in its landing and "
             f"are left out (first: {unlisted[:3]}); land the wave again to include them")
    return unlisted


def _write_parquet(store: ObjectStore, key: str, frame: pl.DataFrame, scratch: Path) -> None:
    path = scratch / Path(key).name
    frame.write_parquet(path, compression="zstd", statistics=True)
    store.put_file(key, path)


def _stage_shards(store: ObjectStore, wave: str, staged: StagedSlices, n_shards: int) -> int:
    """Publish each shard's staged `.npy` (moved, not copied, on a local store); drop stale staging."""
    published = set()
    for shard in range(n_shards):
        key = staged_pixels_key(wave, shard)
        store.publish_file(key, staged.path(shard))
        published.add(key)
    for info in store.list(staging_prefix(wave)):
        if info.key not in published:
            store.delete(info.key)
    return sum(staged.count(shard) for shard in range(n_shards))


def _markdown_table(frame: pl.DataFrame) -> str:
    if frame.height == 0:
        return "none"
    header = "| " + " | ".join(frame.columns) + " |\n|" + "---|" * len(frame.columns) + "\n"
    body = "".join("| " + " | ".join(str(v) for v in row) + " |\n" for row in frame.iter_rows())
    return header + body


def _summary_table(manifest: pl.DataFrame, column: str) -> dict[str, int]:
    return {str(k): int(v) for k, v in manifest.group_by(column).len().sort(column).iter_rows()}


@dg.asset(
    partitions_def=wave_partitions,
    group_name="ingest",
    kinds={"polars", "parquet"},
    io_manager_key=WAVE_IO_MANAGER,
    check_specs=[dg.AssetCheckSpec(RECONCILE_CHECK, asset="manifest", blocking=True,
                                   description="listed = ok + duplicate + quarantined")],
)
def manifest(context: dg.AssetExecutionContext, object_store: ObjectStore, ingest: IngestSettings,
             metrics: MetricsResource):
    """One row per slice of the wave's raw objects: checksums, patient split, status and reason.

    Every object is decoded once here (a broken or duplicate slice can only be found by decoding);
    the 256 px pixels are staged per shard for the `slices` asset. A new wave gets as many shards
    as the shard partitions have (MRI_ASSETS_SHARDS) and records that count in its layout.

    Only a complete landing is read (its `_READY` marker and listing); each object's bytes must
    still have the sha256 the landing recorded, else it is quarantined as changed since landing.
    A slice already `ok` in an earlier wave is a `duplicate` of that wave's slice.
    """
    wave = context.partition_key
    n_shards = N_SHARDS
    started = time.perf_counter()
    try:
        settings = ingest.manifest_settings(n_shards)
        decode = DecodeSettings(wave=wave, n_shards=n_shards, window=ingest.window(),
                                modalities=ingest.modalities(), max_slices=ingest.max_slices())
        workers = ingest.workers()
        sources = list_raw_sources(object_store, wave)
    except (LandingError, ValueError) as error:
        raise dg.Failure(description=str(error), allow_retries=False) from None
    context.log.info(f"wave {wave}: {len(sources)} landed objects under {raw_prefix(wave)}")
    unlisted = unlanded_objects(object_store, wave, sources, context.log.warning)
    earlier_manifests = [(w, str(object_store.local_path(manifest_key(w))))
                         for w in earlier_waves(context.instance, wave)
                         if object_store.exists(manifest_key(w))]
    with object_store.scratch_dir() as scratch_dir:
        with Progress(f"manifest {wave}: decoding", "objects", len(sources),
                      log=context.log.info) as shown:
            rows, staged = decode_wave(sources, decode, Path(scratch_dir) / "spill", workers,
                                       shown.advance)
        earlier = earlier_ok_slices(earlier_manifests, rows["pixel_sha256"])
        frame = finish_manifest(rows, settings, earlier).with_columns(
            pl.lit(wave).alias("wave"),
            pl.col("source_key").map_elements(object_store.uri, return_dtype=pl.String)
            .alias("source_uri"),
        )
        staged_count = _stage_shards(object_store, wave, staged, n_shards)
        write_wave_layout(object_store, WaveLayout(wave, n_shards))
    check = reconcile([s.key for s in sources], frame)
    counts = _summary_table(frame, "status")
    push_figures(metrics, "manifest", {"wave": wave}, manifest_gauges(
        wave, frame.height - counts.get("quarantined", 0), counts.get("quarantined", 0)))
    yield dg.Output(frame, metadata={
        **manifest_metadata(frame, earlier, time.perf_counter() - started),
        "objects_listed": len(sources), "staged_slices": staged_count,
        "earlier_waves_checked": dg.MetadataValue.json([w for w, _ in earlier_manifests]),
        "unlanded_objects_left_out": len(unlisted), "shards": n_shards,
        "store_path": stored_at(object_store, manifest_key(wave)),
        "salt": "development salt: set MRI_ASSETS_SALT" if ingest.uses_dev_salt() else "secret",
    })
    yield dg.AssetCheckResult(check_name=RECONCILE_CHECK, passed=check.passed, metadata={
        "listed_objects": check.listed_objects, "rows": check.rows, "ok": check.ok,
        "duplicate": check.duplicate, "quarantined": check.quarantined,
        "detail": check.describe()})


def manifest_metadata(frame: pl.DataFrame, earlier: pl.DataFrame, seconds: float) -> dict:
    """The manifest's counts by status, split, format and quarantine reason, and its speed."""
    counts = _summary_table(frame, "status")
    reasons = (frame.filter(pl.col("status") == "quarantined")
               .group_by("reason").len().sort("len", descending=True).head(20))
    return {
        "slices": frame.height,
        "ok": counts.get("ok", 0),
        "duplicate": counts.get("duplicate", 0),
        "quarantined": counts.get("quarantined", 0),
        "duplicates_of_earlier_waves": frame.filter(
            (pl.col("status") == "duplicate")
            & pl.col("duplicate_of").is_in(earlier["image_id"].implode())).height,
        "splits": dg.MetadataValue.json(_summary_table(frame.filter(pl.col("status") == "ok"), "split")),
        "formats": dg.MetadataValue.json(_summary_table(frame, "format")),
        "quarantine_reasons": dg.MetadataValue.md(_markdown_table(reasons)),
        "seconds": round(seconds, 2),
        "slices_per_s": round(frame.height / max(seconds, 1e-9), 1),
        "dagster/row_count": frame.height,
    }


@dg.asset(
    partitions_def=wave_shard_partitions,
    group_name="ingest",
    kinds={"numpy"},
    automation_condition=EAGER,
)
@each_shard
def slices(context: dg.AssetExecutionContext, manifest: pl.LazyFrame, object_store: ObjectStore,
           ingest: IngestSettings) -> dg.Output[dict]:
    """The shard's `ok` slices, 256 px uint8, lossless, in a memmap-able `.npy` with an index.

    The `.npy` is the one the `manifest` step's workers wrote: this step checks the manifest's
    `slice_row`s against it, verifies the crc32 of every indexed row, writes the shard index
    (image_id order, each with its row) and links the file into place (a hard link locally, a
    server-side copy on S3). Rows whose bytes no longer match their crc32 (a flipped byte in the
    staged or published file, which are one file locally) are decoded again from the raw objects
    into a new file that replaces both; re-materializing a corrupt shard therefore repairs it.
    """
    wave, shard = wave_and_shard(context)
    n_shards = wave_shard_count(object_store, wave)
    if shard >= n_shards:
        raise dg.Failure(f"wave {wave} was written with {n_shards} shards (its layout); shard "
                         f"{shard:02d} holds nothing: MRI_ASSETS_SHARDS is larger than the wave's")
    started = time.perf_counter()
    wanted = manifest_shard_rows(manifest, shard)
    staged_key = staged_pixels_key(wave, shard)
    n_bytes = object_store.size(staged_key)
    n_rows = staged_rows(n_bytes, SLICE_SIZE)
    index = shard_index(wanted, n_rows)
    npy_key, index_key = slice_keys(wave, shard)
    bad = corrupt_rows(_row_reader(object_store, staged_key), index, SLICE_SIZE)
    if bad.height:
        context.log.warning(
            f"wave {wave} shard {shard:02d}: {bad.height} slices in {object_store.uri(staged_key)} "
            f"(published as {npy_key}) no longer match their crc32 (first: "
            f"{bad['image_id'].head(5).to_list()} at rows {bad['row'].head(5).to_list()}); "
            "decoding them again from the raw objects")
        _rebuild_rows(object_store, wave, manifest, staged_key, bad, index, ingest)
    object_store.copy(staged_key, npy_key)
    with object_store.scratch_dir() as scratch_dir:
        _write_parquet(object_store, index_key, index, Path(scratch_dir))
    seconds = time.perf_counter() - started
    value = {"wave": wave, "shard": shard, "count": index.height, "npy_key": npy_key,
             "index_key": index_key}
    return dg.Output(
        value,
        metadata={
            "count": index.height,
            "bytes": n_bytes,
            "unindexed_rows": n_rows - index.height,
            "rebuilt_rows": bad.height,
            "rebuilt_image_ids": dg.MetadataValue.json(bad["image_id"].head(20).to_list()),
            "images_per_s": round(index.height / max(seconds, 1e-9), 1),
            "store_path": stored_at(object_store, npy_key),
        },
    )


def _row_reader(store: ObjectStore, key: str):
    """`read(first, count)`: the bytes of `count` slices of a staged `.npy` from row `first`."""
    slice_bytes = SLICE_SIZE * SLICE_SIZE

    def read(first: int, count: int) -> bytes:
        return store.read_range(key, HEADER_BYTES + first * slice_bytes, count * slice_bytes)

    return read


def _rebuild_rows(store: ObjectStore, wave: str, manifest: pl.LazyFrame, staged_key: str,
                  bad: pl.DataFrame, index: pl.DataFrame, ingest: IngestSettings) -> None:
    """Write a new staged `.npy` (a new file, never the damaged one in place) with the `bad` rows
    decoded again from their raw objects, check every indexed row of it, and publish it."""
    rows = (manifest
            .filter(pl.col("image_id").is_in(bad["image_id"].implode()))
            .select(REDECODE_COLUMNS).collect())
    decode = DecodeSettings(wave=wave, window=ingest.window(), modalities=ingest.modalities(),
                            max_slices=ingest.max_slices())
    slice_bytes = SLICE_SIZE * SLICE_SIZE
    advice = (f"re-materialize the wave's manifest and its shards (`mri-assets run {wave} "
              "--select manifest+`) to decode the whole wave again")
    with store.scratch_dir() as scratch_dir:
        path = Path(scratch_dir) / Path(staged_key).name
        shutil.copyfile(store.local_path(staged_key), path)
        fd = os.open(path, os.O_WRONLY)
        try:
            def write(row: int, pixels: np.ndarray) -> None:
                os.pwrite(fd, np.ascontiguousarray(pixels).tobytes(), HEADER_BYTES + row * slice_bytes)

            redecode_slices(rows, decode, lambda key, version: store.get_bytes(key, version), write)
        except RebuildError as error:
            raise dg.Failure(description=f"wave {wave}: {bad.height} corrupt slices in "
                             f"{store.uri(staged_key)} cannot be rebuilt: {error}; {advice}",
                             allow_retries=False) from None
        finally:
            os.close(fd)

        def read_local(first: int, count: int) -> bytes:
            with open(path, "rb") as handle:
                return os.pread(handle.fileno(), count * slice_bytes,
                                HEADER_BYTES + first * slice_bytes)

        still = corrupt_rows(read_local, index, SLICE_SIZE)
        if still.height:
            raise dg.Failure(description=f"wave {wave}: after rebuilding, {still.height} slices "
                             f"of {store.uri(staged_key)} still fail their crc32 (first: "
                             f"{still['image_id'].head(3).to_list()}); {advice}",
                             allow_retries=False)
        store.publish_file(staged_key, path)
