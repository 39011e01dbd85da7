"""`WaveStore`: every file of a wave, read and written through one object over the object store.

Keys come from `core.wave_keys` (the layout table of docs/internals.md); this class adds the
store: typed readers and writers, a wave's objects with their sizes, and the landed waves. It
works the same on the local folder and on S3 (`ObjectStore` is the one interface). The writers
serialise exactly as the assets do, so what they write is byte for byte what the assets wrote.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from mri_assets.core import wave_keys as keys
from mri_assets.core.clustering import PcaModel
from mri_assets.core.wave_layout import WaveLayout, wave_layout, write_wave_layout
from mri_assets.resources.object_store import ObjectInfo, ObjectStore

BACKBONE_RECORD_FORMAT = "mri_assets.backbone_record/1"


def backbone_record(wave: str, fields: dict) -> dict:
    """The `backbone` asset's decision for `wave`, as it is stored (`models/backbone/WAVE.json`)."""
    return {"format": BACKBONE_RECORD_FORMAT, "wave": wave, **fields}


def splits_of(manifest: pl.DataFrame, image_ids: list[str]) -> np.ndarray:
    """The split of each of `image_ids` in `manifest` (its `image_id`, `split`, `status`
    columns), `train` for an id with no `ok` row."""
    ok = manifest.filter(pl.col("status") == "ok").select("image_id", "split")
    lookup = dict(ok.iter_rows())
    return np.array([lookup.get(i, "train") for i in image_ids])


@dataclass(frozen=True)
class WaveEmbeddings:
    """A handle on a wave's embedding shards: their ids and model id read, the vectors read
    shard by shard when asked (`shards()`), or all at once (`matrix()`)."""

    wave: str
    paths: tuple[Path, ...]
    ids: list[str]
    model_id: str

    def shards(self) -> Iterator[np.ndarray]:
        """The float16 vectors of each shard, in shard order."""
        from mri_assets.core.embed import read_embeddings  # core.embed brings torch

        for path in self.paths:
            yield read_embeddings(path)[1]

    def matrix(self) -> np.ndarray:
        return np.concatenate(list(self.shards()))


