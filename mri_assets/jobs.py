"""Jobs: what a sensor, a schedule or a person asks Dagster to run."""

from __future__ import annotations

import dagster as dg

from mri_assets.partitions import wave_partitions

ingest_wave_job = dg.define_asset_job(
    "ingest_wave",
    selection=dg.AssetSelection.assets("manifest"),
    partitions_def=wave_partitions,
    description="Build a wave's manifest; its shards follow by automation.",
)
