"""The cost ledger per wave, and the budget gate in front of the GPU steps.

Spend is read from Dagster's own records: the `embeddings` (and `classifier`) materializations
carry the seconds their GPU step took, the object store lists the bytes kept, and the label store
holds the labels paid for. Nothing here estimates what a record can tell.
"""

from collections.abc import Iterable, Mapping

import dagster as dg
import polars as pl

from mri_assets.assets.support.automation import EAGER
from mri_assets.assets.support.monitoring import push_figures
from mri_assets.assets.support.partitions import (
    SMOKE_WAVE,
    WAVES,
    wave_partitions,
    wave_shard_partitions,
)
from mri_assets.assets.support.provenance import dagster_tags, mlflow_run_metadata
from mri_assets.assets.support.reports import png_markdown
from mri_assets.core.costs import CostLedger
from mri_assets.core.costs_plot import burndown_png
from mri_assets.core.wave_keys import bytes_by_wave
from mri_assets.resources.cost_settings import CostSettings
from mri_assets.resources.label_store import LabelStore
from mri_assets.resources.metrics import MetricsResource, cost_gauges
from mri_assets.resources.mlflow_tracking import MlflowTracking
from mri_assets.resources.object_store import ObjectInfo, ObjectStore

EMBEDDINGS = dg.AssetKey("embeddings")
CLASSIFIER = dg.AssetKey("classifier")
BACKBONE = dg.AssetKey("backbone")
WITHIN_CAPS = "within_caps"
RECORDS_PAGE = 1000


def latest_metadata(instance: dg.DagsterInstance, key: dg.AssetKey) -> dict[str, dict]:
    """The metadata of the latest materialization of every partition of `key`, by partition."""
    latest: dict[str, dict] = {}
    cursor = None
    while True:
        page = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key), limit=RECORDS_PAGE, cursor=cursor
        )
        for record in page.records:
            materialization = record.asset_materialization
            if materialization is None:
                continue
            partition = materialization.partition or ""
            if partition not in latest:
                latest[partition] = {k: v.value for k, v in materialization.metadata.items()}
        if not page.has_more:
            return latest
        cursor = page.cursor


def _wave_of_shard_partition(partition: str) -> str:
    return wave_shard_partitions.get_partition_key_from_str(partition).keys_by_dimension["wave"]


def _number(metadata: Mapping, name: str) -> float:
    value = metadata.get(name, 0)
    return float(value) if isinstance(value, int | float) else 0.0


def storage_bytes_by_wave(infos: Iterable[ObjectInfo], waves: Iterable[str]) -> dict[str, int]:
    """Bytes per wave: a key belongs to the wave its place in the layout names
    (`core.wave_keys.wave_of_key`); keys of no known wave (the DVC cache, MLflow artifacts, the IO
    manager's pickles) count under "".
    """
    return bytes_by_wave(((info.key, info.size) for info in infos), waves)


def measured_ledger(
    instance: dg.DagsterInstance,
    settings: CostSettings,
    store: ObjectStore,
    label_store: LabelStore,
) -> CostLedger:
    """Every wave's measured spend so far, from Dagster's records, the store and the label store.
    The nightly smoke's wave is no spend of the plan and is left out."""
    rates = settings.parsed_rates()
    ledger = CostLedger(rates, settings.parsed_caps(), settings.parsed_plan())
    for partition, metadata in sorted(latest_metadata(instance, EMBEDDINGS).items()):
        if _wave_of_shard_partition(partition) == SMOKE_WAVE:
            continue
        ledger = ledger.record_gpu_seconds(
            "embedding", rates.embedding_node_type, _number(metadata, "seconds"),
            images=int(_number(metadata, "images")), wave=_wave_of_shard_partition(partition),
        )
    for wave, metadata in sorted(latest_metadata(instance, BACKBONE).items()):
        # Only a wave that trained its backbone spent on it (adopted or compute weights: 0 s).
        if wave != SMOKE_WAVE and metadata.get("source") == "trained":
            ledger = ledger.record_gpu_seconds(
                "pretraining", rates.retraining_node_type, _number(metadata, "seconds"), wave=wave)
    for wave, metadata in sorted(latest_metadata(instance, CLASSIFIER).items()):
        ledger = ledger.record_gpu_seconds(
            "retraining", rates.retraining_node_type, _number(metadata, "seconds"), wave=wave
        )
    waves = instance.get_dynamic_partitions(WAVES)
    for wave, n_bytes in storage_bytes_by_wave(store.list(""), waves).items():
        if wave != SMOKE_WAVE:
            ledger = ledger.record_storage_bytes(n_bytes, wave=wave)
    expert = label_store.labels_snapshot(None).filter(pl.col("kind") == "expert")
    for wave, count in expert.group_by("wave").len().sort("wave").iter_rows():
        ledger = ledger.record_labels(int(count), int(count), wave=wave or "")
    return ledger


def measured_embedding_img_per_s(ledger: CostLedger) -> float | None:
    """Images per GPU-second over every embedding step recorded, or None before the first."""
    seconds = ledger.gpu_hours("embedding") * 3600.0
    images = ledger.images_embedded()
    return images / seconds if images and seconds > 0 else None


