"""Jobs: what a sensor, a schedule or a person asks Dagster to run."""

from __future__ import annotations

import dagster as dg

from mri_assets.assets.gpu import gpu_run_tags
from mri_assets.partitions import wave_partitions, wave_shard_partitions

ingest_wave_job = dg.define_asset_job(
    "ingest_wave",
    selection=dg.AssetSelection.assets("manifest"),
    partitions_def=wave_partitions,
    description="Build a wave's manifest; its shards follow by automation.",
)

ACTIVE_LEARNING_JOB = "active_learning"

active_learning_job = dg.define_asset_job(
    ACTIVE_LEARNING_JOB,
    selection=dg.AssetSelection.assets("labeling_queue"),
    partitions_def=wave_partitions,
    description="Queue a wave's most informative slices for the clinicians (requested on ARI drift).",
)

drift_check_job = dg.define_asset_job(
    "drift_check",
    selection=dg.AssetSelection.assets("clusters"),
    partitions_def=wave_partitions,
    description="Re-cluster a wave with the current labels; the drift sensor reads the result.",
)

LABEL_REFRESH_JOB = "label_refresh"

label_refresh_job = dg.define_asset_job(
    LABEL_REFRESH_JOB,
    selection=dg.AssetSelection.assets("expert_labels", "clusters"),
    partitions_def=wave_partitions,
    description="Snapshot new labels and re-score the wave's clusters with them.",
)

RETRAIN_JOB = "retrain"

retrain_job = dg.define_asset_job(
    RETRAIN_JOB,
    selection=dg.AssetSelection.assets("expert_labels", "pseudo_labels", "classifier"),
    partitions_def=wave_partitions,
    tags=gpu_run_tags(),
    description="Snapshot labels, promote safe pseudo-labels, retrain the classifier.",
)

embed_wave_job = dg.define_asset_job(
    "embed_wave",
    selection=dg.AssetSelection.assets("embeddings"),
    partitions_def=wave_shard_partitions,
    tags=gpu_run_tags(),
    description="Embed a wave's shards on the GPU pool; run monitoring stops a run past its "
    "`dagster/max_runtime`. `gpu_budget`'s blocking check must pass first.",
)
