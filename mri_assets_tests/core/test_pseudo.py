from __future__ import annotations

import numpy as np
import pytest

from mri_assets.core.pseudo import (
    KnnConsensus,
    contradicted_expert_labels,
    gate_metrics,
    knn_consensus,
    leave_one_out_consensus,
    promote,
)


def _embeddings(n: int, n_classes: int = 4, dim: int = 32, seed: int = 0, noise: float = 1.0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_classes, dim)) * 2.0
    y = rng.integers(0, n_classes, n)
    return (centers[y] + noise * rng.normal(size=(n, dim))).astype(np.float32), y


def _bruteforce_consensus(queries, labeled, y, k, n_classes):
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    ref = labeled / np.linalg.norm(labeled, axis=1, keepdims=True)
    nearest = np.argsort(-(q.astype(np.float64) @ ref.T.astype(np.float64)), axis=1)[:, :k]
    counts = np.stack([np.bincount(row, minlength=n_classes) for row in y[nearest]])
    top = counts.max(axis=1)
    return counts.argmax(axis=1), top / k, (counts == top[:, None]).sum(axis=1) > 1


def _consensus(majority, agreement=None, tie=None) -> KnnConsensus:
    majority = np.asarray(majority)
    return KnnConsensus(
        majority=majority,
        agreement=np.ones(majority.shape[0]) if agreement is None else np.asarray(agreement),
        tie=np.zeros(majority.shape[0], dtype=bool) if tie is None else np.asarray(tie),
        k=10,
    )


def test_promotion_needs_both_confidence_and_neighbour_consensus():
    probs = np.array(
        [
            [0.9, 0.1],  # confident, neighbours agree -> promoted
            [0.9, 0.1],  # confident, neighbours say class 1 -> not promoted
            [0.6, 0.4],  # neighbours agree but not confident -> not promoted
            [0.4, 0.6],  # neither
        ]
    )
    promoted = promote(probs, _consensus([0, 1, 0, 0]), confidence_threshold=0.8)
    np.testing.assert_array_equal(promoted, [True, False, False, False])


def test_confidence_threshold_is_inclusive():
    probs = np.array([[0.8, 0.2], [0.7999, 0.2001]])
    np.testing.assert_array_equal(promote(probs, _consensus([0, 0])), [True, False])


def test_a_tied_neighbourhood_is_never_promoted_even_when_confident_and_matching():
    probs = np.array([[0.99, 0.01], [0.99, 0.01]])
    consensus = _consensus([0, 0], agreement=[0.5, 0.5], tie=[True, False])
    np.testing.assert_array_equal(promote(probs, consensus), [False, True])


def test_min_agreement_can_require_a_strict_majority():
    probs = np.array([[0.95, 0.05, 0.0], [0.95, 0.05, 0.0]])
    consensus = _consensus([0, 0], agreement=[0.4, 0.7])
    np.testing.assert_array_equal(promote(probs, consensus, min_agreement=0.5), [False, True])


def test_knn_consensus_matches_a_bruteforce_sort():
    labeled, y = _embeddings(300, seed=1, noise=3.0)
    queries, _ = _embeddings(500, seed=2, noise=3.0)
    result = knn_consensus(queries, labeled, y, k=7, n_classes=4, chunk_rows=64)
    majority, agreement, tie = _bruteforce_consensus(queries, labeled, y, 7, 4)
    np.testing.assert_array_equal(result.majority, majority)
    np.testing.assert_allclose(result.agreement, agreement, rtol=1e-6)
    np.testing.assert_array_equal(result.tie, tie)
    assert result.k == 7


def test_knn_uses_cosine_so_the_scale_of_an_embedding_does_not_matter():
    labeled, y = _embeddings(200, seed=3, noise=2.0)
    queries, _ = _embeddings(100, seed=4, noise=2.0)
    scales = np.linspace(0.01, 100, 100, dtype=np.float32)[:, None]
    plain = knn_consensus(queries, labeled, y, k=5, n_classes=4)
    scaled = knn_consensus(queries * scales, labeled * 7.0, y, k=5, n_classes=4)
    np.testing.assert_array_equal(plain.majority, scaled.majority)
    np.testing.assert_array_equal(plain.agreement, scaled.agreement)


