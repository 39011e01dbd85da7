"""Benchmark: streaming PCA (90 %) + KMeans k=2,3,4 + ARI/NMI over float16 embedding shards.

Synthesizes a wave of 512-d float16 embeddings with realistic structure (4 classes whose means
and within-class factors live in a low-rank subspace with a decaying spectrum, plus isotropic
noise and an offset; 5 % of slices labeled), written shard by shard as .npy files (the
embeddings' Arrow writer is not in `mri_assets.core` yet). Each measured pipeline runs in a
fresh subprocess that reads the shards from disk and reports its wall time and peak RSS
(VmHWM). The naive scikit-learn pipeline (all rows as float32, PCA(svd_solver="full"),
KMeans(n_init=10)) and ours run on the same subset; `ratio_vs_naive` = naive s / ours s.

    .venv/bin/python benchmarks/cluster.py            # 750k and 4M rows (about 4 GB of shards)
    .venv/bin/python benchmarks/cluster.py --quick    # small smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DIM = 512
N_CLASSES = 4
RANK = 64
SHARD_ROWS = 50_000
LABELED_FRACTION = 0.05
KS = (2, 3, 4)


def synthesize_wave(folder: Path, n_rows: int, seed: int = 0) -> list[Path]:
    """Write `n_rows` embeddings as shards `shard-XXXX.npy` (+ `labels-XXXX.npy`, -1 unlabeled)."""
    folder.mkdir(parents=True, exist_ok=True)
    structure = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(structure.normal(size=(DIM, RANK)))
    spectrum = 1.0 / np.sqrt(np.arange(1, RANK + 1))
    class_means = structure.normal(size=(N_CLASSES, RANK)) * spectrum * 1.0
    offset = np.abs(structure.normal(size=DIM)) * 0.5
    mixing = (basis * 1.0).astype(np.float32).T  # (RANK, DIM)
    paths = []
    for index, start in enumerate(range(0, n_rows, SHARD_ROWS)):
        rows = min(SHARD_ROWS, n_rows - start)
        rng = np.random.default_rng([seed, index])
        labels = rng.integers(0, N_CLASSES, rows)
        latent = class_means[labels] + rng.standard_normal((rows, RANK)) * spectrum
        x = latent.astype(np.float32) @ mixing
        x += rng.standard_normal((rows, DIM), dtype=np.float32) * np.float32(0.03)
        x += offset.astype(np.float32)
        labeled = np.where(rng.random(rows) < LABELED_FRACTION, labels, -1).astype(np.int8)
        path = folder / f"shard-{index:04d}.npy"
        np.save(path, x.astype(np.float16))
        np.save(folder / f"labels-{index:04d}.npy", labeled)
        paths.append(path)
    return paths


def shard_paths(folder: Path, n_shards: int) -> list[Path]:
    return sorted(folder.glob("shard-*.npy"))[:n_shards]


def labels_for(paths: list[Path], rows: int | None) -> np.ndarray:
    labels = np.concatenate(
        [np.load(p.with_name(p.name.replace("shard-", "labels-"))) for p in paths]
    )
    return labels[:rows] if rows else labels


def measure_ours(folder: Path, n_shards: int, rows: int | None) -> dict:
    from mri_assets.core.clustering import cluster_scores, cluster_wave

    paths = shard_paths(folder, n_shards)

    def shards():
        for path in paths:
            yield np.load(path)[:rows] if rows else np.load(path)

    started, cpu_started = time.perf_counter(), time.process_time()
    result = cluster_wave(shards, ks=KS, seed=0)
    truth = labels_for(paths, rows)
    scores = {k: cluster_scores(truth, result.labels[k]) for k in KS}
    return {
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu_started,
        "rows": result.pca.n_samples,
        "n_components": result.pca.n_components,
        "explained_variance": result.pca.explained_variance_total,
        "kmeans_passes": result.models[4].n_iter,
        "ari": {k: scores[k]["ari"] for k in KS},
        "nmi": {k: scores[k]["nmi"] for k in KS},
    }


def measure_naive(folder: Path, rows: int) -> dict:
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    paths = shard_paths(folder, 1)
    started, cpu_started = time.perf_counter(), time.process_time()
    x = np.load(paths[0])[:rows].astype(np.float32)
    truth = labels_for(paths, rows)
    projection = PCA(n_components=0.9, svd_solver="full").fit_transform(x)
    mask = truth >= 0
    ari, nmi = {}, {}
    for k in KS:
        labels = KMeans(n_clusters=k, n_init=10, random_state=0).fit_predict(projection)
        ari[k] = float(adjusted_rand_score(truth[mask], labels[mask]))
        nmi[k] = float(normalized_mutual_info_score(truth[mask], labels[mask]))
    return {
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu_started,
        "rows": len(x),
        "n_components": projection.shape[1],
        "ari": ari,
        "nmi": nmi,
    }


def run_child(*args: str) -> dict:
    completed = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(f"measured run {args} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def peak_rss_gb() -> float:
    """This process's peak RSS. VmHWM belongs to the address space made by exec, whereas
    ru_maxrss would also count the parent's RSS at fork time."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024**2
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def child_main(args: argparse.Namespace) -> None:
    folder = Path(args.folder)
    if args.child == "ours":
        report = measure_ours(folder, args.shards, args.rows)
    else:
        report = measure_naive(folder, args.rows)
    report["peak_rss_gb"] = peak_rss_gb()
    report["load_average_1m"] = os.getloadavg()[0]
    print(json.dumps(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small N for a smoke run")
    parser.add_argument("--workdir", help="where to write shards (default: a temp dir)")
    parser.add_argument("--child", choices=("ours", "naive"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--shards", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return

    n_medium, n_large, n_subset = (
        (100_000, 300_000, 20_000) if args.quick else (750_000, 4_000_000, 50_000)
    )
    with tempfile.TemporaryDirectory(prefix="bench-cluster-", dir=args.workdir) as tmp:
        folder = Path(tmp)
        print(f"synthesizing {n_large:,} x {DIM} float16 embeddings in {folder} ...", flush=True)
        started = time.perf_counter()
        synthesize_wave(folder, n_large)
        print(f"  done in {time.perf_counter() - started:.1f} s", flush=True)

        print(f"subset of {n_subset:,} rows: naive scikit-learn pipeline ...", flush=True)
        naive = run_child("--child", "naive", "--folder", tmp, "--rows", str(n_subset))
        print(f"  naive: {json.dumps(naive)}", flush=True)
        ours_subset = run_child(
            "--child", "ours", "--folder", tmp, "--shards", "1", "--rows", str(n_subset)
        )
        print(f"  ours:  {json.dumps(ours_subset)}", flush=True)

        results = {}
        for name, n_rows in (("750k", n_medium), ("4m", n_large)):
            n_shards = -(-n_rows // SHARD_ROWS)
            print(f"{n_rows:,} rows from {n_shards} shards: ours ...", flush=True)
            results[name] = run_child("--child", "ours", "--folder", tmp, "--shards", str(n_shards))
            print(f"  {json.dumps(results[name])}", flush=True)

    summary = {
        "s_750k": round(results["750k"]["seconds"], 2),
        "peak_rss_gb_750k": round(results["750k"]["peak_rss_gb"], 3),
        "s_4m": round(results["4m"]["seconds"], 2),
        "peak_rss_gb_4m": round(results["4m"]["peak_rss_gb"], 3),
        "ratio_vs_naive": round(naive["seconds"] / ours_subset["seconds"], 2),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
