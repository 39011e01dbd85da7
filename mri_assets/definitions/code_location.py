"""What a code location is made of below `definitions`: the asset modules and the resources of a
deployment. The smoke job and the local runner build their own `Definitions` from these parts,
so none of them needs `definitions` (which imports them)."""

from __future__ import annotations

import dagster as dg

from mri_assets.assets import backbone, clustering, costs, embeddings, ingest, labeling, retraining
from mri_assets.definitions.dagster_private import PickledObjectFilesystemIOManager
from mri_assets.deployment import Deployment
from mri_assets.resources.compute import ComputeResource
from mri_assets.resources.cost_settings import CostSettings
from mri_assets.resources.deployed import object_store_for, secret_config
from mri_assets.resources.dvc_tracking import DvcTracking
from mri_assets.resources.label_store import LabelStore
from mri_assets.resources.metrics import MetricsResource
from mri_assets.resources.mlflow_tracking import MlflowTracking
from mri_assets.resources.settings import (
    ClusteringSettings,
    IngestSettings,
    LabelingSettings,
    PseudoLabelSettings,
    RetrainSettings,
    TrainingSettings,
)
from mri_assets.resources.wave_io import WAVE_IO_MANAGER, wave_io_manager


class _RangePickledIOManager(PickledObjectFilesystemIOManager):
    def handle_output(self, context: dg.OutputContext, obj) -> None:
        if not (context.has_asset_partitions and len(context.asset_partition_keys) > 1):
            return super().handle_output(context, obj)
        paths = self._get_paths_for_partitions(context)
        if not isinstance(obj, dict) or set(map(str, paths)) - set(map(str, obj)):
            raise TypeError(f"an output over {len(paths)} partitions must be a dict by partition "
                            f"key (`partitions.each_shard`), got {type(obj).__name__}")
        by_key = {str(key): value for key, value in obj.items()}
        for key, path in paths.items():
            self.make_directory(path.parent)
            self.dump_to_path(context=context, obj=by_key[str(key)], path=path)


class RangeFilesystemIOManager(dg.FilesystemIOManager):
    """Dagster's filesystem IO manager, which also stores the output of a run over a range of
    partitions when it is a dict by partition key: each value where a one-partition run would
    have put it (so a range run and per-shard runs leave the same files)."""

    def create_io_manager(self, context) -> PickledObjectFilesystemIOManager:
        manager = super().create_io_manager(context)
        return _RangePickledIOManager(base_dir=manager.base_dir)


ASSET_MODULES = [ingest, backbone, embeddings, clustering, labeling, retraining, costs]


def wave_assets() -> list:
    return list(dg.load_assets_from_modules(ASSET_MODULES))


def _io_manager(deployment: Deployment):
    if deployment.profile == "k8s":
        from dagster_aws.s3 import S3PickleIOManager, S3Resource

        return S3PickleIOManager(
            s3_resource=S3Resource(endpoint_url=deployment.object_store.endpoint_url),
            s3_bucket=deployment.bucket,
            s3_prefix="dagster-io",
        )
    return RangeFilesystemIOManager(base_dir=str(deployment.home.dagster / "storage"))


def _dvc(deployment: Deployment) -> DvcTracking:
    where = {"repo_dir": str(deployment.home.dvc_repo), "remote_url": deployment.dvc_remote,
             "dvc_executable": deployment.dvc_executable}
    if deployment.uses_s3:
        return DvcTracking(**where, remote_endpoint_url=deployment.object_store.endpoint_url)
    return DvcTracking(**where)


def _compute(deployment: Deployment) -> ComputeResource:
    """CPU nodes embed at 128 px by default (resized on the device; part of the model id), GPU
    nodes at the stored 256 px. `MRI_ASSETS_INPUT_SIZE=256` changes the local default."""
    settings = deployment.compute
    model = {"checkpoint_key": settings.backbone_checkpoint, "input_size": deployment.input_size,
             "precision": settings.precision}
    if deployment.profile == "local":
        return ComputeResource(**model)
    return ComputeResource(device=settings.device, num_workers=settings.loader_workers,
                           batch_size=settings.batch_size, **model)


def _mlflow(deployment: Deployment) -> MlflowTracking:
    if deployment.mlflow.tracking_uri is not None:
        return MlflowTracking(tracking_uri=secret_config(deployment.mlflow.tracking_uri, ""),
                              experiment_name=deployment.mlflow.experiment,
                              dagster_url=deployment.dagster_url)
    return MlflowTracking.local(deployment.home.root, dagster_url=deployment.dagster_url)


def resources_for(deployment: Deployment) -> dict:
    """Every resource of the deployment, by key; secrets stay `EnvVar`s where the env holds them."""
    loop = deployment.loop
    return {
        "object_store": object_store_for(deployment),
        "ingest": IngestSettings(salt=secret_config(deployment.salt, IngestSettings().salt)),
        "io_manager": _io_manager(deployment),
        WAVE_IO_MANAGER: wave_io_manager,
        "compute": _compute(deployment),
        "dvc": _dvc(deployment),
        "mlflow": _mlflow(deployment),
        "label_store": LabelStore(url=secret_config(deployment.labels_url,
                                                    deployment.labels_url_value)),
        "clustering": ClusteringSettings(),
        "labeling": LabelingSettings(batch_size=loop.label_batch),
        "pseudo": PseudoLabelSettings(),
        "training": TrainingSettings(max_finetune_images=loop.max_finetune_images),
        "retrain": RetrainSettings(every_slices=loop.retrain_every),
        "metrics": MetricsResource(pushgateway_url=deployment.pushgateway_url or ""),
        "cost": CostSettings(),
        "pretrain": backbone.PretrainSettings(policy=deployment.compute.backbone_policy),
    }