@dg.asset(
    partitions_def=wave_partitions,
    ins={"manifest": dg.AssetIn(metadata={"columns": ["status"]})},
    group_name="costs",
    kinds={"python"},
    automation_condition=EAGER,
    check_specs=[
        dg.AssetCheckSpec(
            WITHIN_CAPS,
            asset="gpu_budget",
            blocking=True,
            description="the wave's projected embedding spend stays under every cap it touches",
        )
    ],
)
def gpu_budget(
    context: dg.AssetExecutionContext,
    manifest: pl.LazyFrame,
    object_store: ObjectStore,
    label_store: LabelStore,
    cost: CostSettings,
):
    """The wave's embedding spend, projected before a GPU starts, checked against the caps.

    Why a blocking asset check on an asset upstream of `embeddings`, not a sensor or a
    run-launch hook: the gate lives in the asset graph, where the UI shows the refusal and its
    figures, and every automatic path meets it. A failed check fails this step, so a staged run
    (`materialize_wave`, `mri-assets run`) stops before the shards; and `embeddings` is automated
    with `all_deps_blocking_checks_passed`, so automation requests no shard while it fails. Only
    a person launching `embed_wave` by hand passes it, and run monitoring still stops that run
    at its `dagster/max_runtime`. The projection is the wave's `ok` slices at the embedding
    throughput measured so far (the configured default before anything is measured).
    """
    wave = context.partition_key
    ledger = measured_ledger(context.instance, cost, object_store, label_store)
    measured = measured_embedding_img_per_s(ledger)
    img_per_s = measured if measured is not None else cost.fallback_img_per_s()
    images = manifest.filter(pl.col("status") == "ok").select(pl.len()).collect().item()
    node_type = ledger.rates.embedding_node_type
    verdict = ledger.check_gpu_step("embedding", images, img_per_s, node_type)
    context.log.info(f"wave {wave}: {verdict.message}")
    evidence = {
        "images": images,
        "img_per_s": round(img_per_s, 3),
        "throughput_source": "measured" if measured is not None else "default (nothing measured)",
        "node_type": node_type,
        **dict(verdict.figures),
    }
    return dg.MaterializeResult(
        metadata={**evidence, "verdict": verdict.message},
        check_results=[
            dg.AssetCheckResult(
                check_name=WITHIN_CAPS,
                passed=verdict.allowed,
                severity=dg.AssetCheckSeverity.ERROR,
                description=verdict.message,
                metadata={**evidence, "message": verdict.message},
            )
        ],
    )



@dg.asset(
    partitions_def=wave_partitions,
    deps=["embeddings"],
    group_name="costs",
    kinds={"python", "mlflow"},
)
def wave_costs(
    context: dg.AssetExecutionContext,
    object_store: ObjectStore,
    label_store: LabelStore,
    mlflow: MlflowTracking,
    metrics: MetricsResource,
    cost: CostSettings,
) -> dg.MaterializeResult:
    """Measured spend of every wave so far by category, % of each cap, and the plan's projection.

    Compute is GPU seconds of the `embeddings` and `classifier` steps at the node types' rates,
    storage the bytes in the object store for the cap's horizon, labeling the expert labels
    (each with its QA share). The projection extends the measured throughput and per-image
    spend to the images of the plan not processed yet.
    """
    wave = context.partition_key
    ledger = measured_ledger(context.instance, cost, object_store, label_store)
    spend = ledger.spend()
    measured = measured_embedding_img_per_s(ledger)
    throughput = measured if measured is not None else cost.fallback_img_per_s()
    projection = ledger.project(throughput, ledger.images_embedded())
    png = burndown_png(ledger, projection)
    figures = {**spend.as_metadata(), **projection.as_metadata()}
    with mlflow.start_wave_run(wave, "costs", tags=dagster_tags(context, mlflow),
                               new_run=True) as run_id:
        mlflow.log_metrics(run_id, figures)
        mlflow.log_png(run_id, "burndown.png", png)
    outcome = push_figures(metrics, "wave_costs", {"wave": wave}, cost_gauges(spend))
    projected_total = spend.total + projection.total
    return dg.MaterializeResult(
        metadata={
            **figures,
            "throughput_img_per_s": round(throughput, 3),
            "throughput_source": "measured" if measured is not None else "default",
            "projected_plan_total_eur": round(projected_total, 2),
            "projected_plan_pct_of_usable": round(100 * projected_total / spend.usable_budget_eur, 2)
            if spend.usable_budget_eur else 0.0,
            "burndown": png_markdown("spend vs caps", png),
            **mlflow_run_metadata(mlflow, run_id),
            "metrics_pushed": outcome.pushed,
        }
    )


def cost_line(defs: dg.Definitions, wave: str, instance: dg.DagsterInstance | None = None) -> str:
    """One line for the demo: spend so far and projected for the plan's images, vs the caps."""
    metadata = (
        (instance or dg.DagsterInstance.get())
        .fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("wave_costs"), asset_partitions=[wave]),
            limit=1,
        )
        .records
    )
    if not metadata:
        return f"  costs[{wave}]: no wave_costs materialization yet (run the wave first)"
    figures = {k: v.value for k, v in metadata[0].asset_materialization.metadata.items()}
    settings: CostSettings = defs.resources["cost"]
    caps, plan = settings.parsed_caps(), settings.parsed_plan()
    return (
        f"  costs[{wave}]: spent €{figures['total_eur']:,.2f} (compute €{figures['compute_eur']:,.2f}"
        f" / storage €{figures['storage_eur']:,.2f} / labeling €{figures['labeling_eur']:,.2f});"
        f" projected for {plan.total_images:,} slices €{figures['projected_plan_total_eur']:,.2f}"
        f" of €{caps.usable_eur:,.0f} usable (caps: compute €{caps.compute_eur:,.0f},"
        f" storage €{caps.storage_eur_per_year:,.0f}/yr, labeling €{caps.labeling_eur:,.0f})"
    )
