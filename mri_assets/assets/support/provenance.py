"""Provenance across Dagster and MLflow: every MLflow run a step starts names the Dagster run,
asset and partition that made it, and the step's metadata links to the MLflow run."""

from __future__ import annotations

import dagster as dg

from mri_assets.resources.mlflow_tracking import (
    DAGSTER_ASSET_TAG,
    DAGSTER_PARTITION_TAG,
    DAGSTER_RUN_TAG,
    DAGSTER_RUN_URL_TAG,
    MlflowTracking,
)


def dagster_tags(context: dg.AssetExecutionContext,
                 mlflow: MlflowTracking | None = None) -> dict[str, str]:
    """MLflow tags naming this step: Dagster run id, asset key, partition, and the run's page in
    the Dagster UI where `mlflow` knows the UI's address."""
    tags = {DAGSTER_RUN_TAG: context.run_id,
            DAGSTER_ASSET_TAG: context.asset_key.to_user_string()}
    if context.has_partition_key:
        tags[DAGSTER_PARTITION_TAG] = str(context.partition_key)
    url = mlflow.dagster_run_url(context.run_id) if mlflow is not None else None
    if url is not None:
        tags[DAGSTER_RUN_URL_TAG] = url
    return tags


def mlflow_run_metadata(mlflow: MlflowTracking, run_id: str) -> dict:
    """`mlflow_run_id`, and `mlflow_run` as a link to the run's page where a UI is known."""
    metadata: dict = {"mlflow_run_id": run_id}
    url = mlflow.run_url(run_id)
    if url is not None:
        metadata["mlflow_run"] = dg.MetadataValue.url(url)
    return metadata
