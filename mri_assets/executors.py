"""The executor of each deployment profile. Assets never know which one runs them."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import dagster as dg

GPU_POOL = "gpu"
GPU_QUEUE = "gpu"
DEFAULT_QUEUE = "dagster"
PROFILES = ("local", "celery", "k8s")
DEFAULT_CELERY_BROKER = "redis://127.0.0.1:6379/0"
K8S_PASSED_ENV = (
    "MRI_ASSETS_S3_BUCKET",
    "MRI_ASSETS_S3_PREFIX",
    "MRI_ASSETS_S3_ENDPOINT_URL",
    "MRI_ASSETS_SHARDS",
    "MRI_ASSETS_DEVICE",
    "MRI_ASSETS_LOADER_WORKERS",
    "MRI_ASSETS_BATCH_SIZE",
    "MRI_ASSETS_LABELS_URL",
    "MRI_ASSETS_SALT",
    "MLFLOW_TRACKING_URI",
)


class ProfileError(ValueError):
    """An unknown or misconfigured deployment profile."""


def check_profile(profile: str) -> str:
    if profile not in PROFILES:
        raise ProfileError(
            f"unknown MRI_ASSETS_PROFILE {profile!r}: use one of {', '.join(PROFILES)}"
        )
    return profile


def celery_executor_config(env: Mapping[str, str] = os.environ) -> dict:
    """dagster-celery's executor config: the Redis broker (and result backend) named by the env.

    Workers started by `mri-assets worker` read the same variables, so both sides meet on one broker.
    """
    broker = env.get("MRI_ASSETS_CELERY_BROKER") or DEFAULT_CELERY_BROKER
    return {
        "broker": broker,
        "backend": env.get("MRI_ASSETS_CELERY_BACKEND") or broker,
        "retries": {"enabled": {}},
    }


def k8s_executor_config(env: Mapping[str, str] = os.environ) -> dict:
    """dagster-k8s's `k8s_job_executor` config: one Kubernetes Job per step, in the run's namespace.

    Every step pod gets MRI_ASSETS_PROFILE=k8s, the settings of `K8S_PASSED_ENV` that are set here
    (dagster-k8s copies a bare name's value from the run pod, and fails on an unset one), and
    modest CPU/memory requests; GPU steps add their own `dagster-k8s/config` tag.
    """
    config: dict = {
        "job_namespace": env.get("MRI_ASSETS_K8S_NAMESPACE", "dagster"),
        "max_concurrent": int(env.get("MRI_ASSETS_K8S_MAX_CONCURRENT", "16")),
        "env_vars": ["MRI_ASSETS_PROFILE=k8s", *(name for name in K8S_PASSED_ENV if env.get(name))],
        "retries": {"enabled": {}},
        "step_k8s_config": {
            "container_config": {
                "resources": {
                    "requests": {
                        "cpu": env.get("MRI_ASSETS_K8S_STEP_CPU", "1"),
                        "memory": env.get("MRI_ASSETS_K8S_STEP_MEMORY", "4Gi"),
                    }
                }
            }
        },
    }
    if env.get("MRI_ASSETS_K8S_IMAGE_PULL_POLICY"):
        config["image_pull_policy"] = env["MRI_ASSETS_K8S_IMAGE_PULL_POLICY"]
    return config


def executor_for(profile: str, env: Mapping[str, str] = os.environ) -> dg.ExecutorDefinition:
    check_profile(profile)
    if profile == "celery":
        from dagster_celery import celery_executor

        return celery_executor.configured(celery_executor_config(env), name="celery")
    if profile == "k8s":
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor.configured(k8s_executor_config(env), name="k8s")
    return dg.multiprocess_executor.configured({"max_concurrent": 2})


def gpu_step_tags() -> dict[str, str]:
    """Op tags every GPU asset carries: the Celery queue and the Kubernetes GPU pod settings."""

    k8s_config = {
        "container_config": {
            "resources": {
                "limits": {"nvidia.com/gpu": "1"},
                "requests": {"nvidia.com/gpu": "1"},
            }
        },
        "pod_spec_config": {
            "node_selector": {"nvidia.com/gpu.present": "true"},
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ],
        },
    }
    return {
        "dagster-celery/queue": GPU_QUEUE,
        "dagster-k8s/config": json.dumps(k8s_config, sort_keys=True),
    }


def gpu_run_tags(max_runtime_s: int = 6 * 3600) -> dict[str, str]:
    """Run tags of jobs that hold GPUs: run monitoring stops a run that outlives `max_runtime_s`."""
    return {"dagster/max_runtime": str(max_runtime_s)}
