"""The IO manager over the `WaveStore`: an asset's value is stored where the layout puts it, once,
and handed to the assets downstream as an input.

| asset | stored as (docs/internals.md) | an input receives |
| --- | --- | --- |
| `manifest` | `manifests/WAVE/manifest.parquet` | a `pl.DataFrame`, or a `pl.LazyFrame` (a scan of the file) where the input is annotated so; `columns` in the input's metadata reads only those |
| `backbone` | `models/backbone/WAVE.json` (the record) | the record (`dict`) |
| `pca_model` | `models/pca/WAVE.npz` | the `PcaModel` |
| `clusters` | `clusters/WAVE/clusters.parquet` | a `pl.DataFrame` |
| `embeddings` | nothing more: the shard's step wrote its `.arrow` (and DVC tracked it) | a `WaveEmbeddings` handle on every shard of the wave |

An input whose metadata sets `missing_ok` receives None where the value was never stored (the
first labeling queue, before the wave has clusters); any other missing value is an error that
names the asset, the wave and the key. Values of other assets (the slices' and embeddings'
shard records, the labels snapshots, the classifier's summary) are not in the layout and stay
with the run storage's IO manager (`io_manager`).
"""

from __future__ import annotations

import dagster as dg
import polars as pl

from mri_assets.resources.wave_store import WaveStore

WAVE_IO_MANAGER = "wave_io_manager"
STORED = ("manifest", "backbone", "pca_model", "clusters")
HANDLES = ("embeddings",)
MISSING_OK = "missing_ok"


def _wave_of(partition_keys) -> str:
    waves = {key.keys_by_dimension["wave"] if isinstance(key, dg.MultiPartitionKey) else str(key)
             for key in partition_keys}
    if len(waves) != 1:
        raise dg.Failure(f"one wave per value, got partitions of {sorted(waves)}")
    return waves.pop()


class WaveStoreIOManager(dg.IOManager):
    """Stores and loads the values of the layout's assets in one `WaveStore`."""

    def __init__(self, waves: WaveStore) -> None:
        self.waves = waves

    def handle_output(self, context: dg.OutputContext, obj) -> None:
        name = context.asset_key.path[-1]
        if name in HANDLES:
            return  # the step wrote the shard's file itself; its record says where
        wave = _wave_of(context.asset_partition_keys)
        if name == "manifest":
            self.waves.put_manifest(wave, obj)
        elif name == "backbone":
            self.waves.put_backbone_record(wave, obj)
        elif name == "pca_model":
            self.waves.put_pca(wave, obj)
        elif name == "clusters":
            self.waves.put_clusters(wave, obj)
        else:
            raise dg.Failure(f"{WAVE_IO_MANAGER} stores {', '.join(STORED + HANDLES)}, not {name}")

    def load_input(self, context: dg.InputContext):
        name = context.asset_key.path[-1]
        wave = _wave_of(context.asset_partition_keys)
        metadata = context.definition_metadata or {}
        if not self._exists(name, wave):
            if metadata.get(MISSING_OK):
                return None
            raise dg.Failure(f"{name} of wave {wave} is not stored yet: materialize it first "
                             f"(`mri-assets run {wave} --select {name}`)")
        if name == "manifest":
            columns = metadata.get("columns")
            if context.dagster_type.typing_type is pl.LazyFrame:
                scan = pl.scan_parquet(self.waves.manifest_path(wave))
                return scan.select(columns) if columns else scan
            return self.waves.manifest(wave, columns)
        if name == "backbone":
            return self.waves.backbone_record(wave)
        if name == "pca_model":
            return self.waves.pca(wave)
        if name == "clusters":
            return self.waves.clusters(wave)
        if name == "embeddings":
            return self.waves.wave_embeddings(wave)
        raise dg.Failure(f"{WAVE_IO_MANAGER} loads {', '.join(STORED + HANDLES)}, not {name}")

    def _exists(self, name: str, wave: str) -> bool:
        keys = self.waves.keys
        key = {"manifest": keys.manifest_key, "backbone": keys.backbone_record_key,
               "pca_model": keys.pca_key, "clusters": keys.clusters_key,
               "embeddings": keys.layout_key}.get(name)
        return key is None or self.waves.store.exists(key(wave))


@dg.io_manager(required_resource_keys={"object_store"},
               description="stores manifest, backbone record, PCA and clusters where the "
                           "wave layout puts them (resources/wave_io.py)")
def wave_io_manager(init_context) -> WaveStoreIOManager:
    return WaveStoreIOManager(WaveStore(init_context.resources.object_store))

