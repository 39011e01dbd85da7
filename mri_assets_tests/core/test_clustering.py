import io

import numpy as np
import pytest
from PIL import Image

from mri_assets.core.clustering import (
    NOT_COMPUTABLE_NO_LABELS,
    ClusteringError,
    DriftBaseline,
    PcaModel,
    cluster_scores,
    cluster_wave,
    evaluate_drift,
    fit_kmeans,
    fit_kmeans_multi,
    fit_streaming_pca,
    standardizing_scale,
)
from mri_assets.core.plots import projection_png


def low_rank_embeddings(n=3000, dim=64, n_classes=4, seed=0, separation=6.0, noise=0.05):
    """Class means in a low-rank subspace, decaying within-class factors, small noise."""
    rng = np.random.default_rng(seed)
    rank = 12
    basis, _ = np.linalg.qr(rng.normal(size=(dim, rank)))
    means = rng.normal(size=(n_classes, rank)) * separation
    labels = rng.integers(0, n_classes, n)
    factors = rng.normal(size=(n, rank)) / np.sqrt(np.arange(1, rank + 1))
    x = (means[labels] + factors) @ basis.T + noise * rng.normal(size=(n, dim)) + 0.5
    return x.astype(np.float16), labels


def shards_of(x, size=700):
    return [x[i : i + size] for i in range(0, len(x), size)]


@pytest.fixture(scope="module")
def wave():
    return low_rank_embeddings()


@pytest.mark.parametrize("standardize", [False, True])
def test_pca_keeps_fewest_components_reaching_90_percent_like_numpy_svd(wave, standardize):
    x, _ = wave
    pca = fit_streaming_pca(shards_of(x), variance_target=0.9, standardize=standardize)

    centred = x.astype(np.float64) - x.astype(np.float64).mean(axis=0)
    if standardize:
        centred = centred * standardizing_scale(centred.var(axis=0, ddof=1))
    singular = np.linalg.svd(centred, compute_uv=False)
    cumulative = np.cumsum(singular**2) / np.sum(singular**2)
    k = pca.n_components
    assert cumulative[k - 1] >= 0.9
    assert cumulative[k - 2] < 0.9
    assert pca.explained_variance_total == pytest.approx(cumulative[k - 1], abs=1e-6)
    assert pca.components.dtype == np.float32 and pca.components.shape == (k, x.shape[1])
    assert pca.standardized is standardize
    # The projection is the centred (and scaled) embeddings on the components.
    np.testing.assert_allclose(pca.transform(x[:20]), centred[:20] @ pca.components.T.astype(np.float64),
                               atol=2e-3)


def test_standardized_pca_does_not_let_one_loud_channel_decide_the_clusters(wave):
    """A channel of large variance and no class information (as some ReLU units of a backbone
    are) takes over the raw PCA and its KMeans; standardized, the clusters stay the classes."""
    x, truth = wave
    loud = x.astype(np.float32).copy()
    loud[:, 0] = np.random.default_rng(5).normal(size=len(x)) * 200.0
    scores = {}
    for standardize in (False, True):
        pca = fit_streaming_pca(shards_of(loud), standardize=standardize)
        result = cluster_wave(lambda pca=pca: iter(shards_of(loud)), (4,), seed=0, pca=pca)
        scores[standardize] = cluster_scores(list(truth), result.labels[4])["ari"]
    assert scores[True] > 0.9
    assert scores[False] < 0.5


def test_standardizing_scale_floors_channels_that_hardly_vary():
    scale = standardizing_scale(np.array([4.0, 1.0, 0.0, 1e-12]))
    floor = 0.01 * np.mean([4.0, 1.0, 0.0, 1e-12])
    np.testing.assert_allclose(scale[:2], [1 / np.sqrt(4.0 + floor), 1 / np.sqrt(1.0 + floor)])
    assert scale[2] == pytest.approx(1 / np.sqrt(floor)) and np.isfinite(scale).all()
    np.testing.assert_array_equal(standardizing_scale(np.zeros(3)), np.ones(3))


