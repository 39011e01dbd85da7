"""Ground truth of the sample data joined to a wave's manifest: image_id -> label."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from mri_assets.core.wave_keys import raw_prefix


def ground_truth_for_wave(labels_csv: Path, manifest: pl.DataFrame, wave: str) -> pl.DataFrame:
    """`image_id`, `label` for every manifest slice that `labels.csv` labels.

    `labels.csv` gives `relative_path` below the sample folder; landed objects live at
    `raw/WAVE/relative_path`, so the two join on that key and `slice_index`.
    """
    truth = pl.read_csv(labels_csv, schema_overrides={"slice_index": pl.Int32}).with_columns(
        (pl.lit(raw_prefix(wave)) + pl.col("relative_path")).alias("source_key")
    )
    return (
        manifest.select("image_id", "source_key", "slice_index")
        .join(truth.select("source_key", "slice_index", "label"), on=["source_key", "slice_index"])
        .select("image_id", "label")
        .unique("image_id", keep="first", maintain_order=True)
    )
