"""The labeling loop: the active-learning queue and the snapshot of the clinicians' labels.

A wave's first queue needs only its manifest and slices: until the deployment's classifier can
score the wave (its backbone, embeddings and clusters exist and the classifier reads that
backbone's embeddings), the batch is a patient-stratified random sample
(`core.selection.stratified_random_batch`), so clinicians start labelling while the backbone
still trains. Once the classifier can score the wave, a batch (the `active_learning` job) is
its predictive entropy + k-center diversity + cluster balance (`select_for_labeling`).
"""


from dataclasses import dataclass

import dagster as dg
import numpy as np
import polars as pl

from mri_assets.assets.support.automation import apart_from_smoke
from mri_assets.assets.support.monitoring import push_figures, queue_gauges
from mri_assets.assets.support.partitions import wave_partitions
from mri_assets.core.expert_labels import expert_label_per_image
from mri_assets.core.selection import (
    ENTROPY_SELECTION,
    FIRST_BATCH_SELECTION,
    Selection,
    holdout_for_evaluation,
    queue_uncertainty,
    select_for_labeling,
    series_of,
    stratified_random_batch,
)
from mri_assets.core.wave_keys import checkpoint_key
from mri_assets.resources.label_store import LabelStore
from mri_assets.resources.metrics import MetricsResource
from mri_assets.resources.object_store import ObjectStore
from mri_assets.resources.settings import ClusteringSettings, LabelingSettings
from mri_assets.resources.wave_io import MISSING_OK
from mri_assets.resources.wave_store import WaveStore, splits_of


@dataclass(frozen=True)
class WaveScores:
    """One pass over a wave's embeddings: the deployment's classifier's class probabilities and
    the PCA coordinates of every slice (`ids` order)."""

    ids: list[str]
    probs: np.ndarray
    coords: np.ndarray
    detail: str


def classifier_scores(instance: dg.DagsterInstance, store: ObjectStore, wave: str,
                      classes: list[str]) -> tuple[WaveScores | None, str]:
    """The deployment's latest classifier's class probabilities (its stage-1 head on the wave's
    cached embeddings) and the PCA coordinates of every slice of `wave`, read in one pass over
    its shards; or None and why not."""

    records = instance.fetch_materializations(dg.AssetKey("classifier"), limit=1).records
    if not records:
        return None, "no classifier yet"
    trained_on = records[0].partition_key
    key = checkpoint_key(trained_on)
    if not store.exists(key):
        return None, f"the classifier of wave {trained_on} has no checkpoint at {key}"
    from mri_assets.core.training.checkpoint import embedding_head_from_checkpoint  # brings torch

    head = embedding_head_from_checkpoint(store.get_bytes(key))
    if head is None:
        return None, f"the classifier of wave {trained_on} was saved without its stage-1 head; retrain it"
    waves = WaveStore(store)
    embedded = waves.wave_embeddings(wave)
    if embedded.model_id != head.embedding_model_id:
        return None, (f"the classifier of wave {trained_on} reads embeddings of {head.embedding_model_id}, "
                      f"wave {wave} is embedded by {embedded.model_id}")
    if set(head.class_names) != set(classes):
        return None, f"the classifier of wave {trained_on} has classes {list(head.class_names)}"
    pca = waves.pca(wave)
    probs, coords = [np.zeros((0, len(classes)))], [np.zeros((0, pca.n_components))]
    for block in embedded.shards():
        probs.append(head.predict_proba(block, embedded.model_id))
        coords.append(pca.transform(block))
    detail = f"classifier of wave {trained_on} (its stage-1 head on embeddings of {embedded.model_id})"
    return WaveScores(embedded.ids, np.concatenate(probs), np.concatenate(coords), detail), detail


# The manifest's columns the queue reads: the first batch's strata and every batch's holdout.
QUEUE_COLUMNS = ["image_id", "patient_key", "source_key", "split", "status"]

# A wave's first batch follows its slices by `eager()`, beside the backbone, never after it:
# `clusters` is a dependency for the lineage (later batches read them) that the condition
# ignores, and only while the wave has no queue yet: a clusters refresh (new labels,
# `label_refresh`) does not queue another batch by itself. Each batch spends the labeling
# budget, so later ones are asked for (`active_learning`, the UI).
QUEUE_ONCE_PER_WAVE = (
    dg.AutomationCondition.eager().ignore(dg.AssetSelection.assets("clusters"))
    & dg.AutomationCondition.missing()
).with_label("eager on slices, first batch of a wave only")


