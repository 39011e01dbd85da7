"""Check: the same seed gives the same results, before and after a change of the code.

Runs the demo's pilot on a fresh home in this process: sample data (seed `--seed`), landing,
`manifest slices labeling_queue` (the first, patient-stratified queue), the simulated clinician,
`backbone gpu_budget embeddings pca_model expert_labels clusters pseudo_labels classifier`, then
`labeling_queue` again (the classifier's entropy queue). Prints one JSON object of digests:

- `manifest`: sha256 of the manifest's rows sorted by `image_id` (CSV; the home's folder in
  `source_uri` replaced by `HOME`, so two homes compare; `slice_row`, the workers' arrival
  order in the staged file, left out), and its row count;
- `embeddings`: sha256 of every shard's `.arrow` file, byte for byte;
- `pca`: sha256 of the PCA file; `clusters`: sha256 of the cluster assignments (CSV, sorted);
- `first_queue`, `second_queue`: sha256 of the queued items (image id, priority, reason, kind)
  in queue order, and their count;
- `pseudo_labels`: sha256 of the pseudo-label frame; `classifier_macro_f1`.

To compare two versions of the code, run each with its own PYTHONPATH and an empty home, and
diff the two lines:

    git worktree add /tmp/before c80031b
    PYTHONPATH=/tmp/before nice -n 10 .venv/bin/python benchmarks/same_results.py \
        --home /tmp/h_before --slices 600 > /tmp/before.json
    nice -n 10 .venv/bin/python benchmarks/same_results.py --home /tmp/h_after --slices 600 \
        > /tmp/after.json
    diff /tmp/before.json /tmp/after.json && echo identical

Only public entry points (`cli.operations`, the store's files, the label store's tables) are
used, so the script runs on older versions of the package as well.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import dagster as dg
import polars as pl
import sqlalchemy as sa

PILOT = "pilot"
FIRST_PASS = "manifest slices labeling_queue"
AFTER_LABELS = ("backbone gpu_budget embeddings pca_model expert_labels clusters pseudo_labels "
                "classifier")
SETTINGS = {"max_finetune_images": 1500, "retrain_every": 1000, "label_batch": 500}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _frame_sha(frame: pl.DataFrame, home: Path) -> str:
    text = frame.sort(frame.columns[0]).write_csv()
    return _sha(text.replace(str(home.resolve()), "HOME").encode())


def _queue(deployment, wave: str) -> dict:
    engine = sa.create_engine(deployment.labels_url_value)
    with engine.connect() as connection:
        rows = connection.execute(sa.text(
            "SELECT image_id, priority, reason, kind FROM queue_items WHERE wave = :wave "
            "ORDER BY id"), {"wave": wave}).all()
    engine.dispose()
    return {"items": len(rows), "sha256": _sha(json.dumps([list(r) for r in rows]).encode())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", required=True, help="an empty folder")
    parser.add_argument("--slices", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from mri_assets.cli.operations import ingest_wave, instance_for, label_from_csv, run_wave
    from mri_assets.core.sample_data import build_sample_data
    from mri_assets.definitions import build_defs
    from mri_assets.deployment import Deployment

    home = Path(args.home)
    if home.exists() and any(home.iterdir()):
        raise SystemExit(f"--home {home} must be an empty folder")
    deployment = Deployment.from_env(home=home).with_defaults(**SETTINGS)
    deployment.home.ensure()
    folder = home / "sample" / PILOT
    build_sample_data(folder, n_slices=args.slices, seed=args.seed, wave_style="t1")
    ingest_wave(deployment, PILOT, str(folder))
    runs = {"first_pass": run_wave(deployment, PILOT, FIRST_PASS).success}
    first_queue = _queue(deployment, PILOT)
    label_from_csv(deployment, PILOT, folder / "labels.csv")
    runs["after_labels"] = run_wave(deployment, PILOT, AFTER_LABELS).success
    runs["second_queue"] = run_wave(deployment, PILOT, "labeling_queue").success
    queues = _queue(deployment, PILOT)

    store = home / "store"
    manifest = pl.read_parquet(store / "manifests" / PILOT / "manifest.parquet")
    embeddings = sorted((store / "embeddings" / PILOT).glob("*.arrow"))
    clusters = pl.read_parquet(store / "clusters" / PILOT / "clusters.parquet")
    instance = instance_for(deployment)
    pseudo = build_defs(deployment).load_asset_value("pseudo_labels", partition_key=PILOT,
                                                     instance=instance)
    classifier = instance.fetch_materializations(dg.AssetKey("classifier"), limit=1).records
    f1 = classifier[0].asset_materialization.metadata["macro_f1"].value if classifier else None
    print(json.dumps({
        "slices": args.slices, "seed": args.seed, "runs": runs,
        # `slice_row` is where a decoding worker's append landed in the staged file: arrival
        # order, which differs from run to run by design (docs/internals.md, staging).
        "manifest": {"rows": manifest.height,
                     "sha256": _frame_sha(manifest.drop("slice_row"), home)},
        "embeddings": {path.name: _sha(path.read_bytes()) for path in embeddings},
        "pca": _sha((store / "models" / "pca" / f"{PILOT}.npz").read_bytes()),
        "clusters": {"rows": clusters.height, "sha256": _frame_sha(clusters, home)},
        "first_queue": first_queue,
        "second_queue": {"items": queues["items"] - first_queue["items"],
                         "all_sha256": queues["sha256"]},
        "pseudo_labels": {"rows": pseudo.height, "promoted": int(pseudo["promoted"].sum()),
                          "sha256": _frame_sha(pseudo, home)},
        "classifier_macro_f1": f1,
    }, sort_keys=True))


if __name__ == "__main__":
    main()
