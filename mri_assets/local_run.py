"""Materialize a wave in this process, stage by stage, the way the CLI and the demo do."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

from mri_assets.assets.gpu import GPU_POOL
from mri_assets.core.home import MriHome
from mri_assets.core.wave_layout import wave_shard_count
from mri_assets.partitions import WAVES, shard_partitions, wave_shard_key, wave_shard_partitions

QUIET_CONSOLE = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
REPO_DAGSTER_YAML = Path(__file__).resolve().parent.parent / "deploy" / "local" / "dagster.yaml"


def dagster_instance(home: MriHome) -> dg.DagsterInstance:
    """The persistent Dagster instance under `HOME/dagster` (DAGSTER_HOME of `make dev`), set up
    on first use. It is opened from that folder, so no process environment is changed."""
    home.ensure()
    target = home.dagster / "dagster.yaml"
    if not target.exists() and REPO_DAGSTER_YAML.exists():
        shutil.copyfile(REPO_DAGSTER_YAML, target)
    instance = dg.DagsterInstance.from_config(str(home.dagster))
    storage = instance.event_log_storage
    if storage.supports_global_concurrency_limits and GPU_POOL not in storage.get_concurrency_keys():
        storage.set_concurrency_slots(GPU_POOL, 1)
    return instance


@dataclass
class WaveRunReport:
    wave: str
    runs: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return not self.failed


def _stages(defs: dg.Definitions, selection: set[dg.AssetKey]) -> list[tuple[str, list[dg.AssetKey]]]:
    """Selected assets grouped into runs that share a partitions definition, in dependency order."""
    graph = defs.resolve_asset_graph()
    order = graph.toposorted_asset_keys
    stages: list[tuple[str, list[dg.AssetKey]]] = []
    for key in order:
        if key not in selection:
            continue
        partitions = graph.get(key).partitions_def
        kind = (
            "shard" if partitions == wave_shard_partitions
            else "wave" if partitions is not None else "none"
        )
        if stages and stages[-1][0] == kind:
            stages[-1][1].append(key)
            continue
        stages.append((kind, [key]))
    return stages


def selected_keys(graph, selection: str | None) -> set[dg.AssetKey]:
    """Asset names separated by spaces or commas; `name+` adds everything downstream of it."""
    everything = set(graph.get_all_asset_keys())
    if not selection:
        return everything
    chosen: set[dg.AssetKey] = set()
    for token in selection.replace(",", " ").split():
        key = dg.AssetKey(token.rstrip("+"))
        if key not in everything:
            names = ", ".join(sorted(k.to_user_string() for k in everything))
            raise ValueError(f"unknown asset {token!r} in --select: choose from {names}")
        chosen.add(key)
        if token.endswith("+"):
            chosen |= dg.AssetSelection.assets(key).downstream().resolve(graph)
    return chosen


def wave_shard_keys(defs: dg.Definitions, wave: str) -> list[dg.MultiPartitionKey]:
    """The shard partitions of `wave`: as many as its layout records, within the shard dimension."""
    n_shards = wave_shard_count(defs.resources["object_store"], wave)
    dimension = len(shard_partitions.get_partition_keys())
    if n_shards > dimension:
        raise ValueError(
            f"wave {wave} was written with {n_shards} shards but MRI_ASSETS_SHARDS={dimension}: "
            f"set MRI_ASSETS_SHARDS={n_shards} to materialize its shard assets")
    return [wave_shard_key(wave, shard) for shard in range(n_shards)]


def materialize_wave(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    wave: str,
    selection: str | None = None,
    on_step: Callable[[str], None] | None = None,
) -> WaveRunReport:
    """Run every selected asset of `wave`: wave assets, then each shard, then the rest."""
    if not instance.has_dynamic_partition(WAVES, wave):
        instance.add_dynamic_partitions(WAVES, [wave])
    graph = defs.resolve_asset_graph()
    chosen = selected_keys(graph, selection)
    chosen = {k for k in chosen if graph.get(k).is_materializable}
    report = WaveRunReport(wave)
    for kind, keys in _stages(defs, chosen):
        partition_keys = (
            wave_shard_keys(defs, wave)
            if kind == "shard" else [wave] if kind == "wave" else [None]
        )
        for partition_key in partition_keys:
            label = f"{','.join(k.to_user_string() for k in keys)} [{partition_key or 'all'}]"
            result = dg.materialize(
                assets=list(defs.assets or []),
                selection=keys,
                partition_key=partition_key,
                instance=instance,
                resources=defs.resources,
                raise_on_error=False,
                run_config=QUIET_CONSOLE,
            )
            report.runs.append(result.run_id)
            if not result.success:
                report.failed.append(label)
                return report
            if on_step is not None:
                on_step(label)
    return report
