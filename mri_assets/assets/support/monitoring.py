"""What each batch step pushes to the Pushgateway (the Prometheus convention for batch jobs).

Each asset calls `push_figures` once with the gauges built here. Grouping key: `job` = the asset
name, plus `wave` (and `shard` for wave x shard assets). A Pushgateway that is down is logged and
counted by `MetricsResource.push` and never fails the step.
"""

from __future__ import annotations

from collections.abc import Mapping

from mri_assets.resources.metrics import (
    GaugeValue,
    MetricsResource,
    PushOutcome,
    gpu_utilisation_gauges,
)


def push_figures(
    metrics: MetricsResource,
    job: str,
    grouping: Mapping[str, str],
    gauges: Mapping[str, GaugeValue],
) -> PushOutcome:
    """Push one step's gauges under `job` + `grouping`; an unknown metric name raises."""
    if not gauges:
        return PushOutcome(pushed=False, failures=metrics.push_failures, reason="nothing to push")
    return metrics.push(job, grouping, gauges)


def manifest_gauges(wave: str, ingested: int, quarantined: int) -> dict[str, GaugeValue]:
    return {
        "mri_assets_slices_ingested": [({"wave": wave}, ingested)],
        "mri_assets_quarantined_slices": [({"wave": wave}, quarantined)],
    }


def throughput_gauges(wave: str, stage: str, images: int, seconds: float) -> dict[str, GaugeValue]:
    """Images/s and ms/image of a stage, plus GPU utilisation where NVML finds a GPU."""
    if images <= 0 or seconds <= 0:
        return dict(gpu_utilisation_gauges())
    return {
        "mri_assets_images_per_second": [({"wave": wave, "stage": stage}, images / seconds)],
        "mri_assets_ms_per_image": [({"wave": wave, "stage": stage}, 1000.0 * seconds / images)],
        **gpu_utilisation_gauges(),
    }


def cluster_gauges(wave: str, scores: Mapping[int, Mapping[str, float | None]]) -> dict[str, GaugeValue]:
    """ARI and NMI per k; a k whose score is not computable (no labels yet) is left out."""
    gauges: dict[str, list] = {"mri_assets_ari": [], "mri_assets_nmi": []}
    for k, by_name in sorted(scores.items()):
        for name in ("ari", "nmi"):
            value = by_name.get(name)
            if value is not None:
                gauges[f"mri_assets_{name}"].append(({"wave": wave, "k": str(k)}, float(value)))
    return {name: samples for name, samples in gauges.items() if samples}


def queue_gauges(queue: str, size: int) -> dict[str, GaugeValue]:
    return {"mri_assets_queue_size": [({"queue": queue}, size)]}
