"""Active-learning curve: holdout macro-F1 against expert labels, per selection strategy.

On the demo's pilot (`build_sample_data`, 2,000 T1 slices, seed 0, decoded as the ingest step
decodes them), in this process:

1. the default backbone: self-supervised pretraining (`core.pretrain`, the `backbone` asset's
   defaults) on the pilot's non-holdout slices at the local 128 px input, timed (wall and CPU);
   `--backbone FILE` reuses a saved one instead;
2. the pilot embedded by it and by the seeded random-init ResNet-18 (the old default): ARI of
   k-means at k = 4 (the pipeline's PCA 90 % + KMeans, `core.clustering.cluster_wave`) against
   the ground truth of every slice: `ari_k4_pilot_default`, `ari_k4_pilot_random_init`;
3. the linear probe (the classifier's stage 1 on cached embeddings) with random labels:
   `f1_probe_default_250` vs `f1_probe_random_init_500` (half the labels on the new features
   against all of them on the old);
4. learning curves on the default backbone's embeddings (`core.learning_curve.run_strategy`):
   labels 50 -> 500 in batches of 50 for `random`, `cluster_entropy` (+ diversity) and
   `model_entropy` (+ diversity), `--seeds` seeds each; a quarter of the patients are the
   holdout. The baseline is random selection in the same run: `labels_to_match_random_500` is
   the number of labels model-entropy + diversity needs (mean over seeds, interpolated) to reach
   random selection's mean macro-F1 at 500, and `ratio_vs_random` = 500 / that number.
   `model_entropy` starts, as the `labeling_queue` asset does, with a patient-stratified random
   batch (no classifier can score the wave before its first labels);
5. the first batch alone: 200 labels chosen at once by plain random, by the queue's first-batch
   rule (patient-stratified random, `core.selection.stratified_random_batch`) and by the old one
   (cluster entropy + diversity), the probe's holdout macro-F1 on each (`f1_first_batch_200_*`);
6. the same curves on the harder task the sample carries (`labels.csv` column `level`, 25
   anatomical levels, `core.sample_data.LEVEL_CLASSES`): `f1_at_500_random_hard` (headroom: it
   should stay below 0.9) and `labels_to_match_random_500_hard` (model entropy + diversity,
   goal <= 250); drawn in a second PNG (`*_hard.png`).

The embeddings come from one function, `pilot_embeddings`; `--seeded` skips pretraining and
uses the seeded random-init weights for both (seconds instead of minutes, for development: the
figures then describe those weights, not the default backbone).

Also: the GPU estimate for a 100,000-slice pilot at the GPU profiles' 256 px input, from the FLOPs
torch's counter measures for one training view (`core.pretrain.view_training_flops`) times the
views of the default schedule, at an assumed sustained 50 TFLOP/s (`--gpu-tflops`): about 15 %
of an H100/H200's dense bf16 peak, what small convolutional nets reach in practice.

    .venv/bin/python benchmarks/active_learning.py             # last line: JSON
    .venv/bin/python benchmarks/active_learning.py --seeds 3 --backbone /tmp/ssl.pt
    .venv/bin/python benchmarks/active_learning.py --seeds 2 --seeded   # development only
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mri_assets.assets.backbone import PretrainSettings
from mri_assets.core.backbone import Backbone, build_backbone
from mri_assets.core.clustering import cluster_scores, cluster_wave
from mri_assets.core.learning_curve import (
    STRATEGIES,
    curves_png,
    fit_probe,
    labels_to_reach,
    mean_curves,
    probe_macro_f1,
    run_strategy,
)
from mri_assets.core.precision import resolve_precision
from mri_assets.core.pretrain import (
    IndexedSlices,
    plan_pretraining,
    pretrain_backbone,
)
from mri_assets.core.sample_data import CLASSES, LEVEL_CLASSES
from mri_assets.core.sample_slices import SampleSlices, decoded_sample
from mri_assets.core.selection import (
    queue_uncertainty,
    select_for_labeling,
    series_of,
    stratified_random_batch,
)

INPUT_SIZE = 128
BUDGETS = tuple(range(50, 501, 50))
DEFAULT_PNG = Path(__file__).resolve().parent.parent / "test-artifacts" / "active_learning.png"
FIRST_BATCH = 200
FIRST_BATCH_RULES = ("random", "stratified", "cluster_entropy")


def embed(backbone: Backbone, images: np.ndarray, precision: str = "auto",
          batch: int = 256) -> np.ndarray:
    """float16 embeddings as the `embeddings` asset makes them at `precision` (auto: bf16
    autocast where the CPU has native bf16). The fp32 path embeds in fp32 too, as a CPU without
    bf16 does: its clustering can differ from the same model's bf16 embeddings."""
    backbone.eval()
    bf16 = resolve_precision("cpu", precision) == "bf16"
    parts = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for start in range(0, len(images), batch):
            pixels = torch.from_numpy(np.ascontiguousarray(images[start : start + batch])[:, None])
            parts.append(backbone(pixels).float())
    return torch.cat(parts).numpy().astype(np.float16)


