"""Partitions: ingest waves (dynamic) and wave x shard for the work that fans out.

The shard dimension is static: its size is MRI_ASSETS_SHARDS when the code location is imported
(read by the deployment edge, `deployment.shards_from_env`), because Dagster fixes an asset's
partitions when the asset is defined. It says how many shard partitions a *new* wave gets. A
wave records its own shard count in its layout (`manifests/WAVE/layout.json`, written with the
manifest) and every reader takes the count from there; so lowering MRI_ASSETS_SHARDS later hides
the upper shard partitions of older waves in the UI, but no reader loses their slices.
"""

from __future__ import annotations

import contextlib
import functools

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


# The nightly smoke's wave: a partition of `waves` like any other, but only its own job
# (`smoke_run`) materializes it; automation, the sensors and the queue leave it alone.
SMOKE_WAVE = "smoke"
# Waves that are neither checked against other waves for duplicates nor a reference for them,
# nor adopt another wave's backbone: the smoke wave must give the same results in any home.
ISOLATED_WAVES = frozenset({SMOKE_WAVE})


def earlier_waves(instance: dg.DagsterInstance, wave: str) -> list[str]:
    """The waves registered before `wave` (the order they were added in), isolated ones left out."""
    if wave in ISOLATED_WAVES:
        return []
    order = list(instance.get_dynamic_partitions(WAVES))
    before = order[: order.index(wave)] if wave in order else [w for w in order if w != wave]
    return [w for w in before if w not in ISOLATED_WAVES]


def wave_of_partition(partition_key: str) -> str:
    """The wave of a `waves` partition key ("w1") or of a wave x shard one ("03|w1")."""
    if isinstance(partition_key, dg.MultiPartitionKey):
        return partition_key.keys_by_dimension["wave"]
    if "|" in partition_key:
        return wave_shard_partitions.get_partition_key_from_str(partition_key).keys_by_dimension["wave"]
    return partition_key


def shard_range_tags(wave: str, first: int, last: int) -> dict[str, str]:
    """Run tags of one run over shards `first`..`last` of `wave` (a partition key range)."""
    return {
        "dagster/asset_partition_range_start": str(wave_shard_key(wave, first)),
        "dagster/asset_partition_range_end": str(wave_shard_key(wave, last)),
    }


class _OneShard:
    """A shard asset's context seen for one partition of a range run: `partition_key` is that
    shard's key, everything else is the run's context."""

    def __init__(self, context: dg.AssetExecutionContext, key: dg.MultiPartitionKey) -> None:
        self._context = context
        self._key = key

    @property
    def partition_key(self) -> dg.MultiPartitionKey:
        return self._key

    @property
    def has_partition_key_range(self) -> bool:
        return False

    def __getattr__(self, name: str):
        return getattr(self._context, name)


_SHARD_LISTENERS: list = []  # callables told each shard a range run has finished, in this process


@contextlib.contextmanager
def shards_done(listener):
    """Call `listener(shard_key)` each time a range run in this process (`each_shard`) finishes a
    shard, while inside: how `mri-assets run` advances its bar of shards during one range run."""
    _SHARD_LISTENERS.append(listener)
    try:
        yield
    finally:
        _SHARD_LISTENERS.remove(listener)


def each_shard(compute):
    """Let a per-shard asset run over a range of shard partitions in one step.

    A run of one shard calls `compute` as it is. A run over a range (the local profile runs a
    wave's shards in one run, `sensors.WaveAutomationSensor`) calls it once per shard, in shard
    order, with a context whose `partition_key` is that shard's; each shard's metadata goes to its
    own materialization and the output is `{partition key: value}` (`RangeFilesystemIOManager`
    stores each value where a one-shard run would). A failing shard fails the step.

    A resource with a `batched()` context (`DvcTracking`) is handed to the shards as its batch,
    so the range pays its per-call cost once (one `dvc add` and one `dvc push` for the range's
    files), when every shard has succeeded and before any is recorded."""

    @functools.wraps(compute)
    def run(context: dg.AssetExecutionContext, *args, **kwargs):
        if not context.has_partition_key_range:
            return compute(context, *args, **kwargs)
        values = {}
        with contextlib.ExitStack() as batches:
            kwargs = {name: batches.enter_context(value.batched()) if hasattr(value, "batched")
                      else value for name, value in kwargs.items()}
            for key in context.partition_keys:
                shard_key = wave_shard_partitions.get_partition_key_from_str(str(key))
                output = compute(_OneShard(context, shard_key), *args, **kwargs)
                if isinstance(output, dg.Output):
                    context.add_asset_metadata(dict(output.metadata or {}), partition_key=str(key))
                    output = output.value
                values[str(key)] = output
                for listener in _SHARD_LISTENERS:
                    listener(str(key))
        return dg.Output(values)

    return run
