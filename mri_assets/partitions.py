"""Partitions: ingest waves (dynamic) and wave x shard for the work that fans out."""

from __future__ import annotations

import os

import dagster as dg

WAVES = "waves"
N_SHARDS = int(os.environ.get("MRI_ASSETS_SHARDS", "16"))

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
