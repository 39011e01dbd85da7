"""Benchmark: a pilot wave as a user meets it, from sample data to its first labelling queue and
to the backbone's clusters, materialized in this process with the default settings.

1. `mri-assets sample-data`: `--slices` (default 100,000) T1 slices from real scans, seed
   `--seed`, with the few broken files the default sample carries (`incoming-unsorted/`: they
   are quarantined by `manifest`, a handful of objects among thousands, so they move no figure;
   the manifest counts are in the JSON);
2. `mri-assets ingest-wave pilot` (`operations.ingest_wave`) into a fresh MRI_ASSETS_HOME in a
   temporary folder (local profile, every other setting from the environment: none set = the
   defaults);
3. `mri-assets run pilot --select "manifest slices labeling_queue"`: since issue 20 the first
   queue needs no backbone (patient-stratified random), so it comes first;
4. `mri-assets run pilot --select "backbone gpu_budget embeddings pca_model clusters"`: the
   self-supervised backbone (trained on this first wave), the embeddings it makes, PCA and
   k-means (`gpu_budget` is the embeddings' blocking cost check).

Both runs are `operations.run_wave`, what `mri-assets run` calls. Here they run one after the
other, so the backbone's time includes the queue's; under the daemon they run side by side.

Figures (the last line is one JSON object):
- `landing_to_queue_s`: from the start of landing to `labeling_queue` materialized (goal <= 300
  s for 100,000 slices on 2 cores); `run_to_queue_s` the same without the landing (from the
  start of the first run); `queue_selection`: the queue's `selection` metadata;
- `backbone_ready_s`: from the start of landing to `backbone` materialized (goal <= 1,800 s in
  fp32); `clusters_ready_s`: to `clusters` materialized;
- `queue_before_backbone_s` = backbone_ready_s - landing_to_queue_s, the headline of "the queue
  never waits": how long clinicians can label before the backbone exists; the same-process
  baseline is the order before issue 20, where the queue followed the clusters:
  `ratio_vs_queue_after_clusters` = clusters_ready_s / landing_to_queue_s;
- `embed_ms_per_image`: the `embeddings` steps' own seconds over their images, all shards (from
  the runs' metadata); `embed_stage_ms_per_image` the same from the stage's wall time;
- `ari_k4` (and `nmi_k4`): the wave's `clusters` k = 4 against the sample's ground truth
  (`labels.csv`), every slice that has one (`ari_scored_slices`);
- `peak_rss_gb`: the largest resident set of this process and of its children (the decoding
  workers); `sample_data_s`, `landing_s`, `stage_s` (wall seconds per stage of the two runs);
- `device`, `precision` (of the embeddings; `backbone_precision` of the pretraining),
  `cpu_native_bf16`, `cpu_isa`, `backbone` (its steps, seconds, slices, achieved GFLOP/s).

`--precision fp32` measures the fp32 path on a CPU with native bf16 (what an AVX2 CPU runs): it
sets MRI_ASSETS_PRECISION for this process, which every torch loop follows (embedding,
pretraining and its step budget); unset, the environment's setting or `auto`.
`cpu_native_bf16` reports the real CPU.

    nice -n 10 .venv/bin/python benchmarks/pilot.py --slices 3000     # a quick check
    .venv/bin/python benchmarks/pilot.py                              # 100,000 slices
    .venv/bin/python benchmarks/pilot.py --precision fp32             # the fp32 path
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import dagster as dg

WAVE = "pilot"
QUEUE_SELECTION = "manifest slices labeling_queue"
BACKBONE_SELECTION = "backbone gpu_budget embeddings pca_model clusters"
BACKBONE_FIGURES = ("source", "reason", "slices", "steps", "budget_kind", "budget_steps",
                    "estimated_seconds", "seconds", "cpu_minutes", "total_tflops",
                    "achieved_gflops_per_s", "peak_gflops_per_s", "share_of_peak", "final_loss",
                    "device", "precision", "model_id")


def peak_rss_gb() -> float:
    """ru_maxrss is in KiB on Linux: the larger of this process and its largest child."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own, children) / 1024**2, 3)


def cpu_kind() -> tuple[bool, str]:
    from mri_assets.core.precision import cpu_has_native_bf16

    try:
        from mri_assets.core.cpu_peak import cpu_peak

        isa = cpu_peak().isa
    except ImportError:  # an older checkout
        isa = "unknown"
    return cpu_has_native_bf16(), isa


