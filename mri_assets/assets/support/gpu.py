"""What marks a step as GPU work, for every executor: the Dagster pool, the Celery queue and the
Kubernetes pod settings. Assets carry these tags; the executors only read them."""

from __future__ import annotations

import json

GPU_POOL = "gpu"
GPU_QUEUE = "gpu"


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