def test_a_pca_file_written_before_standardizing_reads_as_a_raw_pca(wave):
    x, _ = wave
    pca = fit_streaming_pca(shards_of(x), standardize=False)
    buffer = io.BytesIO()
    np.savez(buffer, mean=pca.mean, components=pca.components,
             explained_variance=pca.explained_variance,
             explained_variance_ratio=pca.explained_variance_ratio,
             n_samples=np.int64(pca.n_samples), variance_target=np.float64(0.9))
    old = PcaModel.from_bytes(buffer.getvalue())
    assert not old.standardized
    np.testing.assert_allclose(old.transform(x[:50]), pca.transform(x[:50]), atol=1e-5)


def test_streaming_pca_equals_one_shot_pca(wave):
    x, _ = wave
    streamed = fit_streaming_pca(shards_of(x, size=257))
    one_shot = fit_streaming_pca([x])
    assert streamed.n_samples == one_shot.n_samples == len(x)
    np.testing.assert_allclose(streamed.mean, one_shot.mean, atol=1e-6)
    np.testing.assert_allclose(streamed.explained_variance, one_shot.explained_variance, rtol=1e-5)
    np.testing.assert_allclose(streamed.components, one_shot.components, atol=1e-4)
    np.testing.assert_allclose(streamed.transform(x), one_shot.transform(x), atol=1e-3)


def test_pca_model_round_trips_through_bytes(wave):
    x, _ = wave
    pca = fit_streaming_pca(shards_of(x))
    restored = PcaModel.from_bytes(pca.to_bytes())
    assert restored.n_components == pca.n_components
    assert restored.n_samples == pca.n_samples
    np.testing.assert_array_equal(restored.transform(x[:50]), pca.transform(x[:50]))


def test_pca_rejects_shards_of_different_dimension():
    with pytest.raises(ClusteringError, match="same model"):
        fit_streaming_pca([np.ones((5, 8), np.float16), np.ones((5, 9), np.float16)])


def test_pca_rejects_nan_embeddings_naming_the_fix():
    x = np.random.default_rng(0).normal(size=(20, 8)).astype(np.float16)
    x[3, 2] = np.nan
    with pytest.raises(ClusteringError, match="NaN"):
        fit_streaming_pca([x])


def test_kmeans_on_well_separated_clusters_recovers_them_with_ari_near_one(wave):
    x, labels = wave
    result = cluster_wave(lambda: iter(shards_of(x)), ks=(2, 3, 4), seed=7)
    scores = cluster_scores(labels, result.labels[4])
    assert scores["ari"] > 0.99 and scores["nmi"] > 0.99
    assert scores["n_labeled"] == len(x)
    assert set(result.labels) == {2, 3, 4}
    assert all(len(result.labels[k]) == len(x) for k in (2, 3, 4))


def test_kmeans_labels_and_ari_are_deterministic_for_a_seed(wave):
    x, labels = wave
    noisy = x.astype(np.float32) + np.random.default_rng(1).normal(scale=4.0, size=x.shape)
    noisy = noisy.astype(np.float16)
    first = cluster_wave(lambda: iter(shards_of(noisy)), ks=(3, 4), seed=3)
    second = cluster_wave(lambda: iter(shards_of(noisy)), ks=(3, 4), seed=3)
    for k in (3, 4):
        np.testing.assert_array_equal(first.labels[k], second.labels[k])
        np.testing.assert_array_equal(first.models[k].centroids, second.models[k].centroids)
        assert cluster_scores(labels, first.labels[k]) == cluster_scores(labels, second.labels[k])


def test_projection_over_memory_budget_is_recomputed_per_pass_with_same_labels(wave):
    x, _ = wave
    kept = cluster_wave(lambda: iter(shards_of(x)), ks=(2, 4), seed=2)
    streamed = cluster_wave(lambda: iter(shards_of(x)), ks=(2, 4), seed=2, projection_max_bytes=0)
    for k in (2, 4):
        np.testing.assert_array_equal(kept.labels[k], streamed.labels[k])
    np.testing.assert_allclose(kept.plot_coords, streamed.plot_coords, atol=1e-5)


def test_fitting_ks_together_matches_fitting_each_k_alone(wave):
    x, _ = wave
    projection = fit_streaming_pca([x]).transform(x)
    together = fit_kmeans_multi(lambda: iter(shards_of(projection)), (2, 3, 4), seed=5)
    alone = fit_kmeans(lambda: iter(shards_of(projection)), 4, seed=5)
    assert together[4].k == alone.k == 4
    assert together[4].inertia == pytest.approx(alone.inertia, rel=1e-3)


