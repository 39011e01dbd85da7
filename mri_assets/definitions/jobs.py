"""Jobs: what a sensor, a schedule or a person asks Dagster to run."""

from __future__ import annotations

import dagster as dg

from mri_assets.assets.support.gpu import gpu_run_tags
from mri_assets.assets.support.partitions import wave_shard_partitions

ingest_wave_job = dg.define_asset_job(
    "ingest_wave",
    selection=dg.AssetSelection.assets("manifest", "gpu_budget"),
    description="Build a wave's manifest and check its GPU budget in one run; its shards follow "
    "by automation.",
)

ACTIVE_LEARNING_JOB = "active_learning"

active_learning_job = dg.define_asset_job(
    ACTIVE_LEARNING_JOB,
    selection=dg.AssetSelection.assets("labeling_queue"),
    description="Queue a wave's most informative slices for the clinicians (requested on ARI drift).",
)

drift_check_job = dg.define_asset_job(
    "drift_check",
    selection=dg.AssetSelection.assets("clusters"),
    description="Re-cluster a wave with the current labels; the drift sensor reads the result.",
)

LABEL_REFRESH_JOB = "label_refresh"

label_refresh_job = dg.define_asset_job(
    LABEL_REFRESH_JOB,
    selection=dg.AssetSelection.assets("expert_labels", "clusters"),
    description="Snapshot new labels and re-score the wave's clusters with them.",
)

RETRAIN_JOB = "retrain"

retrain_job = dg.define_asset_job(
    RETRAIN_JOB,
    selection=dg.AssetSelection.assets("expert_labels", "pseudo_labels", "classifier"),
    tags=gpu_run_tags(),
    description="Snapshot labels, promote safe pseudo-labels, retrain the classifier.",
)

embed_wave_job = dg.define_asset_job(
    "embed_wave",
    selection=dg.AssetSelection.assets("embeddings"),
    tags=gpu_run_tags(),
    description="Embed a wave's shards on the GPU pool; run monitoring stops a run past its "
    "`dagster/max_runtime`. `gpu_budget`'s blocking check must pass first.",
)

# What `mri-assets run` launches: each stage of a wave (`local_run.materialize_wave`) is a run of
# one of these, subset to the stage's assets and partition, so it is a run of the code location
# that the UI can re-execute (`location_runs`). One job per partitions definition of the graph.
STAGE_JOBS = {"wave": "wave_assets", "shard": "wave_shard_assets"}
_STAGE_DESCRIPTIONS = {
    "wave": "Any of a wave's assets partitioned by wave: `mri-assets run` runs its wave stages "
    "as subsets of this job (re-execute them here).",
    "shard": "Any of a wave's shard assets (wave x shard): `mri-assets run` runs each shard as a "
    "subset of this job (re-execute them here).",
}


def stage_kind(partitions_def: dg.PartitionsDefinition | None) -> str:
    """"shard" (wave x shard), "wave" (any other partitions) or "none" (unpartitioned)."""
    if partitions_def == wave_shard_partitions:
        return "shard"
    return "wave" if partitions_def is not None else "none"


def stage_jobs(assets) -> list:
    """The stage jobs of `assets`: every materializable asset, grouped by `stage_kind`."""
    keys: dict[str, list[dg.AssetKey]] = {kind: [] for kind in STAGE_JOBS}
    for definition in assets:
        if isinstance(definition, dg.AssetsDefinition) and definition.is_materializable:
            kind = stage_kind(definition.partitions_def)
            if kind in keys:
                keys[kind].extend(definition.keys)
    return [
        dg.define_asset_job(STAGE_JOBS[kind], selection=dg.AssetSelection.assets(*chosen),
                            description=_STAGE_DESCRIPTIONS[kind])
        for kind, chosen in keys.items() if chosen
    ]