@dg.asset(
    partitions_def=wave_partitions,
    deps=[dg.AssetKey("slices")],
    ins={"manifest": dg.AssetIn(metadata={"columns": QUEUE_COLUMNS}),
         "clusters": dg.AssetIn(metadata={MISSING_OK: True})},
    group_name="labeling",
    kinds={"sqlalchemy"},
    automation_condition=apart_from_smoke(QUEUE_ONCE_PER_WAVE),
)
def labeling_queue(
    context: dg.AssetExecutionContext,
    manifest: pl.DataFrame,
    clusters: pl.DataFrame | None,
    object_store: ObjectStore,
    label_store: LabelStore,
    clustering: ClusteringSettings,
    labeling: LabelingSettings,
    metrics: MetricsResource,
) -> dg.MaterializeResult:
    """A batch of slices for the clinicians, pushed to the label store within budget.

    Before the deployment's classifier can score the wave: a patient-stratified random sample
    of the manifest (no backbone needed). After: the classifier's predictive entropy (its
    stage-1 head on the wave's cached embeddings), k-center diversity in PCA space and balance
    over the k-means clusters. Metadata `selection` says which, `selection_detail` why.
    Holdout-split slices are queued only as `holdout` items (evaluation), never for training.
    """
    wave = context.partition_key
    labeled = set(expert_label_per_image(label_store.labels_snapshot(None))["image_id"].to_list())
    stats = label_store.stats()
    room = int(stats["budget_left_cases"])
    n_holdout = min(labeling.holdout_per_wave, room)
    n_train = min(labeling.batch_size, max(room - n_holdout, 0))
    scores, detail = classifier_scores(context.instance, object_store, wave, labeling.classes) \
        if clusters is not None else \
        (None, f"wave {wave} has no clusters yet (backbone, embeddings and PCA come first)")
    if scores is None:
        ids, picked, reserved = _first_batch(manifest, labeled, n_train, n_holdout, labeling)
        selection, source = FIRST_BATCH_SELECTION, "none (no classifier for this wave yet)"
    else:
        ids, picked, reserved, source = _entropy_batch(
            scores, manifest, clusters, labeled, n_train, n_holdout, clustering, labeling)
        selection = ENTROPY_SELECTION
    context.log.info(f"{wave}: {selection} ({detail})")
    queued = label_store.enqueue(wave, queue_items(ids, picked, reserved), labeling.classes)
    after = label_store.stats()
    push_figures(metrics, "labeling_queue", {"wave": wave}, queue_gauges("labeling", int(after["queue_size"])))
    return dg.MaterializeResult(metadata={
        "selection": selection,
        "selection_detail": detail,
        "offered": len(picked) + len(reserved),
        "queued": queued,
        "queued_for_training": len(picked),
        "queued_holdout": len(reserved),
        "strata_in_batch": len(set(picked.cluster.tolist())),
        "queue_size": int(after["queue_size"]),
        "budget_left_cases": int(after["budget_left_cases"]),
        "budget_left_eur": float(after["budget_left_eur"]),
        "mean_entropy_queued": float(np.mean(picked.entropy)) if len(picked) and scores is not None
        else 0.0,
        "entropy_source": source,
        "entropy_source_detail": detail,
    })


def _first_batch(manifest: pl.DataFrame, labeled: set[str], n_train: int, n_holdout: int,
                 labeling: LabelingSettings) -> tuple[list[str], Selection, Selection]:
    """A patient-stratified random batch of the manifest's `ok` slices, and holdout items."""
    ok = manifest.filter(pl.col("status") == "ok").drop("status")
    ids = ok["image_id"].to_list()
    exclude = np.array([i in labeled for i in ids], dtype=bool)
    holdout = (ok["split"] == "holdout").to_numpy()
    patients = ok["patient_key"].to_numpy()
    picked = stratified_random_batch(patients, series_of(ok["source_key"].to_list()), n_train,
                                     labeling.seed, exclude=exclude, holdout=holdout)
    patient_codes = np.unique(patients, return_inverse=True)[1].astype(np.int64).reshape(-1)
    reserved = holdout_for_evaluation(patient_codes, holdout, n_holdout, labeling.seed,
                                      exclude=exclude, stratum="patient")
    return ids, picked, reserved


def _entropy_batch(scores: WaveScores, manifest: pl.DataFrame, clusters: pl.DataFrame,
                   labeled: set[str], n_train: int, n_holdout: int,
                   clustering: ClusteringSettings, labeling: LabelingSettings):
    """The classifier's entropy + k-center diversity + cluster balance, and holdout items per
    cluster: (ids, picked, reserved, entropy source)."""
    ids, coords = scores.ids, scores.coords
    frame = pl.DataFrame({"image_id": ids}).join(clusters, on="image_id", how="left")
    assignment = frame[f"cluster_k{clustering.drift_k}"].to_numpy().astype(np.int64)
    uncertainty = queue_uncertainty(coords, assignment, scores.probs, scores.detail)
    exclude = np.array([i in labeled for i in ids], dtype=bool)
    holdout = splits_of(manifest, ids) == "holdout"
    picked = select_for_labeling(uncertainty.entropy, coords, assignment, n_train,
                                 labeling.seed, exclude=exclude, holdout=holdout,
                                 duplicate_radius=labeling.duplicate_radius)
    reserved = holdout_for_evaluation(assignment, holdout, n_holdout, labeling.seed,
                                      exclude=exclude)
    return ids, picked, reserved, uncertainty.source


def queue_items(ids: list[str], picked: Selection, reserved: Selection) -> list[dict]:
    """Label-store items: the training picks, then the holdout items just below them."""
    return [
        {"image_id": ids[i], "priority": float(p), "reason": r, "kind": "expert"}
        for i, p, r in zip(picked.indices, picked.priority, picked.reason)
    ] + [
        {"image_id": ids[i], "priority": float(p) - 1.0, "reason": r, "kind": "holdout"}
        for i, p, r in zip(reserved.indices, reserved.priority, reserved.reason)
    ]


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

