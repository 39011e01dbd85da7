"""Learning curves of the selection strategies, on real sample slices and a seeded backbone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mri_assets.core.backbone import build_backbone
from mri_assets.core.clustering import cluster_wave
from mri_assets.core.learning_curve import (
    curves_png,
    fit_probe,
    labels_to_reach,
    mean_curves,
    probe_macro_f1,
    run_strategy,
)
from mri_assets.core.sample_slices import decoded_sample
from mri_assets.core.selection import stratified_random_batch


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return decoded_sample(tmp_path_factory.mktemp("curve") / "sample", 120, seed=2)


@pytest.fixture(scope="module")
def sample_patients(sample):
    return sample.patients


@pytest.fixture(scope="module")
def wave(sample):
    torch.set_num_threads(1)
    with torch.inference_mode():
        x = build_backbone(seed=0, input_size=64)(torch.from_numpy(sample.images[:, None])).numpy()
    clustering = cluster_wave(lambda: iter([x.astype(np.float16)]), (4,), seed=0)
    coords = clustering.pca.transform(x)
    holdout = sample.patient_split(0.25, seed=0)
    return x, coords, clustering.labels[4], sample.labels, holdout


def test_each_strategy_labels_the_budgets_from_the_pool_only(wave):
    x, coords, clusters, y, holdout = wave
    budgets = (10, 20, 30)
    curves = {s: run_strategy(s, x, coords, clusters, y, holdout, budgets, seed=0, n_classes=4,
                              batch=10, probe_epochs=10)
              for s in ("random", "cluster_entropy", "model_entropy")}
    for curve in curves.values():
        assert len(curve.macro_f1) == 3 and all(0.0 <= f <= 1.0 for f in curve.macro_f1)
        assert len(curve.picked) == 30 == len(set(curve.picked.tolist()))
        assert not holdout[curve.picked].any()
    cluster, model = curves["cluster_entropy"].picked, curves["model_entropy"].picked
    each_own = np.arange(len(y))
    first = stratified_random_batch(each_own, each_own, 10, 0, holdout=holdout).indices
    assert model[:10].tolist() == first.tolist(), "no classifier before the first batch: the queue's first rule"
    assert cluster[10:].tolist() != model[10:].tolist(), "then the model's entropy ranks"
    assert curves["random"].picked[:10].tolist() != cluster[:10].tolist()


def test_the_model_strategys_first_batch_spreads_over_patients(wave, sample_patients):
    x, coords, clusters, y, holdout = wave
    patients = sample_patients
    curve = run_strategy("model_entropy", x, coords, clusters, y, holdout, (10,), seed=0,
                         n_classes=4, batch=10, probe_epochs=5, patients=patients)
    trainable = np.unique(patients[~holdout])
    chosen = patients[curve.picked]
    per_patient = [(chosen == p).sum() for p in trainable]
    assert max(per_patient) - min(per_patient) <= 1, per_patient


def test_a_strategy_is_deterministic_for_a_seed(wave):
    x, coords, clusters, y, holdout = wave
    first, again = (run_strategy("model_entropy", x, coords, clusters, y, holdout, (10, 20), 3, 4,
                                 batch=10, probe_epochs=5) for _ in range(2))
    assert first.macro_f1 == again.macro_f1
    assert first.picked.tolist() == again.picked.tolist()


def test_the_probe_learns_the_classes_of_real_slices(wave):
    x, _, _, y, holdout = wave
    probe = fit_probe(x[~holdout], y[~holdout], 4, seed=0, epochs=30)
    assert probe_macro_f1(probe, x[holdout], y[holdout], 4) > 0.5
    np.testing.assert_allclose(probe.probs(x[:5]).sum(axis=1), 1.0)


def test_labels_to_reach_interpolates_and_says_none_when_never_reached():
    assert labels_to_reach((50, 100, 150), (0.5, 0.7, 0.9), 0.8) == pytest.approx(125.0)
    assert labels_to_reach((50, 100), (0.9, 0.95), 0.8) == 50.0
    assert labels_to_reach((50, 100), (0.5, 0.6), 0.8) is None


def test_bad_budgets_and_strategies_are_refused(wave):
    x, coords, clusters, y, holdout = wave
    with pytest.raises(ValueError, match="multiples of batch"):
        run_strategy("random", x, coords, clusters, y, holdout, (15,), 0, 4, batch=10)
    with pytest.raises(ValueError, match="unknown strategy"):
        run_strategy("oracle", x, coords, clusters, y, holdout, (10,), 0, 4, batch=10)
    with pytest.raises(ValueError, match="exceeds"):
        run_strategy("random", x, coords, clusters, y, holdout, (1000,), 0, 4, batch=10)


def test_mean_curves_and_the_png(wave):
    x, coords, clusters, y, holdout = wave
    curves = [run_strategy("random", x, coords, clusters, y, holdout, (10, 20), seed, 4,
                           batch=10, probe_epochs=5) for seed in (0, 1)]
    mean, std = mean_curves(curves)["random"]
    np.testing.assert_allclose(mean, np.mean([c.macro_f1 for c in curves], axis=0))
    assert std.shape == (2,)
    assert curves_png((10, 20), curves, "test", reference=0.5)[:8] == b"\x89PNG\r\n\x1a\n"
