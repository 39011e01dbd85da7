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

Also: the GPU estimate for a 100,000-slice pilot at the GPU profiles' 256 px input, from the FLOPs
torch's counter measures for one training view (`core.pretrain.view_training_flops`) times the
views of the default schedule, at an assumed sustained 50 TFLOP/s (`--gpu-tflops`): about 15 %
of an H100/H200's dense bf16 peak, what small convolutional nets reach in practice.

    .venv/bin/python benchmarks/active_learning.py             # last line: JSON
    .venv/bin/python benchmarks/active_learning.py --seeds 3 --backbone /tmp/ssl.pt
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
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
from mri_assets.core.precision import cpu_has_native_bf16
from mri_assets.core.pretrain import (
    IndexedSlices,
    plan_pretraining,
    pretrain_backbone,
)
from mri_assets.core.sample_data import CLASSES
from mri_assets.core.sample_slices import decoded_sample

INPUT_SIZE = 128
BUDGETS = tuple(range(50, 501, 50))
DEFAULT_PNG = Path(__file__).resolve().parent.parent / "test-artifacts" / "active_learning.png"


def embed(backbone: Backbone, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """float16 embeddings as the `embeddings` asset makes them (bf16 autocast where native)."""
    backbone.eval()
    precision = torch.bfloat16 if cpu_has_native_bf16() else None
    parts = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16,
                                                enabled=precision is not None):
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


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=2000)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--backbone", type=Path, default=None,
                        help="a saved mri_assets.backbone/1 file (skips pretraining)")
    parser.add_argument("--save-backbone", type=Path, default=None)
    parser.add_argument("--png", type=Path, default=DEFAULT_PNG)
    parser.add_argument("--gpu-tflops", type=float, default=50.0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="mri-al-bench-") as scratch:
        started = time.perf_counter()
        sample = decoded_sample(Path(scratch) / "pilot", args.slices, seed=0, wave_style="t1")
        print(f"pilot: {len(sample)} slices decoded in {time.perf_counter() - started:.0f} s", flush=True)
    truth = sample.labels
    holdout = sample.patient_split(0.25, seed=0)

    config = PretrainSettings().config()  # the `backbone` asset's defaults
    pretrain_seconds = pretrain_cpu_minutes = None
    if args.backbone is not None:
        checkpoint = args.backbone.read_bytes()
    else:
        training = IndexedSlices(sample.images[~holdout])
        result = pretrain_backbone(training, config, "cpu", input_size=INPUT_SIZE,
                                   progress=lambda e: print(f"  pretrain {e}", flush=True))
        checkpoint = result.checkpoint
        pretrain_seconds, pretrain_cpu_minutes = result.seconds, result.cpu_seconds / 60
        print(f"pretraining: {result.steps} steps in {result.seconds:.0f} s "
              f"({pretrain_cpu_minutes:.1f} CPU min), {result.model_id}", flush=True)
        if args.save_backbone is not None:
            args.save_backbone.write_bytes(checkpoint)
    default = build_backbone(checkpoint=checkpoint, input_size=INPUT_SIZE)
    random_init = build_backbone(seed=0, input_size=INPUT_SIZE)

    started = time.perf_counter()
    x_default = embed(default, sample.images)
    x_random = embed(random_init, sample.images)
    print(f"embedded twice in {time.perf_counter() - started:.0f} s", flush=True)
    ari_default, coords, clusters = ari_k4(x_default, truth)
    ari_random, _, _ = ari_k4(x_random, truth)
    print(f"ARI k=4: default {ari_default:.3f}, random init {ari_random:.3f}", flush=True)

    f1_default_250 = random_probe_f1(x_default, truth, holdout, 250, args.seeds)
    f1_random_init_500 = random_probe_f1(x_random, truth, holdout, 500, args.seeds)
    print(f"probe: default @250 {f1_default_250:.3f}, random init @500 {f1_random_init_500:.3f}",
          flush=True)

    started = time.perf_counter()
    curves = [
        run_strategy(strategy, x_default.astype(np.float32), coords, clusters, truth, holdout,
                     BUDGETS, seed, len(CLASSES))
        for seed in range(args.seeds) for strategy in STRATEGIES
    ]
    means = mean_curves(curves)
    for strategy, (mean, _) in means.items():
        print(f"  {strategy:16s} " + " ".join(f"{v:.3f}" for v in mean), flush=True)
    print(f"curves in {time.perf_counter() - started:.0f} s", flush=True)
    at = {b: i for i, b in enumerate(BUDGETS)}
    target = float(means["random"][0][at[500]])
    needed = labels_to_reach(BUDGETS, means["model_entropy"][0], target)
    args.png.parent.mkdir(parents=True, exist_ok=True)
    args.png.write_bytes(curves_png(
        BUDGETS, curves, f"pilot {len(sample)} slices, {args.seeds} seeds, holdout {int(holdout.sum())}",
        reference=target))

    gpu_config = config
    gpu_plan = plan_pretraining(100_000, gpu_config, input_size=256)
    figures = {
        "labels_to_match_random_500": round(needed, 1) if needed is not None else None,
        "ratio_vs_random": round(500 / needed, 3) if needed else None,
        "f1_at_200_random": round(float(means["random"][0][at[200]]), 4),
        "f1_at_200_cluster_entropy": round(float(means["cluster_entropy"][0][at[200]]), 4),
        "f1_at_200_model_entropy": round(float(means["model_entropy"][0][at[200]]), 4),
        "f1_at_500_random": round(target, 4),
        "f1_at_500_cluster_entropy": round(float(means["cluster_entropy"][0][at[500]]), 4),
        "f1_at_500_model_entropy": round(float(means["model_entropy"][0][at[500]]), 4),
        "model_entropy_shortfall_at_500": round(target - float(means["model_entropy"][0][at[500]]), 4),
        "ari_k4_pilot_default": round(ari_default, 4),
        "ari_k4_pilot_random_init": round(ari_random, 4),
        "f1_probe_default_250": round(f1_default_250, 4),
        "f1_probe_random_init_500": round(f1_random_init_500, 4),
        "default_model_id": default.model_id,
        "pretrain_seconds": round(pretrain_seconds, 1) if pretrain_seconds is not None else None,
        "pretrain_cpu_minutes": round(pretrain_cpu_minutes, 2) if pretrain_cpu_minutes is not None else None,
        "gpu_100k_pretrain_tflop": round(gpu_plan.total_flops / 1e12, 1),
        "gpu_100k_pretrain_minutes_est": round(gpu_plan.seconds_at(args.gpu_tflops * 1e12) / 60, 1),
        "seeds": args.seeds,
        "holdout_slices": int(holdout.sum()),
        "png": str(args.png),
    }
    return figures


if __name__ == "__main__":
    print(json.dumps(main()))
