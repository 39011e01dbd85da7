"""The embedding backbone of a wave: self-supervised on the unlabelled slices, or adopted.

`backbone[WAVE]` decides which network embeds the wave, and writes that decision to
`models/backbone/WAVE.json` (what `embeddings` reads):

- `policy: first` (the default): the first wave with no backbone before it trains one on its own
  unlabelled slices (`core.pretrain`, holdout split left out); every later wave adopts the latest
  earlier wave's backbone without training, so the drift baseline and later waves are embedded by
  the same network and their ARI compare. Re-materializing the first wave trains again (a new
  model id: the drift sensor then starts a new baseline).
- `policy: every`: each wave trains its own (each wave restarts the drift baseline).
- `policy: off`: the compute resource's weights (`none` seeded, or `imagenet`).
- `compute.checkpoint_key` set: that classifier checkpoint's fine-tuned backbone, whatever the
  policy (how a wave is re-embedded with the classifier's backbone).
- the isolated `smoke` wave always embeds with the compute resource's model (the smoke fixes it).

A trained backbone is a `mri_assets.backbone/1` file at `models/backbone/WAVE.pt`, logged to
MLflow (run (wave, `backbone`), registered as `mri_assets_backbone`); its model id
(`resnet18:ssl:<sha12>@128`) is what every embedding row of the waves that use it records.
"""

from dataclasses import replace
from typing import TYPE_CHECKING

import dagster as dg
import numpy as np
import polars as pl
from pydantic import Field

from mri_assets.assets.support.automation import EAGER
from mri_assets.assets.support.backbones import embedding_backbone
from mri_assets.assets.support.gpu import GPU_POOL, gpu_step_tags
from mri_assets.assets.support.locations import stored_at
from mri_assets.assets.support.partitions import ISOLATED_WAVES, earlier_waves, wave_partitions
from mri_assets.assets.support.provenance import dagster_tags, mlflow_run_metadata
from mri_assets.core.cpu_peak import CpuPeak, cpu_peak
from mri_assets.core.pretrain_schedule import (
    BUDGET_BUYS,
    STEP_BUDGETS,
    PretrainConfig,
    budget_kind,
    expected_share_of_peak,
)
from mri_assets.core.progress import Progress
from mri_assets.core.wave_keys import backbone_key, manifest_key, slice_keys
from mri_assets.core.wave_layout import wave_shard_count
from mri_assets.resources.compute import ComputeResource
from mri_assets.resources.mlflow_tracking import MlflowTracking
from mri_assets.resources.object_store import ObjectStore
from mri_assets.resources.wave_io import WAVE_IO_MANAGER
from mri_assets.resources.wave_store import WaveStore, backbone_record

if TYPE_CHECKING:
    import torch

    from mri_assets.core.pretrain import IndexedSlices, PretrainPlan

# torch (core.pretrain, core.backbone, core.embed) is imported by the functions that train or read
# slices: every Dagster run worker imports this module, and only the backbone step may train.

POLICIES = ("first", "every", "off")
REGISTERED_BACKBONE = "mri_assets_backbone"
# BatchNorm statistics are measured again on this many clean slices after training: a quarter of
# core.pretrain's 4,096, whose forward passes at the input side took ~40 s on two fp32 cores.
BN_RECALIBRATION_SLICES = 1024


