"""Safe pseudo-labels and the two-stage classifier, compared with a supervised-only baseline."""

import time
from typing import TYPE_CHECKING

import dagster as dg
import numpy as np
import polars as pl

from mri_assets.assets.support.backbones import embedding_backbone
from mri_assets.assets.support.gpu import GPU_POOL, gpu_step_tags
from mri_assets.assets.support.locations import stored_at
from mri_assets.assets.support.partitions import wave_partitions
from mri_assets.assets.support.provenance import mlflow_run_metadata
from mri_assets.assets.support.reports import classifier_metadata, log_classifier_run
from mri_assets.core.clustering import PcaModel
from mri_assets.core.expert_labels import expert_label_per_image
from mri_assets.core.plots import confusion_png
from mri_assets.core.progress import Progress
from mri_assets.core.slice_shards import locate, read_npy, slice_keys, slice_locations
from mri_assets.core.training.errors import TrainingError
from mri_assets.core.wave_layout import wave_shard_count
from mri_assets.resources.compute import ComputeResource
from mri_assets.resources.mlflow_tracking import MlflowTracking
from mri_assets.resources.object_store import ObjectStore
from mri_assets.resources.settings import LabelingSettings, PseudoLabelSettings, TrainingSettings
from mri_assets.resources.wave_io import MISSING_OK
from mri_assets.resources.wave_store import WaveEmbeddings, WaveStore, splits_of

if TYPE_CHECKING:
    from mri_assets.core.training.two_stage import TrainConfig, TrainingData

# The pseudo-labelling and training modules (torch) are imported by the functions that use them:
# every Dagster run worker imports this module, and only these steps train.

GATE_CHECK = "pseudo_label_gate"
BASELINE_CHECK = "maintains_supervised_baseline"
REGISTERED_MODEL = "mri_assets_classifier"


# What the retraining assets receive besides the labels: the wave's embeddings (a handle), the
# manifest's splits, its PCA (the kNN space) and its backbone's record (the network they tune).
SPLIT_COLUMNS = ["image_id", "split", "status"]
WAVE_INPUTS = {
    "embeddings": dg.AssetIn(),
    "manifest": dg.AssetIn(metadata={"columns": SPLIT_COLUMNS}),
    "backbone": dg.AssetIn(metadata={MISSING_OK: True}),
}


def label_codes(ids: list[str], expert: pl.DataFrame, classes: tuple[str, ...]) -> np.ndarray:
    """Class index of each slice's expert label, -1 where unlabeled; unknown classes refused."""
    per_image = dict(expert_label_per_image(expert).select("image_id", "label").iter_rows())
    unknown = sorted({label for label in per_image.values() if label not in classes})
    if unknown:
        raise TrainingError(f"expert labels {unknown} are not in the class set {list(classes)}")
    position = {name: code for code, name in enumerate(classes)}
    return np.array([position.get(per_image.get(i), -1) for i in ids], dtype=np.int64)


def neighbour_space(pca: PcaModel | None, embeddings: np.ndarray, space: str) -> np.ndarray:
    """Where neighbours are searched: the raw embeddings, or the wave's fitted PCA projection."""
    if space == "embedding":
        return embeddings
    if space != "pca":
        raise ValueError(f"pseudo.knn_space must be 'pca' or 'embedding', got {space!r}")
    if pca is None:
        raise TrainingError("pseudo.knn_space=pca needs the wave's pca_model: materialize it first")
    return np.concatenate([pca.transform(embeddings[s : s + 65_536])
                           for s in range(0, len(embeddings), 65_536)])


def wave_slice_rows(store: ObjectStore, wave: str):
    """A function image ids -> `SliceRows` over the wave's memmapped slice shards (all of those
    its layout records)."""
    from mri_assets.core.training.inputs import SliceRows

    shards = range(wave_shard_count(store, wave))
    indexes = [pl.read_parquet(store.local_path(slice_keys(wave, s)[1])) for s in shards]
    arrays = [read_npy(store.local_path(slice_keys(wave, s)[0])) for s in shards]
    locations = slice_locations(indexes)
    return lambda image_ids: SliceRows(arrays, *locate(locations, image_ids))


