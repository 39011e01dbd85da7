"""PCA, KMeans and the ARI drift rule for a wave's embeddings.

Everything streams over shards: the PCA accumulates the scatter matrix shard by shard, KMeans
makes exact Lloyd passes over batches of the PCA projection, so memory depends on the embedding
dimension and the number of components, not on the number of slices in the wave.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

DEFAULT_KS = (2, 3, 4)
NOT_COMPUTABLE_NO_LABELS = "not computable: no labeled slices"


class ClusteringError(ValueError):
    """The wave's embeddings cannot be clustered as asked; the message says what to change."""


# --------------------------------------------------------------------------- PCA


@dataclass(frozen=True)
class PcaModel:
    mean: np.ndarray  # (d,) float64
    components: np.ndarray  # (n_components, d) float32, rows are unit vectors
    explained_variance: np.ndarray  # (n_components,) float64
    explained_variance_ratio: np.ndarray  # (n_components,) float64
    n_samples: int
    variance_target: float
    # (d,) float64: each embedding dimension is multiplied by it after centring, before the
    # components (`standardizing_scale`); ones for a PCA of the raw embeddings (files written
    # before it existed hold none and read as ones).
    scale: np.ndarray | None = None

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])

    @property
    def dim(self) -> int:
        return int(self.components.shape[1])

    @property
    def explained_variance_total(self) -> float:
        return float(self.explained_variance_ratio.sum())

    @property
    def standardized(self) -> bool:
        return self.scale is not None and not np.all(self.scale == 1.0)

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Project embeddings (n, d) of any float dtype onto the components: (n, k) float32."""
        x = _check_batch(x, self.dim).astype(np.float32, copy=False)
        scale = np.ones(self.dim) if self.scale is None else self.scale
        # ((x - mean) * scale) @ C.T, with the scale folded into the components.
        weights = (self.components.astype(np.float64) * scale).T
        offset = (self.mean @ weights).astype(np.float32)
        projected = x @ weights.astype(np.float32)
        projected -= offset
        return projected

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(
            buffer,
            mean=self.mean,
            components=self.components,
            explained_variance=self.explained_variance,
            explained_variance_ratio=self.explained_variance_ratio,
            n_samples=np.int64(self.n_samples),
            variance_target=np.float64(self.variance_target),
            scale=np.ones(self.dim) if self.scale is None else self.scale,
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> PcaModel:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return cls(
                mean=npz["mean"],
                components=npz["components"],
                explained_variance=npz["explained_variance"],
                explained_variance_ratio=npz["explained_variance_ratio"],
                n_samples=int(npz["n_samples"]),
                variance_target=float(npz["variance_target"]),
                scale=npz["scale"] if "scale" in npz.files else None,
            )


def _check_batch(x: np.ndarray, dim: int | None) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ClusteringError(f"embeddings must be a 2-D array (n, dim), got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ClusteringError(
            f"embedding dimension {x.shape[1]} does not match {dim}: "
            "every shard of a wave must come from the same model"
        )
    if not np.issubdtype(x.dtype, np.floating):
        raise ClusteringError(f"embeddings must be floating point, got dtype {x.dtype}")
    return x


def _shifted_moments(
    x: np.ndarray, shift: np.ndarray, chunk_rows: int = 65_536
) -> tuple[np.ndarray, np.ndarray]:
    """Column sums and cross-products of `x - shift` in float64, from float32 row chunks.

    The shift (the first shard's mean) keeps the float32 products free of cancellation.
    """
    dim = x.shape[1]
    sums = np.zeros(dim, dtype=np.float64)
    products = np.zeros((dim, dim), dtype=np.float64)
    buffer = np.empty((min(chunk_rows, len(x)), dim), dtype=np.float32)
    for start in range(0, len(x), chunk_rows):
        chunk = x[start : start + chunk_rows]
        view = buffer[: len(chunk)]
        np.subtract(chunk, shift, out=view, casting="unsafe")
        sums += view.sum(axis=0, dtype=np.float64)
        products += view.T @ view
    return sums, products


def fit_streaming_pca(
    batches: Iterable[np.ndarray], variance_target: float = 0.9, blas_threads: int | None = 1,
    standardize: bool = True,
) -> PcaModel:
    """Exact PCA from shards (n_i, d): keeps the fewest components reaching `variance_target`.

    Sums and cross-products of every shard are accumulated in float64 (memory O(d^2), however
    many slices), then the covariance is eigendecomposed once. `blas_threads` caps BLAS
    threads (None: the library default); one thread is fastest on a small shared CPU.

    `standardize` (the default) fits the PCA to the embeddings with every dimension scaled to
    unit variance (`standardizing_scale`), so that a few channels of large variance do not
    decide the components alone. On the demo's pilot this made KMeans at k = 4 stable: an fp32
    backbone's raw embeddings clustered at ARI 0.25 or 0.40 depending on perturbations of one
    part in 10^5 (its bf16 embeddings, cosine 0.999997 to the fp32 ones); standardized, 0.40 on
    both and on every KMeans seed. It is not a gain on every backbone: over six measured, ARI
    moved by +0.15 (that one), -0.055, -0.012 and within 0.005 on the rest.
    """
    if not 0.0 < variance_target <= 1.0:
        raise ClusteringError(f"variance_target must be in (0, 1], got {variance_target}")
    n_total = 0
    shift: np.ndarray | None = None
    sums: np.ndarray | None = None
    products: np.ndarray | None = None
    with threadpool_limits(limits=blas_threads, user_api="blas"):
        for index, batch in enumerate(batches):
            x = _check_batch(batch, None if shift is None else shift.shape[0])
            if x.shape[0] == 0:
                continue
            if shift is None:
                shift = x[:65_536].mean(axis=0, dtype=np.float64).astype(np.float32)
            shard_sums, shard_products = _shifted_moments(x, shift)
            if not (np.isfinite(shard_sums).all() and np.isfinite(shard_products).all()):
                raise ClusteringError(
                    f"embedding shard #{index} contains NaN or infinite values: "
                    "re-run the embeddings for this shard"
                )
            sums = shard_sums if sums is None else sums + shard_sums
            products = shard_products if products is None else products + shard_products
            n_total += x.shape[0]
    if shift is None or sums is None or products is None or n_total < 2:
        raise ClusteringError(
            f"PCA needs at least 2 embeddings, got {n_total}: the wave has no usable slices"
        )
    scatter_total = products - np.outer(sums, sums) / n_total
    mean_total = shift.astype(np.float64) + sums / n_total
    covariance = scatter_total / (n_total - 1)
    scale = standardizing_scale(np.diag(covariance)) if standardize else np.ones(len(covariance))
    covariance = covariance * np.outer(scale, scale)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues = np.clip(eigenvalues[order], 0.0, None)
    eigenvectors = eigenvectors[:, order]
    total = float(eigenvalues.sum())
    if total <= 0.0:
        raise ClusteringError("embeddings have zero variance: every slice has the same embedding")
    ratio = eigenvalues / total
    cumulative = np.cumsum(ratio)
    k = int(np.searchsorted(cumulative, variance_target - 1e-12) + 1)
    k = min(k, len(eigenvalues))
    components = eigenvectors[:, :k].T
    signs = np.sign(components[np.arange(k), np.abs(components).argmax(axis=1)])
    components = components * signs[:, None]
    return PcaModel(
        mean=mean_total,
        components=components.astype(np.float32),
        explained_variance=eigenvalues[:k],
        explained_variance_ratio=ratio[:k],
        n_samples=n_total,
        variance_target=variance_target,
        scale=scale,
    )


def standardizing_scale(variances: np.ndarray, floor_share: float = 0.01) -> np.ndarray:
    """1 / standard deviation per embedding dimension, with `floor_share` of the mean variance
    added first: a channel that hardly varies (a ReLU unit that is almost always 0) is not
    blown up to the weight of one that carries the wave's structure."""
    variances = np.clip(np.asarray(variances, dtype=np.float64), 0.0, None)
    floor = floor_share * float(variances.mean()) if variances.size else 0.0
    if floor <= 0.0:
        return np.ones_like(variances)
    return 1.0 / np.sqrt(variances + floor)


# --------------------------------------------------------------------------- KMeans


@dataclass(frozen=True)
class KMeansModel:
    centroids: np.ndarray  # (k, p) float32
    seed: int
    inertia: float  # sum of squared distances over the whole wave, last full pass
    n_iter: int  # full passes over the wave
    n_samples: int
    converged: bool

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])


