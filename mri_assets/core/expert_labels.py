"""Expert labels as the rest of the pipeline uses them: one label per slice."""

from __future__ import annotations

import polars as pl


def expert_label_per_image(snapshot: pl.DataFrame) -> pl.DataFrame:
    """The first expert read of each slice (`image_id`, `label`, `annotator`, `queue_kind`).

    QA re-reads measure agreement; they never replace the first read here.
    """
    if snapshot.height == 0:
        return pl.DataFrame(
            schema={"image_id": pl.String, "label": pl.String, "annotator": pl.String,
                    "queue_kind": pl.String}
        )
    return (
        snapshot.filter(pl.col("kind") == "expert")
        .sort("label_id")
        .unique("image_id", keep="first", maintain_order=True)
        .select("image_id", "label", "annotator", "queue_kind")
    )


def align_labels(image_ids: list[str], labels: pl.DataFrame) -> list[str | None]:
    """One entry per image id, None where the slice has no expert label."""
    lookup = dict(zip(labels["image_id"].to_list(), labels["label"].to_list()))
    return [lookup.get(image_id) for image_id in image_ids]


def label_counts_by_wave(snapshot: pl.DataFrame) -> dict[str, int]:
    """How many labels (expert and QA) each wave has: the labels sensor's run key."""
    if snapshot.height == 0:
        return {}
    return {str(w): int(n) for w, n in snapshot.group_by("wave").len().iter_rows()}
