from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from mri_assets.core.training.inputs import ImageBatches
from mri_assets.core.training.loops import train_one_epoch
from mri_assets.core.training.schedule import STAGE2_PARTS, configure_stage2, stage2_lr_factor
from mri_assets_tests.core.training.pattern_fixtures import build_model, label_codes, snapshot


def test_stage2_changes_only_layer3_layer4_and_head(patterns):
    model = build_model()
    before = snapshot(model)
    optimizer = configure_stage2(
        model, lr_head=0.1, lr_layer4=0.1, lr_layer3=0.1, train_batchnorm_stats=True
    )
    y = label_codes(patterns.train.labels)
    loader = ImageBatches(patterns.train.images[:8], y[:8], batch_size=8, seed=0)
    train_one_epoch(model, nn.CrossEntropyLoss(), optimizer, loader, "cpu", "fp32", epoch=0)
    after = model.state_dict()
    trainable = ("backbone.body.layer3.", "backbone.body.layer4.", "head.")
    changed = {key for key, value in before.items() if not torch.equal(after[key], value)}
    assert {key for key in changed if not key.startswith(trainable)} == set()
    for prefix in trainable:
        assert any(key.startswith(prefix) and key.endswith("weight") for key in changed), prefix


def test_stage2_optimizer_has_discriminative_lrs_without_decay_on_norms_and_frozen_batchnorm():
    model = build_model()
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