def test_wave_with_fewer_slices_than_k_is_a_clear_error():
    x = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float16)
    with pytest.raises(ClusteringError, match="3 slices, fewer than k=4"):
        cluster_wave(lambda: iter([x]), ks=(2, 3, 4))


def test_no_labeled_slices_gives_not_computable_scores_not_zero():
    scores = cluster_scores([None, None, None], np.array([0, 1, 0]))
    assert scores == {"ari": None, "nmi": None, "n_labeled": 0, "reason": NOT_COMPUTABLE_NO_LABELS}


def test_scores_use_only_the_labeled_subset():
    truth = ["coronal", None, "sagittal", "coronal", None, "sagittal"]
    clusters = np.array([1, 0, 2, 1, 1, 2])
    scores = cluster_scores(truth, clusters)
    assert scores["n_labeled"] == 4
    assert scores["ari"] == pytest.approx(1.0)
    integer_codes = cluster_scores(np.array([0, -1, 1, 0, -1, 1]), clusters)
    assert integer_codes["ari"] == pytest.approx(1.0) and integer_codes["n_labeled"] == 4


BASELINE = DriftBaseline(wave="pilot", model_id="resnet18:none:abc", k=4, ari=0.8)


@pytest.mark.parametrize(
    ("current_ari", "drifted"),
    [(0.72, False), (0.7199, True), (0.79, False), (0.5, True), (0.95, False)],
)
def test_drift_only_when_ari_drops_by_more_than_ten_percent(current_ari, drifted):
    decision = evaluate_drift(BASELINE, current_ari, "resnet18:none:abc", k=4)
    assert decision.drifted is drifted
    assert decision.status == ("drifted" if drifted else "stable")
    assert decision.relative_drop == pytest.approx((0.8 - current_ari) / 0.8)


@pytest.mark.parametrize(
    ("current_ari", "words"),
    [(0.5, "ARI at k=4 0.500 fell 38% from 0.800 (baseline wave pilot): drift, more than the 10% allowed"),
     (0.95, "ARI at k=4 0.950 rose from 0.800 (baseline wave pilot): no drift"),
     (0.8, "ARI at k=4 0.800 equals 0.800 (baseline wave pilot): no drift"),
     (0.75, "ARI at k=4 0.750 fell 6% from 0.800 (baseline wave pilot): no drift")],
)
def test_the_drift_decision_says_in_words_what_happened(current_ari, words):
    assert evaluate_drift(BASELINE, current_ari, "resnet18:none:abc", k=4).reason.startswith(words)


def test_drift_between_different_models_is_refused_with_the_reason():
    decision = evaluate_drift(BASELINE, 0.1, "resnet50:imagenet:def", k=4)
    assert not decision.drifted
    assert decision.status == "refused"
    assert "different models is meaningless" in decision.reason
    assert "resnet18:none:abc" in decision.reason and "resnet50:imagenet:def" in decision.reason


def test_not_computable_ari_never_triggers_drift():
    decision = evaluate_drift(BASELINE, None, "resnet18:none:abc", k=4)
    assert not decision.drifted and decision.status == "not_computable"
    assert NOT_COMPUTABLE_NO_LABELS in decision.reason


def test_no_baseline_means_no_drift():
    assert evaluate_drift(None, 0.1, "resnet18:none:abc", k=4).status == "no_baseline"


def test_projection_png_renders_with_partial_labels_and_without_labels(wave):
    x, labels = wave
    coords = fit_streaming_pca([x]).transform(x)[:, :2]
    class_names = np.array(["coronal", "sagittal", "axial_inferior", "axial_superior"], object)
    partial = class_names[labels]
    partial[::2] = None
    for class_labels in (partial, None):
        png = projection_png(coords, labels, class_labels, "wave pilot", max_points=500)
        assert Image.open(io.BytesIO(png)).format == "PNG"
    with pytest.raises(ValueError, match="class labels"):
        projection_png(coords, labels, partial[:10], "wave pilot")
