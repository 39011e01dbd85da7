from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from mri_assets.core.backbone import build_backbone
from mri_assets.core.training.embedding_head import fit_embedding_head
from mri_assets.core.training.errors import TrainingError
from mri_assets.core.training.model import ClassifierModel
from mri_assets.core.training.two_stage import (
    LabeledSlices,
    TrainConfig,
    TrainingData,
    train_two_stage,
)
from mri_assets_tests.core.training.pattern_fixtures import (
    CLASSES,
    FAST,
    SIZE,
    build_model,
    embed,
    snapshot,
)


def test_stage1_trains_the_head_and_leaves_backbone_bit_identical(patterns):
    model = build_model()
    backbone_before = snapshot(model.backbone)
    head_before = snapshot(model.head)
    config = TrainConfig(seed=3, head_epochs=5, finetune_epochs=0, precision="fp32")
    report = train_two_stage(model, patterns, config, "cpu")
    after = model.backbone.state_dict()
    assert after.keys() == backbone_before.keys()
    for key, value in backbone_before.items():
        assert torch.equal(after[key], value), key
    assert not torch.equal(model.head.weight, head_before["weight"])
    assert len(report.stage1_history) == 5 and report.stage2_history == []
    assert report.stage1_history[-1]["loss"] < report.stage1_history[0]["loss"]


def test_stage2_moves_layer3_and_layer4_and_reports_how_far(fine_tuned):
    _, report = fine_tuned
    shift = report.backbone_shift
    assert set(shift) == {"layer3_relative_change", "layer4_relative_change",
                          "holdout_embedding_cosine"}
    assert shift["layer4_relative_change"] > 1e-5 and shift["layer3_relative_change"] > 1e-5
    assert -1.0 <= shift["holdout_embedding_cosine"] < 1.0
    metrics = report.metrics()
    assert metrics["stage2_gain_macro_f1"] == pytest.approx(
        report.final_eval.macro_f1 - report.stage1_eval.macro_f1)
    assert metrics["layer4_relative_change"] == shift["layer4_relative_change"]
    assert report.as_dict()["backbone_shift"] == shift
    assert set(report.stage1_head) == {"weight", "bias"}


def test_two_stage_training_is_deterministic_for_a_seed(patterns, fine_tuned):
    first_model, first_report = fine_tuned
    model = build_model()
    report = train_two_stage(model, patterns, FAST)
    first = first_model.state_dict()
    assert all(torch.equal(first[k], v) for k, v in model.state_dict().items())
    assert report.stage1_history == first_report.stage1_history
    assert report.stage2_history == first_report.stage2_history
    assert np.array_equal(report.confusion, first_report.confusion)


def test_a_different_seed_gives_a_different_head(patterns):
    heads = []
    for seed in (7, 7, 8):
        model = ClassifierModel(build_backbone(), CLASSES, seed=seed)
        config = TrainConfig(seed=seed, head_epochs=2, finetune_epochs=0, precision="fp32")
        train_two_stage(model, patterns, config)
        heads.append(model.head.weight.detach().clone())
    assert torch.equal(heads[0], heads[1])
    assert not torch.equal(heads[0], heads[2])


def test_labels_outside_the_model_class_set_name_both_sets(patterns):
    model = build_model(classes=("axial", "coronal", "sagittal", "other"))
    with pytest.raises(TrainingError) as error:
        train_two_stage(model, patterns, FAST)
    message = str(error.value)
    assert "'axial_inferior'" in message and "'other'" in message


def test_a_class_without_training_examples_is_rejected(patterns):
    train = patterns.train
    keep = np.array([label != "coronal" for label in train.labels])
    without_coronal = LabeledSlices(
        train.images[keep], [label for label, k in zip(train.labels, keep, strict=True) if k],
        train.embeddings[keep])
    with pytest.raises(TrainingError, match=r"no examples of class\(es\) \['coronal'\]"):
        train_two_stage(build_model(), replace(patterns, train=without_coronal), FAST)


def test_no_expert_labels_is_rejected(patterns):
    train = patterns.train
    no_rows = LabeledSlices(train.images[:0], [], train.embeddings[:0])
    with pytest.raises(TrainingError, match="no expert labels"):
        train_two_stage(build_model(), replace(patterns, train=no_rows), FAST)


def test_a_precision_the_policy_refuses_is_a_training_error(patterns):
    with pytest.raises(TrainingError, match="'auto', 'fp32', 'bf16', 'fp16'"):
        TrainConfig(precision="int8")
    fp16 = TrainConfig(seed=3, head_epochs=1, finetune_epochs=0, precision="fp16")
    with pytest.raises(TrainingError, match="TrainConfig.precision: precision 'fp16' is for CUDA"):
        train_two_stage(build_model(), patterns, fp16, device="cpu")


def test_embeddings_from_another_backbone_are_rejected(patterns):
    other = replace(patterns, embeddings_model_id="resnet18:none:000000000000")
    with pytest.raises(TrainingError, match="re-embed"):
        train_two_stage(build_model(), other, FAST)


def test_stage2_rows_restrict_stage2_only(patterns, fine_tuned):
    full_model, full_report = fine_tuned
    n_train = len(patterns.train.labels)
    subset = list(range(0, n_train, 2))
    model = build_model()
    report = train_two_stage(model, replace(patterns, stage2_rows=subset), FAST)
    assert report.stage1_history == full_report.stage1_history, "stage 1 still sees every row"
    assert report.n_train == n_train and report.n_stage2 == len(subset)
    assert full_report.n_stage2 == n_train
    full = full_model.state_dict()
    assert not all(torch.equal(full[k], v) for k, v in model.state_dict().items())
    with pytest.raises(TrainingError, match="stage2_rows"):
        train_two_stage(build_model(), replace(patterns, stage2_rows=[n_train]), FAST)


