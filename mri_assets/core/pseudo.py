"""Safe pseudo-labels: the promotion rule, its evaluation gate, and second-read candidates.

Plan (issue 6): a model prediction on an unlabeled slice becomes a pseudo_label only when

- the model is confident: max probability >= `confidence_threshold` (default 0.8), AND
- it agrees with the embedding neighbourhood: the predicted class is the majority label of the
  slice's k nearest expert-labeled slices (cosine similarity of the embeddings), AND
- that majority is not a tie (two classes with the same top count are never promoted).

Neighbours are found by exact search: embeddings are L2-normalised float32, similarities come
from chunked matrix products (numpy's BLAS) and the k best per row from `torch.topk` (a
partial selection, ~5x faster here than numpy's argpartition over the same block). Memory is
bounded by one chunk: `chunk_rows x n_labeled` float32 similarities.

Cost: 2 x n_unlabeled x n_labeled x dim flops, i.e. 2.3 TFLOP for 750,000 x 3,000 x 512; the
products are ~80 % of the time. Callers that need it faster can pass the wave's PCA coordinates
instead of the raw embeddings (the neighbour rule is then cosine in PCA space).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

_DEFAULT_CHUNK_ROWS = 4096


@dataclass(frozen=True)
class KnnConsensus:
    """Per query slice: `majority` label of its `k` nearest labeled neighbours (lowest class id
    among equal counts), `agreement` = fraction of the k with that label, `tie` = another class
    has the same count. `k` is the number of neighbours actually used (min(k, n_labeled))."""

    majority: np.ndarray
    agreement: np.ndarray
    tie: np.ndarray
    k: int


def _require_positive_int(value: object, name: str) -> None:
    is_int = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not (is_int and value >= 1):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_labeled(labeled_emb: np.ndarray, labeled_y: np.ndarray, n_classes: int) -> np.ndarray:
    _require_positive_int(n_classes, "n_classes")
    if labeled_emb.ndim != 2:
        raise ValueError(f"labeled_emb must be 2-D (slices x dim), got shape {labeled_emb.shape}")
    if labeled_emb.shape[0] == 0:
        raise ValueError("no expert-labeled embeddings: label some slices before pseudo-labeling")
    y = np.asarray(labeled_y)
    if y.shape != (labeled_emb.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(
            f"labeled_y must be integer class ids, one per labeled embedding"
            f" ({labeled_emb.shape[0]}), got dtype {y.dtype} and shape {y.shape}"
        )
    outside = np.flatnonzero((y < 0) | (y >= n_classes))
    if outside.size:
        raise ValueError(
            f"labeled_y has {outside.size} labels outside 0..{n_classes - 1} (e.g. row"
            f" {outside[0]}: {y[outside[0]]}); map labels to class ids with the wave's class set"
        )
    return y.astype(np.int64)


def _checked_rows(block: np.ndarray, first_row: int, name: str, normalise: bool) -> np.ndarray:
    rows = np.ascontiguousarray(block, dtype=np.float32)
    sq_norms = np.einsum("ij,ij->i", rows, rows)
    bad = np.flatnonzero(~np.isfinite(sq_norms) | (sq_norms == 0))
    if bad.size:
        raise ValueError(
            f"{name} has {bad.size} rows with a zero, NaN or infinite embedding (first: row"
            f" {first_row + int(bad[0])}); cosine similarity is undefined for them, re-embed"
            " those slices"
        )
    return rows / np.sqrt(sq_norms)[:, None] if normalise else rows


def _vote(neighbour_labels: np.ndarray, n_classes: int, k_used: int):
    rows = neighbour_labels.shape[0]
    flat = (np.arange(rows)[:, None] * n_classes + neighbour_labels).ravel()
    counts = np.bincount(flat, minlength=rows * n_classes).reshape(rows, n_classes)
    top = counts.max(axis=1)
    tie = (counts == top[:, None]).sum(axis=1) > 1
    return counts.argmax(axis=1), top / k_used, tie


def _consensus(
    queries: np.ndarray,
    labeled_emb: np.ndarray,
    labeled_y: np.ndarray,
    k: int,
    n_classes: int,
    chunk_rows: int,
    leave_self_out: bool,
) -> KnnConsensus:
    _require_positive_int(k, "k")
    _require_positive_int(chunk_rows, "chunk_rows")
    y = _check_labeled(labeled_emb, labeled_y, n_classes)
    if queries.ndim != 2 or queries.shape[1] != labeled_emb.shape[1]:
        raise ValueError(
            f"query embeddings must be 2-D with the labeled dim {labeled_emb.shape[1]},"
            f" got shape {queries.shape}; embed both with the same backbone"
        )
    n_ref = labeled_emb.shape[0] - (1 if leave_self_out else 0)
    if n_ref < 1:
        raise ValueError("leave-one-out consensus needs at least 2 labeled embeddings")
    k_used = int(min(k, n_ref))
    reference_t = np.ascontiguousarray(
        _checked_rows(labeled_emb, 0, "labeled_emb", normalise=True).T
    )
    n = queries.shape[0]
    majority = np.empty(n, dtype=np.int64)
    agreement = np.empty(n, dtype=np.float32)
    tie = np.empty(n, dtype=bool)
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        # A query's scale does not change its neighbour ranking, so only the labeled side is
        # normalised; the query rows are still checked for zero / non-finite vectors.
        q = _checked_rows(queries[start:stop], start, "query embeddings", normalise=False)
        similarity = q @ reference_t
        if leave_self_out:
            rows = np.arange(stop - start)
            similarity[rows, rows + start] = -np.inf
        if k_used < similarity.shape[1]:
            neighbours = torch.topk(torch.from_numpy(similarity), k_used, dim=1, sorted=False)
            neighbour_ids = neighbours.indices.numpy()
        else:
            neighbour_ids = np.broadcast_to(np.arange(similarity.shape[1]), similarity.shape)
        majority[start:stop], agreement[start:stop], tie[start:stop] = _vote(
            y[neighbour_ids], n_classes, k_used
        )
    return KnnConsensus(majority=majority, agreement=agreement, tie=tie, k=k_used)


def knn_consensus(
    unlabeled_emb: np.ndarray,
    labeled_emb: np.ndarray,
    labeled_y: np.ndarray,
    k: int = 10,
    *,
    n_classes: int,
    chunk_rows: int = _DEFAULT_CHUNK_ROWS,
) -> KnnConsensus:
    """Majority label of each unlabeled slice's k nearest expert-labeled slices (cosine).

    Embeddings may be float16 (as stored); each chunk is converted to float32; labeled rows
    are L2-normalised (a query's own scale does not change its ranking). With fewer than k
    labeled slices, all of them vote (`KnnConsensus.k` says how many). Slices whose top count is shared by two classes are flagged `tie`. Zero or non-finite
    embeddings are refused. Equal similarities at the k-th place are resolved by `torch.topk`,
    deterministically for the same input.
    """
    return _consensus(
        np.asarray(unlabeled_emb),
        np.asarray(labeled_emb),
        labeled_y,
        k,
        n_classes,
        chunk_rows,
        leave_self_out=False,
    )


def leave_one_out_consensus(
    labeled_emb: np.ndarray,
    labeled_y: np.ndarray,
    k: int = 10,
    *,
    n_classes: int,
    chunk_rows: int = _DEFAULT_CHUNK_ROWS,
) -> KnnConsensus:
    """`knn_consensus` of every labeled slice against the other labeled slices (itself left
    out, so its own label does not vote): the neighbour opinion used by
    `contradicted_expert_labels`."""
    emb = np.asarray(labeled_emb)
    return _consensus(emb, emb, labeled_y, k, n_classes, chunk_rows, leave_self_out=True)


def _check_probs(probs: np.ndarray, n_rows: int) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != n_rows:
        raise ValueError(
            f"probs must be (slices x classes) with {n_rows} rows like the consensus,"
            f" got shape {p.shape}"
        )
    if not np.isfinite(p).all():
        raise ValueError("probs contain NaN or infinite values; check the classifier output")
    return p


def promote(
    probs: np.ndarray,
    consensus: KnnConsensus,
    confidence_threshold: float = 0.8,
    *,
    min_agreement: float = 0.0,
) -> np.ndarray:
    """Boolean mask of slices whose prediction becomes a pseudo_label: max prob >= threshold
    AND argmax == kNN majority AND no tie (AND agreement >= `min_agreement`, off by default)."""
    if not 0.0 < confidence_threshold <= 1.0:
        raise ValueError(f"confidence_threshold must be in (0, 1], got {confidence_threshold}")
    if not 0.0 <= min_agreement <= 1.0:
        raise ValueError(f"min_agreement must be in [0, 1], got {min_agreement}")
    p = _check_probs(probs, consensus.majority.shape[0])
    confident = p.max(axis=1) >= confidence_threshold
    agrees = p.argmax(axis=1) == consensus.majority
    return confident & agrees & ~consensus.tie & (consensus.agreement >= min_agreement)


@dataclass(frozen=True)
class GateResult:
    """The promotion rule measured on holdout labeled slices (see `gate_metrics`)."""

    f1: float
    precision: float
    coverage: float
    n: int
    n_promoted: int
    threshold: float
    passed: bool
    reason: str

    def as_metadata(self) -> dict[str, float | int | bool | str]:
        """Plain values for an asset check's metadata."""
        return asdict(self)


def _macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    labels = np.union1d(y_true, y_pred)
    scores = []
    for label in labels:
        tp = int(np.sum((y_pred == label) & (y_true == label)))
        fp = int(np.sum((y_pred == label) & (y_true != label)))
        fn = int(np.sum((y_pred != label) & (y_true == label)))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def gate_metrics(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    promoted: np.ndarray,
    *,
    f1_threshold: float = 0.88,
    min_promoted: int = 1,
) -> GateResult:
    """Measure the promotion rule on the holdout labeled slices and decide the gate.

    The rule is a classifier that may abstain: on the holdout slices (their consensus computed
    against the training expert labels only, never against each other), `y_pred` is the model's
    argmax and `promoted` the output of `promote`. Definitions:

    - `f1`: macro-F1 of the promoted predictions against the expert labels, over the classes that
      occur among the promoted slices (truth or prediction). Abstentions are not errors: only
      promoted slices enter training, so the gate asks "are the labels we would add right?";
      the macro average keeps a small class with bad pseudo-labels from hiding behind a large one.
    - `precision`: fraction of promoted slices whose label is right (micro, all classes).
    - `coverage`: promoted / holdout slices; reported so a rule that promotes almost nothing is
      visible (the F1 alone would not show it).
    - `passed`: at least `min_promoted` promoted slices and `f1 >= f1_threshold`. With nothing
      promoted, F1 and precision are reported as 0.0 and the gate fails: an unmeasured rule
      promotes nothing.
    """
    yt, yp, mask = np.asarray(y_true), np.asarray(y_pred), np.asarray(promoted)
    if yt.ndim != 1 or yp.shape != yt.shape or mask.shape != yt.shape:
        raise ValueError(
            f"y_true, y_pred and promoted must be 1-D of the same length, got shapes {yt.shape},"
            f" {yp.shape}, {mask.shape}"
        )
    if mask.dtype != np.bool_:
        raise ValueError(f"promoted must be a boolean mask (from promote), got dtype {mask.dtype}")
    if yt.shape[0] == 0:
        raise ValueError(
            "no holdout labeled slices to measure the pseudo-label rule on: queue and label"
            " holdout items (selection.holdout_for_evaluation) first"
        )
    if not 0.0 < f1_threshold <= 1.0:
        raise ValueError(f"f1_threshold must be in (0, 1], got {f1_threshold}")
    n, n_promoted = int(yt.shape[0]), int(mask.sum())
    coverage = n_promoted / n
    if n_promoted == 0:
        return GateResult(0.0, 0.0, 0.0, n, 0, f1_threshold, False, "no holdout slice promoted")
    f1 = _macro_f1(yt[mask], yp[mask])
    precision = float(np.mean(yt[mask] == yp[mask]))
    if n_promoted < min_promoted:
        reason = f"only {n_promoted} holdout slices promoted, need at least {min_promoted}"
    elif f1 < f1_threshold:
        reason = f"macro-F1 {f1:.3f} of promoted holdout slices is below {f1_threshold:.3f}"
    else:
        reason = f"macro-F1 {f1:.3f} >= {f1_threshold:.3f} on {n_promoted} promoted of {n}"
    passed = n_promoted >= min_promoted and f1 >= f1_threshold
    return GateResult(f1, precision, coverage, n, n_promoted, f1_threshold, passed, reason)


def contradicted_expert_labels(
    expert_y: np.ndarray, model_pred: np.ndarray, knn_majority: np.ndarray, knn_tie: np.ndarray
) -> np.ndarray:
    """Mask of expert labels that both the model and the neighbours contradict: candidates for
    a second read (QA). The neighbour opinion must leave the slice itself out
    (`leave_one_out_consensus`), else its own label votes for itself; a tie is no opinion."""
    arrays = [np.asarray(a) for a in (expert_y, model_pred, knn_majority, knn_tie)]
    if any(a.ndim != 1 or a.shape != arrays[0].shape for a in arrays):
        raise ValueError(
            "expert_y, model_pred, knn_majority and knn_tie must be 1-D of the same length, got"
            f" shapes {[a.shape for a in arrays]}"
        )
    expert, model, majority, tie = arrays
    if tie.dtype != np.bool_:
        raise ValueError(f"knn_tie must be a boolean mask, got dtype {tie.dtype}")
    return (model != expert) & (majority != expert) & ~tie