class PretrainSettings(dg.ConfigurableResource):
    """Which backbone embeds a wave, and the self-supervised schedule when one is trained."""

    policy: str = Field(
        default="first",
        description="first (default) | every | off (the compute weights); see assets/backbone.py",
    )
    steps: int = Field(
        default=0, description="optimiser steps of the schedule; 0 = the budget of the device kind "
        "(core.pretrain_schedule.STEP_BUDGETS: GPU, CPU with native bf16, CPU in fp32). The budget does not "
        "grow with the wave: a larger wave trains on a seeded sample spread over patients")
    epochs: int = Field(default=0, description="passes over the training slices instead of a step "
                        "budget (0 = use `steps`)")
    batch_size: int = Field(default=64, description="slices per step (two views each; at a fixed "
                            "cost, 64 slices x 120 steps reached pilot ARI 0.32 in fp32 where "
                            "128 x 60 reached 0.11)")
    lr: float = Field(default=3e-3, description="AdamW peak learning rate (warm-up, cosine decay)")
    temperature: float = 0.2
    view_fraction: float = Field(default=0.75, description="view side / input side")
    crop_min_area: float = Field(
        default=0.4, description="smallest share of the slice's area a random crop keeps (up to "
        "all of it): crops of 20 % and more lost where the slice lies in the head (fp32, 120 "
        "steps, seeds 0-1: pilot ARI 0.33 and 0.39 against 0.40 and 0.41 with 40 %)")
    max_slices: int = Field(default=0, description="train on a seeded sample of at most this many "
                            "slices, spread over patients (0 = steps x batch_size: each slice is "
                            "seen about once at most)")
    include_holdout: bool = Field(default=False, description="pretrain on holdout slices too")
    min_slices: int = Field(
        default=1000, description="a wave with fewer training slices does not train a backbone: "
        "it embeds with the compute weights and a later, larger wave trains (on a 300-slice "
        "first wave the self-supervised backbone failed the pseudo-label gate in fp32, F1 0.24)")
    rotation_weight: float = Field(
        default=2.0, description="weight of the quarter-turn pretext (0 = contrastive only): "
        "predicting a view's rotation keeps orientation in the features, which the contrastive "
        "views alone teach the network to ignore")
    drop_nearest_negatives: int = Field(
        default=0, description="per view, leave out this many of its most similar other views "
        "from the contrastive negatives (0, the default: every other view is one). In a wave of "
        "many patients a slice's nearest other slices are mostly the same anatomy in another "
        "patient. It is a trade, measured on the demo's pilot (benchmarks/pretrain.py, "
        "benchmarks/active_learning.py): 8 raised the pilot ARI at k=4 (the coarse layout) and "
        "lowered the 25-level task's active-learning gain (the fine detail)")
    seed: int = 0

    def config(self, budget_kind: str = "cpu-fp32") -> PretrainConfig:
        """The schedule for a device of `budget_kind` (`core.pretrain_schedule.budget_kind`)."""
        if self.policy not in POLICIES:
            raise ValueError(f"pretrain.policy={self.policy!r}: allowed values are {list(POLICIES)}")
        if self.max_slices < 0:
            raise ValueError(f"pretrain.max_slices={self.max_slices}: use 0 (steps x batch_size) "
                             "or a positive number")
        if self.steps < 0 or self.epochs < 0:
            raise ValueError(f"pretrain.steps={self.steps}, pretrain.epochs={self.epochs}: use 0 "
                             "(the device's budget) or a positive number")
        if self.drop_nearest_negatives < 0:
            raise ValueError(f"pretrain.drop_nearest_negatives={self.drop_nearest_negatives}: use 0 "
                             "(every other view is a negative, the default) or a positive number")
        if not 0 < self.crop_min_area <= 1:
            raise ValueError(f"pretrain.crop_min_area={self.crop_min_area}: use a share of the "
                             "slice's area above 0 and at most 1 (default 0.4)")
        steps = 0 if self.epochs else (self.steps or STEP_BUDGETS[budget_kind])
        return PretrainConfig(seed=self.seed, epochs=self.epochs or 1, steps=steps,
                              batch_size=self.batch_size, lr=self.lr,
                              temperature=self.temperature, view_fraction=self.view_fraction,
                              crop_scale=(self.crop_min_area, 1.0),
                              rotation_weight=self.rotation_weight,
                              drop_nearest_negatives=self.drop_nearest_negatives,
                              bn_recalibration_slices=BN_RECALIBRATION_SLICES)

    def sample_limit(self, config: PretrainConfig) -> int:
        """At most this many training slices (0: all): `max_slices`, else one pass of the budget."""
        if self.max_slices or self.epochs:
            return self.max_slices
        return config.steps * config.batch_size


def _latest_earlier(store: ObjectStore, waves: list[str]) -> dict | None:
    for earlier in reversed(waves):
        record = WaveStore(store).backbone_record(earlier)
        if record is not None and record.get("checkpoint_key"):
            return record
    return None


def wave_training_slices(store: ObjectStore, wave: str, include_holdout: bool, max_slices: int,
                         seed: int) -> "IndexedSlices":
    """The wave's slices through the crc32-checking shard reader, holdout left out unless asked,
    at most `max_slices` of them when that is set: a seeded sample spread over the wave's
    patients (`core.pretrain.patient_spread_sample`)."""
    from mri_assets.core.embed import SliceShard
    from mri_assets.core.pretrain import IndexedSlices, patient_spread_sample

    shards, positions, image_ids = [], [], []
    for shard in range(wave_shard_count(store, wave)):
        npy_key, index_key = slice_keys(wave, shard)
        reader = SliceShard(store.local_path(npy_key), store.local_path(index_key))
        index = pl.read_parquet(store.local_path(index_key), columns=["image_id", "split"])
        keep = np.ones(len(reader), dtype=bool) if include_holdout \
            else index["split"].to_numpy() != "holdout"
        shards.append(reader)
        positions.append(np.flatnonzero(keep))
        image_ids.append(index["image_id"].filter(pl.Series(keep)))
    total = sum(len(p) for p in positions)
    if max_slices and total > max_slices:
        patients = (pl.DataFrame({"image_id": pl.concat(image_ids)})
                    .join(pl.read_parquet(store.local_path(manifest_key(wave)),
                                          columns=["image_id", "patient_key"]),
                          on="image_id", how="left", maintain_order="left")["patient_key"]
                    .fill_null("").to_numpy())
        chosen = patient_spread_sample(patients, max_slices, seed)
        bounds = np.cumsum([0] + [len(p) for p in positions])
        positions = [p[chosen[(chosen >= lo) & (chosen < hi)] - lo]
                     for p, lo, hi in zip(positions, bounds[:-1], bounds[1:], strict=True)]
    return IndexedSlices(shards, positions)


