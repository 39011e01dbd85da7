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

import json

import dagster as dg
import numpy as np
import polars as pl
from pydantic import Field

from mri_assets.assets.gpu import GPU_POOL, gpu_step_tags
from mri_assets.assets.ingest import ISOLATED_WAVES, earlier_waves, slices
from mri_assets.assets.locations import stored_at
from mri_assets.assets.provenance import dagster_tags, mlflow_run_metadata
from mri_assets.automation import EAGER
from mri_assets.core.backbone import Backbone, build_backbone
from mri_assets.core.embed import SliceShard
from mri_assets.core.pretrain import (
    IndexedSlices,
    PretrainConfig,
    plan_pretraining,
    pretrain_backbone,
)
from mri_assets.core.progress import Progress
from mri_assets.core.slice_shards import slice_keys
from mri_assets.core.training.checkpoint import backbone_checkpoint
from mri_assets.core.wave_keys import backbone_key
from mri_assets.core.wave_keys import backbone_record_key as record_key
from mri_assets.core.wave_layout import wave_shard_count
from mri_assets.partitions import wave_partitions
from mri_assets.resources.compute import ComputeResource
from mri_assets.resources.mlflow_tracking import MlflowTracking
from mri_assets.resources.object_store import ObjectStore

POLICIES = ("first", "every", "off")
REGISTERED_BACKBONE = "mri_assets_backbone"
RECORD_FORMAT = "mri_assets.backbone_record/1"


class PretrainSettings(dg.ConfigurableResource):
    """Which backbone embeds a wave, and the self-supervised schedule when one is trained."""

    policy: str = Field(
        default="first",
        description="first (default) | every | off (the compute weights); see assets/backbone.py",
    )
    epochs: int = Field(default=12, description="passes over the wave's unlabelled slices")
    batch_size: int = Field(default=128, description="slices per step (two views each)")
    lr: float = Field(default=2e-3, description="AdamW peak learning rate (warm-up, cosine decay)")
    temperature: float = 0.2
    view_fraction: float = Field(default=0.75, description="view side / input side")
    max_slices: int = Field(default=0, description="train on a seeded sample of at most this many slices (0 = all)")
    include_holdout: bool = Field(default=False, description="pretrain on holdout slices too")
    min_slices: int = Field(
        default=1000, description="a wave with fewer training slices does not train a backbone: "
        "it embeds with the compute weights and a later, larger wave trains (on a 300-slice "
        "first wave the self-supervised backbone failed the pseudo-label gate in fp32, F1 0.24)")
    rotation_weight: float = Field(
        default=1.0, description="weight of the quarter-turn pretext (0 = contrastive only): "
        "predicting a view's rotation keeps orientation in the features, which the contrastive "
        "views alone teach the network to ignore")
    seed: int = 0

    def config(self) -> PretrainConfig:
        if self.policy not in POLICIES:
            raise ValueError(f"pretrain.policy={self.policy!r}: allowed values are {list(POLICIES)}")
        if self.max_slices < 0:
            raise ValueError(f"pretrain.max_slices={self.max_slices}: use 0 (all) or a positive number")
        return PretrainConfig(seed=self.seed, epochs=self.epochs, batch_size=self.batch_size,
                              lr=self.lr, temperature=self.temperature,
                              view_fraction=self.view_fraction,
                              rotation_weight=self.rotation_weight)


def read_record(store: ObjectStore, wave: str) -> dict | None:
    """The wave's backbone decision, or None when `backbone` never ran for it."""
    key = record_key(wave)
    if not store.exists(key):
        return None
    return json.loads(store.get_bytes(key))


def _write_record(store: ObjectStore, wave: str, record: dict) -> dict:
    record = {"format": RECORD_FORMAT, "wave": wave, **record}
    store.put_bytes(record_key(wave), json.dumps(record, sort_keys=True, indent=1).encode())
    return record


def embedding_backbone(store: ObjectStore, compute: ComputeResource, wave: str) -> tuple[Backbone, str]:
    """The network that embeds `wave` and a line saying where it came from.

    `compute.checkpoint_key` (a classifier checkpoint) wins; the isolated smoke wave keeps the
    compute resource's model; otherwise the wave's `backbone` record; with none, the compute
    resource's weights (seeded or ImageNet)."""
    if compute.checkpoint_key:
        model = compute.build_backbone(checkpoint=backbone_checkpoint(store.get_bytes(compute.checkpoint_key)))
        return model, f"classifier checkpoint {compute.checkpoint_key}"
    record = None if wave in ISOLATED_WAVES else read_record(store, wave)
    if record is None or not record.get("checkpoint_key"):
        reason = "no backbone materialization" if record is None else record["reason"]
        return compute.build_backbone(), f"compute weights {compute.weights} ({reason})"
    model = compute.build_backbone(checkpoint=store.get_bytes(record["checkpoint_key"]))
    if model.model_id.split("@")[0] != record["model_id"].split("@")[0]:
        raise ValueError(
            f"{record['checkpoint_key']} gives model {model.model_id} but {record_key(wave)} "
            f"records {record['model_id']}: re-materialize backbone for wave {wave}")
    return model, f"{record['source']} backbone of wave {record['trained_on']}"


