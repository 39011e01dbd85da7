"""The labeling loop: the active-learning queue and the snapshot of the clinicians' labels."""

import io

import dagster as dg
import numpy as np
import polars as pl

from mri_assets.assets.clustering import pca_model, wave_embeddings
from mri_assets.assets.monitoring import push_figures, queue_gauges
from mri_assets.automation import apart_from_smoke
from mri_assets.core.clustering import PcaModel
from mri_assets.core.expert_labels import expert_label_per_image
from mri_assets.core.selection import (
    holdout_for_evaluation,
    queue_uncertainty,
    select_for_labeling,
)
from mri_assets.core.training.checkpoint import embedding_head_from_checkpoint
from mri_assets.core.wave_keys import checkpoint_key, manifest_key, pca_key
from mri_assets.partitions import wave_partitions
from mri_assets.resources.label_store import LabelStore
from mri_assets.resources.metrics import MetricsResource
from mri_assets.resources.object_store import ObjectStore
from mri_assets.resources.settings import ClusteringSettings, LabelingSettings


def wave_projection(store: ObjectStore, wave: str) -> tuple[list[str], np.ndarray]:
    """The wave's image ids and their PCA coordinates (the fitted transform, never refitted)."""
    shards, ids, _ = wave_embeddings(store, wave)
    pca = PcaModel.from_bytes(store.get_bytes(pca_key(wave)))
    coords = np.concatenate([pca.transform(block) for block in shards()]) if ids else np.zeros((0, 1))
    return ids, coords


def classifier_probs(instance: dg.DagsterInstance, store: ObjectStore, wave: str,
                     classes: list[str]) -> tuple[np.ndarray | None, str]:
    """The deployment's latest classifier's class probabilities for every slice of `wave` (its
    stage-1 head on the wave's cached embeddings), or None and why not."""

    records = instance.fetch_materializations(dg.AssetKey("classifier"), limit=1).records
    if not records:
        return None, "no classifier yet"
    trained_on = records[0].partition_key
    key = checkpoint_key(trained_on)
    if not store.exists(key):
        return None, f"the classifier of wave {trained_on} has no checkpoint at {key}"
    head = embedding_head_from_checkpoint(store.get_bytes(key))
    if head is None:
        return None, f"the classifier of wave {trained_on} was saved without its stage-1 head; retrain it"
    shards, ids, model_id = wave_embeddings(store, wave)
    if model_id != head.embedding_model_id:
        return None, (f"the classifier of wave {trained_on} reads embeddings of {head.embedding_model_id}, "
                      f"wave {wave} is embedded by {model_id}")
    if set(head.class_names) != set(classes):
        return None, f"the classifier of wave {trained_on} has classes {list(head.class_names)}"
    probs = np.concatenate([head.predict_proba(block, model_id) for block in shards()]) if ids \
        else np.zeros((0, len(classes)))
    return probs, f"classifier of wave {trained_on} (its stage-1 head on embeddings of {model_id})"


def split_of(store: ObjectStore, wave: str, image_ids: list[str]) -> np.ndarray:
    manifest = pl.read_parquet(io.BytesIO(store.get_bytes(manifest_key(wave))),
                               columns=["image_id", "split", "status"])
    lookup = dict(manifest.filter(pl.col("status") == "ok").select("image_id", "split").iter_rows())
    return np.array([lookup.get(i, "train") for i in image_ids])


# A wave's first batch follows its clusters by `eager()`, but only while the wave has no queue
# yet: a clusters refresh (new labels, `label_refresh`) does not queue another batch by itself.
# Each batch spends the labeling budget, so later ones are asked for (`active_learning`, the UI).
QUEUE_ONCE_PER_WAVE = (
    dg.AutomationCondition.eager() & dg.AutomationCondition.missing()
).with_label("eager, first batch of a wave only")