def _trainer():
    """(ClassifierModel, train_two_stage), imported when a step trains (they bring torch)."""
    from mri_assets.core.training.model import ClassifierModel
    from mri_assets.core.training.two_stage import train_two_stage

    return ClassifierModel, train_two_stage


def train_config(training: TrainingSettings, precision: str = "auto") -> "TrainConfig":
    """The two-stage schedule of `training`, at the deployment's requested `precision`
    (`compute.precision`, MRI_ASSETS_PRECISION: `auto` picks per device as every loop does)."""
    from mri_assets.core.training.two_stage import TrainConfig

    return TrainConfig(seed=training.seed, precision=precision, head_epochs=training.head_epochs,
                       finetune_epochs=training.finetune_epochs, head_lr=training.head_lr,
                       lr_head=training.lr_head, lr_layer4=training.lr_layer4,
                       lr_layer3=training.lr_layer3, batch_size=training.batch_size)


@dg.asset(
    partitions_def=wave_partitions,
    ins={**WAVE_INPUTS, "pca_model": dg.AssetIn(metadata={MISSING_OK: True})},
    group_name="retraining",
    kinds={"pytorch"},
    check_specs=[dg.AssetCheckSpec(GATE_CHECK, asset="pseudo_labels", blocking=True,
                                   description="the promotion rule's F1 on holdout ≥ threshold")],
)
def pseudo_labels(
    context: dg.AssetExecutionContext,
    expert_labels: pl.DataFrame,
    embeddings: WaveEmbeddings,
    manifest: pl.DataFrame,
    backbone: dict | None,
    pca_model: PcaModel | None,
    object_store: ObjectStore,
    compute: ComputeResource,
    labeling: LabelingSettings,
    pseudo: PseudoLabelSettings,
    training: TrainingSettings,
):
    """Predictions on unlabeled slices, promoted only when confident AND the kNN majority agrees.

    The supervised baseline (the two-stage schedule on expert labels only) is trained here and
    its holdout report kept for the classifier's comparison. The teacher is a linear head on the
    cached embeddings fitted to every expert label (stage 1 alone), not a fine-tuned model: with
    a few hundred expert labels stage 2 swings holdout F1 either way (a 300-slice wave, 150
    labels: 0.73 after stage 1, 0.55 after stage 2, and the rule's F1 fell from 1.0 to 0.5),
    while the pseudo-labels exist to give stage 2 the data it needs. Reading cached embeddings
    also spares a backbone pass over every unlabeled slice. The rule is measured first on the
    labeled holdout slices; below the F1 threshold nothing is promoted and the blocking check
    stops the classifier.
    """
    from mri_assets.core.training.embedding_head import fit_embedding_head
    ClassifierModel, train_two_stage = _trainer()
    wave = context.partition_key
    classes = tuple(labeling.classes)
    ids, model_id, embeddings = embeddings.ids, embeddings.model_id, embeddings.matrix()
    codes = label_codes(ids, expert_labels, classes)
    holdout = splits_of(manifest, ids) == "holdout"
    reference, evaluation, unlabeled = _label_masks(codes, holdout)
    if not reference.any():
        raise TrainingError(
            f"wave {wave} has no expert labels outside the holdout split: label queued items first")
    device, _, _ = compute.device_and_precision()
    teacher = ClassifierModel(embedding_backbone(WaveStore(object_store), compute, wave, backbone)[0],
                              classes, seed=training.seed)
    data = _expert_data(wave_slice_rows(object_store, wave), np.array(ids), codes, classes,
                        embeddings, model_id, reference, evaluation)
    config = train_config(training, compute.precision)
    with Progress(f"pseudo_labels {wave}: supervised baseline, stage 2", "steps",
                  log=context.log.info) as shown:
        report = train_two_stage(teacher, data, config, device, progress=shown)
    WaveStore(object_store).put_baseline(wave, report.as_dict())
    head = fit_embedding_head(data.train.embeddings, data.train.labels, classes, config, model_id)
    space = neighbour_space(pca_model, embeddings, pseudo.knn_space)
    frame, gate, figures = _promote(ids, codes, classes, head, embeddings, space, model_id,
                                    (reference, evaluation, unlabeled), pseudo)
    context.log.info(f"{wave}: gate {'passed' if gate.passed else 'FAILED'}: {gate.reason}")
    yield dg.Output(frame, metadata={
        **figures, "model_id": model_id, "confidence_threshold": pseudo.confidence_threshold,
        "knn_k": pseudo.knn_k, "knn_space": pseudo.knn_space,
        "baseline_macro_f1": round(report.macro_f1, 4), "baseline_stage2_kept": report.stage2_kept,
        "teacher": TEACHER,
    })
    yield dg.AssetCheckResult(check_name=GATE_CHECK, passed=bool(gate.passed),
                              metadata=gate.as_metadata())