def metadata_of(instance: dg.DagsterInstance, asset: str, partitions: list[str]) -> list[dict]:
    """The latest materialization's metadata of each partition of `asset`, as plain values."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=partitions),
        limit=max(len(partitions), 1) * 4,
    ).records
    latest: dict[str, dict] = {}
    for record in records:  # newest first
        materialization = record.asset_materialization
        latest.setdefault(str(materialization.partition),
                          {k: v.value for k, v in materialization.metadata.items()})
    return [latest[p] for p in partitions if p in latest]


class StageClock:
    """`run_wave`'s on_step: when each run of a stage ended, measured from `origin`."""

    def __init__(self, origin: float) -> None:
        self.origin = origin
        self.last = time.perf_counter()
        self.ready: dict[str, float] = {}  # asset -> seconds since origin when its run ended
        self.stage_s: dict[str, float] = {}

    def start(self) -> None:
        self.last = time.perf_counter()

    def __call__(self, label: str) -> None:
        now = time.perf_counter()
        assets = label.split(" [")[0]
        self.stage_s[assets] = round(self.stage_s.get(assets, 0.0) + now - self.last, 2)
        for asset in assets.split(","):
            self.ready[asset] = round(now - self.origin, 2)
        self.last = now
        print(f"  {now - self.origin:8.1f} s  {label} done", flush=True)


def run(deployment, selection: str, clock: StageClock) -> None:
    from mri_assets.cli.operations import run_wave

    print(f"mri-assets run {WAVE} --select '{selection}'", flush=True)
    clock.start()
    report = run_wave(deployment, WAVE, selection, on_step=clock)
    if not report.success:
        raise SystemExit(f"run failed at {report.failed} (interrupted: {report.interrupted}); "
                         f"run ids {report.runs[-1:]}")


def ari_against_truth(deployment, labels_csv: Path) -> dict:
    from mri_assets.core.clustering import cluster_scores
    from mri_assets.core.sample_labels import ground_truth_for_wave
    from mri_assets.resources.deployed import object_store_for
    from mri_assets.resources.wave_store import WaveStore

    store = WaveStore(object_store_for(deployment))
    truth = ground_truth_for_wave(labels_csv, store.manifest(WAVE), WAVE)
    scored = store.clusters(WAVE).select("image_id", "cluster_k4").join(truth, on="image_id")
    scores = cluster_scores(scored["label"].to_numpy(), scored["cluster_k4"].to_numpy())
    rounded = {k: None if scores[k] is None else round(scores[k], 4) for k in ("ari", "nmi")}
    return {"ari_k4": rounded["ari"], "nmi_k4": rounded["nmi"], "ari_scored_slices": scored.height}


def manifest_counts(deployment) -> dict[str, int]:
    from mri_assets.resources.deployed import object_store_for
    from mri_assets.resources.wave_store import WaveStore

    frame = WaveStore(object_store_for(deployment)).manifest(WAVE, columns=["status"])
    return {str(k): int(v) for k, v in frame.group_by("status").len().iter_rows()}


def reused_sample(sample_dir: Path, slices: int, seed: int):
    """A sample folder written earlier by `mri-assets sample-data --slices N --seed S` (with its
    broken files): its summary, checked against `slices`; the seed is taken on trust."""
    from types import SimpleNamespace

    labels_csv = sample_dir / "labels.csv"
    if not labels_csv.is_file():
        raise SystemExit(f"--sample {sample_dir}: no labels.csv; write it with `mri-assets "
                         f"sample-data --out {sample_dir} --slices {slices} --seed {seed}`")
    with labels_csv.open() as handle:
        rows = sum(1 for _ in handle) - 1
    if rows != slices:
        raise SystemExit(f"--sample {sample_dir} holds {rows} slices, not {slices}")
    bad = sorted((sample_dir / "incoming-unsorted").glob("*"))
    patients = sum(1 for path in sample_dir.glob("patient-*") if path.is_dir())
    return SimpleNamespace(n_slices=rows, n_patients=patients, bad_paths=bad, labels_csv=labels_csv)