def test_a_stage2_that_loses_on_withheld_rows_is_rolled_back_to_stage1(more_patterns):
    model = build_model()
    before = snapshot(model.backbone)
    # Clipped, but a step size far too large: stage 2 wrecks what stage 1 fitted.
    wrecking = TrainConfig(seed=3, head_epochs=5, finetune_epochs=2, batch_size=8, lr_head=1.0,
                           lr_layer4=1.0, lr_layer3=1.0, max_grad_norm=1.0, precision="fp32")
    report = train_two_stage(model, more_patterns, wrecking)
    selection = report.stage2_selection
    assert selection["validation_rows"] == 12 and not report.stage2_kept
    assert selection["validation_macro_f1_stage2"] < selection["validation_macro_f1_stage1"]
    assert report.final_eval == report.stage1_eval and report.stage2_gain == 0.0
    assert "rejected_holdout_macro_f1" in selection and report.metrics()["stage2_kept"] == 0.0
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "stage-1 weights restored"
    assert model.embedding_model_id == report.initial_backbone_model_id
    head = {k: v for k, v in model.head.state_dict().items()}
    assert all(torch.equal(head[k], report.stage1_head[k]) for k in head)


def test_a_stage2_that_holds_on_withheld_rows_is_kept_and_they_train_neither_stage(
    more_patterns
):
    train = more_patterns.train
    model = ClassifierModel(build_backbone(seed=0), CLASSES, seed=FAST.seed)
    report = train_two_stage(model, more_patterns, FAST)
    selection = report.stage2_selection
    assert report.stage2_kept == (
        selection["validation_macro_f1_stage2"] >= selection["validation_macro_f1_stage1"])
    assert report.stage2_kept, "a gentle stage 2 on well-separated patterns holds up"
    # The 12 withheld rows train neither stage: stage 1 is the head fitted on the other 48.
    withheld = np.zeros(len(train.labels), dtype=bool)
    withheld[np.random.default_rng(FAST.seed).permutation(len(train.labels))[:12]] = True
    head = fit_embedding_head(train.embeddings[~withheld], list(np.array(train.labels)[~withheld]),
                              CLASSES, FAST, model.embedding_model_id or "")
    np.testing.assert_allclose(head.weight, report.stage1_head["weight"].double().numpy(),
                               rtol=1e-5, atol=1e-6)
    unchecked = train_two_stage(build_model(), more_patterns,
                                TrainConfig(**{**FAST.__dict__, "stage2_validation_fraction": 0.0}))
    assert unchecked.stage2_selection == {"validation_rows": 0, "kept": True}


# ---------------------------------------------------------------- real slices (MNI152 template)

MNI = (
    Path(nib.__file__).parent.parent
    / "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
)


def _resize(plane: np.ndarray, low: float, high: float) -> np.ndarray:
    scaled = np.clip((plane - low) / (high - low), 0, 1) * 255
    return np.asarray(Image.fromarray(scaled.astype(np.uint8)).resize((SIZE, SIZE), Image.BILINEAR))


def _mni_slices(rng: np.random.Generator, n_per_class: int) -> tuple[np.ndarray, list[str]]:
    volume = np.asarray(nib.load(MNI).dataobj, dtype=np.float32)
    low, high = np.percentile(volume, [1, 99.5])
    nx, ny, nz = volume.shape
    cuts = {
        "axial_inferior": lambda i: volume[:, :, i],
        "axial_superior": lambda i: volume[:, :, i],
        "coronal": lambda i: volume[:, i, :],
        "sagittal": lambda i: volume[i, :, :],
    }
    ranges = {
        "axial_inferior": (int(nz * 0.2), int(nz * 0.4)),
        "axial_superior": (int(nz * 0.6), int(nz * 0.8)),
        "coronal": (int(ny * 0.25), int(ny * 0.75)),
        "sagittal": (int(nx * 0.2), int(nx * 0.8)),
    }
    images, labels = [], []
    for name in CLASSES:
        for index in rng.choice(np.arange(*ranges[name]), n_per_class, replace=False):
            images.append(_resize(np.rot90(cuts[name](int(index))), low, high))
            labels.append(name)
    return np.stack(images), labels


def test_two_stage_on_real_mni_slices_beats_chance_and_reports_the_holdout():
    rng = np.random.default_rng(0)
    images, labels = _mni_slices(rng, 10)
    holdout = np.arange(len(labels)) % 5 == 0
    model = build_model()
    data = TrainingData(
        train=LabeledSlices(images[~holdout],
                            [label for label, h in zip(labels, holdout, strict=True) if not h],
                            embed(model, images[~holdout])),
        holdout=LabeledSlices(images[holdout],
                              [label for label, h in zip(labels, holdout, strict=True) if h]),
        embeddings_model_id=model.embedding_model_id,
    )
    config = TrainConfig(seed=0, batch_size=16, precision="fp32")
    report = train_two_stage(model, data, config, "cpu")
    assert report.final_eval.n == holdout.sum() == report.confusion.sum()
    assert report.confusion.sum(axis=1).tolist() == [holdout.sum() // 4] * 4
    assert report.stage1_eval.macro_f1 > 0.5 and report.macro_f1 > 0.5
    assert set(report.metrics()) >= {"holdout_macro_f1", "stage2_epoch2_loss", "stage1_epoch4_loss"}
    assert len(report.stage2_history) == 3