def _label_masks(codes: np.ndarray, holdout: np.ndarray) -> tuple[np.ndarray, ...]:
    """(reference, evaluation, unlabeled): expert-labeled outside the holdout, expert-labeled in
    it, unlabeled outside it. Holdout slices are for evaluation only: an unlabeled one is never
    pseudo-labeled, or the classifier would train on the holdout patients it is measured on."""
    return (codes >= 0) & ~holdout, (codes >= 0) & holdout, (codes < 0) & ~holdout


def _expert_data(rows_of, ids: np.ndarray, codes: np.ndarray, classes: tuple[str, ...],
                 embeddings: np.ndarray, model_id: str, reference: np.ndarray,
                 evaluation: np.ndarray) -> "TrainingData":
    """The supervised baseline's data: the expert labels outside the holdout, and in it."""
    from mri_assets.core.training.two_stage import LabeledSlices, TrainingData

    return TrainingData(
        train=LabeledSlices(rows_of(list(ids[reference])),
                            [classes[c] for c in codes[reference]], embeddings[reference]),
        holdout=LabeledSlices(rows_of(list(ids[evaluation])),
                              [classes[c] for c in codes[evaluation]]),
        embeddings_model_id=model_id,
    )


TEACHER = ("a linear head on the cached embeddings, fitted to every expert label outside the "
           "holdout (stage 1 alone)")


def _promote(ids: list[str], codes: np.ndarray, classes: tuple[str, ...], head, embeddings: np.ndarray,
             space: np.ndarray, model_id: str, masks: tuple[np.ndarray, np.ndarray, np.ndarray],
             pseudo: PseudoLabelSettings):
    """The teacher's predictions on the unlabeled slices, promoted by the rule where the gate
    (the rule measured on the labeled holdout) passes: (frame, gate, figures for metadata)."""
    from mri_assets.core.pseudo import (
        contradicted_expert_labels,
        gate_metrics,
        knn_consensus,
        leave_one_out_consensus,
        promote,
    )

    reference, evaluation, unlabeled = masks
    queries = unlabeled | evaluation
    probs = np.zeros((len(ids), len(classes)), dtype=np.float32)
    probs[queries] = head.predict_proba(embeddings[queries], model_id)
    consensus = knn_consensus(space[queries], space[reference], codes[reference],
                              k=pseudo.knn_k, n_classes=len(classes))
    rule = promote(probs[queries], consensus, pseudo.confidence_threshold)
    in_evaluation = evaluation[queries]
    gate = gate_metrics(codes[evaluation], probs[evaluation].argmax(1), rule[in_evaluation],
                        f1_threshold=pseudo.f1_threshold, min_promoted=pseudo.min_promoted_holdout)
    in_unlabeled = unlabeled[queries]
    predicted = probs[unlabeled].argmax(1)
    frame = pl.DataFrame({
        "image_id": [i for i, u in zip(ids, unlabeled) if u],
        "label": [classes[c] for c in predicted],
        "confidence": probs[unlabeled].max(1).astype(np.float32),
        "knn_majority": [classes[c] for c in consensus.majority[in_unlabeled]],
        "knn_agreement": consensus.agreement[in_unlabeled].astype(np.float32),
        "knn_tie": consensus.tie[in_unlabeled],
        "promoted": rule[in_unlabeled] & gate.passed,
    })
    loo = leave_one_out_consensus(space[reference], codes[reference], pseudo.knn_k,
                                  n_classes=len(classes))
    reference_pred = head.predict_proba(embeddings[reference], model_id).argmax(1)
    doubtful = contradicted_expert_labels(codes[reference], reference_pred, loo.majority, loo.tie)
    second_reads = [i for i, d in zip(np.array(ids)[reference], doubtful) if d]
    return frame, gate, {
        "unlabeled": int(unlabeled.sum()),
        "rule_would_promote": int(rule[in_unlabeled].sum()),
        "promoted": int(frame["promoted"].sum()),
        "expert_reference": int(reference.sum()),
        "holdout_evaluated": int(evaluation.sum()),
        "second_read_candidates": dg.MetadataValue.json(second_reads[:50]),
        "n_second_read_candidates": len(second_reads),
    }