@dg.asset(
    partitions_def=wave_partitions,
    deps=[dg.AssetKey("slices")],
    group_name="embed",
    io_manager_key=WAVE_IO_MANAGER,
    kinds={"pytorch", "mlflow"},
    pool=GPU_POOL,
    op_tags=gpu_step_tags(),
    automation_condition=EAGER,
)
def backbone(
    context: dg.AssetExecutionContext,
    object_store: ObjectStore,
    compute: ComputeResource,
    pretrain: PretrainSettings,
    mlflow: MlflowTracking,
) -> dg.Output[dict]:
    """Which backbone embeds the wave: trained self-supervised on its slices, adopted from an
    earlier wave, or the compute resource's weights (see the module docstring)."""
    from mri_assets.core.precision import resolve_precision

    wave = context.partition_key
    device, _, _ = compute.device_and_precision()
    precision = resolve_precision(device, compute.precision, purpose="training")
    config = replace(pretrain.config(budget_kind(device, precision)), precision=precision)
    earlier = earlier_waves(context.instance, wave)
    adopted = _latest_earlier(object_store, earlier) if pretrain.policy == "first" else None
    if compute.checkpoint_key:
        model, _ = embedding_backbone(WaveStore(object_store), compute, wave)
        record = backbone_record(wave, {
            "source": "classifier", "model_id": model.model_id, "checkpoint_key": None,
            "trained_on": None, "reason": f"compute.checkpoint_key={compute.checkpoint_key} embeds"})
    elif wave in ISOLATED_WAVES or pretrain.policy == "off":
        model = compute.build_backbone()
        why = "isolated wave: the compute resource's fixed model" if wave in ISOLATED_WAVES \
            else "pretrain.policy=off"
        record = backbone_record(wave, {
            "source": "compute", "model_id": model.model_id, "checkpoint_key": None,
            "trained_on": None, "reason": why})
    elif adopted is not None:
        record = backbone_record(wave, {
            "source": "adopted", "model_id": adopted["model_id"],
            "checkpoint_key": adopted["checkpoint_key"], "trained_on": adopted["trained_on"],
            "reason": f"policy first: wave {adopted['trained_on']} trained the backbone"})
    elif (n := len(training := wave_training_slices(
            object_store, wave, pretrain.include_holdout, pretrain.sample_limit(config),
            pretrain.seed))) < pretrain.min_slices:
        model = compute.build_backbone()
        record = backbone_record(wave, {
            "source": "compute", "model_id": model.model_id, "checkpoint_key": None,
            "trained_on": None,
            "reason": f"only {n} training slices, fewer than pretrain.min_slices="
                      f"{pretrain.min_slices}: the compute weights; a larger wave trains"})
    else:
        return _train(context, object_store, compute, pretrain, mlflow, config, training)
    context.log.info(f"{wave}: {record['reason']} -> {record['model_id']}")
    return dg.Output(record, metadata={
        "model_id": record["model_id"], "source": record["source"], "reason": record["reason"],
        "trained_on": str(record["trained_on"]), "policy": pretrain.policy,
    })


def budget_line(wave: str, plan: "PretrainPlan", config: PretrainConfig, device: "torch.device",
                n_slices: int) -> str:
    """What the pretraining is about to spend, said before it starts: its step budget, the time
    that implies on this device and what the budget buys."""
    kind = budget_kind(device, config.precision)
    source = "pretrain.steps" if config.steps and config.steps != STEP_BUDGETS[kind] else \
        f"the {kind} budget"
    estimate = f", {plan.total_flops / 1e12:.1f} TFLOP"
    if device.type == "cpu":
        seconds, share, peak = _cpu_estimate(plan, config.precision)
        estimate = (f", about {seconds / 60:.1f} min here ({plan.total_flops / 1e12:.1f} TFLOP at "
                    f"{share:.0%} of {peak.detail(config.precision)})")
    return (f"{wave}: self-supervised pretraining, {plan.steps} steps of {plan.batch_size} slices "
            f"({source}, {config.precision}) on {n_slices} training slices{estimate}; "
            f"{BUDGET_BUYS}")


