"""Benchmark: self-supervised pretraining, its speed against the CPU's peak and its quality
against its step budget.

On the demo's pilot (`decoded_sample`, 2,000 T1 slices, seed 0, decoded as the ingest step
decodes them; a quarter of the patients held out as the `backbone` asset leaves out the
holdout split), in this process:

1. **Speed.** A few optimiser steps of the default schedule, timed after a warm-up step, with
   the views in `channels_last` (ours) and then in the contiguous NCHW layout (the baseline):
   `achieved_gflops` (the schedule's FLOPs per step, torch's FLOP counter, over the measured
   step time), `peak_gflops` (`core.cpu_peak`: cores x clock x FLOP/cycle of the instruction
   set), `share_of_peak`, and `ratio_vs_nchw`.
2. **Quality against the budget.** For each `--budgets` step count (and each `--seeds` seed),
   the `backbone` asset's default schedule with that many steps, then the pilot embedded and
   clustered as the pipeline does (PCA 90 % + KMeans, `benchmarks/active_learning.ari_k4`):
   `ari_k4_by_budget` {steps: ARI at k = 4 against every slice's ground truth}, with the
   seconds each took (`seconds_by_budget`), and `ari_k4_pilot_min_over_seeds` at the default
   budget, with each seed's ARI (`ari_k4_pilot_by_seed`) and 10-NN class agreement in the same
   PCA space (`knn10_class_agreement_by_seed`: the features' local quality, which the ARI mixes
   with how KMeans lays its four clusters).

`--precision fp32` measures the path of CPUs without native bf16 on a CPU that has it.

    .venv/bin/python benchmarks/pretrain.py                          # default budget, 1 seed
    .venv/bin/python benchmarks/pretrain.py --precision fp32 --budgets 60,120,168 --seeds 3
    .venv/bin/python benchmarks/pretrain.py --seeds 3 --set crop_scale=0.4,1.6   # a variant
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from active_learning import ari_k4, embed

from mri_assets.assets.backbone import PretrainSettings
from mri_assets.core.backbone import build_backbone
from mri_assets.core.cpu_peak import cpu_peak
from mri_assets.core.precision import resolve_precision
from mri_assets.core.pretrain import (
    IndexedSlices,
    ProjectionHead,
    _parameter_groups,
    plan_pretraining,
    pretrain_backbone,
    resized_base,
    step_loss,
)
from mri_assets.core.pretrain_schedule import STEP_BUDGETS, PretrainConfig, budget_kind
from mri_assets.core.sample_slices import decoded_sample

INPUT_SIZE = 128


def step_seconds(images: np.ndarray, config, precision: str, layout: torch.memory_format,
                 steps: int = 3) -> float:
    """Median seconds of one optimiser step of `config` (after a warm-up step), the network in
    `layout`: the training loop's own `step_loss`, backward and AdamW step."""
    device = torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    backbone = build_backbone("resnet18", "none", seed=0, input_size=INPUT_SIZE)
    modules = (backbone.body.to(memory_format=layout).train(),
               ProjectionHead(backbone.dim, config.projection_dim).train(),
               torch.nn.Linear(backbone.dim, 4))
    optimizer = torch.optim.AdamW(_parameter_groups(modules, 1e-4), lr=1e-3)
    plan = plan_pretraining(len(images), config, input_size=INPUT_SIZE, flops_per_view=1)
    times = []
    for step in range(steps + 1):
        started = time.perf_counter()
        index = np.sort(np.random.default_rng(step).choice(len(images), config.batch_size,
                                                           replace=False))
        base = resized_base(torch.from_numpy(images[index][:, None]), INPUT_SIZE)
        loss = step_loss(base.contiguous(memory_format=layout), modules, config, plan,
                         generator, device, precision)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step:
            times.append(time.perf_counter() - started)
    return float(np.median(times))


def ari_by_budget(sample, holdout: np.ndarray, config, budgets: list[int], seeds: int,
                  default_steps: int) -> dict:
    """ARI at k = 4 of the pilot (every slice) after pretraining `config` for each step budget
    and seed: `ari_k4_by_budget` (mean over seeds), `seconds_by_budget`, and at the default
    budget `ari_k4_pilot_min_over_seeds`, `ari_k4_pilot_by_seed` and
    `knn10_class_agreement_by_seed`."""
    table, seconds_table, at_default, agreements = {}, {}, [], []
    for steps in budgets:
        scores, seconds, agreement_by_seed = [], [], []
        for seed in range(seeds):
            run_config = replace(config, steps=steps, seed=seed)
            result = pretrain_backbone(IndexedSlices(sample.images[~holdout]), run_config, "cpu",
                                       input_size=INPUT_SIZE)
            model = build_backbone(checkpoint=result.checkpoint, input_size=INPUT_SIZE)
            ari, coords, _ = ari_k4(embed(model, sample.images, config.precision), sample.labels)
            scores.append(ari)
            seconds.append(result.seconds)
            agreement = knn_class_agreement(coords, sample.labels)
            agreement_by_seed.append(agreement)
            print(f"  {steps} steps, seed {seed}: ARI k=4 {ari:.3f}, 10-NN class agreement "
                  f"{agreement:.3f} in {result.seconds:.0f} s "
                  f"({result.total_flops / 1e12:.1f} TFLOP, {config.precision})", flush=True)
        table[steps] = round(float(np.mean(scores)), 4)
        seconds_table[steps] = round(float(np.mean(seconds)), 1)
        if steps == default_steps:
            at_default = scores
            agreements = agreement_by_seed
    return {
        "ari_k4_by_budget": table,
        "seconds_by_budget": seconds_table,
        "ari_k4_pilot_min_over_seeds": round(min(at_default), 4) if at_default else None,
        "ari_k4_pilot_by_seed": [round(float(a), 4) for a in at_default],
        "knn10_class_agreement_by_seed": [round(float(a), 4) for a in agreements],
    }