def test_two_labels_with_equal_top_count_are_flagged_as_a_tie():
    labeled = np.array([[1.0, 0.01], [1.0, 0.02], [1.0, -0.01], [1.0, -0.02], [-1.0, 0.0]])
    y = np.array([0, 1, 0, 1, 2])
    result = knn_consensus(np.array([[1.0, 0.0]]), labeled, y, k=4, n_classes=3)
    assert result.tie[0]
    assert result.agreement[0] == pytest.approx(0.5)
    probs = np.array([[0.95, 0.05, 0.0]])
    assert not promote(probs, result)[0]


def test_fewer_labeled_slices_than_k_lets_all_of_them_vote():
    labeled = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    y = np.array([2, 2, 1])
    result = knn_consensus(np.array([[1.0, 0.05], [0.0, 1.0]]), labeled, y, k=10, n_classes=3)
    assert result.k == 3
    np.testing.assert_array_equal(result.majority, [2, 2])
    np.testing.assert_allclose(result.agreement, [2 / 3, 2 / 3])


def test_knn_consensus_is_deterministic_and_independent_of_the_chunk_size():
    labeled, y = _embeddings(400, seed=5, noise=4.0)
    queries, _ = _embeddings(300, seed=6, noise=4.0)
    whole = knn_consensus(queries, labeled, y, k=10, n_classes=4, chunk_rows=4096)
    chunked = knn_consensus(queries, labeled, y, k=10, n_classes=4, chunk_rows=37)
    again = knn_consensus(queries, labeled, y, k=10, n_classes=4, chunk_rows=37)
    for a, b in ((whole, chunked), (chunked, again)):
        np.testing.assert_array_equal(a.majority, b.majority)
        np.testing.assert_array_equal(a.agreement, b.agreement)
        np.testing.assert_array_equal(a.tie, b.tie)


def test_float16_embeddings_as_stored_give_the_float32_answer():
    labeled, y = _embeddings(300, seed=7)
    queries, _ = _embeddings(300, seed=8)
    as_stored = knn_consensus(
        queries.astype(np.float16), labeled.astype(np.float16), y, k=5, n_classes=4
    )
    majority, _, _ = _bruteforce_consensus(
        queries.astype(np.float16).astype(np.float32),
        labeled.astype(np.float16).astype(np.float32),
        y,
        5,
        4,
    )
    np.testing.assert_array_equal(as_stored.majority, majority)


def test_leave_one_out_does_not_let_a_slice_vote_for_itself():
    labeled = np.array([[1.0, 0.0], [0.99, 0.1], [0.98, -0.1], [0.0, 1.0]])
    y = np.array([1, 0, 0, 1])
    with_self = knn_consensus(labeled, labeled, y, k=1, n_classes=2)
    left_out = leave_one_out_consensus(labeled, y, k=1, n_classes=2)
    assert with_self.majority[0] == 1
    assert left_out.majority[0] == 0
    assert left_out.k == 1


