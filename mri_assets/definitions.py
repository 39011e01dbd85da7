"""The single `defs` of the deployment profile named by MRI_ASSETS_PROFILE (`local` by default).

A profile changes resources and the executor only; the assets are the same everywhere.
"""

from __future__ import annotations

import os

import dagster as dg

from mri_assets.assets import clustering, costs, embeddings, ingest, labeling, retraining
from mri_assets.assets.smoke import smoke_reproduces
from mri_assets.core.home import MriHome
from mri_assets.executors import check_profile, executor_for
from mri_assets.jobs import (
    active_learning_job,
    drift_check_job,
    embed_wave_job,
    ingest_wave_job,
    label_refresh_job,
    retrain_job,
)
from mri_assets.resources.compute import ComputeResource
from mri_assets.resources.cost_settings import CostSettings
from mri_assets.resources.dvc_tracking import DvcTracking
from mri_assets.resources.label_store import LabelStore
from mri_assets.resources.metrics import MetricsResource
from mri_assets.resources.mlflow_tracking import MlflowTracking
from mri_assets.resources.object_store import LocalObjectStore, ObjectStore
from mri_assets.resources.settings import (
    ClusteringSettings,
    IngestSettings,
    LabelingSettings,
    PseudoLabelSettings,
    RetrainSettings,
    TrainingSettings,
)
from mri_assets.schedules import monthly_retrain, weekly_drift_check
from mri_assets.sensors import ari_drift_sensor, labels_sensor, retrain_sensor, wave_sensor
from mri_assets.smoke_run import nightly_smoke, nightly_smoke_schedule

ASSET_MODULES = [ingest, embeddings, clustering, labeling, retraining, costs]


def _salt() -> str | dg.EnvVar:
    return dg.EnvVar("MRI_ASSETS_SALT") if os.environ.get("MRI_ASSETS_SALT") else IngestSettings().salt


def _object_store(profile: str, home: MriHome) -> ObjectStore:
    bucket = os.environ.get("MRI_ASSETS_S3_BUCKET")
    if profile == "k8s" or bucket:
        from mri_assets.resources.object_store import S3ObjectStore

        return S3ObjectStore(
            bucket=bucket or "mri-assets",
            prefix=os.environ.get("MRI_ASSETS_S3_PREFIX", ""),
            endpoint_url=os.environ.get("MRI_ASSETS_S3_ENDPOINT_URL") or None,
            cache_dir=str(home.cache),
        )
    return LocalObjectStore(root=str(home.store))


def _io_manager(profile: str, home: MriHome):
    if profile == "k8s":
        from dagster_aws.s3 import S3PickleIOManager, S3Resource

        return S3PickleIOManager(
            s3_resource=S3Resource(endpoint_url=os.environ.get("MRI_ASSETS_S3_ENDPOINT_URL")),
            s3_bucket=os.environ.get("MRI_ASSETS_S3_BUCKET", "mri-assets"),
            s3_prefix="dagster-io",
        )
    return dg.FilesystemIOManager(base_dir=str(home.dagster / "storage"))


def _env_or(name: str, default: str) -> str | dg.EnvVar:
    return dg.EnvVar(name) if os.environ.get(name) else default


def _dvc(profile: str, home: MriHome) -> DvcTracking:
    bucket = os.environ.get("MRI_ASSETS_S3_BUCKET")
    if profile == "k8s" or bucket:
        prefix = os.environ.get("MRI_ASSETS_S3_PREFIX", "").strip("/")
        remote = f"s3://{bucket or 'mri-assets'}/{prefix + '/' if prefix else ''}dvc-remote"
        return DvcTracking(repo_dir=str(home.dvc_repo), remote_url=remote,
                           remote_endpoint_url=os.environ.get("MRI_ASSETS_S3_ENDPOINT_URL"))
    return DvcTracking(repo_dir=str(home.dvc_repo), remote_url=str(home.dvc_remote))


def _compute(profile: str) -> ComputeResource:
    """CPU nodes embed at 128 px by default (resized on the device; part of the model id), GPU
    nodes at the stored 256 px. `MRI_ASSETS_INPUT_SIZE=256` changes the local default."""
    checkpoint = os.environ.get("MRI_ASSETS_BACKBONE_CHECKPOINT") or None
    size = os.environ.get("MRI_ASSETS_INPUT_SIZE", "128" if profile == "local" else "")
    input_size = int(size) if size and int(size) != 256 else None
    if profile == "local":
        return ComputeResource(checkpoint_key=checkpoint, input_size=input_size)
    return ComputeResource(device=os.environ.get("MRI_ASSETS_DEVICE", "auto"),
                           num_workers=int(os.environ.get("MRI_ASSETS_LOADER_WORKERS", "0")),
                           batch_size=int(os.environ.get("MRI_ASSETS_BATCH_SIZE", "64")),
                           checkpoint_key=checkpoint, input_size=input_size)


def _mlflow(home: MriHome) -> MlflowTracking:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return MlflowTracking(tracking_uri=dg.EnvVar("MLFLOW_TRACKING_URI"),
                              experiment_name=os.environ.get("MRI_ASSETS_EXPERIMENT", "mri_assets"))
    return MlflowTracking.local(home.root)


def _label_store(home: MriHome) -> LabelStore:
    return LabelStore(url=_env_or("MRI_ASSETS_LABELS_URL", f"sqlite:///{home.labels_db}"))


def resources_for(profile: str, home: MriHome) -> dict:
    return {
        "object_store": _object_store(profile, home),
        "ingest": IngestSettings(salt=_salt()),
        "io_manager": _io_manager(profile, home),
        "compute": _compute(profile),
        "dvc": _dvc(profile, home),
        "mlflow": _mlflow(home),
        "label_store": _label_store(home),
        "clustering": ClusteringSettings(),
        "labeling": LabelingSettings(
            batch_size=int(os.environ.get("MRI_ASSETS_LABEL_BATCH", "200"))),
        "pseudo": PseudoLabelSettings(),
        "training": TrainingSettings(
            max_finetune_images=int(os.environ.get("MRI_ASSETS_MAX_FINETUNE_IMAGES", "0"))),
        "retrain": RetrainSettings(
            every_slices=int(os.environ.get("MRI_ASSETS_RETRAIN_EVERY", "500000"))),
        "metrics": MetricsResource(),
        "cost": CostSettings(),
    }


def build_defs(profile: str | None = None, home: MriHome | None = None) -> dg.Definitions:
    profile = check_profile(profile or os.environ.get("MRI_ASSETS_PROFILE", "local"))
    home = home or MriHome.from_env()
    return dg.Definitions(
        assets=dg.load_assets_from_modules(ASSET_MODULES),
        asset_checks=[smoke_reproduces],
        jobs=[ingest_wave_job, active_learning_job, drift_check_job, label_refresh_job, retrain_job,
              embed_wave_job, nightly_smoke],
        sensors=[wave_sensor, ari_drift_sensor, labels_sensor, retrain_sensor],
        schedules=[weekly_drift_check, monthly_retrain, nightly_smoke_schedule],
        resources=resources_for(profile, home),
        executor=executor_for(profile),
    )


defs = build_defs()