def knn_class_agreement(coords: np.ndarray, labels: np.ndarray, k: int = 10) -> float:
    """The share of each slice's `k` nearest neighbours (Euclidean, in the clustering's PCA
    space, the slice itself left out) that have its class: how well the features keep the classes
    apart locally, whatever KMeans makes of their global layout. The ARI at k = 4 can fall on a
    backbone that scores high here, when one cluster goes to a scanner instead of a class."""
    from sklearn.neighbors import NearestNeighbors

    neighbours = NearestNeighbors(n_neighbors=k + 1).fit(coords).kneighbors(
        coords, return_distance=False)[:, 1:]
    return float((labels[neighbours] == labels[:, None]).mean())


def schedule_overrides(pairs: list[str]) -> dict:
    """`FIELD=VALUE` strings -> PretrainConfig fields, each value parsed as the field's default
    is typed (a tuple from comma-separated numbers)."""
    defaults = {f.name: f.default for f in fields(PretrainConfig)}
    overrides = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in defaults or not value:
            raise ValueError(f"--set {pair!r}: use FIELD=VALUE with FIELD one of {sorted(defaults)}")
        default = defaults[name]
        if isinstance(default, tuple):
            overrides[name] = tuple(float(v) for v in value.split(","))
        elif default is None:
            overrides[name] = int(value)
        else:
            overrides[name] = type(default)(value)
    PretrainConfig(**overrides)  # checked here, with the schedule's own message
    return overrides


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=2000)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--budgets", default="", help="step counts, comma-separated (default: the device's budget)")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--speed-steps", type=int, default=3)
    parser.add_argument("--speed-only", action="store_true", help="measure the step speed only")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="change one field of the schedule (core.pretrain_schedule."
                        "PretrainConfig), e.g. --set crop_scale=0.4,1.6 --set rotation_weight=4; "
                        "repeatable")
    args = parser.parse_args()
    try:
        overrides = schedule_overrides(args.set)
    except ValueError as error:
        parser.error(str(error))

    precision = resolve_precision("cpu", args.precision, purpose="training")
    kind = budget_kind("cpu", precision)
    default_steps = STEP_BUDGETS[kind]
    budgets = [int(b) for b in args.budgets.split(",") if b] or [default_steps]
    with tempfile.TemporaryDirectory(prefix="mri-pretrain-bench-") as scratch:
        sample = decoded_sample(Path(scratch) / "pilot", args.slices, seed=0, wave_style="t1")
    holdout = sample.patient_split(0.25, seed=0)
    training = sample.images[~holdout]
    print(f"pilot: {len(sample)} slices, {len(training)} for training; precision {precision} "
          f"({kind}, default budget {default_steps} steps)", flush=True)

    config = replace(PretrainSettings().config(kind), precision=precision, **overrides)
    plan = plan_pretraining(len(training), config, input_size=INPUT_SIZE)
    flops_per_step = plan.total_flops / plan.steps
    ours = step_seconds(training, config, precision, torch.channels_last, args.speed_steps)
    nchw = step_seconds(training, config, precision, torch.contiguous_format, args.speed_steps)
    peak = cpu_peak(os.environ.get("ONEDNN_MAX_CPU_ISA"))
    achieved = flops_per_step / ours / 1e9
    print(f"step: {ours:.2f} s channels_last, {nchw:.2f} s NCHW; {flops_per_step / 1e9:.0f} GFLOP "
          f"per step -> {achieved:.0f} GFLOP/s, peak {peak.gflops(precision):.0f} "
          f"({peak.detail(precision)})", flush=True)

    budget_figures = {} if args.speed_only else ari_by_budget(
        sample, holdout, config, budgets, args.seeds, default_steps)
    return {
        "precision": precision,
        "budget_kind": kind,
        "default_steps": default_steps,
        "achieved_gflops": round(achieved, 1),
        "peak_gflops": round(peak.gflops(precision), 1),
        "share_of_peak": round(achieved / peak.gflops(precision), 3),
        "ratio_vs_nchw": round(nchw / ours, 3),
        "step_seconds": round(ours, 3),
        "gflop_per_step": round(flops_per_step / 1e9, 1),
        **budget_figures,
        "seeds": args.seeds,
        "isa": peak.isa,
    }


if __name__ == "__main__":
    print(json.dumps(main()))
