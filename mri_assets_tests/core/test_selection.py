from __future__ import annotations

import numpy as np
import pytest

from mri_assets.core.selection import (
    CLUSTER_ENTROPY,
    MODEL_ENTROPY,
    entropy_from_probs,
    holdout_for_evaluation,
    kcenter_radius,
    naive_select,
    queue_uncertainty,
    select_for_labeling,
    series_of,
    soft_assignment,
    stratified_random_batch,
)


def _wave(n: int = 2000, dim: int = 6, seed: int = 0, sizes=(0.4, 0.3, 0.2, 0.1)):
    """Four Gaussian clusters in a small PCA space, entropies from the soft assignment."""
    rng = np.random.default_rng(seed)
    centroids = rng.normal(scale=4.0, size=(len(sizes), dim))
    clusters = rng.choice(len(sizes), size=n, p=sizes)
    coords = centroids[clusters] + rng.normal(size=(n, dim))
    entropy = entropy_from_probs(soft_assignment(coords, centroids))
    return entropy, coords.astype(np.float32), clusters.astype(np.int64), centroids


def test_entropy_is_zero_when_certain_and_log_c_when_uniform():
    probs = np.array([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0.0]])
    entropy = entropy_from_probs(probs)
    np.testing.assert_allclose(entropy, [0.0, np.log(3), np.log(2)], atol=1e-12)


def test_entropy_refuses_logits_and_rows_not_summing_to_one():
    with pytest.raises(ValueError, match="do not sum to 1"):
        entropy_from_probs(np.array([[2.0, 1.0], [0.5, 0.5]]))
    with pytest.raises(ValueError, match="negative"):
        entropy_from_probs(np.array([[1.5, -0.5]]))


def test_soft_assignment_is_a_distribution_peaking_at_the_nearest_centroid():
    _, coords, _, centroids = _wave(n=500)
    probs = soft_assignment(coords, centroids)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    nearest = ((coords[:, None, :] - centroids[None, :, :]) ** 2).sum(axis=2).argmin(axis=1)
    np.testing.assert_array_equal(probs.argmax(axis=1), nearest)


def test_default_temperature_spreads_entropies_between_certain_and_uniform():
    entropy, _, _, _ = _wave(n=2000)
    log_k = np.log(4)
    assert np.median(entropy) > 0.02 * log_k
    assert np.median(entropy) < 0.98 * log_k
    assert entropy.std() > 0.05 * log_k


def test_soft_assignment_gives_boundary_slices_more_entropy_than_centroid_slices():
    centroids = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    rng = np.random.default_rng(1)
    coords = np.vstack(
        [centroids[rng.integers(0, 3, 300)] + rng.normal(size=(300, 2)), [[0.0, 0.0], [5.0, 0.0]]]
    )
    entropy = entropy_from_probs(soft_assignment(coords, centroids))
    assert entropy[-1] > entropy[-2]


def test_selection_returns_n_distinct_slices_deterministically_for_a_seed():
    entropy, coords, clusters, _ = _wave()
    first = select_for_labeling(entropy, coords, clusters, n=40, seed=7)
    again = select_for_labeling(entropy, coords, clusters, n=40, seed=7)
    assert len(first) == 40
    assert np.unique(first.indices).size == 40
    np.testing.assert_array_equal(first.indices, again.indices)
    assert first.reason == again.reason
    assert first.kind == "train"
    assert np.all(np.diff(first.priority) < 0)


def test_selection_never_queues_labeled_queued_or_holdout_slices():
    entropy, coords, clusters, _ = _wave()
    top = np.argsort(-entropy)
    exclude = np.zeros(entropy.shape[0], dtype=bool)
    exclude[top[:100]] = True
    holdout = np.zeros(entropy.shape[0], dtype=bool)
    holdout[top[100:200]] = True
    chosen = select_for_labeling(
        entropy, coords, clusters, n=60, seed=0, exclude=exclude, holdout=holdout
    )
    assert len(chosen) == 60
    assert not exclude[chosen.indices].any()
    assert not holdout[chosen.indices].any()


def test_one_batch_takes_at_most_one_of_planted_duplicates():
    entropy, coords, clusters, _ = _wave()
    source = int(np.argmax(entropy))
    rng = np.random.default_rng(3)
    exact = np.repeat(coords[source : source + 1], 30, axis=0)
    near = coords[source] + rng.normal(scale=1e-3, size=(30, coords.shape[1]))
    coords = np.vstack([coords, exact, near]).astype(np.float32)
    entropy = np.concatenate([entropy, np.full(60, entropy.max() + 1.0)])
    clusters = np.concatenate([clusters, np.full(60, clusters[source])])
    planted = np.r_[source, np.arange(coords.shape[0] - 60, coords.shape[0])]
    chosen = select_for_labeling(entropy, coords, clusters, n=40, seed=0)
    assert len(chosen) == 40
    assert np.isin(chosen.indices, planted).sum() == 1


