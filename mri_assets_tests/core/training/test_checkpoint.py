from __future__ import annotations

import numpy as np
import pytest
import torch

from mri_assets.core.backbone import build_backbone
from mri_assets.core.training.checkpoint import (
    backbone_checkpoint,
    backbone_state_from_checkpoint,
    embedding_head_from_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from mri_assets.core.training.errors import TrainingError
from mri_assets.core.training.two_stage import TrainConfig, train_two_stage
from mri_assets_tests.core.training.pattern_fixtures import CLASSES, build_model, embed, head_probs


def test_the_stage1_head_saved_in_the_checkpoint_predicts_from_cached_embeddings(patterns):
    model = build_model()
    config = TrainConfig(seed=3, head_epochs=5, finetune_epochs=0, precision="fp32")
    report = train_two_stage(model, patterns, config)
    data = save_checkpoint(model, CLASSES, {}, embedding_head=report.stage1_head,
                           embedding_model_id=report.initial_backbone_model_id)
    head = embedding_head_from_checkpoint(data)
    assert head is not None and head.embedding_model_id == model.embedding_model_id
    cached = embed(model, patterns.holdout.images)
    np.testing.assert_allclose(head.predict_proba(cached, model.embedding_model_id),
                               head_probs(model, cached), atol=1e-4)
    with pytest.raises(TrainingError, match="re-embed"):
        head.predict_proba(cached, "resnet18:none:000000000000")
    assert embedding_head_from_checkpoint(save_checkpoint(model, CLASSES, {})) is None


def test_a_checkpoint_keeps_its_meta_and_gives_back_the_fine_tuned_backbone(fine_tuned):
    model, _ = fine_tuned
    data = save_checkpoint(model, CLASSES, {"wave": "pilot", "expert_snapshot": "abc"})

    payload = read_checkpoint(data)
    assert payload["meta"] == {"wave": "pilot", "expert_snapshot": "abc"}
    assert payload["class_names"] == list(CLASSES)
    assert backbone_state_from_checkpoint(payload).keys() == model.backbone.state_dict().keys()

    backbone = build_backbone(arch=payload["arch"], checkpoint=backbone_checkpoint(data))
    assert backbone.model_id == payload["backbone_model_id"]
    assert payload["backbone_model_id"].split(":")[2] != model.backbone.model_id.split(":")[2]
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(backbone.state_dict()[key], value), key
