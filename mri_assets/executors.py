"""The executor of each deployment profile. Assets never know which one runs them."""

from __future__ import annotations

import json

import dagster as dg

GPU_POOL = "gpu"
GPU_QUEUE = "gpu"
PROFILES = ("local", "celery", "k8s")


class ProfileError(ValueError):
    """An unknown or misconfigured deployment profile."""


def check_profile(profile: str) -> str:
    if profile not in PROFILES:
        raise ProfileError(
            f"unknown MRI_ASSETS_PROFILE {profile!r}: use one of {', '.join(PROFILES)}"
        )
    return profile


def executor_for(profile: str) -> dg.ExecutorDefinition:
    check_profile(profile)
    if profile == "celery":
        from dagster_celery import celery_executor

        return celery_executor
    if profile == "k8s":
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor
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
