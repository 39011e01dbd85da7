"""Prometheus figures: batch runs push to a Pushgateway, the triage app serves `/metrics`.

`METRICS` is the one list of metric names the project emits (pushed ones prefixed `mri_assets_`;
the triage app's own `mri_triage_*` gauges listed with `source="triage"`); the Grafana dashboard
test checks every panel's query against it. Batch steps push with `MetricsResource.push`, which never fails a
run: a Pushgateway that is down or refuses the push is logged as a warning and counted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import dagster as dg
from prometheus_client import CollectorRegistry, Gauge, push_to_gateway
from pydantic import PrivateAttr

from mri_assets.core.costs import CATEGORIES, Spend

PREFIX = "mri_assets_"


@dataclass(frozen=True)
class MetricSpec:
    help: str
    unit: str
    labels: tuple[str, ...] = ()
    source: str = "pushgateway"


METRICS: Mapping[str, MetricSpec] = {
    "mri_assets_slices_ingested": MetricSpec(
        "Slices written by the manifest step for a wave (all statuses but quarantined).",
        "slices",
        ("wave",),
    ),
    "mri_assets_quarantined_slices": MetricSpec(
        "Slices quarantined by the manifest step for a wave.", "slices", ("wave",)
    ),
    "mri_assets_images_per_second": MetricSpec(
        "Measured throughput of a stage.", "images/s", ("wave", "stage")
    ),
    "mri_assets_ms_per_image": MetricSpec(
        "Measured milliseconds per image of a stage.", "ms", ("wave", "stage")
    ),
    "mri_assets_gpu_utilisation_ratio": MetricSpec(
        "GPU utilisation read from NVML at the end of a step (0-1); absent without a GPU.",
        "ratio",
        ("gpu",),
    ),
    "mri_assets_queue_size": MetricSpec(
        "Items waiting in a queue (e.g. labeling).", "items", ("queue",)
    ),
    "mri_assets_labels_per_hour": MetricSpec(
        "Expert labels submitted per hour over the last snapshot window.", "labels/h"
    ),
    "mri_assets_budget_left_euros": MetricSpec(
        "Usable budget left (total cap less contingency, less spend).", "EUR"
    ),
    "mri_assets_spend_euros": MetricSpec(
        "Measured spend by category (compute, storage, labeling).", "EUR", ("category",)
    ),
    "mri_assets_cap_euros": MetricSpec(
        "Cap by category (compute, storage, labeling, total).", "EUR", ("category",)
    ),
    "mri_assets_ari": MetricSpec(
        "Adjusted Rand index of the k-means clusters against expert labels.", "ratio", ("wave", "k")
    ),
    "mri_assets_nmi": MetricSpec(
        "Normalised mutual information of the k-means clusters against expert labels.",
        "ratio",
        ("wave", "k"),
    ),
    # Served by the triage app's /metrics (mri_assets/triage/app.py), scraped, not pushed.
    "mri_triage_queue_size": MetricSpec("Items queued or leased.", "items", source="triage"),
    "mri_triage_labels_last_hour": MetricSpec(
        "Labels submitted in the last hour.", "labels", source="triage"
    ),
    "mri_triage_labels_total": MetricSpec("Labels in the store.", "labels", source="triage"),
    "mri_triage_budget_left_cases": MetricSpec(
        "Expert cases the budget still pays for.", "cases", source="triage"
    ),
    "mri_triage_budget_left_eur": MetricSpec(
        "Labeling budget left in EUR.", "EUR", source="triage"
    ),
}

Sample = tuple[Mapping[str, str], float]
GaugeValue = float | Sequence[Sample]


@dataclass(frozen=True)
class PushOutcome:
    pushed: bool
    failures: int
    reason: str = ""


def gpu_utilisation() -> dict[str, float]:
    """Utilisation (0-1) per GPU index from NVML; empty when pynvml or a GPU is missing."""
    try:
        import pynvml
    except ImportError:
        return {}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return {}
    try:
        return {
            str(index): pynvml.nvmlDeviceGetUtilizationRates(
                pynvml.nvmlDeviceGetHandleByIndex(index)
            ).gpu
            / 100.0
            for index in range(pynvml.nvmlDeviceGetCount())
        }
    finally:
        pynvml.nvmlShutdown()


def gpu_utilisation_gauges() -> dict[str, list[Sample]]:
    """The GPU gauge ready for `push`, or nothing at all when there is no GPU to read."""
    readings = gpu_utilisation()
    if not readings:
        return {}
    return {
        "mri_assets_gpu_utilisation_ratio": [
            ({"gpu": index}, ratio) for index, ratio in sorted(readings.items())
        ]
    }


def cost_gauges(spend: Spend) -> dict[str, GaugeValue]:
    """The ledger's figures as gauges: spend and cap per category, and usable budget left."""
    caps = {category: spend.caps.for_category(category) for category in CATEGORIES}
    caps["total"] = spend.caps.usable_eur
    return {
        "mri_assets_spend_euros": [
            ({"category": category}, eur) for category, eur in spend.by_category().items()
        ],
        "mri_assets_cap_euros": [({"category": category}, eur) for category, eur in caps.items()],
        "mri_assets_budget_left_euros": spend.budget_left_eur,
    }