def _latest_earlier(store: ObjectStore, waves: list[str]) -> dict | None:
    for earlier in reversed(waves):
        record = read_record(store, earlier)
        if record is not None and record.get("checkpoint_key"):
            return record
    return None


def wave_training_slices(store: ObjectStore, wave: str, include_holdout: bool, max_slices: int,
                         seed: int) -> IndexedSlices:
    """The wave's slices through the crc32-checking shard reader, holdout left out unless asked,
    at most `max_slices` of them (a seeded sample) when that is set."""
    shards, positions = [], []
    for shard in range(wave_shard_count(store, wave)):
        npy_key, index_key = slice_keys(wave, shard)
        reader = SliceShard(store.local_path(npy_key), store.local_path(index_key))
        split = pl.read_parquet(store.local_path(index_key), columns=["split"])["split"].to_numpy()
        keep = np.ones(len(reader), dtype=bool) if include_holdout else split != "holdout"
        shards.append(reader)
        positions.append(np.flatnonzero(keep))
    if max_slices:
        total = sum(len(p) for p in positions)
        if total > max_slices:
            chosen = np.sort(np.random.default_rng([seed, 11]).choice(total, max_slices, replace=False))
            bounds = np.cumsum([0] + [len(p) for p in positions])
            positions = [p[chosen[(chosen >= lo) & (chosen < hi)] - lo]
                         for p, lo, hi in zip(positions, bounds[:-1], bounds[1:], strict=True)]
    return IndexedSlices(shards, positions)


@dg.asset(
    partitions_def=wave_partitions,
    deps=[slices],
    group_name="embed",
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
    wave = context.partition_key
    config = pretrain.config()
    earlier = earlier_waves(context.instance, wave)
    adopted = _latest_earlier(object_store, earlier) if pretrain.policy == "first" else None
    if compute.checkpoint_key:
        model, _ = embedding_backbone(object_store, compute, wave)
        record = _write_record(object_store, wave, {
            "source": "classifier", "model_id": model.model_id, "checkpoint_key": None,
            "trained_on": None, "reason": f"compute.checkpoint_key={compute.checkpoint_key} embeds"})
    elif wave in ISOLATED_WAVES or pretrain.policy == "off":
        model = compute.build_backbone()
        why = "isolated wave: the compute resource's fixed model" if wave in ISOLATED_WAVES \
            else "pretrain.policy=off"
        record = _write_record(object_store, wave, {
            "source": "compute", "model_id": model.model_id, "checkpoint_key": None,
            "trained_on": None, "reason": why})
    elif adopted is not None:
        record = _write_record(object_store, wave, {
            "source": "adopted", "model_id": adopted["model_id"],
            "checkpoint_key": adopted["checkpoint_key"], "trained_on": adopted["trained_on"],
            "reason": f"policy first: wave {adopted['trained_on']} trained the backbone"})
    elif (n := len(training := wave_training_slices(
            object_store, wave, pretrain.include_holdout, pretrain.max_slices,
            pretrain.seed))) < pretrain.min_slices:
        model = compute.build_backbone()
        record = _write_record(object_store, wave, {
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


def _train(context: dg.AssetExecutionContext, store: ObjectStore, compute: ComputeResource,
           pretrain: PretrainSettings, mlflow: MlflowTracking, config: PretrainConfig,
           training: IndexedSlices) -> dg.Output[dict]:
    wave = context.partition_key
    device, _, device_note = compute.device_and_precision()
    context.log.info(f"{wave}: self-supervised pretraining on {len(training)} slices on {device}")
    # A line per tenth of the steps (and a minute) in the run's log; a bar on `mri-assets`'s terminal.
    steps = plan_pretraining(len(training), config, compute.arch, compute.input_size).steps
    with Progress(f"backbone {wave}: pretraining", "steps", steps, log=context.log.info) as shown:
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
    record = _write_record(store, wave, {
        "source": "trained", "model_id": result.model_id, "checkpoint_key": key,
        "trained_on": wave, "reason": f"self-supervised on {result.n_slices} slices of wave {wave}"})
    context.log.info(f"{wave}: {record['reason']} in {result.seconds:.0f} s "
                     f"({result.cpu_seconds / 60:.1f} CPU min) -> {result.model_id}")
    return dg.Output(record, metadata={
        "model_id": result.model_id, "source": "trained", "reason": record["reason"],
        "trained_on": wave, "policy": pretrain.policy,
        "slices": result.n_slices, "steps": result.steps, "views": result.views,
        "view_size": result.view_size, "epochs": config.epochs,
        "final_loss": round(result.history[-1]["loss"], 4) if result.history else "none",
        "seconds": round(result.seconds, 1),
        "cpu_minutes": round(result.cpu_seconds / 60, 2),
        "total_tflops": round(result.total_flops / 1e12, 2),
        "achieved_gflops_per_s": figures["achieved_gflops_per_s"],
        "device": str(device), "device_note": device_note, "precision": result.precision,
        "checkpoint": stored_at(store, key),
        **mlflow_run_metadata(mlflow, run_id),
        "registered_model": f"{REGISTERED_BACKBONE} v{version}",
    })