def test_a_cluster_made_only_of_copies_gives_one_pick_and_passes_its_share_on():
    entropy, coords, clusters, _ = _wave()
    copies = clusters == 3
    coords[copies] = coords[np.flatnonzero(copies)[0]]
    chosen = select_for_labeling(entropy, coords, clusters, n=40, seed=0)
    assert len(chosen) == 40
    assert (chosen.cluster == 3).sum() == 1


def test_copies_of_already_labeled_slices_are_never_picked():
    entropy, coords, clusters, _ = _wave()
    labeled = int(np.argmax(entropy))
    coords = np.vstack([coords, np.repeat(coords[labeled : labeled + 1], 20, axis=0)])
    entropy = np.concatenate([entropy, np.full(20, entropy.max() + 1.0)])
    clusters = np.concatenate([clusters, np.full(20, clusters[labeled])])
    exclude = np.zeros(entropy.shape[0], dtype=bool)
    exclude[labeled] = True
    chosen = select_for_labeling(entropy, coords, clusters, n=40, seed=0, exclude=exclude)
    assert not np.isin(chosen.indices, np.arange(entropy.shape[0] - 20, entropy.shape[0])).any()


def test_equal_balance_gives_every_cluster_the_same_share_when_entropy_favours_one():
    entropy, coords, clusters, _ = _wave()
    entropy = entropy + np.where(clusters == 0, 10.0, 0.0)
    chosen = select_for_labeling(entropy, coords, clusters, n=40, seed=0, balance="equal")
    np.testing.assert_array_equal(np.bincount(chosen.cluster, minlength=4), [10, 10, 10, 10])


def test_proportional_balance_follows_cluster_sizes():
    entropy, coords, clusters, _ = _wave(n=4000)
    chosen = select_for_labeling(entropy, coords, clusters, n=100, seed=0, balance="proportional")
    expected = 100 * np.bincount(clusters, minlength=4) / clusters.shape[0]
    assert np.all(np.abs(np.bincount(chosen.cluster, minlength=4) - expected) < 1)


def test_a_small_cluster_gives_what_it_has_and_the_others_share_the_rest():
    entropy, coords, clusters, _ = _wave()
    exclude = (clusters == 3) & (np.cumsum(clusters == 3) > 2)
    chosen = select_for_labeling(entropy, coords, clusters, n=41, seed=0, exclude=exclude)
    counts = np.bincount(chosen.cluster, minlength=4)
    assert counts[3] == 2
    assert sorted(counts[:3].tolist()) == [13, 13, 13]


def test_batch_larger_than_the_eligible_slices_returns_all_of_them():
    entropy, coords, clusters, _ = _wave(n=50)
    exclude = np.arange(50) >= 20
    chosen = select_for_labeling(entropy, coords, clusters, n=100, seed=0, exclude=exclude)
    assert sorted(chosen.indices.tolist()) == list(range(20))


def test_nothing_eligible_or_a_zero_batch_gives_an_empty_selection():
    entropy, coords, clusters, _ = _wave(n=50)
    everything = np.ones(50, dtype=bool)
    assert (
        len(select_for_labeling(entropy, coords, clusters, n=10, seed=0, exclude=everything)) == 0
    )
    assert len(select_for_labeling(entropy, coords, clusters, n=0, seed=0)) == 0
    assert len(holdout_for_evaluation(clusters, np.zeros(50, dtype=bool), n=10, seed=0)) == 0


def test_fast_and_naive_selection_pick_the_same_slices_with_the_same_kcenter_radius():
    entropy, coords, clusters, _ = _wave(n=1500)
    exclude = np.zeros(entropy.shape[0], dtype=bool)
    exclude[::97] = True
    fast = select_for_labeling(entropy, coords, clusters, n=30, seed=5, exclude=exclude)
    naive = naive_select(entropy, coords, clusters, n=30, seed=5, exclude=exclude)
    np.testing.assert_array_equal(fast.indices, naive.indices)
    np.testing.assert_allclose(fast.kcenter_distance[1:], naive.kcenter_distance[1:], rtol=1e-5)
    pool = np.argsort(-entropy)[:300]
    centers_fast = np.r_[fast.indices, np.flatnonzero(exclude)]
    centers_naive = np.r_[naive.indices, np.flatnonzero(exclude)]
    assert kcenter_radius(coords, pool, centers_fast) == pytest.approx(
        kcenter_radius(coords, pool, centers_naive), rel=1e-6
    )


