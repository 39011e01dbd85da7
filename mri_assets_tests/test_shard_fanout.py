"""A wave fans out over wave x shard partitions: a corrupt shard fails and retries alone."""

from __future__ import annotations

import dagster as dg
import numpy as np
import polars as pl
import pytest

from mri_assets.assets.embeddings import embeddings_key
from mri_assets.core.home import MriHome
from mri_assets.core.sample_data import build_sample_data
from mri_assets.core.slice_shards import manifest_key, slice_keys
from mri_assets.definitions import build_defs
from mri_assets.local_run import QUIET_CONSOLE
from mri_assets.partitions import WAVES, wave_shard_key
from mri_assets.resources.landing import land_wave
from mri_assets.resources.object_store import LocalObjectStore
from mri_assets.resources.settings import IngestSettings

WAVE = "wave-fanout"
MAX_RETRIES = 2


def _materialize(defs, instance, asset: str, partition_key: str) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        assets=list(defs.assets), selection=[dg.AssetKey(asset)], partition_key=partition_key,
        instance=instance, resources=defs.resources, raise_on_error=False, run_config=QUIET_CONSOLE,
    )


def _events(instance, run_id: str, event_type: dg.DagsterEventType) -> list:
    return [record.dagster_event for record in instance.all_logs(run_id, of_type=event_type)]


def _corrupt_first_slice(store: LocalObjectStore, shard: int) -> str:
    """Invert the pixels of the shard's first slice on disk; returns that slice's image_id."""
    npy_key, index_key = slice_keys(WAVE, shard)
    pixels = np.load(store.local_path(npy_key), mmap_mode="r+")
    pixels[0] = 255 - pixels[0]
    pixels.flush()
    index = pl.read_parquet(store.local_path(index_key))
    return index.filter(pl.col("row") == 0)["image_id"].item()


@pytest.mark.timeout(400)
def test_a_corrupt_shard_fails_and_retries_alone_while_the_other_shards_materialize(mri_home, tmp_path):
    landing = tmp_path / "landing"
    build_sample_data(landing, n_slices=40, seed=0)
    store = LocalObjectStore(root=str(mri_home / "store"))
    land_wave(LocalObjectStore(root=str(landing)), "", store, WAVE, IngestSettings().salt)
    defs = build_defs("local", MriHome(mri_home))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(WAVES, [WAVE])
    assert _materialize(defs, instance, "manifest", WAVE).success

    manifest = pl.read_parquet(store.local_path(manifest_key(WAVE)))
    shards = sorted(manifest.filter(pl.col("status") == "ok")["shard"].unique().to_list())[:3]
    assert len(shards) == 3, f"sample wave filled only shards {shards}"
    for shard in shards:
        assert _materialize(defs, instance, "slices", str(wave_shard_key(WAVE, shard))).success
    good_first, bad, good_last = shards
    bad_image_id = _corrupt_first_slice(store, bad)

    results = {good_first: _materialize(defs, instance, "embeddings", str(wave_shard_key(WAVE, good_first)))}
    first_bytes = store.local_path(embeddings_key(WAVE, good_first)).read_bytes()
    for shard in (bad, good_last):
        results[shard] = _materialize(defs, instance, "embeddings", str(wave_shard_key(WAVE, shard)))

    assert results[good_first].success and results[good_last].success
    assert not results[bad].success
    failure = _events(instance, results[bad].run_id, dg.DagsterEventType.STEP_FAILURE)
    assert len(failure) == 1
    assert bad_image_id in failure[0].step_failure_data.error.to_string()
    assert len(_events(instance, results[bad].run_id, dg.DagsterEventType.STEP_UP_FOR_RETRY)) == MAX_RETRIES
    for shard in (good_first, good_last):
        assert _events(instance, results[shard].run_id, dg.DagsterEventType.STEP_UP_FOR_RETRY) == []

    records = instance.fetch_materializations(dg.AssetKey("embeddings"), limit=10).records
    assert sorted(r.partition_key for r in records) == sorted(
        str(wave_shard_key(WAVE, s)) for s in (good_first, good_last))
    assert {r.run_id for r in records} == {results[good_first].run_id, results[good_last].run_id}
    assert not store.exists(embeddings_key(WAVE, bad))
    assert store.local_path(embeddings_key(WAVE, good_first)).read_bytes() == first_bytes