def _half_sq_distances(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """0.5*||c||^2 - x.c : argmin over columns equals the nearest centroid."""
    return 0.5 * np.einsum("ij,ij->i", centroids, centroids)[None, :] - x @ centroids.T


def assign(model: KMeansModel, x: np.ndarray) -> np.ndarray:
    """Nearest-centroid label (int8) for each row of a PCA projection batch."""
    x = _check_batch(x, model.centroids.shape[1]).astype(np.float32, copy=False)
    return _half_sq_distances(x, model.centroids).argmin(axis=1).astype(np.int8)


def _seeded_sample(
    batches: Iterable[np.ndarray], size: int, rng: np.random.Generator
) -> tuple[np.ndarray, int, int]:
    """A uniform sample of `size` rows in one pass (smallest random priorities); also n and dim."""
    kept_rows: np.ndarray | None = None
    kept_keys = np.empty(0)
    n_total = 0
    dim: int | None = None
    for batch in batches:
        x = _check_batch(batch, dim)
        dim = x.shape[1]
        n_total += x.shape[0]
        keys = rng.random(x.shape[0])
        if x.shape[0] > size:
            top = np.argpartition(keys, size - 1)[:size]
            keys, x = keys[top], x[top]
        x = x.astype(np.float32)
        rows = x if kept_rows is None else np.concatenate([kept_rows, x])
        keys = np.concatenate([kept_keys, keys])
        if len(keys) > size:
            top = np.argpartition(keys, size - 1)[:size]
            rows, keys = rows[top], keys[top]
        kept_rows, kept_keys = rows, keys
    if kept_rows is None or dim is None:
        raise ClusteringError("KMeans got no embeddings: the wave has no usable slices")
    return kept_rows[np.argsort(kept_keys, kind="stable")], n_total, dim


def _kmeans_plusplus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    centroids = np.empty((k, x.shape[1]), dtype=np.float32)
    centroids[0] = x[rng.integers(len(x))]
    closest = ((x - centroids[0]) ** 2).sum(axis=1)
    for j in range(1, k):
        total = float(closest.sum())
        if total <= 0.0:
            index = int(rng.integers(len(x)))
        else:
            candidates = rng.choice(len(x), size=2 + int(math.log(k)), p=closest / total)
            costs = [np.minimum(closest, ((x - x[c]) ** 2).sum(axis=1)).sum() for c in candidates]
            index = int(candidates[int(np.argmin(costs))])
        centroids[j] = x[index]
        closest = np.minimum(closest, ((x - centroids[j]) ** 2).sum(axis=1))
    return centroids


def _lloyd_in_memory(
    x: np.ndarray, centroids: np.ndarray, max_iter: int, tol: float
) -> tuple[np.ndarray, float]:
    scale = _scale(x)
    rows = np.arange(len(x))
    for _ in range(max_iter):
        labels = _half_sq_distances(x, centroids).argmin(axis=1)
        onehot = np.zeros((len(x), len(centroids)), dtype=np.float32)
        onehot[rows, labels] = 1.0
        counts = onehot.sum(axis=0)[:, None]
        sums = onehot.T @ x
        updated = np.where(counts > 0, sums / np.maximum(counts, 1.0), centroids)
        shift = float(((updated - centroids) ** 2).sum())
        centroids = updated.astype(np.float32)
        if shift <= tol * scale:
            break
    distances = _half_sq_distances(x, centroids).min(axis=1)
    inertia = float((2.0 * distances.astype(np.float64)).sum() + (x.astype(np.float64) ** 2).sum())
    return centroids, inertia


def _scale(x: np.ndarray) -> float:
    return float(x.var(axis=0).sum()) or 1.0


def fit_kmeans_multi(
    batches_factory: Callable[[], Iterable[np.ndarray]],
    ks: Sequence[int] = DEFAULT_KS,
    seed: int = 0,
    sample_size: int = 20_000,
    n_init: int = 10,
    max_passes: int = 20,
    tol: float = 1e-5,
    blas_threads: int | None = 1,
) -> dict[int, KMeansModel]:
    """Exact (Lloyd) KMeans for every k in `ks`, sharing each pass over the wave.

    `batches_factory()` must yield the same PCA-projection batches (n_i, p) in the same order
    each time it is called. Initialisation: k-means++ (`n_init` tries) and Lloyd on a seeded
    uniform sample (tries cost sample-sized work only: with 3, one of five pilot backbones kept a
    local optimum at ARI 0.24 where 10 found 0.31, the other four unchanged); then full passes
    where one GEMM scores every k's centroids at once, until
    every centroid set moves less than `tol` (relative to the sample's variance).
    Deterministic for a seed and the same batches.
    `blas_threads` caps BLAS threads (None: library default); the products here are thin, and
    one thread is much faster than several for them.
    """
    with threadpool_limits(limits=blas_threads, user_api="blas"):
        return _fit_kmeans_multi(batches_factory, ks, seed, sample_size, n_init, max_passes, tol)


def _fit_kmeans_multi(
    batches_factory: Callable[[], Iterable[np.ndarray]],
    ks: Sequence[int],
    seed: int,
    sample_size: int,
    n_init: int,
    max_passes: int,
    tol: float,
) -> dict[int, KMeansModel]:
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ClusteringError(f"k must be positive integers, got {ks}")
    rng = np.random.default_rng(seed)
    sample, n_total, _ = _seeded_sample(batches_factory(), sample_size, rng)
    if n_total < max(ks):
        raise ClusteringError(
            f"the wave has {n_total} slices, fewer than k={max(ks)}: ingest more slices or lower k"
        )
    scale = _scale(sample)
    centroids: dict[int, np.ndarray] = {}
    for k in ks:
        best: tuple[float, np.ndarray] | None = None
        for _ in range(n_init):
            start = _kmeans_plusplus(sample, k, rng)
            fitted, inertia = _lloyd_in_memory(sample, start, max_iter=100, tol=tol)
            if best is None or inertia < best[0]:
                best = (inertia, fitted)
        assert best is not None
        centroids[k] = best[1]

    offsets = np.cumsum((0,) + ks)
    converged = dict.fromkeys(ks, False)
    inertia = dict.fromkeys(ks, 0.0)
    passes = 0
    while passes < max_passes and not all(converged.values()):
        passes += 1
        stacked = np.concatenate([centroids[k] for k in ks])
        sums = np.zeros((len(stacked), stacked.shape[1]), dtype=np.float64)
        counts = np.zeros(len(stacked), dtype=np.float64)
        half_sq = np.zeros(len(ks), dtype=np.float64)
        norm_sq = 0.0
        for batch in _batches_in_chunks(batches_factory()):
            distances = _half_sq_distances(batch, stacked)
            onehot = np.zeros_like(distances)
            rows = np.arange(len(batch))
            for i, k in enumerate(ks):
                block = distances[:, offsets[i] : offsets[i + 1]]
                nearest = block.argmin(axis=1)
                onehot[rows, offsets[i] + nearest] = 1.0
                half_sq[i] += float(block[rows, nearest].sum(dtype=np.float64))
            sums += onehot.T @ batch
            counts += onehot.sum(axis=0, dtype=np.float64)
            norm_sq += float(np.einsum("ij,ij->", batch, batch, dtype=np.float64))
        for i, k in enumerate(ks):
            inertia[k] = 2.0 * half_sq[i] + norm_sq
            block = slice(offsets[i], offsets[i + 1])
            c = counts[block][:, None]
            updated = np.where(c > 0, sums[block] / np.maximum(c, 1.0), centroids[k])
            shift = float(((updated - centroids[k]) ** 2).sum())
            converged[k] = shift <= tol * scale
            centroids[k] = updated.astype(np.float32)
    return {
        k: KMeansModel(
            centroids=centroids[k],
            seed=seed,
            inertia=inertia[k],
            n_iter=passes,
            n_samples=n_total,
            converged=converged[k],
        )
        for k in ks
    }


def fit_kmeans(
    batches_factory: Callable[[], Iterable[np.ndarray]], k: int, seed: int = 0, **options
) -> KMeansModel:
    """KMeans for one k; see `fit_kmeans_multi` for the algorithm and options."""
    return fit_kmeans_multi(batches_factory, (k,), seed=seed, **options)[k]


def _batches_in_chunks(batches: Iterable[np.ndarray], rows: int = 65_536) -> Iterator[np.ndarray]:
    for batch in batches:
        batch = _check_batch(batch, None).astype(np.float32, copy=False)
        for start in range(0, len(batch), rows):
            yield batch[start : start + rows]


# --------------------------------------------------------------------------- scores


def labeled_mask(true_labels: Sequence | np.ndarray) -> np.ndarray:
    """True where a slice has a label: None/NaN/"" (and -1 for integer codes) mean unlabeled."""
    labels = np.asarray(true_labels)
    if np.issubdtype(labels.dtype, np.integer):
        return labels >= 0
    if np.issubdtype(labels.dtype, np.floating):
        return ~np.isnan(labels)
    if labels.dtype.kind == "U":
        return labels != ""
    return np.array([_is_label(v) for v in labels], dtype=bool)


def _is_label(value: object) -> bool:
    if value is None or value == "":
        return False
    return not (isinstance(value, float) and math.isnan(value))


def cluster_scores(
    true_labels: Sequence | np.ndarray, cluster_labels: Sequence | np.ndarray
) -> dict[str, float | int | str | None]:
    """ARI and NMI on the labeled subset: {ari, nmi, n_labeled, reason}.

    Without at least two labeled slices both scores are None with the reason; never 0.
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    truth = np.asarray(true_labels)
    clusters = np.asarray(cluster_labels)
    if truth.shape[0] != clusters.shape[0]:
        raise ClusteringError(
            f"{truth.shape[0]} true labels for {clusters.shape[0]} cluster labels: "
            "align labels to the wave's slices (one entry per slice, None where unlabeled)"
        )
    mask = labeled_mask(truth)
    n_labeled = int(mask.sum())
    if n_labeled == 0:
        return {"ari": None, "nmi": None, "n_labeled": 0, "reason": NOT_COMPUTABLE_NO_LABELS}
    if n_labeled < 2:
        return {
            "ari": None,
            "nmi": None,
            "n_labeled": n_labeled,
            "reason": "not computable: only 1 labeled slice (need at least 2)",
        }
    truth, clusters = truth[mask], clusters[mask]
    if truth.dtype == object:
        truth = truth.astype(str)
    return {
        "ari": float(adjusted_rand_score(truth, clusters)),
        "nmi": float(normalized_mutual_info_score(truth, clusters)),
        "n_labeled": n_labeled,
        "reason": None,
    }


# --------------------------------------------------------------------------- the wave pipeline


@dataclass(frozen=True)
class WaveClustering:
    pca: PcaModel
    models: dict[int, KMeansModel]
    labels: dict[int, np.ndarray]  # k -> (n,) int8, in shard order
    plot_index: np.ndarray  # rows (shard order) of the plotted subsample
    plot_coords: np.ndarray  # (len(plot_index), 2) first two PCA coordinates


def cluster_wave(
    shards_factory: Callable[[], Iterable[np.ndarray]],
    ks: Sequence[int] = DEFAULT_KS,
    seed: int = 0,
    variance_target: float = 0.9,
    pca: PcaModel | None = None,
    projection_max_bytes: int = 1 << 30,
    plot_points: int = 20_000,
    blas_threads: int | None = 1,
) -> WaveClustering:
    """PCA (unless a fitted one is given), KMeans for every k, and labels for every slice.

    `shards_factory()` yields the wave's embedding shards (n_i, d) in a fixed order. The PCA
    projection is kept in memory when it fits `projection_max_bytes`; otherwise every KMeans
    pass re-reads and re-projects the shards, so memory stays flat however large the wave.
    """
    if pca is None:
        pca = fit_streaming_pca(shards_factory(), variance_target, blas_threads)
    with threadpool_limits(limits=blas_threads, user_api="blas"):
        return _cluster_with_pca(shards_factory, pca, ks, seed, projection_max_bytes, plot_points)


def _cluster_with_pca(
    shards_factory: Callable[[], Iterable[np.ndarray]],
    pca: PcaModel,
    ks: Sequence[int],
    seed: int,
    projection_max_bytes: int,
    plot_points: int,
) -> WaveClustering:
    n, p = pca.n_samples, pca.n_components
    if n < max(ks):
        raise ClusteringError(
            f"the wave has {n} slices, fewer than k={max(ks)}: ingest more slices or lower k"
        )
    projected: np.ndarray | None = None
    if n * p * 4 <= projection_max_bytes:
        projected = np.empty((n, p), dtype=np.float32)
        row = 0
        for shard in shards_factory():
            block = pca.transform(shard)
            projected[row : row + len(block)] = block
            row += len(block)
        if row != n:
            raise ClusteringError(
                f"the shards held {n} embeddings when the PCA was fitted and {row} now: "
                "refit the PCA for this wave"
            )

    def projection_batches() -> Iterator[np.ndarray]:
        if projected is not None:
            yield from (projected[s : s + 65_536] for s in range(0, n, 65_536))
        else:
            yield from (pca.transform(shard) for shard in shards_factory())

    models = fit_kmeans_multi(projection_batches, ks, seed=seed, blas_threads=None)
    labels = {k: np.empty(n, dtype=np.int8) for k in ks}
    plot_rng = np.random.default_rng(seed)
    plot_index = np.sort(plot_rng.choice(n, size=min(n, plot_points), replace=False))
    plot_coords = np.empty((len(plot_index), min(2, p)), dtype=np.float32)
    row = 0
    for batch in projection_batches():
        stop = row + len(batch)
        for k in ks:
            labels[k][row:stop] = assign(models[k], batch)
        lo, hi = np.searchsorted(plot_index, [row, stop])
        plot_coords[lo:hi] = batch[plot_index[lo:hi] - row, : plot_coords.shape[1]]
        row = stop
    return WaveClustering(pca, models, labels, plot_index, plot_coords)


# --------------------------------------------------------------------------- drift


@dataclass(frozen=True)
class DriftBaseline:
    wave: str
    model_id: str
    k: int
    ari: float | None


@dataclass(frozen=True)
class DriftDecision:
    drifted: bool
    status: str  # "drifted" | "stable" | "no_baseline" | "not_computable" | "refused"
    relative_drop: float | None
    reason: str


def evaluate_drift(
    baseline: DriftBaseline | None,
    current_ari: float | None,
    model_id: str,
    k: int,
    threshold: float = 0.10,
) -> DriftDecision:
    """Drift when ARI at k drops by MORE than `threshold` relative to the baseline's ARI.

    Refused (never drift) when the embeddings come from a different model than the baseline's
    or the baseline was measured at another k; no drift when either ARI is not computable.
    """
    if baseline is None:
        return DriftDecision(False, "no_baseline", None, "no baseline yet: nothing to compare")
    if baseline.model_id != model_id:
        return DriftDecision(
            False,
            "refused",
            None,
            "drift refused: comparing embeddings of different models is meaningless: "
            f"baseline {baseline.model_id} (wave {baseline.wave}), current {model_id}; "
            "re-embed the wave with the baseline's model or pin a new baseline",
        )
    if baseline.k != k:
        return DriftDecision(
            False,
            "refused",
            None,
            f"drift refused: baseline ARI was measured at k={baseline.k}, current at k={k}",
        )
    if current_ari is None:
        return DriftDecision(
            False, "not_computable", None, f"no drift check: current ARI {NOT_COMPUTABLE_NO_LABELS}"
        )
    if baseline.ari is None or baseline.ari <= 0.0:
        return DriftDecision(
            False,
            "not_computable",
            None,
            f"no drift check: baseline ARI of wave {baseline.wave} is {baseline.ari}, "
            "a relative drop needs a positive baseline; pin another baseline",
        )
    drop = (baseline.ari - current_ari) / baseline.ari
    drifted = drop > threshold + 1e-12
    verdict = "drifted" if drifted else "stable"
    return DriftDecision(drifted, verdict, drop,
                         drift_in_words(current_ari, baseline, k, drop, threshold, drifted))


def drift_in_words(current_ari: float, baseline: DriftBaseline, k: int, drop: float,
                   threshold: float, drifted: bool) -> str:
    """The decision as a sentence, e.g. "ARI at k=4 0.197 fell 27% from 0.269 (baseline wave
    pilot): drift, more than the 10% allowed"."""
    now, then = f"{current_ari:.3f}", f"{baseline.ari:.3f}"
    if drop < 0:
        movement = f"rose from {then}"
    elif drop == 0:
        movement = f"equals {then}"
    else:
        movement = f"fell {drop:.0%} from {then}"
    verdict = (f"drift, more than the {threshold:.0%} allowed" if drifted
               else f"no drift (a fall of more than {threshold:.0%} would be)")
    return f"ARI at k={k} {now} {movement} (baseline wave {baseline.wave}): {verdict}"