@pytest.mark.parametrize(
    ("labeled_y", "query", "message"),
    [
        (np.array([0, 5]), np.ones((1, 2)), "outside 0..2"),
        (np.array([0.0, 1.0]), np.ones((1, 2)), "integer class ids"),
        (np.array([0, 1]), np.array([[1.0, 1.0], [0.0, 0.0]]), "row 1"),
        (np.array([0, 1]), np.array([[np.nan, 1.0]]), "row 0"),
        (np.array([0, 1]), np.ones((1, 3)), "same backbone"),
    ],
)
def test_bad_knn_inputs_are_refused_with_what_to_change(labeled_y, query, message):
    labeled = np.array([[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match=message):
        knn_consensus(query, labeled, labeled_y, k=1, n_classes=3)


def test_knn_without_any_expert_label_is_refused():
    with pytest.raises(ValueError, match="no expert-labeled embeddings"):
        knn_consensus(np.ones((2, 4)), np.ones((0, 4)), np.zeros(0, dtype=int), n_classes=2)


def test_gate_metrics_score_only_promoted_slices_and_report_coverage():
    y_true = np.array([0, 0, 1, 1, 2])
    y_pred = np.array([0, 1, 1, 1, 0])
    promoted = np.array([True, False, True, True, True])
    result = gate_metrics(y_true, y_pred, promoted, f1_threshold=0.5)
    # Promoted pairs (truth, pred): (0,0) (1,1) (1,1) (2,0). Per-class F1: class 0 = 2/3,
    # class 1 = 1, class 2 = 0 -> macro 5/9; 3 of 4 right; 4 of 5 promoted.
    assert result.f1 == pytest.approx(5 / 9)
    assert result.precision == pytest.approx(3 / 4)
    assert result.coverage == pytest.approx(4 / 5)
    assert (result.n, result.n_promoted, result.passed) == (5, 4, True)
    assert gate_metrics(y_true, y_pred, promoted, f1_threshold=0.6).passed is False


def test_abstaining_does_not_lower_the_gate_f1_but_lowers_coverage():
    y_true = np.array([0, 1, 2, 3, 0, 1])
    y_pred = np.array([0, 1, 2, 3, 3, 0])
    everything = gate_metrics(y_true, y_pred, np.ones(6, dtype=bool))
    only_right = gate_metrics(y_true, y_pred, np.array([True] * 4 + [False] * 2))
    assert only_right.f1 == pytest.approx(1.0)
    assert everything.f1 < only_right.f1
    assert only_right.coverage < everything.coverage


def test_gate_fails_when_nothing_or_too_little_is_promoted():
    y = np.array([0, 1, 1])
    nothing = gate_metrics(y, y, np.zeros(3, dtype=bool))
    assert not nothing.passed
    assert nothing.coverage == 0.0
    assert "no holdout slice promoted" in nothing.reason
    few = gate_metrics(y, y, np.array([True, False, False]), min_promoted=2)
    assert few.f1 == pytest.approx(1.0)
    assert not few.passed
    assert set(few.as_metadata()) >= {"f1", "precision", "coverage", "n", "threshold", "passed"}


def test_gate_without_holdout_labels_is_refused():
    empty = np.zeros(0, dtype=int)
    with pytest.raises(ValueError, match="no holdout labeled slices"):
        gate_metrics(empty, empty, np.zeros(0, dtype=bool))


def test_promotion_rule_is_more_precise_than_the_bare_model_on_noisy_data():
    rng = np.random.default_rng(11)
    labeled, y_labeled = _embeddings(600, seed=12, noise=2.5)
    queries, y_true = _embeddings(2000, seed=12, noise=2.5)
    queries, y_true = queries[600:], y_true[600:]
    wrong = rng.random(y_true.shape[0]) < 0.3
    y_model = np.where(wrong, (y_true + 1) % 4, y_true)
    probs = np.full((y_true.shape[0], 4), 0.02)
    probs[np.arange(y_true.shape[0]), y_model] = 0.94
    consensus = knn_consensus(queries, labeled, y_labeled, k=10, n_classes=4)
    promoted = promote(probs, consensus)
    model_precision = np.mean(y_model == y_true)
    rule = gate_metrics(y_true, y_model, promoted)
    assert rule.precision > model_precision + 0.2
    assert rule.coverage > 0.3


def test_expert_label_is_flagged_only_when_model_and_neighbours_both_contradict_it():
    expert = np.array([0, 0, 0, 0, 0])
    model = np.array([1, 1, 0, 1, 2])
    majority = np.array([1, 0, 1, 2, 1])
    tie = np.array([False, False, False, False, True])
    flagged = contradicted_expert_labels(expert, model, majority, tie)
    np.testing.assert_array_equal(flagged, [True, False, False, True, False])