@dg.asset(
    partitions_def=wave_partitions,
    deps=[pca_model],
    group_name="labeling",
    kinds={"sqlalchemy"},
    automation_condition=apart_from_smoke(QUEUE_ONCE_PER_WAVE),
)
def labeling_queue(
    context: dg.AssetExecutionContext,
    clusters: pl.DataFrame,
    object_store: ObjectStore,
    label_store: LabelStore,
    clustering: ClusteringSettings,
    labeling: LabelingSettings,
    metrics: MetricsResource,
) -> dg.MaterializeResult:
    """Top-entropy, diverse, cluster-balanced slices pushed to the label store, within budget.

    The entropy is the deployment's latest classifier's (predictive entropy of its stage-1 head
    on the wave's cached embeddings) once one exists for the wave's backbone; before that, the
    k-means soft assignment's. Metadata `entropy_source` says which. Holdout-split slices are queued only as `holdout` items (evaluation), never for training.
    """
    wave = context.partition_key
    ids, coords = wave_projection(object_store, wave)
    frame = pl.DataFrame({"image_id": ids}).join(clusters, on="image_id", how="left")
    assignment = frame[f"cluster_k{clustering.drift_k}"].to_numpy().astype(np.int64)
    probs, source_detail = classifier_probs(context.instance, object_store, wave, labeling.classes)
    uncertainty = queue_uncertainty(coords, assignment, probs, source_detail)
    entropy = uncertainty.entropy
    labeled = set(expert_label_per_image(label_store.labels_snapshot(None))["image_id"].to_list())
    exclude = np.array([i in labeled for i in ids])
    holdout = split_of(object_store, wave, ids) == "holdout"
    stats = label_store.stats()
    room = int(stats["budget_left_cases"])
    n_holdout = min(labeling.holdout_per_wave, room)
    n_train = min(labeling.batch_size, max(room - n_holdout, 0))
    picked = select_for_labeling(entropy, coords, assignment, n_train, labeling.seed,
                                 exclude=exclude, holdout=holdout,
                                 duplicate_radius=labeling.duplicate_radius)
    reserved = holdout_for_evaluation(assignment, holdout, n_holdout, labeling.seed, exclude=exclude)
    items = [
        {"image_id": ids[i], "priority": float(p), "reason": r, "kind": "expert"}
        for i, p, r in zip(picked.indices, picked.priority, picked.reason)
    ] + [
        {"image_id": ids[i], "priority": float(p) - 1.0, "reason": r, "kind": "holdout"}
        for i, p, r in zip(reserved.indices, reserved.priority, reserved.reason)
    ]
    queued = label_store.enqueue(wave, items, labeling.classes)
    after = label_store.stats()
    push_figures(metrics, "labeling_queue", {"wave": wave}, queue_gauges("labeling", int(after["queue_size"])))
    return dg.MaterializeResult(metadata={
        "offered": len(items),
        "queued": queued,
        "queued_for_training": len(picked),
        "queued_holdout": len(reserved),
        "queue_size": int(after["queue_size"]),
        "budget_left_cases": int(after["budget_left_cases"]),
        "budget_left_eur": float(after["budget_left_eur"]),
        "mean_entropy_queued": float(np.mean(picked.entropy)) if len(picked) else 0.0,
        "entropy_source": uncertainty.source,
        "entropy_source_detail": uncertainty.detail,
    })


@dg.asset(
    partitions_def=wave_partitions,
    deps=[labeling_queue],
    group_name="labeling",
    kinds={"polars"},
)
def expert_labels(context: dg.AssetExecutionContext, label_store: LabelStore) -> dg.Output[pl.DataFrame]:
    """The label store's labels at materialization time, so training is reproducible."""
    wave = context.partition_key
    snapshot = label_store.labels_snapshot(None)
    per_image = expert_label_per_image(snapshot)
    stats = label_store.stats()
    per_class = dict(per_image.group_by("label").len().sort("label").iter_rows())
    kappa = stats.get("kappa")
    return dg.Output(
        snapshot,
        metadata={
            "labels": snapshot.height,
            "labeled_slices": per_image.height,
            "per_class": dg.MetadataValue.json(per_class),
            "annotators": dg.MetadataValue.json(stats["labels_per_annotator"]),
            "agreement_kappa": float(kappa) if kappa is not None else "not computable",
            "qa_pairs": int(stats["qa_pairs"]),
            "label_count": label_store.label_count(),
            "wave": wave,
        },
    )

