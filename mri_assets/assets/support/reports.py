"""What a model-training step records besides its value: its MLflow run and its metadata, built
here so the asset bodies stay load, call, write, return."""

from __future__ import annotations

import base64

import dagster as dg

from mri_assets.assets.support.provenance import dagster_tags
from mri_assets.resources.mlflow_tracking import MlflowTracking


def png_markdown(name: str, png: bytes) -> dg.MetadataValue:
    """A PNG inline in the Dagster UI's metadata."""
    return dg.MetadataValue.md(f"![{name}](data:image/png;base64,{base64.b64encode(png).decode()})")


def log_classifier_run(context: dg.AssetExecutionContext, mlflow: MlflowTracking, meta: dict,
                       config, semi, baseline: dict, png: bytes, checkpoint: bytes, model,
                       registered_model: str) -> tuple[str, str]:
    """The classifier's MLflow run (wave, `classifier`): parameters, holdout metrics against the
    baseline's, the baseline report, the confusion matrix, and the checkpoint registered as
    `registered_model`. Returns (run id, model version)."""
    tags = {**dagster_tags(context, mlflow), "model_id": meta["embedding_model_id"]}
    with mlflow.start_wave_run(meta["wave"], "classifier", tags=tags, new_run=True) as run_id:
        mlflow.log_params(run_id, {**{k: v for k, v in meta.items() if "f1" not in k},
                                   "lr_stage2": str(config.stage2_lrs), "seed": config.seed})
        mlflow.log_metrics(run_id, {**semi.metrics(),
                                    "baseline_holdout_macro_f1": meta["baseline_macro_f1"]})
        mlflow.log_dict(run_id, "baseline_report.json", baseline)
        mlflow.log_png(run_id, "confusion.png", png)
        version = mlflow.register_checkpoint(run_id, checkpoint, registered_model, model,
                                             tags=dagster_tags(context, mlflow))
    return run_id, version


def classifier_metadata(semi, baseline_f1: float, counts: dict, png: bytes) -> dict:
    """The classifier's figures against the baseline, in the UI's metadata."""
    return {
        "macro_f1": round(semi.macro_f1, 4),
        "baseline_macro_f1": round(baseline_f1, 4),
        "macro_f1_gain": round(semi.macro_f1 - baseline_f1, 4),
        "stage1_macro_f1": round(semi.stage1_eval.macro_f1, 4),
        "stage2_gain_macro_f1": round(semi.stage2_gain, 4),
        "stage2_kept": semi.stage2_kept,
        "precision": semi.precision,
        "stage2_selection": dg.MetadataValue.json(
            {k: round(v, 4) if isinstance(v, float) else v
             for k, v in semi.stage2_selection.items()}),
        **{name: round(value, 5) for name, value in semi.backbone_shift.items()},
        "expert_labels": counts["expert_labels"],
        "pseudo_labels_used": counts["pseudo_labels"],
        "stage2_images": counts["stage2_images"],
        "holdout": counts["holdout"],
        "confusion": png_markdown("confusion", png),
    }
