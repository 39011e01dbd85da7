"""Self-supervised pretraining: augmentations, objective, schedule, determinism, checkpoint."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import polars as pl
import pytest
import torch
from torch import nn

from mri_assets.core.backbone import GRAY_MEAN, GRAY_STD, build_backbone, read_backbone_meta
from mri_assets.core.embed import CorruptSliceError, SliceShard
from mri_assets.core.pretrain import (
    IndexedSlices,
    PretrainConfig,
    PretrainError,
    contrastive_loss,
    draw_view_params,
    learning_rate,
    plan_pretraining,
    pretrain_backbone,
    quarter_turns,
    recalibrate_batchnorm,
    render_views,
    resized_base,
    view_training_flops,
)
from mri_assets.core.sample_slices import decoded_sample
from mri_assets.core.slice_shards import payload_crc32

TINY = PretrainConfig(seed=5, epochs=2, batch_size=8, bn_recalibration_slices=16)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def real_slices(tmp_path_factory):
    sample = decoded_sample(tmp_path_factory.mktemp("pretrain") / "sample", 24, seed=3)
    return sample.images[:16]


@pytest.fixture(scope="module")
def tiny_run(real_slices):
    return pretrain_backbone(IndexedSlices(real_slices), TINY, input_size=64)


def _half_bright(side: int, where: str) -> torch.Tensor:
    base = torch.zeros(1, 1, side, side)
    if where == "top":
        base[..., : side // 2, :] = 1.0
    else:
        base[..., :, : side // 2] = 1.0
    return base


def test_views_flip_left_right_about_half_the_time_and_never_up_down():
    config = PretrainConfig(crop_scale=(1.0, 1.0), max_rotation_deg=0.0)
    generator = torch.Generator().manual_seed(0)
    top, left = _half_bright(64, "top"), _half_bright(64, "left")
    n = 200
    params = draw_view_params(n, config, generator)
    top_views = render_views(top.expand(n, -1, -1, -1), params, 32, generator)
    left_views = render_views(left.expand(n, -1, -1, -1), params, 32, generator)
    upper, lower = top_views[..., :16, :].mean(dim=(1, 2, 3)), top_views[..., 16:, :].mean(dim=(1, 2, 3))
    assert bool((upper > lower).all()), "a view turned the image upside down"
    mirrored = (left_views[..., :, 16:].mean(dim=(1, 2, 3)) > left_views[..., :, :16].mean(dim=(1, 2, 3)))
    assert 0.35 < float(mirrored.float().mean()) < 0.65


def test_views_are_normalised_like_the_backbone_and_have_the_view_size(real_slices):
    generator = torch.Generator().manual_seed(1)
    base = resized_base(torch.from_numpy(real_slices[:4, None]), 64)
    assert base.shape == (4, 1, 64, 64) and 0.0 <= float(base.min()) and float(base.max()) <= 1.0
    views = render_views(base, draw_view_params(4, TINY, generator), 48, generator)
    assert views.shape == (4, 1, 48, 48)
    assert views.is_contiguous(memory_format=torch.channels_last)
    assert torch.isfinite(views).all()


def test_contrastive_loss_is_low_for_matching_views_and_high_for_mismatched_ones():
    z = torch.eye(6)[:, :6] * 5
    matched = contrastive_loss(z, z.clone(), temperature=0.05)
    mismatched = contrastive_loss(z, z.roll(1, dims=0), temperature=0.05)
    assert float(matched) < 0.01
    assert float(mismatched) > 3.0
    a, b = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), torch.randn(4, 3)
    both = nn.functional.normalize(torch.cat([a, b]), dim=1)
    logits = both @ both.T / 0.5
    logits.fill_diagonal_(-1e4)
    expected = nn.functional.cross_entropy(logits, torch.tensor([4, 5, 6, 7, 0, 1, 2, 3]))
    torch.testing.assert_close(contrastive_loss(a, b, 0.5), expected)


def test_dropping_the_nearest_negatives_masks_each_views_most_similar_others_never_its_partner():
    generator = torch.Generator().manual_seed(3)
    a, b = torch.randn(5, 4, generator=generator), torch.randn(5, 4, generator=generator)
    b[2] = a[2] + 0.01 * torch.randn(4, generator=generator)  # slice 2's views match closely
    a[1] = a[0] + 0.01 * torch.randn(4, generator=generator)  # slice 1 looks like slice 0
    both = nn.functional.normalize(torch.cat([a, b]), dim=1)
    similarity = both @ both.T
    partner = torch.tensor([5, 6, 7, 8, 9, 0, 1, 2, 3, 4])
    expected_rows = []
    for row in range(10):
        negatives = [c for c in range(10) if c not in (row, int(partner[row]))]
        kept = sorted(negatives, key=lambda c: -float(similarity[row, c]))[2:]
        logits = similarity[row, [int(partner[row]), *kept]] / 0.5
        expected_rows.append(-torch.log_softmax(logits, dim=0)[0])
    dropped = contrastive_loss(a, b, 0.5, drop_nearest=2)
    torch.testing.assert_close(dropped, torch.stack(expected_rows).mean())
    # slice 0's view 0 no longer has slice 1's look-alike among its negatives: its loss falls
    assert float(dropped) < float(contrastive_loss(a, b, 0.5))
    # slice 2's partner is its most similar view: it stays the target, never a dropped negative
    assert float(contrastive_loss(a[2:], b[2:], 0.5, drop_nearest=1)) < 10
    # a step too small to drop that many keeps one negative per view
    tiny = contrastive_loss(a[:2], b[:2], 0.5, drop_nearest=50)
    pair = nn.functional.normalize(torch.cat([a[:2], b[:2]]), dim=1)
    sims = pair @ pair.T / 0.5
    keep_one = []
    for row, other in enumerate([2, 3, 0, 1]):
        negatives = [c for c in range(4) if c not in (row, other)]
        lowest = min(negatives, key=lambda c: float(sims[row, c]))
        keep_one.append(-torch.log_softmax(sims[row, [other, lowest]], dim=0)[0])
    torch.testing.assert_close(tiny, torch.stack(keep_one).mean())


def test_learning_rate_warms_up_then_decays_to_zero():
    config = PretrainConfig(lr=1e-3, warmup_fraction=0.1)
    rates = [learning_rate(step, 100, config) for step in range(100)]
    assert rates[0] == pytest.approx(1e-4)
    assert max(rates) == pytest.approx(1e-3) and rates.index(max(rates)) == 9
    assert all(a >= b for a, b in itertools.pairwise(rates[9:]))
    assert rates[-1] < 1e-5


def test_same_seed_gives_the_same_backbone_and_another_seed_another(real_slices, tiny_run):
    again = pretrain_backbone(IndexedSlices(real_slices), TINY, input_size=64)
    other = pretrain_backbone(IndexedSlices(real_slices),
                              PretrainConfig(seed=6, epochs=2, batch_size=8,
                                             bn_recalibration_slices=16), input_size=64)
    assert again.model_id == tiny_run.model_id
    first = build_backbone(checkpoint=tiny_run.checkpoint).state_dict()
    second = build_backbone(checkpoint=again.checkpoint).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert other.model_id != tiny_run.model_id


def test_the_checkpoint_loads_as_an_ssl_backbone_that_embeds_differently(real_slices, tiny_run):
    loaded = build_backbone(checkpoint=tiny_run.checkpoint, input_size=64)
    assert loaded.model_id == tiny_run.model_id
    assert loaded.model_id.startswith("resnet18:ssl:") and loaded.model_id.endswith("@64")
    seeded = build_backbone(seed=TINY.seed, input_size=64)
    pixels = torch.from_numpy(real_slices[:4, None])
    with torch.inference_mode():
        cosine = nn.functional.cosine_similarity(loaded(pixels), seeded(pixels), dim=1)
    assert float(cosine.mean()) < 0.99
    meta = read_backbone_meta(tiny_run.checkpoint)
    assert meta["steps"] == tiny_run.steps == 4 and meta["n_slices"] == 16
    assert meta["view_size"] == 48 and meta["config_seed"] == TINY.seed
    assert len(tiny_run.history) == 2 and all(math.isfinite(h["loss"]) for h in tiny_run.history)


def test_batchnorm_statistics_are_measured_again_on_clean_slices(real_slices):
    backbone = build_backbone(seed=0, input_size=64)
    with torch.no_grad():
        backbone.body.bn1.running_mean.fill_(123.0)
    pixels = torch.from_numpy(real_slices[:, None])
    seen = recalibrate_batchnorm(backbone, IndexedSlices(real_slices), np.arange(16),
                                 torch.device("cpu"), "fp32", batch_size=8)
    assert seen == 16 and not backbone.training
    with torch.no_grad():
        first = backbone.body.conv1(backbone.normalise(pixels))
    torch.testing.assert_close(backbone.body.bn1.running_mean, first.mean(dim=(0, 2, 3)),
                               rtol=1e-4, atol=1e-4)


def test_plan_counts_steps_views_and_flops_that_grow_with_the_view_area():
    plan = plan_pretraining(2000, PretrainConfig(epochs=3, batch_size=100), input_size=128,
                            flops_per_view=10)
    assert (plan.steps_per_epoch, plan.steps, plan.views, plan.view_size) == (20, 60, 12_000, 96)
    assert plan.total_flops == 120_000 and plan.seconds_at(1_000) == 120
    capped = plan_pretraining(2000, PretrainConfig(epochs=3, batch_size=100, max_steps=7),
                              input_size=128, flops_per_view=10)
    assert capped.steps == 7
    small, large = view_training_flops("resnet18", 96), view_training_flops("resnet18", 192)
    assert 3.6 < large / small < 4.2


def test_bad_settings_are_refused_naming_them():
    with pytest.raises(PretrainError, match="batch_size"):
        PretrainConfig(batch_size=1)
    with pytest.raises(PretrainError, match="max_rotation_deg"):
        PretrainConfig(max_rotation_deg=90)
    with pytest.raises(PretrainError, match="drop_nearest_negatives must be >= 0"):
        PretrainConfig(drop_nearest_negatives=-1)
    with pytest.raises(PretrainError, match="at least 2 slices"):
        plan_pretraining(1, PretrainConfig(), flops_per_view=1)


def test_indexed_slices_read_shards_through_the_crc32_check(tmp_path, real_slices):
    pixels = np.ascontiguousarray(real_slices[:6])
    np.save(tmp_path / "shard.npy", pixels)
    pl.DataFrame({"image_id": [f"id-{i}" for i in range(6)], "row": list(range(6)),
                  "payload_crc32": [payload_crc32(p) for p in pixels]}).write_parquet(
        tmp_path / "shard.parquet")
    shard = SliceShard(tmp_path / "shard.npy", tmp_path / "shard.parquet")
    slices = IndexedSlices([shard, shard], [np.array([0, 2]), np.array([5])])
    assert len(slices) == 3
    np.testing.assert_array_equal(slices[np.array([2, 0])][:, 0], pixels[[5, 0]])
    pixels[2, 0, 0] ^= 0xFF
    np.save(tmp_path / "shard.npy", pixels)
    damaged = IndexedSlices([SliceShard(tmp_path / "shard.npy", tmp_path / "shard.parquet")],
                            [np.array([2])])
    with pytest.raises(CorruptSliceError, match="id-2"):
        damaged[np.array([0])]


def test_a_crop_larger_than_the_slice_zooms_out_and_keeps_the_whole_slice_in_view():
    config = PretrainConfig(crop_scale=(2.0, 2.0), max_rotation_deg=0.0)
    generator = torch.Generator().manual_seed(2)
    n = 20
    zero, one = torch.zeros(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
    params = dataclasses.replace(draw_view_params(n, config, generator), gamma=one, contrast=one,
                                 brightness=zero, blur_sigma=zero, noise=zero)
    views = render_views(torch.ones(n, 1, 64, 64), params, 64, generator)
    slice_value = (1.0 - GRAY_MEAN) / GRAY_STD
    shown = (views > slice_value / 2).float().mean(dim=(1, 2, 3))
    assert bool(((shown > 0.35) & (shown < 0.65)).all()), "the slice fills about half the view"
    corners = views[..., [0, 0, -1, -1], [0, -1, 0, -1]]
    assert bool((corners < slice_value / 2).any(dim=-1).all()), "with a border around it"


def test_quarter_turns_turn_each_view_by_its_own_count():
    views = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4).repeat(4, 1, 1, 1)
    turned = quarter_turns(views, torch.tensor([0, 1, 2, 3]))
    for k in range(4):
        torch.testing.assert_close(turned[k], torch.rot90(views[k], k, dims=(-2, -1)))


def test_the_turn_pretext_adds_a_third_smaller_view_to_the_plan_and_trains(real_slices):
    plain = plan_pretraining(100, PretrainConfig(epochs=1, batch_size=10), input_size=128,
                             flops_per_view=64)
    turned = plan_pretraining(100, PretrainConfig(epochs=1, batch_size=10, rotation_weight=0.5),
                              input_size=128, flops_per_view=96 * 96)
    assert plain.rotation_views == 0 and plain.total_flops == 64 * plain.views
    assert (turned.rotation_views, turned.rotation_view_size) == (100, 64)
    assert turned.total_flops == 96 * 96 * turned.views + 64 * 64 * 100
    config = PretrainConfig(seed=5, epochs=1, batch_size=8, bn_recalibration_slices=16,
                            rotation_weight=0.5)
    result = pretrain_backbone(IndexedSlices(real_slices), config, input_size=64)
    assert result.rotation_views == 16 and math.isfinite(result.history[0]["loss"])
    assert result.model_id != pretrain_backbone(
        IndexedSlices(real_slices), dataclasses.replace(config, rotation_weight=0.0),
        input_size=64).model_id


def test_a_sample_under_the_budget_takes_every_patient_before_a_second_slice_of_any():
    from mri_assets.core.pretrain import patient_spread_sample

    patients = np.array(["a"] * 50 + ["b"] * 3 + ["c"] * 7 + ["d"] * 1)
    chosen = patient_spread_sample(patients, 4, seed=0)
    assert sorted(patients[chosen]) == ["a", "b", "c", "d"]
    chosen = patient_spread_sample(patients, 10, seed=0)
    counts = {p: int((patients[chosen] == p).sum()) for p in "abcd"}
    assert counts == {"a": 3, "b": 3, "c": 3, "d": 1}
    assert list(chosen) == sorted(chosen)
    assert list(patient_spread_sample(patients, 10, seed=0)) == list(chosen)
    assert list(patient_spread_sample(patients, 10, seed=1)) != list(chosen)
    assert len(patient_spread_sample(patients, 1000, seed=0)) == len(patients)


def test_a_step_budget_fixes_the_steps_whatever_the_number_of_slices():
    from mri_assets.core.pretrain import plan_pretraining

    config = PretrainConfig(steps=30, batch_size=16)
    small = plan_pretraining(100, config, flops_per_view=1)
    large = plan_pretraining(100_000, config, flops_per_view=1)
    assert small.steps == large.steps == 30
    assert small.views == large.views == 2 * 16 * 30
