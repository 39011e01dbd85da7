"""`mri-assets demo`: the whole loop on sample data from real scans, with a short summary.

pilot wave (T1) -> manifest, slices -> the first labeling queue (patient-stratified random: it
needs no backbone) -> simulated clinician labels -> self-supervised backbone (a fixed step
budget), embeddings, PCA, expert labels, clusters with ARI (the drift baseline) -> pseudo-labels
and their gate -> classifier vs supervised baseline -> costs; then two
later waves embedded by the pilot's backbone: EPI-like scans (another contrast, whose ARI rises)
and a wave half of which comes from a new site with its own scanner and exporter (whose ARI
falls), the drift sensor's verdict on each, and the active learning it requests.
"""

from __future__ import annotations

import io
import time

import dagster as dg
import polars as pl

from mri_assets.deployment import Deployment

PILOT = "pilot"
EPI_WAVE = "scale"
DRIFT_WAVE = "site-b"
# The first queue needs only the manifest: the clinicians label while the backbone trains.
FIRST_PASS = "manifest slices labeling_queue"
AFTER_LABELS = ("backbone gpu_budget embeddings pca_model expert_labels clusters pseudo_labels "
                "classifier wave_costs")
SECOND_WAVE = "manifest slices backbone gpu_budget embeddings pca_model clusters labeling_queue"
# The demo's smaller loop figures, where the environment does not set them.
DEMO_SETTINGS = {"max_finetune_images": 1500, "retrain_every": 1000, "label_batch": 500}


def _manifest_summary(defs: dg.Definitions, instance: dg.DagsterInstance, wave: str) -> str:
    frame: pl.DataFrame = defs.load_asset_value("manifest", partition_key=wave, instance=instance)
    counts = dict(frame.group_by("status").len().iter_rows())
    splits = dict(frame.filter(pl.col("status") == "ok").group_by("split").len().iter_rows())
    return (
        f"  manifest[{wave}]: {frame.height} slices = {counts.get('ok', 0)} ok + "
        f"{counts.get('duplicate', 0)} duplicate + {counts.get('quarantined', 0)} quarantined; "
        f"splits {dict(sorted(splits.items()))}"
    )


def _latest_metadata(instance: dg.DagsterInstance, asset: str, wave: str) -> dict:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[wave]), limit=1
    ).records
    if not records:
        return {}
    return {k: v.value for k, v in records[0].asset_materialization.metadata.items()}


def _check_status(instance: dg.DagsterInstance, asset: str, check: str) -> str:
    """The latest evaluation of an asset check, with its measured figures."""
    history = instance.event_log_storage.get_asset_check_execution_history(
        dg.AssetCheckKey(dg.AssetKey(asset), check), limit=1
    )
    if not history:
        return "not run"
    record = history[0]
    evaluation = record.event.dagster_event.event_specific_data if record.event else None
    figures = {}
    if evaluation is not None and hasattr(evaluation, "metadata"):
        figures = {k: v.value for k, v in evaluation.metadata.items() if k in ("f1", "precision", "coverage")}
    return f"{record.status.value.lower()} {figures}"


def pseudo_label_precision(defs: dg.Definitions, instance: dg.DagsterInstance, wave: str,
                           labels_csv) -> tuple[int, float | None]:
    """Promoted pseudo-labels checked against the sample's ground truth (never used to train)."""
    from mri_assets.core.sample_labels import ground_truth_for_wave
    from mri_assets.core.wave_keys import manifest_key

    store = defs.resources["object_store"]
    manifest = pl.read_parquet(io.BytesIO(store.get_bytes(manifest_key(wave))))
    truth = ground_truth_for_wave(labels_csv, manifest, wave)
    promoted = defs.load_asset_value("pseudo_labels", partition_key=wave,
                                     instance=instance).filter(pl.col("promoted"))
    if promoted.height == 0:  # an empty frame's columns may have no type to join on
        return 0, None
    checked = promoted.join(truth, on="image_id", suffix="_truth")
    if checked.height == 0:
        return 0, None
    return checked.height, float((checked["label"] == checked["label_truth"]).mean())