def test_kcenter_batch_covers_the_pool_better_than_the_top_entropy_slices():
    entropy, coords, clusters, _ = _wave(n=3000)
    chosen = select_for_labeling(
        entropy, coords, clusters, n=20, seed=0, pool_factor=10, balance="proportional"
    )
    pool = np.argsort(-entropy, kind="stable")[:200]
    assert kcenter_radius(coords, pool, chosen.indices) < kcenter_radius(coords, pool, pool[:20])


def test_holdout_items_are_queued_only_as_holdout_and_stratified_by_cluster():
    _, _, clusters, _ = _wave(n=3000)
    holdout = np.zeros(clusters.shape[0], dtype=bool)
    holdout[::5] = True
    exclude = np.zeros(clusters.shape[0], dtype=bool)
    exclude[::10] = True
    chosen = holdout_for_evaluation(clusters, holdout, n=100, seed=2, exclude=exclude)
    assert chosen.kind == "holdout"
    assert len(chosen) == 100
    assert holdout[chosen.indices].all()
    assert not exclude[chosen.indices].any()
    eligible = clusters[holdout & ~exclude]
    expected = 100 * np.bincount(eligible, minlength=4) / eligible.shape[0]
    assert np.all(np.abs(np.bincount(chosen.cluster, minlength=4) - expected) < 1)
    again = holdout_for_evaluation(clusters, holdout, n=100, seed=2, exclude=exclude)
    np.testing.assert_array_equal(chosen.indices, again.indices)


