from __future__ import annotations

import io
import itertools
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import f1_score
from torch import nn

from mri_assets.core.backbone import build_backbone
from mri_assets.core.train import (
    STAGE2_PARTS,
    ClassifierModel,
    ImageBatches,
    SliceRows,
    TrainConfig,
    TrainingError,
    backbone_state_from_checkpoint,
    compare_to_supervised_baseline,
    configure_stage2,
    confusion_matrix_png,
    embedding_head_from_checkpoint,
    eval_result_from_predictions,
    fit_embedding_head,
    flip_left_right,
    load_checkpoint,
    predict_proba,
    read_checkpoint,
    relative_change,
    save_checkpoint,
    stage2_lr_factor,
    train_head_on_embeddings,
    train_one_epoch,
    train_supervised_baseline,
    train_two_stage,
)

CLASSES = ("axial_inferior", "axial_superior", "coronal", "sagittal")
SIZE = 64
FAST = TrainConfig(
    seed=3, head_epochs=5, finetune_epochs=1, batch_size=8, eval_batch_size=32, precision="fp32"
)


def _model(seed: int = 0, classes=CLASSES) -> ClassifierModel:
    return ClassifierModel(build_backbone(seed=seed), classes, seed=seed)


def _pattern_slices(n_per_class: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """Four visually distinct uint8 patterns (one per class) with noise and random phase."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    images, labels = [], []
    for k, name in enumerate(CLASSES):
        for _ in range(n_per_class):
            phase = rng.uniform(0, 2 * np.pi)
            if k == 0:
                base = np.sin(12 * yy * np.pi + phase)
            elif k == 1:
                base = np.sin(12 * xx * np.pi + phase)
            elif k == 2:
                base = np.where(
                    (yy - 0.5) ** 2 + (xx - 0.5) ** 2 < rng.uniform(0.05, 0.12), 1.0, -1.0
                )
            else:
                base = np.sign(np.sin(8 * yy * np.pi + phase) * np.sin(8 * xx * np.pi))
            noisy = base + rng.normal(0, 0.3, base.shape)
            images.append(np.clip((noisy + 1.5) * 85, 0, 255).astype(np.uint8))
            labels.append(name)
    return np.stack(images), labels


@torch.no_grad()
def _embed(model: ClassifierModel, images: np.ndarray) -> np.ndarray:
    model.eval()
    return model.backbone(torch.from_numpy(images[:, None])).numpy().astype(np.float16)


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """On the shared 2-core machine one intra-op thread is several times faster than two."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def pattern_data():
    train_images, train_labels = _pattern_slices(4, seed=1)
    eval_images, eval_labels = _pattern_slices(2, seed=2)
    train_embeddings = _embed(_model(), train_images)
    return train_images, train_labels, train_embeddings, eval_images, eval_labels


@pytest.fixture(scope="module")
def fine_tuned(pattern_data):
    """One two-stage run shared (read-only) by the tests that need a fine-tuned model."""
    train_images, train_labels, train_embeddings, eval_images, eval_labels = pattern_data
    model = _model()
    report = train_two_stage(
        model, train_embeddings, train_images, train_labels, eval_images, eval_labels, FAST
    )
    return model, report


def test_stage1_trains_the_head_and_leaves_backbone_bit_identical(pattern_data):
    train_images, train_labels, train_embeddings, eval_images, eval_labels = pattern_data
    model = _model()
    backbone_before = _snapshot(model.backbone)
    head_before = _snapshot(model.head)
    config = TrainConfig(seed=3, head_epochs=5, finetune_epochs=0, precision="fp32")
    report = train_two_stage(
        model, train_embeddings, train_images, train_labels, eval_images, eval_labels, config, "cpu"
    )
    after = model.backbone.state_dict()
    assert after.keys() == backbone_before.keys()
    for key, value in backbone_before.items():
        assert torch.equal(after[key], value), key
    assert not torch.equal(model.head.weight, head_before["weight"])
    assert len(report.stage1_history) == 5 and report.stage2_history == []
    assert report.stage1_history[-1]["loss"] < report.stage1_history[0]["loss"]


def test_stage2_changes_only_layer3_layer4_and_head(pattern_data):
    train_images, train_labels, _, _, _ = pattern_data
    model = _model()
    before = _snapshot(model)
    optimizer = configure_stage2(
        model, lr_head=0.1, lr_layer4=0.1, lr_layer3=0.1, train_batchnorm_stats=True
    )
    y = np.array([CLASSES.index(label) for label in train_labels])
    loader = ImageBatches(train_images[:8], y[:8], batch_size=8, seed=0)
    train_one_epoch(model, nn.CrossEntropyLoss(), optimizer, loader, "cpu", "fp32", epoch=0)
    after = model.state_dict()
    trainable = ("backbone.body.layer3.", "backbone.body.layer4.", "head.")
    changed = {key for key, value in before.items() if not torch.equal(after[key], value)}
    assert {key for key in changed if not key.startswith(trainable)} == set()
    for prefix in trainable:
        assert any(key.startswith(prefix) and key.endswith("weight") for key in changed), prefix


def test_stage2_optimizer_has_discriminative_lrs_without_decay_on_norms_and_frozen_batchnorm():
    model = _model()
    optimizer = configure_stage2(model, lr_head=1e-3)
    assert isinstance(optimizer, torch.optim.SGD)
    assert all(g["momentum"] == 0.9 and g["nesterov"] for g in optimizer.param_groups)
    names = [g["name"] for g in optimizer.param_groups]
    assert names == [n for part in STAGE2_PARTS for n in (part, f"{part}.no_decay")]
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert [lrs[p] for p in STAGE2_PARTS] == pytest.approx([1e-3, 1e-3 / 3, 1e-4])
    assert all(g["initial_lr"] == g["lr"] for g in optimizer.param_groups)
    assert all((g["weight_decay"] == 0) == g["name"].endswith("no_decay") for g in optimizer.param_groups)
    assert all(p.ndim == 1 for g in optimizer.param_groups if g["name"].endswith("no_decay")
               for p in g["params"])
    custom = configure_stage2(model, lr_head=2e-3, lr_layer4=5e-4, lr_layer3=7e-5)
    assert [g["lr"] for g in custom.param_groups[::2]] == pytest.approx([2e-3, 5e-4, 7e-5])

    in_groups = {id(p) for g in optimizer.param_groups for p in g["params"]}
    body = model.backbone.body
    expected = {id(p) for m in (body.layer3, body.layer4, model.head) for p in m.parameters()}
    assert in_groups == expected
    assert {id(p) for p in model.parameters() if p.requires_grad} == expected

    model.train()
    batchnorms = [
        (name, module)
        for name, module in model.backbone.body.named_modules()
        if isinstance(module, nn.BatchNorm2d)
    ]
    assert not any(module.training for _, module in batchnorms)
    configure_stage2(model, train_batchnorm_stats=True)
    model.train()
    for name, module in batchnorms:
        assert module.training == name.startswith(("layer3", "layer4")), name


def test_stage2_schedule_warms_up_then_decays_to_zero():
    factors = [stage2_lr_factor(step, 50, 0.1) for step in range(50)]
    assert factors[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert all(a >= b for a, b in itertools.pairwise(factors[4:]))
    assert factors[-1] < 0.01
    assert stage2_lr_factor(0, 10, 0.0) == 1.0


def test_left_right_flips_mirror_about_half_the_batch_and_never_up_down():
    images = torch.arange(64, dtype=torch.uint8).reshape(1, 1, 8, 8).repeat(40, 1, 1, 1)
    flipped = flip_left_right(images, torch.Generator().manual_seed(0))
    mirrored = [torch.equal(f, images[0].flip(-1)) for f in flipped]
    kept = [torch.equal(f, images[0]) for f in flipped]
    assert all(m or k for m, k in zip(mirrored, kept, strict=True))
    assert 10 < sum(mirrored) < 30


def test_stage2_moves_layer3_and_layer4_and_reports_how_far(pattern_data, fine_tuned):
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


def test_relative_change_is_the_norm_of_the_difference_over_the_norm_before():
    before = {"layer3.a": torch.tensor([3.0, 4.0]), "layer4.a": torch.tensor([1.0])}
    after = {"layer3.a": torch.tensor([3.0, 4.5]), "layer4.a": torch.tensor([1.0])}
    assert relative_change(before, after, "layer3.") == pytest.approx(0.1)
    assert relative_change(before, after, "layer4.") == 0.0
    with pytest.raises(TrainingError, match="layer9"):
        relative_change(before, after, "layer9.")


def test_the_stage1_head_saved_in_the_checkpoint_predicts_from_cached_embeddings(pattern_data):
    train_images, train_labels, train_embeddings, eval_images, eval_labels = pattern_data
    model = _model()
    config = TrainConfig(seed=3, head_epochs=5, finetune_epochs=0, precision="fp32")
    report = train_two_stage(model, train_embeddings, train_images, train_labels, eval_images,
                             eval_labels, config)
    data = save_checkpoint(model, CLASSES, {}, embedding_head=report.stage1_head,
                           embedding_model_id=report.initial_backbone_model_id)
    head = embedding_head_from_checkpoint(data)
    assert head is not None and head.embedding_model_id == model.embedding_model_id
    cached = _embed(model, eval_images)
    np.testing.assert_allclose(head.predict_proba(cached, model.embedding_model_id),
                               predict_proba(model, cached), atol=1e-4)
    with pytest.raises(TrainingError, match="re-embed"):
        head.predict_proba(cached, "resnet18:none:000000000000")
    assert embedding_head_from_checkpoint(save_checkpoint(model, CLASSES, {})) is None


def test_two_stage_training_is_deterministic_for_a_seed(pattern_data, fine_tuned):
    train_images, train_labels, train_embeddings, eval_images, eval_labels = pattern_data
    first_model, first_report = fine_tuned
    model = _model()
    report = train_two_stage(
        model, train_embeddings, train_images, train_labels, eval_images, eval_labels, FAST
    )
    first = first_model.state_dict()
    assert all(torch.equal(first[k], v) for k, v in model.state_dict().items())
    assert report.stage1_history == first_report.stage1_history
    assert report.stage2_history == first_report.stage2_history
    assert np.array_equal(report.confusion, first_report.confusion)


def test_a_different_seed_gives_a_different_head(pattern_data):
    train_images, train_labels, train_embeddings, eval_images, eval_labels = pattern_data
    heads = []
    for seed in (7, 7, 8):
        model = ClassifierModel(build_backbone(), CLASSES, seed=seed)
        config = TrainConfig(seed=seed, head_epochs=2, finetune_epochs=0, precision="fp32")
        train_two_stage(
            model, train_embeddings, train_images, train_labels, eval_images, eval_labels, config
        )
        heads.append(model.head.weight.detach().clone())
    assert torch.equal(heads[0], heads[1])
    assert not torch.equal(heads[0], heads[2])


def test_nan_loss_stops_training_naming_epoch_and_step(pattern_data):
    train_images = pattern_data[0]
    model = _model()
    optimizer = configure_stage2(model)
    with torch.no_grad():
        model.head.weight.fill_(float("nan"))
    loader = ImageBatches(train_images[:4], np.zeros(4), batch_size=4)
    with pytest.raises(TrainingError, match=r"epoch 2, step 0"):
        train_one_epoch(model, nn.CrossEntropyLoss(), optimizer, loader, "cpu", "fp32", epoch=2)


def test_non_finite_embeddings_are_rejected_with_their_rows(pattern_data):
    _, train_labels, train_embeddings, _, _ = pattern_data
    broken = train_embeddings.copy()
    broken[[3, 9], 0] = np.inf
    y = np.array([CLASSES.index(label) for label in train_labels])
    with pytest.raises(TrainingError, match=r"2 embedding row\(s\).*\[3, 9\]"):
        train_head_on_embeddings(nn.Linear(512, 4), broken, y)


def test_labels_outside_the_model_class_set_name_both_sets(pattern_data):
    train_images, train_labels, train_embeddings, eval_images, eval_labels = pattern_data
    model = _model(classes=("axial", "coronal", "sagittal", "other"))
    with pytest.raises(TrainingError) as error:
        train_two_stage(
            model, train_embeddings, train_images, train_labels, eval_images, eval_labels, FAST
        )
    message = str(error.value)
    assert "'axial_inferior'" in message and "'other'" in message


def test_a_class_without_training_examples_is_rejected(pattern_data):
    train_images, train_labels, train_embeddings, eval_images, eval_labels = pattern_data
    keep = np.array([label != "coronal" for label in train_labels])
    with pytest.raises(TrainingError, match=r"no examples of class\(es\) \['coronal'\]"):
        train_two_stage(
            _model(),
            train_embeddings[keep],
            train_images[keep],
            [label for label, k in zip(train_labels, keep, strict=True) if k],
            eval_images,
            eval_labels,
            FAST,
        )


def test_no_expert_labels_is_rejected(pattern_data):
    train_images, train_labels, train_embeddings, eval_images, eval_labels = pattern_data
    with pytest.raises(TrainingError, match="no expert labels"):
        train_supervised_baseline(
            _model(),
            train_embeddings,
            train_images,
            train_labels,
            np.zeros(len(train_labels), dtype=bool),
            eval_images,
            eval_labels,
            FAST,
        )
    with pytest.raises(TrainingError, match="no expert labels"):
        train_two_stage(
            _model(), train_embeddings[:0], train_images[:0], [], eval_images, eval_labels, FAST
        )


def test_a_precision_the_policy_refuses_is_a_training_error(pattern_data):
    with pytest.raises(TrainingError, match="'auto', 'fp32', 'bf16', 'fp16'"):
        TrainConfig(precision="int8")
    train_images, train_labels, train_embeddings, eval_images, eval_labels = pattern_data
    fp16 = TrainConfig(seed=3, head_epochs=1, finetune_epochs=0, precision="fp16")
    with pytest.raises(TrainingError, match="TrainConfig.precision: precision 'fp16' is for CUDA"):
        train_two_stage(_model(), train_embeddings, train_images, train_labels, eval_images,
                        eval_labels, fp16, device="cpu")


def test_embeddings_from_another_backbone_are_rejected(pattern_data):
    train_images, train_labels, train_embeddings, eval_images, eval_labels = pattern_data
    with pytest.raises(TrainingError, match="re-embed"):
        train_two_stage(
            _model(),
            train_embeddings,
            train_images,
            train_labels,
            eval_images,
            eval_labels,
            FAST,
            embeddings_model_id="resnet18:none:000000000000",
        )


def test_checkpoint_round_trip_gives_the_same_predictions(pattern_data, fine_tuned):
    eval_images = pattern_data[3]
    model, _ = fine_tuned
    data = save_checkpoint(model, CLASSES, {"wave": "pilot", "expert_snapshot": "abc"})

    payload = read_checkpoint(data)
    assert payload["meta"] == {"wave": "pilot", "expert_snapshot": "abc"}
    assert backbone_state_from_checkpoint(payload).keys() == model.backbone.state_dict().keys()

    loaded = load_checkpoint(data, list(reversed(CLASSES)))
    assert loaded.class_names == CLASSES
    assert loaded.embedding_model_id == payload["backbone_model_id"]
    assert payload["backbone_model_id"].split(":")[2] != model.backbone.model_id.split(":")[2]
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    np.testing.assert_allclose(
        predict_proba(loaded, eval_images), predict_proba(model, eval_images), atol=1e-5
    )


def test_loading_a_checkpoint_for_another_class_set_names_both_sets():
    data = save_checkpoint(_model(), CLASSES, {})
    with pytest.raises(TrainingError) as error:
        load_checkpoint(data, ["axial", "coronal", "sagittal"])
    assert "'axial_inferior'" in str(error.value) and "'axial'" in str(error.value)


def test_predict_proba_from_cached_embeddings_matches_the_image_path(pattern_data, fine_tuned):
    _, train_labels, train_embeddings, eval_images, _ = pattern_data
    model = _model()
    y = np.array([CLASSES.index(label) for label in train_labels])
    train_head_on_embeddings(model.head, train_embeddings, y, epochs=3, seed=0)
    from_images = predict_proba(model, eval_images)
    from_embeddings = predict_proba(
        model, _embed(model, eval_images), embeddings_model_id=model.embedding_model_id
    )
    assert from_images.shape == (len(eval_images), 4)
    np.testing.assert_allclose(from_embeddings, from_images, atol=2e-3)
    np.testing.assert_allclose(from_images.sum(axis=1), 1.0, atol=1e-5)

    fine_tuned_model, _ = fine_tuned
    with pytest.raises(TrainingError, match="fine-tuned"):
        predict_proba(fine_tuned_model, train_embeddings)


def test_slice_rows_read_the_requested_rows_across_shards():
    shards = [np.arange(5 * 4, dtype=np.uint8).reshape(5, 2, 2) + 100 * s for s in range(2)]
    rows = SliceRows(shards, shard=np.array([1, 0, 1]), row=np.array([4, 2, 0]))
    got = rows[np.array([0, 2, 1])]
    np.testing.assert_array_equal(got, np.stack([shards[1][4], shards[1][0], shards[0][2]]))
    with pytest.raises(TrainingError, match="row outside shard 0"):
        SliceRows(shards, shard=np.array([0]), row=np.array([5]))


def test_image_batches_cover_every_row_once_and_keep_a_trailing_single_row():
    def batches(seed: int, epoch: int) -> list[list[int]]:
        loader = ImageBatches(np.zeros((9, 4, 4), np.uint8), np.arange(9), batch_size=4, seed=seed)
        loader.set_epoch(epoch)
        return [labels.tolist() for _, labels in loader]

    seen = batches(1, 0)
    assert [len(b) for b in seen] == [4, 5]
    assert sorted(label for batch in seen for label in batch) == list(range(9))
    assert batches(1, 0) == seen
    assert batches(1, 1) != seen
    assert batches(2, 0) != seen


def test_macro_f1_and_confusion_agree_with_scikit_learn():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 4, 200)
    y_pred = np.where(rng.random(200) < 0.7, y_true, rng.integers(0, 4, 200))
    result = eval_result_from_predictions(y_true, y_pred, CLASSES)
    assert result.macro_f1 == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    per_class = f1_score(y_true, y_pred, average=None, labels=range(4))
    assert list(result.per_class_f1.values()) == pytest.approx(list(per_class))
    assert result.confusion.sum() == 200 and result.confusion[1, 2] == np.sum(
        (y_true == 1) & (y_pred == 2)
    )
    assert confusion_matrix_png(result).startswith(b"\x89PNG")


def test_baseline_comparison_starts_both_models_from_the_same_weights(pattern_data):
    train_images, train_labels, train_embeddings, eval_images, eval_labels = pattern_data
    seeds = iter([0, 1])
    with pytest.raises(TrainingError, match="deterministic"):
        compare_to_supervised_baseline(
            lambda: _model(next(seeds)),
            train_embeddings,
            train_images,
            train_labels,
            np.ones(len(train_labels), bool),
            eval_images,
            eval_labels,
            FAST,
        )
    expert = np.arange(len(train_labels)) % 2 == 0
    comparison = compare_to_supervised_baseline(
        _model,
        train_embeddings,
        train_images,
        train_labels,
        expert,
        eval_images,
        eval_labels,
        TrainConfig(seed=3, head_epochs=2, finetune_epochs=0),
    )
    assert comparison.baseline.n_train == expert.sum()
    assert comparison.semi_supervised.n_train == len(train_labels)
    assert comparison.baseline.n_eval == comparison.semi_supervised.n_eval == len(eval_labels)
    assert comparison.baseline.config == comparison.semi_supervised.config


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
    model = _model()
    train_embeddings = _embed(model, images[~holdout])
    train_labels = [label for label, h in zip(labels, holdout, strict=True) if not h]
    eval_labels = [label for label, h in zip(labels, holdout, strict=True) if h]
    config = TrainConfig(seed=0, batch_size=16, precision="fp32")
    report = train_two_stage(
        model,
        train_embeddings,
        images[~holdout],
        train_labels,
        images[holdout],
        eval_labels,
        config,
        "cpu",
        embeddings_model_id=model.embedding_model_id,
    )
    assert report.final_eval.n == holdout.sum() == report.confusion.sum()
    assert report.confusion.sum(axis=1).tolist() == [holdout.sum() // 4] * 4
    assert report.stage1_eval.macro_f1 > 0.5 and report.macro_f1 > 0.5
    assert set(report.metrics()) >= {"holdout_macro_f1", "stage2_epoch2_loss", "stage1_epoch4_loss"}
    assert len(report.stage2_history) == 3
    assert isinstance(io.BytesIO(confusion_matrix_png(report.final_eval)).read(8), bytes)


def test_stage2_rows_restrict_stage2_only(pattern_data, fine_tuned):
    train_images, train_labels, train_embeddings, eval_images, eval_labels = pattern_data
    full_model, full_report = fine_tuned
    subset = list(range(0, len(train_labels), 2))
    model = _model()
    report = train_two_stage(model, train_embeddings, train_images, train_labels, eval_images,
                             eval_labels, FAST, stage2_rows=subset)
    assert report.stage1_history == full_report.stage1_history, "stage 1 still sees every row"
    assert report.n_train == len(train_labels) and report.n_stage2 == len(subset)
    assert full_report.n_stage2 == len(train_labels)
    full = full_model.state_dict()
    assert not all(torch.equal(full[k], v) for k, v in model.state_dict().items())
    with pytest.raises(TrainingError, match="stage2_rows"):
        train_two_stage(_model(), train_embeddings, train_images, train_labels, eval_images,
                        eval_labels, FAST, stage2_rows=[len(train_labels)])


@pytest.fixture(scope="module")
def larger_pattern_data():
    """60 training rows: enough for stage 2's withheld validation rows (20 %, at least 10)."""
    train_images, train_labels = _pattern_slices(15, seed=4)
    eval_images, eval_labels = _pattern_slices(2, seed=5)
    return train_images, train_labels, _embed(_model(), train_images), eval_images, eval_labels


def test_a_stage2_that_loses_on_withheld_rows_is_rolled_back_to_stage1(larger_pattern_data):
    train_images, train_labels, train_embeddings, eval_images, eval_labels = larger_pattern_data
    model = _model()
    before = _snapshot(model.backbone)
    # Clipped, but a step size far too large: stage 2 wrecks what stage 1 fitted.
    wrecking = TrainConfig(seed=3, head_epochs=5, finetune_epochs=2, batch_size=8, lr_head=1.0,
                           lr_layer4=1.0, lr_layer3=1.0, max_grad_norm=1.0, precision="fp32")
    report = train_two_stage(model, train_embeddings, train_images, train_labels, eval_images,
                             eval_labels, wrecking)
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
    larger_pattern_data
):
    train_images, train_labels, train_embeddings, eval_images, eval_labels = larger_pattern_data
    model = ClassifierModel(build_backbone(seed=0), CLASSES, seed=FAST.seed)
    report = train_two_stage(model, train_embeddings, train_images, train_labels, eval_images,
                             eval_labels, FAST)
    selection = report.stage2_selection
    assert report.stage2_kept == (
        selection["validation_macro_f1_stage2"] >= selection["validation_macro_f1_stage1"])
    assert report.stage2_kept, "a gentle stage 2 on well-separated patterns holds up"
    # The 12 withheld rows train neither stage: stage 1 is the head fitted on the other 48.
    withheld = np.zeros(len(train_labels), dtype=bool)
    withheld[np.random.default_rng(FAST.seed).permutation(len(train_labels))[:12]] = True
    head = fit_embedding_head(train_embeddings[~withheld], list(np.array(train_labels)[~withheld]),
                              CLASSES, FAST, model.embedding_model_id or "")
    np.testing.assert_allclose(head.weight, report.stage1_head["weight"].double().numpy(),
                               rtol=1e-5, atol=1e-6)
    unchecked = train_two_stage(_model(), train_embeddings, train_images, train_labels,
                                eval_images, eval_labels,
                                TrainConfig(**{**FAST.__dict__, "stage2_validation_fraction": 0.0}))
    assert unchecked.stage2_selection == {"validation_rows": 0, "kept": True}
