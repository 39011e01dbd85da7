"""Partitions: ingest waves (dynamic) and wave x shard for the work that fans out.

The shard dimension is static: its size is MRI_ASSETS_SHARDS when the code location is imported
(read by the deployment edge, `deployment.shards_from_env`), because Dagster fixes an asset's
partitions when the asset is defined. It says how many shard partitions a *new* wave gets. A
wave records its own shard count in its layout (`manifests/WAVE/layout.json`, written with the
manifest) and every reader takes the count from there; so lowering MRI_ASSETS_SHARDS later hides
the upper shard partitions of older waves in the UI, but no reader loses their slices.
"""

from __future__ import annotations

import dagster as dg

from mri_assets.deployment import shards_from_env

WAVES = "waves"
N_SHARDS = shards_from_env()  # the size of the shard dimension, not of any particular wave

wave_partitions = dg.DynamicPartitionsDefinition(name=WAVES)
shard_partitions = dg.StaticPartitionsDefinition([f"{i:02d}" for i in range(N_SHARDS)])
wave_shard_partitions = dg.MultiPartitionsDefinition(
    {"shard": shard_partitions, "wave": wave_partitions}
)


def wave_shard_key(wave: str, shard: int | str) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({"wave": wave, "shard": f"{int(shard):02d}"})


def wave_and_shard(context: dg.AssetExecutionContext) -> tuple[str, int]:
    keys = context.partition_key.keys_by_dimension
    return keys["wave"], int(keys["shard"])