def build_registry(
    gauges: Mapping[str, GaugeValue], help_texts: Mapping[str, str] | None = None
) -> CollectorRegistry:
    """A fresh registry holding `gauges`; unknown names or wrong labels raise ValueError."""
    registry = CollectorRegistry()
    for name, value in gauges.items():
        spec = METRICS.get(name)
        if spec is None:
            raise ValueError(
                f"unknown metric {name!r}: add it to METRICS in mri_assets/resources/metrics.py "
                f"or use one of {sorted(METRICS)}"
            )
        if spec.source != "pushgateway":
            raise ValueError(f"metric {name!r} is served by the {spec.source} app, not pushed")
        text = (help_texts or {}).get(name, spec.help)
        gauge = Gauge(name, f"{text} [{spec.unit}]", labelnames=spec.labels, registry=registry)
        samples = [({}, value)] if isinstance(value, int | float) else list(value)
        for labels, number in samples:
            if set(labels) != set(spec.labels):
                raise ValueError(
                    f"metric {name!r} takes labels {list(spec.labels)}, got {sorted(labels)}"
                )
            target = (
                gauge.labels(**{k: str(v) for k, v in labels.items()}) if spec.labels else gauge
            )
            target.set(float(number))
    return registry


class MetricsResource(dg.ConfigurableResource):
    """Pushes a batch step's figures to a Pushgateway; does nothing when no URL is set.

    `pushgateway_url` comes from the deployment (`PUSHGATEWAY_URL`); None or an empty string
    turns pushing off.
    """

    pushgateway_url: str | None = None
    timeout_s: float = 5.0

    _push_failures: int = PrivateAttr(default=0)

    @property
    def push_failures(self) -> int:
        return self._push_failures

    def gateway_url(self) -> str | None:
        return self.pushgateway_url or None

    def push(
        self,
        job: str,
        grouping: Mapping[str, str] | None,
        gauges: Mapping[str, GaugeValue],
        help: Mapping[str, str] | None = None,
    ) -> PushOutcome:
        registry = build_registry(gauges, help)
        url = self.gateway_url()
        if url is None:
            return PushOutcome(pushed=False, failures=self._push_failures, reason="no url")
        try:
            push_to_gateway(
                url,
                job=job,
                registry=registry,
                grouping_key={k: str(v) for k, v in (grouping or {}).items()},
                timeout=self.timeout_s,
            )
        except OSError as error:
            self._push_failures += 1
            dg.get_dagster_logger().warning(
                f"metrics push to {url} (job={job}, grouping={dict(grouping or {})}) failed "
                f"[{self._push_failures} so far]: {error}"
            )
            return PushOutcome(pushed=False, failures=self._push_failures, reason=str(error))
        return PushOutcome(pushed=True, failures=self._push_failures)
