"""Ground truth of the sample data joined to a wave's manifest: image_id -> label."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from mri_assets.core.wave_keys import raw_prefix


def read_sample_labels(labels_csv: Path, column: str = "label") -> pl.DataFrame:
    """`relative_path`, `slice_index`, `label` of `labels.csv`, the label taken from `column`:
    `label` (the four orientation classes) or `level` (the harder anatomical levels, written by
    `mri-assets sample-data --levels`)."""
    truth = pl.read_csv(labels_csv, schema_overrides={"slice_index": pl.Int32})
    if column not in truth.columns or column in ("relative_path", "slice_index"):
        kept = [c for c in truth.columns if c not in ("relative_path", "slice_index")]
        hint = " (write it with `mri-assets sample-data --levels`)" if column == "level" else ""
        raise ValueError(f"{labels_csv} has no class column {column!r}{hint}; it has {kept}")
    return truth.select("relative_path", "slice_index", pl.col(column).alias("label"))


def ground_truth_for_wave(labels_csv: Path, manifest: pl.DataFrame, wave: str,
                          column: str = "label") -> pl.DataFrame:
    """`image_id`, `label` for every manifest slice that `labels.csv` labels (class set `column`,
    see `read_sample_labels`).

    `labels.csv` gives `relative_path` below the sample folder; landed objects live at
    `raw/WAVE/relative_path`, so the two join on that key and `slice_index`.
    """
    truth = read_sample_labels(labels_csv, column).with_columns(
        (pl.lit(raw_prefix(wave)) + pl.col("relative_path")).alias("source_key")
    )
    return (
        manifest.select("image_id", "source_key", "slice_index")
        .join(truth.select("source_key", "slice_index", "label"), on=["source_key", "slice_index"])
        .select("image_id", "label")
        .unique("image_id", keep="first", maintain_order=True)
    )
