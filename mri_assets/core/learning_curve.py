"""Active-learning curves: holdout macro-F1 against the number of expert labels, per strategy.

A simulated clinician labels the slices a strategy picks, `batch` at a time, from the labelled
pool (the truth is known for every slice of the sample, so a pick is labelled at once). After
each batch a linear probe — the classifier's stage 1,
`core.training.loops.train_head_on_embeddings`, on the cached embeddings — is fitted on the
labels so far and scored on a fixed holdout (whole patients, never picked). Strategies:

- `random`: a seeded random order of the pool;
- `cluster_entropy`: entropy of the k-means soft assignment (`CLUSTER_ENTROPY`) + k-center
  diversity and cluster balance (`core.selection.select_for_labeling`), every batch;
- `model_entropy`: the queue's rule. The first batch is patient-stratified random
  (`stratified_random_batch`, what `labeling_queue` builds before a classifier can score the
  wave), then the probe's predictive entropy (`MODEL_ENTROPY`) + the same diversity and balance.
  `patients` and `series` (one per slice) stratify the first batch; without them every slice is
  its own patient (plain random).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mri_assets.core.selection import (
    queue_uncertainty,
    select_for_labeling,
    stratified_random_batch,
)
from mri_assets.core.training.loops import train_head_on_embeddings
from mri_assets.core.training.metrics import eval_result_from_predictions

STRATEGIES = ("random", "cluster_entropy", "model_entropy")


@dataclass(frozen=True)
class Probe:
    weight: np.ndarray  # (n_classes, dim)
    bias: np.ndarray

    def probs(self, x: np.ndarray) -> np.ndarray:
        logits = np.asarray(x, dtype=np.float64) @ self.weight.T + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        np.exp(logits, out=logits)
        return logits / logits.sum(axis=1, keepdims=True)


def fit_probe(x: np.ndarray, y: np.ndarray, n_classes: int, seed: int, epochs: int = 50) -> Probe:
    """The stage-1 head (standardised features, AdamW, folded back) on `x`, `y`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(x.shape[1], n_classes)
    train_head_on_embeddings(head, x, y, epochs=epochs, seed=seed)
    return Probe(head.weight.detach().double().numpy(), head.bias.detach().double().numpy())


def probe_macro_f1(probe: Probe, x: np.ndarray, y: np.ndarray, n_classes: int) -> float:
    predicted = probe.probs(x).argmax(axis=1)
    return eval_result_from_predictions(y, predicted, [str(c) for c in range(n_classes)]).macro_f1


@dataclass(frozen=True)
class Curve:
    strategy: str
    seed: int
    budgets: tuple[int, ...]
    macro_f1: tuple[float, ...]
    picked: np.ndarray  # pool rows in pick order


def run_strategy(
    strategy: str,
    embeddings: np.ndarray,
    coords_pca: np.ndarray,
    clusters: np.ndarray,
    labels: np.ndarray,
    holdout: np.ndarray,
    budgets: Sequence[int],
    seed: int,
    n_classes: int,
    batch: int = 50,
    probe_epochs: int = 50,
    patients: np.ndarray | None = None,
    series: np.ndarray | None = None,
) -> Curve:
    """Label `batch` slices at a time by `strategy` until the largest budget; the holdout
    macro-F1 of a probe fitted on the labels so far at each budget (a multiple of `batch`)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}: choose from {list(STRATEGIES)}")
    budgets = tuple(int(b) for b in budgets)
    if any(b % batch or b <= 0 for b in budgets) or list(budgets) != sorted(set(budgets)):
        raise ValueError(f"budgets must be increasing multiples of batch={batch}, got {budgets}")
    holdout = np.asarray(holdout, dtype=bool)
    pool = np.flatnonzero(~holdout)
    if budgets[-1] > len(pool):
        raise ValueError(f"the largest budget {budgets[-1]} exceeds the {len(pool)} pool slices")
    x_eval, y_eval = embeddings[holdout], labels[holdout]
    order = np.random.default_rng([seed, 3]).permutation(pool)
    cluster_uncertainty = queue_uncertainty(coords_pca, clusters)
    patients = np.arange(len(labels)) if patients is None else np.asarray(patients)
    series = patients if series is None else np.asarray(series)
    labeled = np.zeros(len(labels), dtype=bool)
    picked: list[int] = []
    scores: list[float] = []
    probe: Probe | None = None
    while len(picked) < budgets[-1]:
        if strategy == "random":
            chosen = order[len(picked) : len(picked) + batch]
        elif strategy == "model_entropy" and probe is None:
            chosen = stratified_random_batch(patients, series, batch, seed, exclude=labeled,
                                             holdout=holdout).indices
        else:
            uncertainty = cluster_uncertainty
            if strategy == "model_entropy" and probe is not None:
                uncertainty = queue_uncertainty(coords_pca, clusters, probe.probs(embeddings))
            chosen = select_for_labeling(uncertainty.entropy, coords_pca, clusters, batch,
                                         seed + len(picked), exclude=labeled,
                                         holdout=holdout).indices
            if len(chosen) < batch:  # near-duplicates or too few left: fill at random
                taken = set(chosen.tolist())
                rest = [i for i in order if not labeled[i] and i not in taken]
                chosen = np.concatenate([chosen, rest[: batch - len(chosen)]]).astype(np.int64)
        labeled[chosen] = True
        picked.extend(int(i) for i in chosen)
        rows = np.asarray(picked)
        probe = fit_probe(embeddings[rows], labels[rows], n_classes, seed, probe_epochs)
        if len(picked) in budgets:
            scores.append(probe_macro_f1(probe, x_eval, y_eval, n_classes))
    return Curve(strategy, seed, budgets, tuple(scores), np.asarray(picked))


def labels_to_reach(budgets: Sequence[int], mean_f1: Sequence[float], target: float) -> float | None:
    """The fewest labels at which the (linearly interpolated) mean curve reaches `target`;
    None when it never does within the budgets."""
    b = np.asarray(budgets, dtype=np.float64)
    f = np.asarray(mean_f1, dtype=np.float64)
    above = np.flatnonzero(f >= target)
    if above.size == 0:
        return None
    first = int(above[0])
    if first == 0:
        return float(b[0])
    lo, hi = f[first - 1], f[first]
    return float(b[first - 1] + (target - lo) / (hi - lo) * (b[first] - b[first - 1]))


def mean_curves(curves: Sequence[Curve]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """strategy -> (mean, std) of macro-F1 over seeds, per budget."""
    out = {}
    for strategy in STRATEGIES:
        rows = np.array([c.macro_f1 for c in curves if c.strategy == strategy])
        if len(rows):
            out[strategy] = (rows.mean(axis=0), rows.std(axis=0))
    return out


def curves_png(budgets: Sequence[int], curves: Sequence[Curve], title: str,
               reference: float | None = None) -> bytes:
    """Mean ± std macro-F1 against labels, one line per strategy; `reference` as a dashed line."""
    from matplotlib.figure import Figure

    from mri_assets.core.plots import figure_png

    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot(1, 1, 1)
    for strategy, (mean, std) in mean_curves(curves).items():
        axes.plot(budgets, mean, marker="o", label=strategy.replace("_", " "))
        axes.fill_between(budgets, mean - std, mean + std, alpha=0.15)
    if reference is not None:
        axes.axhline(reference, linestyle="--", color="grey", linewidth=1,
                     label="random selection at the largest budget")
    axes.set_xlabel("expert labels")
    axes.set_ylabel("holdout macro-F1 (linear probe)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    return figure_png(figure)
