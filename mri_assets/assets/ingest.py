"""Ingestion: the wave's manifest (checksums, splits, quarantine) and its 256 px slice shards."""


import time
from pathlib import Path

import dagster as dg
import polars as pl

from mri_assets.assets.monitoring import manifest_gauges, push_figures
from mri_assets.core.ingest import (
    SLICE_SIZE,
    DecodeSettings,
    SourceObject,
    StagedSlices,
    decode_wave,
)
from mri_assets.core.manifest import READY_MARKER, finish_manifest, raw_prefix, reconcile
from mri_assets.core.slice_shards import (
    manifest_key,
    manifest_shard_rows,
    shard_index,
    slice_keys,
    staged_pixels_key,
    staged_rows,
    staging_prefix,
)
from mri_assets.core.wave_layout import WaveLayout, wave_shard_count, write_wave_layout
from mri_assets.partitions import N_SHARDS, wave_and_shard, wave_partitions, wave_shard_partitions
from mri_assets.resources.metrics import MetricsResource
from mri_assets.resources.object_store import LocalObjectStore, ObjectStore
from mri_assets.resources.settings import IngestSettings

RECONCILE_CHECK = "counts_reconcile"


def list_raw_sources(store: ObjectStore, wave: str) -> list[SourceObject]:
    """The wave's raw objects, each pinned to the version read (where the store versions)."""
    infos = [
        info
        for info in store.list(raw_prefix(wave))
        if Path(info.key).name != READY_MARKER
    ]
    if isinstance(store, LocalObjectStore):
        return [SourceObject(info.key, None, path=str(store.local_path(info.key)), size=info.size)
                for info in infos]
    sources = []
    for info in infos:
        data, version = store.get_versioned(info.key)
        sources.append(SourceObject(info.key, version, data=data))
    return sources


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
    check_specs=[dg.AssetCheckSpec(RECONCILE_CHECK, asset="manifest", blocking=True,
                                   description="listed = ok + duplicate + quarantined")],
)
def manifest(context: dg.AssetExecutionContext, object_store: ObjectStore, ingest: IngestSettings,
             metrics: MetricsResource):
    """One row per slice of the wave's raw objects: checksums, patient split, status and reason.

    Every object is decoded once here (a broken or duplicate slice can only be found by decoding);
    the 256 px pixels are staged per shard for the `slices` asset. A new wave gets as many shards
    as the shard partitions have (MRI_ASSETS_SHARDS) and records that count in its layout.
    """
    wave = context.partition_key
    n_shards = N_SHARDS
    started = time.perf_counter()
    sources = list_raw_sources(object_store, wave)
    context.log.info(f"wave {wave}: {len(sources)} raw objects listed under {raw_prefix(wave)}")
    settings = ingest.manifest_settings(n_shards)
    decode = DecodeSettings(wave=wave, n_shards=n_shards, window=ingest.window())
    done = {"objects": 0}

    def log_progress(n: int) -> None:
        done["objects"] += n
        if done["objects"] % 200 < n or done["objects"] == len(sources):
            context.log.info(f"decoded {done['objects']}/{len(sources)} objects")

    with object_store.scratch_dir() as scratch_dir:
        scratch = Path(scratch_dir)
        rows, staged = decode_wave(sources, decode, scratch / "spill", ingest.workers(), log_progress)
        frame = finish_manifest(rows, settings).with_columns(
            pl.lit(wave).alias("wave"),
            pl.col("source_key").map_elements(object_store.uri, return_dtype=pl.String)
            .alias("source_uri"),
        )
        _write_parquet(object_store, manifest_key(wave), frame, scratch)
        staged_count = _stage_shards(object_store, wave, staged, n_shards)
        write_wave_layout(object_store, WaveLayout(wave, n_shards))
    seconds = time.perf_counter() - started
    check = reconcile([s.key for s in sources], frame)
    counts = _summary_table(frame, "status")
    reasons = (
        frame.filter(pl.col("status") == "quarantined")
        .group_by("reason").len().sort("len", descending=True).head(20)
    )
    push_figures(metrics, "manifest", {"wave": wave}, manifest_gauges(
        wave, frame.height - counts.get("quarantined", 0), counts.get("quarantined", 0)))
    yield dg.Output(
        frame,
        metadata={
            "objects_listed": len(sources),
            "slices": frame.height,
            "ok": counts.get("ok", 0),
            "duplicate": counts.get("duplicate", 0),
            "quarantined": counts.get("quarantined", 0),
            "staged_slices": staged_count,
            "shards": n_shards,
            "splits": dg.MetadataValue.json(_summary_table(frame.filter(pl.col("status") == "ok"), "split")),
            "formats": dg.MetadataValue.json(_summary_table(frame, "format")),
            "quarantine_reasons": dg.MetadataValue.md(_markdown_table(reasons)),
            "seconds": round(seconds, 2),
            "slices_per_s": round(frame.height / max(seconds, 1e-9), 1),
            "store_path": object_store.uri(manifest_key(wave)),
            "salt": "development salt: set MRI_ASSETS_SALT" if ingest.uses_dev_salt() else "secret",
            "dagster/row_count": frame.height,
        },
    )
    yield dg.AssetCheckResult(
        check_name=RECONCILE_CHECK,
        passed=check.passed,
        metadata={
            "listed_objects": check.listed_objects,
            "rows": check.rows,
            "ok": check.ok,
            "duplicate": check.duplicate,
            "quarantined": check.quarantined,
            "detail": check.describe(),
        },
    )


@dg.asset(
    partitions_def=wave_shard_partitions,
    deps=[manifest],
    group_name="ingest",
    kinds={"numpy"},
    automation_condition=dg.AutomationCondition.eager(),
)
def slices(context: dg.AssetExecutionContext, object_store: ObjectStore) -> dg.Output[dict]:
    """The shard's `ok` slices, 256 px uint8, lossless, in a memmap-able `.npy` with an index.

    The `.npy` is the one the `manifest` step's workers wrote: this step checks the manifest's
    `slice_row`s against it, writes the shard index (image_id order, each with its row) and links
    the file into place (a hard link locally, a server-side copy on S3).
    """
    wave, shard = wave_and_shard(context)
    n_shards = wave_shard_count(object_store, wave)
    if shard >= n_shards:
        raise dg.Failure(f"wave {wave} was written with {n_shards} shards (its layout); shard "
                         f"{shard:02d} holds nothing: MRI_ASSETS_SHARDS is larger than the wave's")
    started = time.perf_counter()
    wanted = manifest_shard_rows(object_store.local_path(manifest_key(wave)), shard)
    staged_key = staged_pixels_key(wave, shard)
    n_bytes = object_store.size(staged_key)
    n_rows = staged_rows(n_bytes, SLICE_SIZE)
    index = shard_index(wanted, n_rows)
    npy_key, index_key = slice_keys(wave, shard)
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
            "images_per_s": round(index.height / max(seconds, 1e-9), 1),
            "store_path": object_store.uri(npy_key),
        },
    )