def drift_verdict(defs: dg.Definitions, instance: dg.DagsterInstance) -> tuple[list[str], list[str]]:
    """What `ari_drift_sensor` decides from every `clusters` materialization so far: its latest
    verdict on each wave, in words, and the waves it requests active learning for."""
    from mri_assets.definitions.sensors import drift_decisions

    decisions, _ = drift_decisions(instance, defs.resources["clustering"], None)
    latest = {wave: decision for wave, decision, _ in decisions}
    requested = [wave for wave, _, run_key in decisions if run_key is not None]
    return [f"{wave}: {decision.reason}" for wave, decision in latest.items()], requested


def run_demo(deployment: Deployment, slices: int, seed: int) -> int:
    from mri_assets.assets.costs import cost_line
    from mri_assets.cli.operations import ingest_wave, instance_for, label_from_csv, run_wave
    from mri_assets.core.progress import Progress
    from mri_assets.core.sample_data import build_sample_data
    from mri_assets.definitions import build_defs
    from mri_assets.resources.deployed import label_store_for

    deployment = deployment.with_defaults(**DEMO_SETTINGS)
    home = deployment.home

    def run(wave: str, selection: str) -> bool:
        return run_wave(deployment, wave, selection).success  # a bar per stage (local_run)

    def land(wave: str, folder) -> str:
        with Progress(f"      landing {wave}", "files") as bar:
            return ingest_wave(deployment, wave, str(folder), on_file=bar.advance)

    def label(wave: str, folder):
        with Progress(f"      simulated clinician labeling {wave}", "labels") as bar:
            return label_from_csv(deployment, wave, folder / "labels.csv", on_item=bar.advance)

    started = time.perf_counter()
    pilot_dir = home.root / "sample" / PILOT
    print(f"[1/8] sample data: {slices} T1 slices from real scans into {pilot_dir}")
    build_sample_data(pilot_dir, n_slices=slices, seed=seed, wave_style="t1", progress=True)
    print(f"[2/8] landing: {land(PILOT, pilot_dir)}")
    print(f"[3/8] wave {PILOT}: manifest -> slices -> first labeling queue (patient-stratified "
          "random: no backbone needed)")
    ok = run(PILOT, FIRST_PASS)
    print("[4/8] simulated clinician labels the queue from labels.csv (demo only)")
    labeled = label(PILOT, pilot_dir)
    print(f"      {labeled.labeled} labels, {labeled.qa_labeled} QA re-reads")
    print(f"[5/8] wave {PILOT}: backbone (self-supervised, fixed step budget) -> embeddings -> PCA "
          "-> expert labels -> clusters, ARI -> pseudo-labels + gate -> classifier -> costs")
    ok = run(PILOT, AFTER_LABELS) and ok
    later = (
        (EPI_WAVE, "epi", max(slices // 3, 200), "EPI-like slices (another contrast)"),
        (DRIFT_WAVE, "t1_new_site", max(slices // 2, 600),
         "slices, half of them from a new site (T2-weighted, rows and columns swapped on export)"),
    )
    for step, (wave, style, n, what) in enumerate(later, start=6):
        print(f"[{step}/8] wave {wave}: {n} {what}; embedded by the pilot's backbone")
        wave_dir = home.root / "sample" / wave
        build_sample_data(wave_dir, n_slices=n, seed=seed + step - 5, wave_style=style,
                          progress=True)
        print(f"      landing: {land(wave, wave_dir)}")
        ok = run(wave, SECOND_WAVE) and ok
        label(wave, wave_dir)
        ok = run(wave, "expert_labels clusters") and ok
    defs = build_defs(deployment)
    instance = instance_for(deployment)
    print("[8/8] ari_drift_sensor, evaluated once as the daemon would:")
    verdicts, requests = drift_verdict(defs, instance)
    for line in verdicts:
        print(f"      {line}")
    drift_lines = []
    labels = label_store_for(deployment)
    for wave in requests:
        before = labels.wave_progress(wave)["open"]
        ok = run(wave, "labeling_queue") and ok
        after = labels.wave_progress(wave)["open"]
        drift_lines.append(f"  drift: ari_drift_sensor requested active_learning[{wave}]; its "
                           f"queue grew from {before} to {after} open items")
        print(drift_lines[-1].strip())
    if not requests:
        drift_lines.append("  drift: ari_drift_sensor requested nothing")
    print(_summary(defs, instance, deployment, pilot_dir, started, drift_lines))
    print(cost_line(defs, PILOT, instance))
    return 0 if ok else 1


def _ari(instance: dg.DagsterInstance, wave: str) -> str:
    clusters = _latest_metadata(instance, "clusters", wave)
    ari, nmi = clusters.get("ari_k4"), clusters.get("nmi_k4")
    if not isinstance(ari, float):
        return f"{wave} {ari}"
    return f"{wave} {ari:.3f} (NMI {nmi:.3f})"


def _stage2_line(model: dict) -> str:
    moved = (f"layer4 moved {model.get('layer4_relative_change')} (relative L2), holdout "
             f"embedding cosine {model.get('holdout_embedding_cosine')}")
    if model.get("stage2_kept", True):
        return f"stage 1 {model.get('stage1_macro_f1')} -> stage 2 {model.get('macro_f1')}, {moved}"
    rejected = (model.get("stage2_selection") or {}).get("rejected_holdout_macro_f1")
    return (f"stage 1 {model.get('stage1_macro_f1')}; stage 2 rejected on withheld training "
            f"rows (holdout would have been {rejected}; {moved})")


def _summary(defs, instance, deployment: Deployment, pilot_dir, started: float,
             drift_lines: list[str]) -> str:
    pseudo = _latest_metadata(instance, "pseudo_labels", PILOT)
    model = _latest_metadata(instance, "classifier", PILOT)
    backbone = _latest_metadata(instance, "backbone", PILOT)
    checked, precision = pseudo_label_precision(defs, instance, PILOT, pilot_dir / "labels.csv")
    lines = [
        "",
        "summary",
        *(_manifest_summary(defs, instance, wave) for wave in (PILOT, EPI_WAVE, DRIFT_WAVE)),
        "  ARI k=4: " + ", ".join(_ari(instance, wave) for wave in (PILOT, EPI_WAVE, DRIFT_WAVE)),
        *drift_lines,
        (f"  pseudo-labels: {pseudo.get('promoted')} promoted of {pseudo.get('unlabeled')} "
        f"unlabeled; gate {_check_status(instance, 'pseudo_labels', 'pseudo_label_gate')}; "
        f"precision vs ground truth {precision if precision is None else round(precision, 4)} "
        f"on {checked}"),
        (f"  classifier holdout macro-F1 {model.get('macro_f1')} vs supervised baseline "
        f"{model.get('baseline_macro_f1')} ({model.get('expert_labels')} expert + "
        f"{model.get('pseudo_labels_used')} pseudo-labels; stage 2 on {model.get('stage2_images')} images)"),
        (f"  backbone: {backbone.get('model_id')} ({backbone.get('source')}, "
        f"{backbone.get('steps')} steps of the {backbone.get('budget_kind')} budget in "
        f"{backbone.get('seconds')} s, {backbone.get('precision')}, "
        f"{backbone.get('cpu_minutes')} CPU min); {_stage2_line(model)}"),
        f"  state: {deployment.home.root} (store, Dagster instance, MLflow, DVC, labels)",
        ("  look: `make dev` -> http://127.0.0.1:3000 (assets, waves partitions, sensors, checks);"
        " `MRI_ASSETS_TRIAGE_DEMO=1 mri-assets triage serve` for the labeling page (a real"
        " deployment sets a strong MRI_ASSETS_TRIAGE_SECRET instead)"),
        f"  total: {time.perf_counter() - started:.1f} s",
    ]
    return "\n".join(lines)