class WaveStore:
    """A wave's files in one object store (`WaveStore(object_store)`)."""

    keys = keys  # the key builders, for callers that hand a key on (metadata, DVC)

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    # What a wave holds ---------------------------------------------------------------------

    def objects(self, wave: str) -> list[ObjectInfo]:
        """Every object of `wave` in the layout, with its size, sorted by key."""
        found: dict[str, ObjectInfo] = {}
        for prefix in keys.wave_prefixes(wave):
            for info in self.store.list(prefix):
                if keys.wave_of_key(info.key) == wave:
                    found[info.key] = info
        return [found[key] for key in sorted(found)]

    def bytes_by_wave(self, waves: list[str] | set[str]) -> dict[str, int]:
        """Bytes kept per wave of `waves`; every other object (DVC cache, MLflow artifacts, a wave
        not in `waves`) counts under ""."""
        return keys.bytes_by_wave(((info.key, info.size) for info in self.store.list("")), waves)

    def landed_waves(self) -> list[str]:
        """Waves whose landing area holds a `raw/WAVE/_READY` marker (names not validated: the
        caller refuses, in words, a folder no partition can carry)."""
        return sorted(keys.wave_of_key(info.key) or "" for info in self.store.list(keys.RAW_ROOT)
                      if keys.is_landing_marker(info.key))

    # Manifest and layout -------------------------------------------------------------------

    def has_manifest(self, wave: str) -> bool:
        return self.store.exists(keys.manifest_key(wave))

    def put_manifest(self, wave: str, frame: pl.DataFrame) -> str:
        """Write the wave's manifest (zstd, with statistics: readers filter by shard and status)."""
        key = keys.manifest_key(wave)
        with self.store.scratch_dir() as scratch:
            path = Path(scratch) / "manifest.parquet"
            frame.write_parquet(path, compression="zstd", statistics=True)
            self.store.put_file(key, path)
        return key

    def manifest(self, wave: str, columns: list[str] | None = None) -> pl.DataFrame:
        return pl.read_parquet(io.BytesIO(self.store.get_bytes(keys.manifest_key(wave))),
                               columns=columns)

    def splits(self, wave: str, image_ids: list[str]) -> np.ndarray:
        """The split of each of `image_ids` (`train` for an id the manifest has no `ok` row of)."""
        return splits_of(self.manifest(wave, ["image_id", "split", "status"]), image_ids)

    def manifest_path(self, wave: str) -> Path:
        """A local path of the manifest (the store's file, or the download cache of S3)."""
        return self.store.local_path(keys.manifest_key(wave))

    def layout(self, wave: str) -> WaveLayout:
        return wave_layout(self.store, wave)

    def shard_count(self, wave: str) -> int:
        return self.layout(wave).n_shards

    def put_layout(self, layout: WaveLayout) -> str:
        return write_wave_layout(self.store, layout)

    # Shards --------------------------------------------------------------------------------

    def slice_paths(self, wave: str, shard: int) -> tuple[Path, Path]:
        """Local paths of the shard's slices (`.npy`, index `.parquet`)."""
        npy_key, index_key = keys.slice_keys(wave, shard)
        return self.store.local_path(npy_key), self.store.local_path(index_key)

    def slice_index(self, wave: str, shard: int, columns: list[str] | None = None) -> pl.DataFrame:
        return pl.read_parquet(self.store.local_path(keys.slice_keys(wave, shard)[1]),
                               columns=columns)

    def embeddings_path(self, wave: str, shard: int) -> Path:
        return self.store.local_path(keys.embeddings_key(wave, shard))

    def embeddings(self, wave: str, shard: int) -> pa.Table:
        """The shard's embeddings (`image_id`, `embedding`; schema metadata `model_id`, `dim`)."""
        with pa.memory_map(str(self.embeddings_path(wave, shard))) as source:
            return pa.ipc.open_file(source).read_all()

    def wave_embeddings(self, wave: str) -> WaveEmbeddings:
        """The wave's embedding shards, those its layout records (whatever MRI_ASSETS_SHARDS is
        now), with their ids and the one model id they share (refused when they mix models)."""
        from mri_assets.core.embed import read_embedding_ids  # core.embed brings torch

        paths = tuple(self.embeddings_path(wave, shard) for shard in range(self.shard_count(wave)))
        ids: list[str] = []
        model_ids: set[str] = set()
        for path in paths:
            shard_ids, meta = read_embedding_ids(path)
            ids.extend(shard_ids)
            model_ids.add(meta["model_id"])
        if len(model_ids) > 1:
            raise ValueError(
                f"wave {wave} mixes embeddings of several models {sorted(model_ids)}: "
                "re-materialize its embeddings with one model"
            )
        return WaveEmbeddings(wave, paths, ids, model_ids.pop() if model_ids else "none")

    def put_embeddings(self, wave: str, shard: int, path: Path) -> str:
        key = keys.embeddings_key(wave, shard)
        self.store.put_file(key, path)
        return key

    # Models and results --------------------------------------------------------------------

    def backbone_record(self, wave: str) -> dict | None:
        """The `backbone` asset's decision for the wave, or None when it never ran for it."""
        key = keys.backbone_record_key(wave)
        return json.loads(self.store.get_bytes(key)) if self.store.exists(key) else None

    def put_backbone_record(self, wave: str, record: dict) -> dict:
        record = backbone_record(wave, record)
        self.store.put_bytes(keys.backbone_record_key(wave),
                             json.dumps(record, sort_keys=True, indent=1).encode())
        return record

    def backbone(self, wave: str) -> bytes:
        """The self-supervised backbone trained on the wave (a `mri_assets.backbone/1` file)."""
        return self.store.get_bytes(keys.backbone_key(wave))

    def put_backbone(self, wave: str, data: bytes) -> str:
        key = keys.backbone_key(wave)
        self.store.put_bytes(key, data)
        return key

    def pca(self, wave: str) -> PcaModel:
        return PcaModel.from_bytes(self.store.get_bytes(keys.pca_key(wave)))

    def put_pca(self, wave: str, pca: PcaModel) -> bytes:
        data = pca.to_bytes()
        self.store.put_bytes(keys.pca_key(wave), data)
        return data

    def clusters(self, wave: str) -> pl.DataFrame:
        return pl.read_parquet(io.BytesIO(self.store.get_bytes(keys.clusters_key(wave))))

    def put_clusters(self, wave: str, frame: pl.DataFrame) -> str:
        buffer = io.BytesIO()
        frame.write_parquet(buffer)
        key = keys.clusters_key(wave)
        self.store.put_bytes(key, buffer.getvalue())
        return key

    def has_checkpoint(self, wave: str) -> bool:
        return self.store.exists(keys.checkpoint_key(wave))

    def checkpoint(self, wave: str) -> bytes:
        """The wave's classifier checkpoint."""
        return self.store.get_bytes(keys.checkpoint_key(wave))

    def put_checkpoint(self, wave: str, data: bytes) -> str:
        key = keys.checkpoint_key(wave)
        self.store.put_bytes(key, data)
        return key

    def baseline(self, wave: str) -> dict:
        return json.loads(self.store.get_bytes(keys.baseline_key(wave)))

    def put_baseline(self, wave: str, report: dict) -> str:
        key = keys.baseline_key(wave)
        self.store.put_bytes(key, json.dumps(report, default=float).encode())
        return key

    def truth(self, wave: str) -> pl.DataFrame:
        """The wave's ground truth kept in the store (`relative_path`, `slice_index`, `label`)."""
        return pl.read_csv(io.BytesIO(self.store.get_bytes(keys.truth_key(wave))),
                           schema_overrides={"label": pl.String})

    def put_truth(self, wave: str, data: bytes) -> str:
        key = keys.truth_key(wave)
        self.store.put_bytes(key, data)
        return key

    # Landing -------------------------------------------------------------------------------

    def landing_marker(self, wave: str) -> dict | None:
        """The wave's `_READY` marker, or None before its landing completed."""
        key = keys.landing_marker_key(wave)
        return json.loads(self.store.get_bytes(key)) if self.store.exists(key) else None

    def landing_listing(self, wave: str) -> pl.DataFrame:
        return pl.read_parquet(io.BytesIO(self.store.get_bytes(keys.landing_listing_key(wave))))