def _classifier_data(rows_of, ids: list[str], codes: np.ndarray, holdout: np.ndarray,
                     classes: tuple[str, ...], embeddings: np.ndarray, model_id: str,
                     pseudo_labels: pl.DataFrame, training: TrainingSettings) -> tuple["TrainingData", dict]:
    """The classifier's data: the expert labels and the promoted pseudo-labels outside the
    holdout (stage 2 on at most `training.max_finetune_images` of them), evaluated on the
    expert-labeled holdout; and its counts for the metadata."""
    from mri_assets.core.training.two_stage import LabeledSlices, TrainingData

    position = {image_id: row for row, image_id in enumerate(ids)}
    expert_ids = [i for i, c, h in zip(ids, codes, holdout) if c >= 0 and not h]
    eval_ids = [i for i, c, h in zip(ids, codes, holdout) if c >= 0 and h]
    promoted = pseudo_labels.filter(pl.col("promoted"))
    in_holdout = [i for i in promoted["image_id"].to_list() if holdout[position[i]]]
    if in_holdout:
        raise TrainingError(
            f"{len(in_holdout)} promoted pseudo-labels lie in the holdout split (first: {in_holdout[:3]}); "
            "re-materialize pseudo_labels: holdout slices are for evaluation only")
    pseudo_ids = promoted["image_id"].to_list()
    pseudo_label = dict(promoted.select("image_id", "label").iter_rows())
    train_ids = expert_ids + pseudo_ids
    train_labels = [classes[codes[position[i]]] for i in expert_ids] + [pseudo_label[i] for i in pseudo_ids]
    # Stage 1 (cached embeddings) uses every label; the cap only bounds stage 2's images.
    finetune_pseudo = set(_finetune_rows(expert_ids, pseudo_ids, training.max_finetune_images,
                                         training.seed))
    stage2_rows = list(range(len(expert_ids))) + [
        len(expert_ids) + n for n, i in enumerate(pseudo_ids) if i in finetune_pseudo]
    data = TrainingData(
        train=LabeledSlices(rows_of(train_ids), train_labels,
                            embeddings[[position[i] for i in train_ids]]),
        holdout=LabeledSlices(rows_of(eval_ids), [classes[codes[position[i]]] for i in eval_ids]),
        embeddings_model_id=model_id,
        stage2_rows=stage2_rows,
    )
    return data, {"expert_labels": len(expert_ids), "pseudo_labels": len(pseudo_ids),
                  "stage2_images": len(stage2_rows), "holdout": len(eval_ids)}


def _finetune_rows(expert_ids: list[str], pseudo_ids: list[str], cap: int, seed: int) -> list[str]:
    if cap <= 0 or len(expert_ids) + len(pseudo_ids) <= cap:
        return pseudo_ids
    keep = max(cap - len(expert_ids), 0)
    order = np.random.default_rng(seed).permutation(len(pseudo_ids))[:keep]
    return [pseudo_ids[i] for i in sorted(order)]