def ari_k4(embeddings: np.ndarray, truth: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """ARI at k = 4 of the pipeline's clustering (k = 2, 3, 4 fitted in turn, as `clusters` does),
    with its PCA coordinates and k = 4 labels."""
    result = cluster_wave(lambda: iter([embeddings]), (2, 3, 4), seed=0)
    coords = result.pca.transform(embeddings)
    return float(cluster_scores(truth, result.labels[4])["ari"]), coords, result.labels[4]


def random_probe_f1(x: np.ndarray, y: np.ndarray, holdout: np.ndarray, n: int, seeds: int) -> float:
    pool = np.flatnonzero(~holdout)
    scores = []
    for seed in range(seeds):
        rows = np.random.default_rng([seed, 3]).permutation(pool)[:n]
        probe = fit_probe(x[rows], y[rows], len(CLASSES), seed)
        scores.append(probe_macro_f1(probe, x[holdout], y[holdout], len(CLASSES)))
    return float(np.mean(scores))


@dataclass(frozen=True)
class PilotEmbeddings:
    """The pilot embedded by the backbone under test (`default`) and by the seeded random-init
    ResNet-18 (`random_init`), float16, in sample order; how the default was obtained."""

    default: np.ndarray
    random_init: np.ndarray
    model_id: str
    pretrain_seconds: float | None
    pretrain_cpu_minutes: float | None


def default_config(precision: str, overrides: dict | None = None):
    """The `backbone` asset's default schedule for this CPU at `precision` (auto|fp32|bf16),
    with `--set` overrides (`pretrain.schedule_overrides`)."""
    from dataclasses import replace

    from mri_assets.core.pretrain_schedule import budget_kind

    resolved = resolve_precision("cpu", precision, purpose="training")
    return replace(PretrainSettings().config(budget_kind("cpu", resolved)), precision=resolved,
                   **(overrides or {}))


def pilot_embeddings(sample: SampleSlices, holdout: np.ndarray, args: argparse.Namespace
                     ) -> PilotEmbeddings:
    """Pretrain the default backbone on the pilot's non-holdout slices (or load `--backbone`,
    or take the seeded weights with `--seeded`) and embed the pilot with it and the seeded
    random-init weights. The one place the benchmark makes features."""
    random_init = build_backbone(seed=0, input_size=INPUT_SIZE)
    seconds = cpu_minutes = None
    if args.seeded:
        default = random_init
    else:
        if args.backbone is not None:
            checkpoint = args.backbone.read_bytes()
        else:
            config = default_config(args.precision, args.overrides)  # defaults + --set
            training = IndexedSlices(sample.images[~holdout])
            result = pretrain_backbone(
                training, config, "cpu", input_size=INPUT_SIZE,
                progress=lambda e: print(f"  pretrain {e}", flush=True) if e["step"] % 20 == 0 else None)
            checkpoint = result.checkpoint
            seconds, cpu_minutes = result.seconds, result.cpu_seconds / 60
            print(f"pretraining: {result.steps} steps in {result.seconds:.0f} s "
                  f"({cpu_minutes:.1f} CPU min), {result.model_id}", flush=True)
            if args.save_backbone is not None:
                args.save_backbone.write_bytes(checkpoint)
        default = build_backbone(checkpoint=checkpoint, input_size=INPUT_SIZE)
    started = time.perf_counter()
    x_default = embed(default, sample.images, args.precision)
    x_random = x_default if args.seeded else embed(random_init, sample.images, args.precision)
    print(f"embedded in {time.perf_counter() - started:.0f} s", flush=True)
    return PilotEmbeddings(x_default, x_random, default.model_id, seconds, cpu_minutes)


def first_batch_f1(rule: str, x: np.ndarray, coords: np.ndarray, clusters: np.ndarray,
                   y: np.ndarray, holdout: np.ndarray, patients: np.ndarray, series: np.ndarray,
                   n_classes: int, seed: int, n: int = FIRST_BATCH) -> float:
    """Holdout macro-F1 of the probe on one first batch of `n` labels chosen by `rule`."""
    if rule == "random":
        rows = np.random.default_rng([seed, 3]).permutation(np.flatnonzero(~holdout))[:n]
    elif rule == "stratified":
        rows = stratified_random_batch(patients, series, n, seed, holdout=holdout).indices
    elif rule == "cluster_entropy":
        entropy = queue_uncertainty(coords, clusters).entropy
        rows = select_for_labeling(entropy, coords, clusters, n, seed, holdout=holdout).indices
    else:
        raise ValueError(f"unknown first-batch rule {rule!r}: choose from {FIRST_BATCH_RULES}")
    probe = fit_probe(x[rows], y[rows], n_classes, seed)
    return probe_macro_f1(probe, x[holdout], y[holdout], n_classes)


def learning_curves(task: str, x: np.ndarray, coords: np.ndarray, clusters: np.ndarray,
                    y: np.ndarray, holdout: np.ndarray, patients: np.ndarray, series: np.ndarray,
                    n_classes: int, seeds: int, png: Path) -> dict:
    """Every strategy's curve over `seeds`, the first-batch comparison and the PNG; figures
    named with the task's suffix ("" for the four orientation classes, "_hard" for levels)."""
    started = time.perf_counter()
    curves = [
        run_strategy(strategy, x, coords, clusters, y, holdout, BUDGETS, seed, n_classes,
                     patients=patients, series=series)
        for seed in range(seeds) for strategy in STRATEGIES
    ]
    means = mean_curves(curves)
    for strategy, (mean, _) in means.items():
        print(f"  {task:5s} {strategy:16s} " + " ".join(f"{v:.3f}" for v in mean), flush=True)
    first = {rule: float(np.mean([first_batch_f1(rule, x, coords, clusters, y, holdout, patients,
                                                 series, n_classes, seed)
                                  for seed in range(seeds)]))
             for rule in FIRST_BATCH_RULES}
    print(f"  {task:5s} first batch of {FIRST_BATCH}: "
          + ", ".join(f"{rule} {f1:.3f}" for rule, f1 in first.items()), flush=True)
    print(f"curves ({task}) in {time.perf_counter() - started:.0f} s", flush=True)
    at = {b: i for i, b in enumerate(BUDGETS)}
    target = float(means["random"][0][at[500]])
    needed = labels_to_reach(BUDGETS, means["model_entropy"][0], target)
    png.parent.mkdir(parents=True, exist_ok=True)
    png.write_bytes(curves_png(
        BUDGETS, curves, f"pilot {len(y)} slices, {n_classes} classes ({task}), {seeds} seeds, "
        f"holdout {int(holdout.sum())}", reference=target))
    suffix = "" if task == "orientation" else "_hard"
    figures = {
        f"labels_to_match_random_500{suffix}": round(needed, 1) if needed is not None else None,
        f"ratio_vs_random{suffix}": round(500 / needed, 3) if needed else None,
    }
    for budget in (200, 500):
        for strategy in STRATEGIES:
            figures[f"f1_at_{budget}_{strategy}{suffix}"] = round(
                float(means[strategy][0][at[budget]]), 4)
    figures[f"model_entropy_shortfall_at_500{suffix}"] = round(
        target - float(means["model_entropy"][0][at[500]]), 4)
    for rule, f1 in first.items():
        figures[f"f1_first_batch_{FIRST_BATCH}_{rule}{suffix}"] = round(f1, 4)
    figures[f"png{suffix}"] = str(png)
    return figures


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=2000)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--backbone", type=Path, default=None,
                        help="a saved mri_assets.backbone/1 file (skips pretraining)")
    parser.add_argument("--seeded", action="store_true",
                        help="no pretraining: the seeded random-init weights (development)")
    parser.add_argument("--save-backbone", type=Path, default=None)
    parser.add_argument("--png", type=Path, default=DEFAULT_PNG)
    parser.add_argument("--gpu-tflops", type=float, default=50.0)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="pretraining and embedding precision (fp32: the path of CPUs without native bf16)")
    parser.add_argument("--ari-seeds", type=int, default=3,
                        help="pretraining seeds for ari_k4_pilot_min_over_seeds (0: skip)")
    parser.add_argument("--budgets", default="60,120,240",
                        help="step budgets for ari_k4_by_budget (one seed each; empty: skip)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a PretrainConfig field for every pretraining here, as in "
                        "benchmarks/pretrain.py, e.g. --set drop_nearest_negatives=8")
    args = parser.parse_args()
    from pretrain import schedule_overrides

    args.overrides = schedule_overrides(args.set)

    with tempfile.TemporaryDirectory(prefix="mri-al-bench-") as scratch:
        started = time.perf_counter()
        sample = decoded_sample(Path(scratch) / "pilot", args.slices, seed=0, wave_style="t1",
                                levels=True)
        print(f"pilot: {len(sample)} slices decoded in {time.perf_counter() - started:.0f} s", flush=True)
    truth = sample.labels
    holdout = sample.patient_split(0.25, seed=0)
    series = series_of([key.rsplit("#", 1)[0] for key in sample.keys])

    embedded = pilot_embeddings(sample, holdout, args)
    x_default, x_random = embedded.default, embedded.random_init
    ari_default, coords, clusters = ari_k4(x_default, truth)
    ari_random, _, _ = ari_k4(x_random, truth)
    print(f"ARI k=4: default {ari_default:.3f}, random init {ari_random:.3f}", flush=True)

    f1_default_250 = random_probe_f1(x_default, truth, holdout, 250, args.seeds)
    f1_random_init_500 = random_probe_f1(x_random, truth, holdout, 500, args.seeds)
    print(f"probe: default @250 {f1_default_250:.3f}, random init @500 {f1_random_init_500:.3f}",
          flush=True)

    x = x_default.astype(np.float32)
    orientation = learning_curves("orientation", x, coords, clusters, truth, holdout,
                                  sample.patients, series, len(CLASSES), args.seeds, args.png)
    hard_png = args.png.with_name(f"{args.png.stem}_hard{args.png.suffix}")
    hard = learning_curves("level", x, coords, clusters, sample.levels, holdout,
                           sample.patients, series, len(LEVEL_CLASSES), args.seeds, hard_png)

    budget_figures = {}
    if not args.seeded and (args.ari_seeds or args.budgets):
        from pretrain import ari_by_budget

        config = default_config(args.precision, args.overrides)
        default_steps = config.steps
        if args.ari_seeds:
            budget_figures.update(ari_by_budget(sample, holdout, config, [default_steps],
                                                args.ari_seeds, default_steps))
        budgets = [int(b) for b in args.budgets.split(",") if b]
        if budgets:
            table = ari_by_budget(sample, holdout, config, budgets, 1, default_steps)
            budget_figures["ari_k4_by_budget"] = table["ari_k4_by_budget"]
            budget_figures["seconds_by_budget"] = table["seconds_by_budget"]
    gpu_plan = plan_pretraining(100_000, PretrainSettings().config("gpu"), input_size=256)
    figures = {
        **budget_figures,
        **orientation,
        **hard,
        "ari_k4_pilot_default": round(ari_default, 4),
        "ari_k4_pilot_random_init": round(ari_random, 4),
        "f1_probe_default_250": round(f1_default_250, 4),
        "f1_probe_random_init_500": round(f1_random_init_500, 4),
        "default_model_id": embedded.model_id,
        "pretrain_seconds": round(embedded.pretrain_seconds, 1)
        if embedded.pretrain_seconds is not None else None,
        "pretrain_cpu_minutes": round(embedded.pretrain_cpu_minutes, 2)
        if embedded.pretrain_cpu_minutes is not None else None,
        "gpu_100k_pretrain_tflop": round(gpu_plan.total_flops / 1e12, 1),
        "gpu_100k_pretrain_minutes_est": round(gpu_plan.seconds_at(args.gpu_tflops * 1e12) / 60, 1),
        "seeds": args.seeds,
        "holdout_slices": int(holdout.sum()),
        "level_classes": len(LEVEL_CLASSES),
    }
    return figures


if __name__ == "__main__":
    print(json.dumps(main()))
