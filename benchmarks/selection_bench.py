"""Queue selection at wave scale: entropy + k-center diversity for a 750,000-slice wave.

Targets (issue 5): a batch of 1,000 from 750,000 slices in <= 60 s and <= 3 GB peak RSS, with the
ratio to the naive full pairwise-distance k-center (`naive_select`) on a subset both can run.

The 750k run happens in a child process so its peak RSS (the child's own `ru_maxrss`, including
the synthesized wave) is measured alone. The timed part is what the `labeling_queue` asset does:
soft assignment to the k-means centroids, entropy, and `select_for_labeling`.

    .venv/bin/python benchmarks/selection_bench.py      # last line: JSON
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from mri_assets.core.selection import (
    entropy_from_probs,
    naive_select,
    select_for_labeling,
    soft_assignment,
)

CLUSTER_SHARES = (0.4, 0.3, 0.2, 0.1)


def synthesize_wave(
    n_slices: int, dim: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """PCA coordinates with cluster structure: 4 clusters of unequal size, each made of a few
    sub-clusters, with a decaying variance per PCA dimension (as PCA output has). Returns
    coords (float32), centroids, exclude (3,000 already labeled or queued), holdout (~10 %)."""
    rng = np.random.default_rng(seed)
    centroids = rng.normal(scale=6.0, size=(len(CLUSTER_SHARES), dim))
    sub_offsets = rng.normal(scale=2.0, size=(len(CLUSTER_SHARES), 5, dim))
    scale = np.linspace(2.0, 0.3, dim, dtype=np.float32)
    cluster = rng.choice(len(CLUSTER_SHARES), size=n_slices, p=CLUSTER_SHARES)
    sub = rng.integers(0, 5, n_slices)
    coords = np.empty((n_slices, dim), dtype=np.float32)
    for start in range(0, n_slices, 100_000):
        stop = min(start + 100_000, n_slices)
        noise = rng.standard_normal((stop - start, dim), dtype=np.float32) * scale
        coords[start:stop] = (
            centroids[cluster[start:stop]] + sub_offsets[cluster[start:stop], sub[start:stop]]
        ) + noise
    exclude = np.zeros(n_slices, dtype=bool)
    exclude[rng.choice(n_slices, size=min(3000, n_slices // 10), replace=False)] = True
    holdout = rng.random(n_slices) < 0.1
    return coords, centroids, exclude, holdout


def _select(coords, centroids, exclude, holdout, batch, seed, selector):
    probs = soft_assignment(coords, centroids)
    entropy = entropy_from_probs(probs)
    clusters = probs.argmax(axis=1)
    return selector(
        entropy, coords, clusters, batch, seed, exclude=exclude, holdout=holdout, pool_factor=10
    )


def _child(n_slices: int, dim: int, batch: int, seed: int) -> None:
    coords, centroids, exclude, holdout = synthesize_wave(n_slices, dim, seed)
    start = time.perf_counter()
    selection = _select(coords, centroids, exclude, holdout, batch, seed, select_for_labeling)
    seconds = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    per_cluster = np.bincount(selection.cluster, minlength=len(CLUSTER_SHARES)).tolist()
    print(
        json.dumps(
            {
                "seconds": seconds,
                "peak_rss_gb": peak_kb / 2**20,
                "n": len(selection),
                "per_cluster": per_cluster,
            }
        )
    )


def _time(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def measure_selection(
    n_slices: int = 750_000,
    dim: int = 50,
    batch: int = 1000,
    subset: int = 20_000,
    subset_batch: int = 300,
    seed: int = 0,
) -> dict[str, float]:
    """Run the wave-scale selection in a child process, then fast vs naive on a subset."""
    print(f"selecting {batch} of {n_slices:,} slices ({dim}-d PCA) in a child process", flush=True)
    child = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            str(n_slices),
            str(dim),
            str(batch),
            str(seed),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    wave = json.loads(child.stdout.strip().splitlines()[-1])
    print(
        f"  {wave['n']} selected in {wave['seconds']:.2f} s, peak RSS {wave['peak_rss_gb']:.2f}"
        f" GB, per cluster {wave['per_cluster']}",
        flush=True,
    )

    print(f"fast vs naive on a {subset:,}-slice subset, batch {subset_batch}", flush=True)
    coords, centroids, exclude, holdout = synthesize_wave(subset, dim, seed)
    args = (coords, centroids, exclude, holdout, subset_batch, seed)
    fast_s, fast = _time(lambda: _select(*args, select_for_labeling))
    print(f"  fast  {fast_s:.3f} s", flush=True)
    naive_s, naive = _time(lambda: _select(*args, naive_select))
    print(f"  naive {naive_s:.3f} s", flush=True)
    same = bool(np.array_equal(fast.indices, naive.indices))
    print(f"  same picks: {same}; ratio naive/fast {naive_s / fast_s:.1f}x", flush=True)
    return {
        "select_750k_s": round(wave["seconds"], 3),
        "select_peak_rss_gb": round(wave["peak_rss_gb"], 3),
        "ratio_vs_naive": round(naive_s / fast_s, 2),
    }


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(*(int(a) for a in sys.argv[2:6]))
    else:
        print(json.dumps(measure_selection()))
