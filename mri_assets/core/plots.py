"""PNG figures for asset metadata and MLflow (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from mri_assets.core.clustering import labeled_mask

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# matplotlib is imported when a figure is drawn: the asset modules import this module, and every
# Dagster run worker imports them all, most runs drawing nothing.

MAX_PLOT_POINTS = 20_000
UNLABELED = "unlabeled"


def figure_png(figure: Figure) -> bytes:
    """The figure, laid out tight, as PNG bytes."""
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _subsample(n: int, max_points: int, seed: int) -> np.ndarray:
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))


def projection_png(
    coords_2d: np.ndarray,
    cluster_labels: Sequence | np.ndarray,
    class_labels: Sequence | np.ndarray | None,
    title: str,
    max_points: int = MAX_PLOT_POINTS,
    seed: int = 0,
) -> bytes:
    """Two scatter panels of a 2-D projection: coloured by cluster, and by class label.

    `class_labels` has one entry per point, None (or "") where a slice is unlabeled; with no
    labels at all the second panel says so. At most `max_points` points (seeded subsample).
    """
    coords = np.asarray(coords_2d, dtype=np.float32)
    clusters = np.asarray(cluster_labels)
    if coords.ndim != 2 or coords.shape[1] < 1:
        raise ValueError(f"coords_2d must have shape (n, 2), got {coords.shape}")
    if coords.shape[1] == 1:
        coords = np.column_stack([coords[:, 0], np.zeros(len(coords), dtype=np.float32)])
    if len(clusters) != len(coords):
        raise ValueError(f"{len(clusters)} cluster labels for {len(coords)} points")
    if class_labels is not None and len(class_labels) != len(coords):
        raise ValueError(f"{len(class_labels)} class labels for {len(coords)} points")
    index = _subsample(len(coords), max_points, seed)
    x, y = coords[index, 0], coords[index, 1]

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 5), dpi=90)
    FigureCanvasAgg(figure)
    by_cluster, by_label = figure.subplots(1, 2)
    for value in np.unique(clusters[index]):
        chosen = clusters[index] == value
        by_cluster.scatter(x[chosen], y[chosen], s=3, alpha=0.6, label=f"cluster {value}")
    by_cluster.set_title("by cluster")
    by_cluster.legend(markerscale=4, fontsize=8, loc="upper right")

    all_labels = None if class_labels is None else np.asarray(class_labels)
    if all_labels is None or not labeled_mask(all_labels).any():
        by_label.scatter(x, y, s=3, alpha=0.3, color="lightgray")
        by_label.set_title("by label: no labeled slices")
    else:
        labels = all_labels[index]
        mask = labeled_mask(labels)
        by_label.scatter(x[~mask], y[~mask], s=2, alpha=0.2, color="lightgray", label=UNLABELED)
        names = labels[mask].astype(str)
        for name in np.unique(names):
            chosen = names == name
            by_label.scatter(x[mask][chosen], y[mask][chosen], s=5, alpha=0.8, label=name)
        by_label.set_title(f"by label ({int(mask.sum())} labeled of {len(labels)} shown)")
        by_label.legend(markerscale=4, fontsize=8, loc="upper right")
    for axis in (by_cluster, by_label):
        axis.set_xlabel("PC 1")
        axis.set_ylabel("PC 2")
    figure.suptitle(title)
    return figure_png(figure)


def confusion_png(matrix: np.ndarray, class_names: Sequence[str], title: str) -> bytes:
    """A confusion matrix (rows = truth, columns = prediction) with counts in the cells."""
    matrix = np.asarray(matrix)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5, 4.8), dpi=100)
    FigureCanvasAgg(figure)
    axis = figure.subplots()
    axis.imshow(matrix, cmap="Blues")
    ticks = np.arange(len(class_names))
    axis.set_xticks(ticks, labels=list(class_names), rotation=30, ha="right", fontsize=8)
    axis.set_yticks(ticks, labels=list(class_names), fontsize=8)
    for (row, column), value in np.ndenumerate(matrix):
        axis.text(column, row, str(int(value)), ha="center", va="center", fontsize=9,
                  color="white" if value > matrix.max() / 2 else "black")
    axis.set_xlabel("predicted")
    axis.set_ylabel("expert label (holdout)")
    axis.set_title(title)
    return figure_png(figure)