@dg.asset(
    partitions_def=wave_partitions,
    ins=WAVE_INPUTS,
    group_name="retraining",
    kinds={"pytorch", "mlflow"},
    pool=GPU_POOL,
    op_tags=gpu_step_tags(),
    check_specs=[dg.AssetCheckSpec(BASELINE_CHECK, asset="classifier",
                                   description="semi-supervised macro-F1 ≥ supervised-only baseline")],
)
def classifier(
    context: dg.AssetExecutionContext,
    pseudo_labels: pl.DataFrame,
    expert_labels: pl.DataFrame,
    embeddings: WaveEmbeddings,
    manifest: pl.DataFrame,
    backbone: dict | None,
    object_store: ObjectStore,
    compute: ComputeResource,
    mlflow: MlflowTracking,
    labeling: LabelingSettings,
    training: TrainingSettings,
):
    """Two-stage fine-tune on expert + promoted pseudo-labels, against the expert-only baseline.

    The baseline (trained by `pseudo_labels`) has the same schedule, seed and starting weights on
    the same expert labels, evaluated on the same holdout slices. Stage 1 trains the head on
    cached embeddings; stage 2 unfreezes layer3 and layer4 with discriminative learning rates
    and is kept only when it beats stage 1 on training rows withheld from both
    (`stage2_kept`). Evaluation uses the holdout split only. A failed run leaves the previous
    checkpoint in place.
    """
    from mri_assets.core.training.checkpoint import save_checkpoint
    ClassifierModel, train_two_stage = _trainer()
    wave = context.partition_key
    started = time.perf_counter()
    classes = tuple(labeling.classes)
    ids, model_id, embeddings = embeddings.ids, embeddings.model_id, embeddings.matrix()
    codes = label_codes(ids, expert_labels, classes)
    holdout = splits_of(manifest, ids) == "holdout"
    data, counts = _classifier_data(wave_slice_rows(object_store, wave), ids, codes, holdout,
                                    classes, embeddings, model_id, pseudo_labels, training)
    device, _, _ = compute.device_and_precision()
    model = ClassifierModel(embedding_backbone(WaveStore(object_store), compute, wave, backbone)[0],
                            classes, seed=training.seed)
    config = train_config(training, compute.precision)
    with Progress(f"classifier {wave}: stage 2", "steps", log=context.log.info) as shown:
        semi = train_two_stage(model, data, config, device, progress=shown)
    baseline = WaveStore(object_store).baseline(wave)
    baseline_f1 = float(baseline["final_eval"]["macro_f1"])
    meta = {"wave": wave, "embedding_model_id": model_id, **counts, "macro_f1": semi.macro_f1,
            "baseline_macro_f1": baseline_f1, "stage1_macro_f1": semi.stage1_eval.macro_f1,
            "stage2_gain_macro_f1": semi.stage2_gain, "stage2_kept": semi.stage2_kept,
            **semi.backbone_shift}
    checkpoint = save_checkpoint(model, classes, meta, embedding_head=semi.stage1_head,
                                 embedding_model_id=model_id)
    png = confusion_png(semi.confusion, classes, f"wave {wave}: holdout confusion")
    run_id, version = log_classifier_run(context, mlflow, meta, config, semi, baseline, png,
                                         checkpoint, model, REGISTERED_MODEL)
    key = WaveStore(object_store).put_checkpoint(wave, checkpoint)
    value = {"wave": wave, "checkpoint": key, "classes": list(classes),
             "macro_f1": semi.macro_f1, "baseline_macro_f1": baseline_f1}
    yield dg.Output(value, metadata={
        **classifier_metadata(semi, baseline_f1, counts, png), "embedding_model_id": model_id,
        "seconds": round(time.perf_counter() - started, 1), "device": str(device),
        "checkpoint": stored_at(object_store, key), **mlflow_run_metadata(mlflow, run_id),
        "registered_model": f"{REGISTERED_MODEL} v{version}"})
    yield dg.AssetCheckResult(check_name=BASELINE_CHECK, passed=bool(semi.macro_f1 >= baseline_f1),
                              metadata={"macro_f1": semi.macro_f1, "baseline_macro_f1": baseline_f1,
                                        "threshold": "macro_f1 >= baseline_macro_f1"})
