"""kNN consensus for pseudo-labels at wave scale: 750,000 unlabeled vs 3,000 labeled 512-d.

`knn_750k_s` times the exact 512-d search the pipeline uses by default. The option
`pseudo.knn_space=pca` (neighbours in the wave's PCA space) is timed too, with how often its
majorities agree with the exact ones: `knn_750k_pca_s`, `pca_majority_agreement`.

Target (issue 6): <= 30 s on this machine, with the ratio to a brute-force numpy baseline (full
cosine-distance matrix in float64 + a full argsort per row) measured on a subset in this run.
Embeddings are synthetic float16 (as stored) with class and sub-cluster structure, seeded.

    .venv/bin/python benchmarks/pseudo.py      # last line: JSON
"""

from __future__ import annotations

import json
import time

import numpy as np

from mri_assets.core.clustering import fit_streaming_pca
from mri_assets.core.pseudo import knn_consensus

N_CLASSES = 4


def synthesize_embeddings(
    n_unlabeled: int, n_labeled: int, dim: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """float16 embeddings: 4 classes x 6 sub-clusters around a shared mean direction (CNN
    features are far from centred), Gaussian noise. Returns unlabeled, labeled, labeled_y,
    unlabeled_y (the truth, for the progress line)."""
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=dim).astype(np.float32) * 2.0
    centers = mean + rng.normal(size=(N_CLASSES, 6, dim)).astype(np.float32) * 0.9

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, N_CLASSES, n)
        sub = rng.integers(0, 6, n)
        out = np.empty((n, dim), dtype=np.float16)
        for start in range(0, n, 50_000):
            stop = min(start + 50_000, n)
            noise = rng.standard_normal((stop - start, dim), dtype=np.float32) * 3.5
            out[start:stop] = centers[y[start:stop], sub[start:stop]] + noise
        return out, y

    unlabeled, unlabeled_y = draw(n_unlabeled)
    labeled, labeled_y = draw(n_labeled)
    return unlabeled, labeled, labeled_y, unlabeled_y


def bruteforce_majority(
    unlabeled: np.ndarray, labeled: np.ndarray, labeled_y: np.ndarray, k: int
) -> np.ndarray:
    """The baseline: float64 cosine-distance matrix, full argsort, vote."""
    u = unlabeled.astype(np.float64)
    ref = labeled.astype(np.float64)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    distance = 1.0 - u @ ref.T
    nearest = np.argsort(distance, axis=1)[:, :k]
    votes = labeled_y[nearest]
    counts = np.zeros((u.shape[0], N_CLASSES), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(u.shape[0]), k), votes.ravel()), 1)
    return counts.argmax(axis=1)


def _gemm_rate_gflops() -> float:
    """float32 matrix-product rate right now (the machine is shared; context for the timing)."""
    a = np.ones((4096, 512), dtype=np.float32)
    b = np.ones((512, 3000), dtype=np.float32)
    a @ b
    start = time.perf_counter()
    a @ b
    return 2 * 4096 * 512 * 3000 / (time.perf_counter() - start) / 1e9


def main(
    n_unlabeled: int = 750_000,
    n_labeled: int = 3000,
    dim: int = 512,
    k: int = 10,
    subset: int = 10_000,
    seed: int = 0,
) -> dict[str, float]:
    print(f"synthesizing {n_unlabeled:,} + {n_labeled:,} float16 {dim}-d embeddings", flush=True)
    unlabeled, labeled, labeled_y, unlabeled_y = synthesize_embeddings(
        n_unlabeled, n_labeled, dim, seed
    )
    print(f"float32 GEMM rate now: {_gemm_rate_gflops():.0f} GFLOP/s", flush=True)

    print(f"kNN consensus (k={k}) of {subset:,} slices: fast vs brute force", flush=True)
    start = time.perf_counter()
    fast_subset = knn_consensus(unlabeled[:subset], labeled, labeled_y, k, n_classes=N_CLASSES)
    fast_s = time.perf_counter() - start
    start = time.perf_counter()
    brute = bruteforce_majority(unlabeled[:subset], labeled, labeled_y, k)
    brute_s = time.perf_counter() - start
    same = float(np.mean(fast_subset.majority == brute))
    print(
        f"  fast {fast_s:.2f} s, brute force {brute_s:.2f} s, same majority on {same:.4%}",
        flush=True,
    )

    print(f"kNN consensus of all {n_unlabeled:,} slices", flush=True)
    start = time.perf_counter()
    result = knn_consensus(unlabeled, labeled, labeled_y, k, n_classes=N_CLASSES)
    knn_s = time.perf_counter() - start
    gflop = 2 * n_unlabeled * n_labeled * dim / 1e9
    print(
        f"  {knn_s:.2f} s ({gflop:.0f} GFLOP of products, {gflop / knn_s:.0f} GFLOP/s); majority = truth on {np.mean(result.majority == unlabeled_y):.2%},"
        f" ties {result.tie.mean():.2%}",
        flush=True,
    )
    print("the option pseudo.knn_space=pca: neighbours in the wave's PCA space (>= 90 % variance)", flush=True)
    pca = fit_streaming_pca([unlabeled[:50_000]], variance_target=0.9)
    start = time.perf_counter()
    projected_unlabeled = np.concatenate(
        [pca.transform(unlabeled[s : s + 65_536]) for s in range(0, n_unlabeled, 65_536)]
    )
    in_pca = knn_consensus(projected_unlabeled, pca.transform(labeled), labeled_y, k,
                           n_classes=N_CLASSES)
    pca_s = time.perf_counter() - start
    agreement = float(np.mean(in_pca.majority == result.majority))
    print(
        f"  {pca.n_components} components: {pca_s:.2f} s (projection included; the PCA itself is"
        f" the pca_model asset); same majority as exact 512-d on {agreement:.2%}",
        flush=True,
    )
    return {
        "knn_750k_s": round(knn_s, 3),
        "ratio_vs_bruteforce": round(brute_s / fast_s, 2),
        "knn_750k_pca_s": round(pca_s, 3),
        "pca_majority_agreement": round(agreement, 4),
    }


if __name__ == "__main__":
    print(json.dumps(main()))