def _cpu_estimate(plan: "PretrainPlan", precision: str) -> tuple[float, float, CpuPeak]:
    """The seconds `plan` takes on this CPU at the share of its peak pretraining reaches, that
    share, and the peak."""
    peak = cpu_peak()
    share = expected_share_of_peak(precision, peak.isa)
    return plan.seconds_at(peak.gflops(precision) * share * 1e9), share, peak


def _estimate_seconds(plan: "PretrainPlan", precision: str, device: "torch.device") -> float:
    return _cpu_estimate(plan, precision)[0] if device.type == "cpu" else float("nan")


def _share_of_peak(achieved: float, precision: str, device: "torch.device") -> dict:
    if device.type != "cpu":
        return {}
    peak = cpu_peak()
    return {"peak_gflops_per_s": round(peak.gflops(precision), 1),
            "share_of_peak": round(achieved / peak.gflops(precision), 3),
            "peak_detail": peak.detail(precision)}


def _train(context: dg.AssetExecutionContext, store: ObjectStore, compute: ComputeResource,
           pretrain: PretrainSettings, mlflow: MlflowTracking, config: PretrainConfig,
           training: "IndexedSlices") -> dg.Output[dict]:
    from mri_assets.core.backbone import build_backbone
    from mri_assets.core.pretrain import plan_pretraining, pretrain_backbone

    wave = context.partition_key
    device, _, device_note = compute.device_and_precision()
    plan = plan_pretraining(len(training), config, compute.arch, compute.input_size)
    context.log.info(budget_line(wave, plan, config, device, len(training)))
    # A line per tenth of the steps (and a minute) in the run's log; a bar on `mri-assets`'s terminal.
    with Progress(f"backbone {wave}: pretraining", "steps", plan.steps, log=context.log.info) as shown:
        result = pretrain_backbone(
            training, config, device, arch=compute.arch, input_size=compute.input_size,
            init_weights=compute.weights, progress=shown.pretraining_entry,
        )
    key = backbone_key(wave)
    store.put_bytes(key, result.checkpoint)
    figures = result.as_metadata()
    with mlflow.start_wave_run(wave, "backbone", tags={**dagster_tags(context, mlflow),
                                                      "model_id": result.model_id},
                               new_run=True) as run_id:
        mlflow.log_params(run_id, {k: v for k, v in figures.items()
                                   if k.startswith("config_") or k in ("arch", "input_size", "view_size", "objective")})
        mlflow.log_metrics(run_id, {"seconds": result.seconds, "cpu_seconds": result.cpu_seconds,
                                    "steps": result.steps, "n_slices": result.n_slices,
                                    "total_tflops": result.total_flops / 1e12})
        for entry in result.history:
            mlflow.log_metrics(run_id, {"loss": entry["loss"]}, step=int(entry["epoch"]))
        version = mlflow.register_checkpoint(
            run_id, result.checkpoint, REGISTERED_BACKBONE,
            build_backbone(compute.arch, checkpoint=result.checkpoint, input_size=compute.input_size),
            tags=dagster_tags(context, mlflow))
    record = backbone_record(wave, {
        "source": "trained", "model_id": result.model_id, "checkpoint_key": key,
        "trained_on": wave, "reason": f"self-supervised on {result.n_slices} slices of wave {wave}"})
    context.log.info(f"{wave}: {record['reason']} in {result.seconds:.0f} s "
                     f"({result.cpu_seconds / 60:.1f} CPU min) -> {result.model_id}")
    return dg.Output(record, metadata={
        "model_id": result.model_id, "source": "trained", "reason": record["reason"],
        "trained_on": wave, "policy": pretrain.policy,
        "slices": result.n_slices, "steps": result.steps, "views": result.views,
        "view_size": result.view_size,
        "budget_kind": budget_kind(device, result.precision), "budget_steps": plan.steps,
        "estimated_seconds": round(_estimate_seconds(plan, result.precision, device), 1),
        "final_loss": round(result.history[-1]["loss"], 4) if result.history else "none",
        "seconds": round(result.seconds, 1),
        "cpu_minutes": round(result.cpu_seconds / 60, 2),
        "total_tflops": round(result.total_flops / 1e12, 2),
        "achieved_gflops_per_s": figures["achieved_gflops_per_s"],
        **_share_of_peak(figures["achieved_gflops_per_s"], result.precision, device),
        "device": str(device), "device_note": device_note, "precision": result.precision,
        "checkpoint": stored_at(store, key),
        **mlflow_run_metadata(mlflow, run_id),
        "registered_model": f"{REGISTERED_BACKBONE} v{version}",
    })