def pilot(slices: int, seed: int, home: Path, sample: Path | None = None) -> dict:
    from mri_assets.assets.support.partitions import wave_shard_key
    from mri_assets.cli.operations import ingest_wave, instance_for
    from mri_assets.core.progress import Progress
    from mri_assets.core.sample_data import build_sample_data
    from mri_assets.deployment import Deployment

    deployment = Deployment.from_env(home=home / "home", profile="local")
    deployment.home.ensure()
    sample_dir = sample or home / "sample"

    started = time.perf_counter()
    if sample is None:
        print(f"sample data: {slices} T1 slices, seed {seed}, into {sample_dir}", flush=True)
        summary = build_sample_data(sample_dir, n_slices=slices, seed=seed, wave_style="t1",
                                    include_bad=True, progress=True)
    else:
        print(f"sample data: reusing {sample_dir}", flush=True)
        summary = reused_sample(sample_dir, slices, seed)
    sample_data_s = time.perf_counter() - started
    print(f"  {sample_data_s:.1f} s: {summary.n_slices} slices, {summary.n_patients} patients, "
          f"{len(summary.bad_paths)} broken files", flush=True)

    print(f"mri-assets ingest-wave {WAVE} --source {sample_dir}", flush=True)
    origin = time.perf_counter()
    with Progress(f"landing {WAVE}", "files", leave=True) as bar:
        landed = ingest_wave(deployment, WAVE, str(sample_dir), on_file=bar.advance)
    landing_s = time.perf_counter() - origin
    print(f"  {landing_s:.1f} s: {landed}", flush=True)

    clock = StageClock(origin)
    run(deployment, QUEUE_SELECTION, clock)
    run(deployment, BACKBONE_SELECTION, clock)

    instance = instance_for(deployment)
    queue = metadata_of(instance, "labeling_queue", [WAVE])[0]
    backbone = metadata_of(instance, "backbone", [WAVE])[0]
    shard_keys = [str(wave_shard_key(WAVE, s)) for s in range(deployment.shards)]
    shards = metadata_of(instance, "embeddings", shard_keys)
    images = sum(int(m["images"]) for m in shards)
    embed_seconds = sum(float(m["seconds"]) for m in shards)
    counts = manifest_counts(deployment)
    scores = ari_against_truth(deployment, summary.labels_csv)

    queue_ready = clock.ready["labeling_queue"]
    backbone_ready = clock.ready["backbone"]
    clusters_ready = clock.ready["clusters"]
    embed_stage_s = clock.stage_s.get("embeddings", 0.0)
    return {
        "slices": summary.n_slices,
        "manifest": counts,
        "landing_to_queue_s": queue_ready,
        "run_to_queue_s": round(queue_ready - landing_s, 2),
        "backbone_ready_s": backbone_ready,
        "clusters_ready_s": clusters_ready,
        "queue_before_backbone_s": round(backbone_ready - queue_ready, 2),
        "ratio_vs_queue_after_clusters": round(clusters_ready / queue_ready, 2),
        "queue_selection": queue.get("selection"),
        "queued": queue.get("queued"),
        "embed_ms_per_image": round(1000 * embed_seconds / images, 3) if images else None,
        "embed_stage_ms_per_image": round(1000 * embed_stage_s / images, 3) if images else None,
        "embedded_images": images,
        **scores,
        "device": shards[0].get("device") if shards else None,
        "precision": shards[0].get("precision") if shards else None,
        "backbone_precision": backbone.get("precision"),
        "backbone": {k: backbone[k] for k in BACKBONE_FIGURES if k in backbone},
        "sample_data_s": round(sample_data_s, 2),
        "landing_s": round(landing_s, 2),
        "stage_s": clock.stage_s,
    }


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                        help="MRI_ASSETS_PRECISION for this run (fp32: the fp32 path on a CPU "
                        "with native bf16, as on AVX2); default: the environment's, else auto")
    parser.add_argument("--home", help="an empty folder that keeps the sample and MRI_ASSETS_HOME "
                        "(default: a temporary folder, removed at the end)")
    parser.add_argument("--sample", type=Path, help="a folder `mri-assets sample-data --out DIR "
                        "--slices N --seed S` wrote before (the sample is not part of any figure "
                        "but `sample_data_s`; writing 100,000 slices takes a while)")
    args = parser.parse_args()
    if args.home and Path(args.home).exists() and any(Path(args.home).iterdir()):
        parser.error(f"--home {args.home} is not empty: the figures are for a fresh home")

    from mri_assets.core.progress import terminal_bars
    from mri_assets.definitions.local_run import without_debug_lines

    if args.precision:
        os.environ["MRI_ASSETS_PRECISION"] = args.precision  # read once, by Deployment.from_env
    requested = os.environ.get("MRI_ASSETS_PRECISION", "auto")
    native_bf16, isa = cpu_kind()
    print(f"pilot benchmark: {args.slices} slices, precision {requested}, CPU {isa} "
          f"(native bf16: {native_bf16})", flush=True)
    root = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="mri-pilot-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        with terminal_bars(), without_debug_lines():
            report = pilot(args.slices, args.seed, root, args.sample)
    finally:
        if not args.home:
            shutil.rmtree(root, ignore_errors=True)
    return {
        **report,
        "requested_precision": requested,
        "cpu_native_bf16": native_bf16,
        "cpu_isa": isa,
        "peak_rss_gb": peak_rss_gb(),
        "seed": args.seed,
    }


if __name__ == "__main__":
    print(json.dumps(main()))
