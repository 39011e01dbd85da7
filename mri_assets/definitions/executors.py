"""The executor of each deployment profile. Assets never know which one runs them."""

from __future__ import annotations

from collections.abc import Mapping

import dagster as dg

from mri_assets.assets.support.gpu import GPU_POOL, GPU_QUEUE, gpu_run_tags, gpu_step_tags
from mri_assets.deployment import PROFILES, Deployment, ProfileError, check_profile

__all__ = [
    "DEFAULT_QUEUE",
    "GPU_POOL",
    "GPU_QUEUE",
    "K8S_PASSED_ENV",
    "PROFILES",
    "ProfileError",
    "celery_executor_config",
    "check_profile",
    "executor_for",
    "gpu_run_tags",
    "gpu_step_tags",
    "k8s_executor_config",
    "shard_runs_for",
]

DEFAULT_QUEUE = "dagster"
# The settings a step pod needs to build the same Deployment as its run pod.
K8S_PASSED_ENV = (
    "MRI_ASSETS_S3_BUCKET",
    "MRI_ASSETS_S3_PREFIX",
    "MRI_ASSETS_S3_ENDPOINT_URL",
    "MRI_ASSETS_SHARDS",
    "MRI_ASSETS_DEVICE",
    "MRI_ASSETS_LOADER_WORKERS",
    "MRI_ASSETS_BATCH_SIZE",
    "MRI_ASSETS_INPUT_SIZE",
    "MRI_ASSETS_BACKBONE_CHECKPOINT",
    "MRI_ASSETS_LABELS_URL",
    "MRI_ASSETS_SALT",
    "MRI_ASSETS_LABEL_BATCH",
    "MRI_ASSETS_MAX_FINETUNE_IMAGES",
    "MRI_ASSETS_RETRAIN_EVERY",
    "MRI_ASSETS_LOOP_SENSOR_INTERVAL",
    "MLFLOW_TRACKING_URI",
    "MRI_ASSETS_EXPERIMENT",
    "PUSHGATEWAY_URL",
)


def _deployment(source: Deployment | Mapping[str, str]) -> Deployment:
    """A deployment, or one read from a mapping of variables (tests pass plain dicts)."""
    return source if isinstance(source, Deployment) else Deployment.from_env(source)


def celery_executor_config(deployment: Deployment | Mapping[str, str]) -> dict:
    """dagster-celery's executor config: the Redis broker (and result backend) of the deployment.

    Workers started by `mri-assets worker` take the same deployment, so both sides meet on one broker.
    """
    celery = _deployment(deployment).celery
    return {
        "broker": celery.broker,
        "backend": celery.backend or celery.broker,
        "retries": {"enabled": {}},
    }


def k8s_executor_config(deployment: Deployment | Mapping[str, str]) -> dict:
    """dagster-k8s's `k8s_job_executor` config: one Kubernetes Job per step, in the run's namespace.

    Every step pod gets MRI_ASSETS_PROFILE=k8s, the settings of `K8S_PASSED_ENV` that are set here
    (dagster-k8s copies a bare name's value from the run pod, and fails on an unset one), and
    modest CPU/memory requests; GPU steps add their own `dagster-k8s/config` tag.
    """
    deployment = _deployment(deployment)
    k8s = deployment.k8s
    config: dict = {
        "job_namespace": k8s.namespace,
        "max_concurrent": k8s.max_concurrent,
        "env_vars": ["MRI_ASSETS_PROFILE=k8s", *deployment.set_values(K8S_PASSED_ENV)],
        "retries": {"enabled": {}},
        "step_k8s_config": {
            "container_config": {
                "resources": {"requests": {"cpu": k8s.step_cpu, "memory": k8s.step_memory}}
            }
        },
    }
    if k8s.image_pull_policy:
        config["image_pull_policy"] = k8s.image_pull_policy
    return config


def shard_runs_for(deployment: Deployment) -> str:
    """How automation runs a wave's shard assets: `per_wave` (one run over the wave's shards,
    stepping through them in one process) where one machine does the work, `per_shard` (a run
    per shard partition, each retried on its own) where the executor fans steps out to a fleet."""
    return "per_wave" if check_profile(deployment.profile) == "local" else "per_shard"


def executor_for(deployment: Deployment) -> dg.ExecutorDefinition:
    """Celery workers or Kubernetes pods per step; locally every step in the run's own process
    (no second process start per step: a run's steps run one after another, and runs beside
    each other are bounded by the instance's run queue and the `gpu` pool)."""
    profile = check_profile(deployment.profile)
    if profile == "celery":
        from dagster_celery import celery_executor

        return celery_executor.configured(celery_executor_config(deployment), name="celery")
    if profile == "k8s":
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor.configured(k8s_executor_config(deployment), name="k8s")
    return dg.in_process_executor
