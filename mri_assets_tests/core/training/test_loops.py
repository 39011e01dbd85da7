from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mri_assets.core.training.errors import TrainingError
from mri_assets.core.training.inputs import ImageBatches
from mri_assets.core.training.loops import (
    flip_left_right,
    train_head_on_embeddings,
    train_one_epoch,
)
from mri_assets.core.training.schedule import configure_stage2
from mri_assets_tests.core.training.pattern_fixtures import (
    build_model,
    embed,
    head_probs,
    label_codes,
)


def test_left_right_flips_mirror_about_half_the_batch_and_never_up_down():
    images = torch.arange(64, dtype=torch.uint8).reshape(1, 1, 8, 8).repeat(40, 1, 1, 1)
    flipped = flip_left_right(images, torch.Generator().manual_seed(0))
    mirrored = [torch.equal(f, images[0].flip(-1)) for f in flipped]
    kept = [torch.equal(f, images[0]) for f in flipped]
    assert all(m or k for m, k in zip(mirrored, kept, strict=True))
    assert 10 < sum(mirrored) < 30


def test_nan_loss_stops_training_naming_epoch_and_step(patterns):
    model = build_model()
    optimizer = configure_stage2(model)
    with torch.no_grad():
        model.head.weight.fill_(float("nan"))
    loader = ImageBatches(patterns.train.images[:4], np.zeros(4), batch_size=4)
    with pytest.raises(TrainingError, match=r"epoch 2, step 0"):
        train_one_epoch(model, nn.CrossEntropyLoss(), optimizer, loader, "cpu", "fp32", epoch=2)


def test_non_finite_embeddings_are_rejected_with_their_rows(patterns):
    broken = patterns.train.embeddings.copy()
    broken[[3, 9], 0] = np.inf
    with pytest.raises(TrainingError, match=r"2 embedding row\(s\).*\[3, 9\]"):
        train_head_on_embeddings(nn.Linear(512, 4), broken, label_codes(patterns.train.labels))


def test_a_head_fitted_on_cached_embeddings_predicts_from_images_as_from_the_cache(patterns):
    """The standardisation stage 1 trains with is folded back: the head reads raw backbone
    features, so the model on images and the head on float16 cached embeddings agree."""
    model = build_model()
    y = label_codes(patterns.train.labels)
    train_head_on_embeddings(model.head, patterns.train.embeddings, y, epochs=3, seed=0)
    images = patterns.holdout.images
    model.eval()
    with torch.no_grad():
        from_images = torch.softmax(model(torch.from_numpy(images[:, None])), dim=1).numpy()
    from_embeddings = head_probs(model, embed(model, images))
    assert from_images.shape == (len(images), 4)
    np.testing.assert_allclose(from_embeddings, from_images, atol=2e-3)
    np.testing.assert_allclose(from_images.sum(axis=1), 1.0, atol=1e-5)