def test_selection_rows_become_queue_frame_with_image_ids():
    entropy, coords, clusters, _ = _wave(n=200)
    chosen = select_for_labeling(entropy, coords, clusters, n=8, seed=0)
    image_ids = [f"img{i:04d}" for i in range(200)]
    frame = chosen.as_frame(image_ids)
    assert frame.columns == ["image_id", "priority", "reason", "kind", "cluster", "entropy"]
    assert frame["image_id"].to_list() == [image_ids[i] for i in chosen.indices]
    assert frame["reason"][1].startswith("entropy ")
    assert "k-center distance" in frame["reason"][1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"exclude": np.zeros(10, dtype=int)}, "exclude must be a boolean mask"),
        ({"holdout": np.zeros(3, dtype=bool)}, "holdout must be a boolean mask"),
        ({"n": -1}, "non-negative integer"),
        ({"pool_factor": 0}, "pool_factor"),
        ({"clusters": np.zeros(10)}, "clusters must be an integer array"),
        ({"coords_pca": np.zeros((9, 2))}, "coords_pca must be"),
        ({"balance": "random"}, "balance must be"),
    ],
)
def test_bad_selection_inputs_are_refused_with_what_to_change(kwargs, message):
    args = {
        "entropy": np.linspace(0, 1, 10),
        "coords_pca": np.arange(20, dtype=np.float32).reshape(10, 2),
        "clusters": np.zeros(10, dtype=int),
        "n": 3,
        "seed": 0,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        select_for_labeling(**args)


def test_queue_uncertainty_uses_the_classifier_once_there_is_one_else_the_clusters():
    rng = np.random.default_rng(0)
    coords = np.concatenate([rng.normal(0, 1, (30, 2)), rng.normal(8, 1, (30, 2))])
    clusters = np.repeat([0, 1], 30)
    before = queue_uncertainty(coords, clusters)
    assert before.source == CLUSTER_ENTROPY and before.detail == "no classifier yet"
    assert before.entropy.shape == (60,)
    assert np.argmax(before.entropy) == np.argmin(np.abs(coords @ [1, 1] - 8))

    probs = np.full((60, 4), 0.01)
    probs[:, 0] = 0.97
    probs[7] = 0.25
    after = queue_uncertainty(coords, clusters, probs, "classifier of wave pilot")
    assert after.source == MODEL_ENTROPY and after.detail == "classifier of wave pilot"
    assert np.argmax(after.entropy) == 7
    assert after.entropy[7] == pytest.approx(np.log(4))
    picked = select_for_labeling(after.entropy, coords, clusters, 2, seed=0, pool_factor=1)
    assert 7 in picked.indices.tolist()
    assert sorted(picked.cluster.tolist()) == [0, 1], "cluster balance kept"
    with pytest.raises(ValueError, match="59 rows for 60 slices"):
        queue_uncertainty(coords, clusters, probs[:59])


def _patients_wave(sizes=(30, 12, 5, 1), series_per_patient=3):
    """Patients of unequal size, each slice in one of its patient's series."""
    patients, series = [], []
    for p, size in enumerate(sizes):
        for i in range(size):
            patients.append(f"patient-{p}")
            series.append(f"patient-{p}/series-{i % series_per_patient}")
    return np.array(patients), np.array(series)


def test_first_batch_spreads_over_patients_then_series():
    patients, series = _patients_wave()
    picked = stratified_random_batch(patients, series, 8, seed=0)
    counts = {p: int((patients[picked.indices] == p).sum()) for p in np.unique(patients)}
    # four patients: two rounds each, but patient-3 has only one slice
    assert sorted(counts.values()) == [1, 2, 2, 3]
    assert counts["patient-3"] == 1
    # a patient's picks come from different series while it has some left
    for p in ("patient-0", "patient-1"):
        rows = picked.indices[patients[picked.indices] == p]
        assert len(set(series[rows])) == len(rows)
    assert len(set(picked.indices.tolist())) == len(picked) == 8
    assert picked.priority[0] == 1.0 and np.all(np.diff(picked.priority) < 0)
    assert np.isnan(picked.entropy).all() and picked.kind == "train"
    assert picked.reason[0].startswith("first batch, no learned features yet")


def test_first_batch_takes_a_patients_series_in_proportion_to_their_slices():
    # a 32-slice volume (two axial levels, say) and a 16-slice series of one patient: equal
    # turns would give each half the picks and the volume's classes too few labels
    patients = np.array(["patient-0"] * 48)
    series = np.array(["patient-0/volume.nii.gz"] * 32 + ["patient-0/series-02"] * 16)
    for seed in range(5):
        picked = stratified_random_batch(patients, series, 12, seed=seed)
        assert (series[picked.indices] == "patient-0/volume.nii.gz").sum() == 8
        assert len(set(picked.indices.tolist())) == 12


def test_first_batch_is_seeded_and_differs_across_seeds():
    patients, series = _patients_wave()
    first = stratified_random_batch(patients, series, 10, seed=3)
    again = stratified_random_batch(patients, series, 10, seed=3)
    other = stratified_random_batch(patients, series, 10, seed=4)
    np.testing.assert_array_equal(first.indices, again.indices)
    assert first.indices.tolist() != other.indices.tolist()


def test_first_batch_skips_holdout_and_labeled_and_levels_patients():
    patients, series = _patients_wave()
    holdout = patients == "patient-1"
    labeled = np.zeros(len(patients), dtype=bool)
    labeled[np.flatnonzero(patients == "patient-0")[:4]] = True
    for seed in range(5):
        picked = stratified_random_batch(patients, series, 5, seed=seed, exclude=labeled,
                                         holdout=holdout)
        chosen = patients[picked.indices]
        assert not holdout[picked.indices].any() and not labeled[picked.indices].any()
        # patient-0 has 4 labels already: patient-2 (5 slices) and patient-3 (1) catch up first
        assert (chosen == "patient-0").sum() == 0
        assert (chosen == "patient-2").sum() == 4 and (chosen == "patient-3").sum() == 1


def test_first_batch_is_short_when_the_wave_is_and_refuses_bad_input():
    patients, series = _patients_wave(sizes=(2, 1))
    assert len(stratified_random_batch(patients, series, 50, seed=0)) == 3
    assert len(stratified_random_batch(patients[:0], series[:0], 5, seed=0)) == 0
    with pytest.raises(ValueError, match="one entry per slice"):
        stratified_random_batch(patients, series[:2], 2, seed=0)
    with pytest.raises(ValueError, match="non-negative integer"):
        stratified_random_batch(patients, series, -1, seed=0)


def test_a_volume_is_its_own_series_and_single_slice_files_share_their_folder():
    keys = ["raw/w/p1/series-01.nii.gz", "raw/w/p1/series-01.nii.gz",
            "raw/w/p1/series-02/slice-000.dcm", "raw/w/p1/series-02/slice-001.dcm",
            "raw/w/p1/series-03/slice-000.png"]
    assert series_of(keys).tolist() == [
        "raw/w/p1/series-01.nii.gz", "raw/w/p1/series-01.nii.gz",
        "raw/w/p1/series-02", "raw/w/p1/series-02", "raw/w/p1/series-03"]


def test_holdout_strata_are_named_in_the_reason():
    strata = np.repeat(np.arange(4), 5)
    picked = holdout_for_evaluation(strata, np.ones(20, dtype=bool), 4, seed=0,
                                    stratum="patient")
    assert sorted(picked.cluster.tolist()) == [0, 1, 2, 3]
    assert all(r.endswith(f"patient {c}") for r, c in zip(picked.reason, picked.cluster))
