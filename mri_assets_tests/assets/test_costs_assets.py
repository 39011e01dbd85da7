"""The cost ledger asset and the GPU budget gate, run in process on a real Dagster instance."""

from pathlib import Path

import dagster as dg
import pytest

from mri_assets.assets.costs import WITHIN_CAPS, cost_line, gpu_budget, wave_costs
from mri_assets.assets.ingest import manifest
from mri_assets.assets.support.partitions import WAVES, shard_partitions, wave_shard_key
from mri_assets.core.costs import CostConfigError
from mri_assets.core.home import MriHome
from mri_assets.core.sample_data import build_sample_data
from mri_assets.definitions import build_defs
from mri_assets.definitions.local_run import dagster_instance, materialize_wave
from mri_assets.resources.cost_settings import CostSettings
from mri_assets.resources.label_store import LabelStore
from mri_assets.resources.landing import land_wave
from mri_assets.resources.metrics import MetricsResource
from mri_assets.resources.mlflow_tracking import MlflowTracking
from mri_assets.resources.object_store import LocalObjectStore

WAVE = "w1"
CLOSED_PORT_URL = "http://127.0.0.1:9"


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample")
    build_sample_data(out, n_slices=60, seed=0, wave_style="t1", include_bad=False)
    return out


def _landed_defs(mri_home: Path, sample_dir: Path, cost: CostSettings):
    home = MriHome(mri_home).ensure()
    defs = build_defs("local", home)
    land_wave(LocalObjectStore(root=str(sample_dir)), "", defs.resources["object_store"], WAVE, "s")
    resources = {**defs.resources, "cost": cost}
    instance = dagster_instance(home)
    instance.add_dynamic_partitions(WAVES, [WAVE])
    return dg.Definitions(assets=defs.assets, resources=resources), instance


def _check_evaluation(instance: dg.DagsterInstance):
    key = dg.AssetCheckKey(dg.AssetKey("gpu_budget"), WITHIN_CAPS)
    record = instance.event_log_storage.get_latest_asset_check_execution_by_key([key])[key]
    return record.event.dagster_event.event_specific_data


def _embeddings_tick(defs: dg.Definitions, instance: dg.DagsterInstance, cursor=None):
    """One automation tick over `embeddings`: (requested partition keys, cursor for the next)."""
    result = dg.evaluate_automation_conditions(
        defs=defs, instance=instance, asset_selection=dg.AssetSelection.assets("embeddings"),
        cursor=cursor,
    )
    return set(result.get_requested_partitions(dg.AssetKey("embeddings"))), result.cursor


def test_projected_overspend_fails_the_blocking_check_and_no_embedding_runs(
    mri_home, sample_dir
):
    tiny = CostSettings(caps={"embedding_gpu_hours": 1e-6})
    defs, instance = _landed_defs(mri_home, sample_dir, tiny)

    report = materialize_wave(defs, instance, WAVE)

    assert not report.success
    assert "gpu_budget" in report.failed[0]
    evaluation = _check_evaluation(instance)
    assert evaluation.passed is False
    assert evaluation.description.startswith("refused: caps.embedding_gpu_hours")
    assert "images at 200.00 img/s on t4-spot" in evaluation.description
    assert evaluation.metadata["images"].value > 0
    embedded = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("embeddings")), limit=1
    ).records
    assert embedded == []


def test_automation_requests_embeddings_only_after_the_budget_check_passes(
    mri_home, sample_dir
):
    defs, instance = _landed_defs(mri_home, sample_dir, CostSettings(caps={"embedding_gpu_hours": 1e-6}))
    refused = dg.materialize([manifest, gpu_budget], partition_key=WAVE, instance=instance, resources=defs.resources,
                             raise_on_error=False)
    assert not refused.success
    _, cursor = _embeddings_tick(defs, instance)
    instance.report_runless_asset_event(dg.AssetMaterialization("backbone", partition=WAVE))
    for shard in shard_partitions.get_partition_keys():
        instance.report_runless_asset_event(
            dg.AssetMaterialization("slices", partition=str(wave_shard_key(WAVE, shard)))
        )

    while_refused, cursor = _embeddings_tick(defs, instance, cursor)
    # gpu_budget receives the stored manifest as its input: manifest is in the assets, unselected
    allowed = dg.materialize([manifest, gpu_budget], selection=[gpu_budget], partition_key=WAVE,
                             instance=instance, resources={**defs.resources, "cost": CostSettings()})
    after_allowed, _ = _embeddings_tick(defs, instance, cursor)

    assert while_refused == set()
    assert allowed.get_asset_check_evaluations()[0].passed
    every_shard = {str(wave_shard_key(WAVE, s)) for s in shard_partitions.get_partition_keys()}
    assert after_allowed == every_shard


def _record_embedding(instance, wave: str, shard: int, seconds: float, images: int) -> None:
    instance.report_runless_asset_event(
        dg.AssetMaterialization(
            "embeddings",
            partition=str(wave_shard_key(wave, shard)),
            metadata={"seconds": seconds, "images": images},
        )
    )


def _label_three_pilot_slices(store: LabelStore) -> None:
    items = [
        {"image_id": f"img-{i}", "priority": 1.0 - i / 10, "reason": "test", "kind": "expert"}
        for i in range(3)
    ]
    store.enqueue("pilot", items, ["coronal", "sagittal"])
    for _ in items:
        item = store.lease_next("alice")
        store.submit_label(item["id"], "alice", "coronal", 2.0)


def test_wave_costs_reproduce_hand_computed_spend_from_the_recorded_runs(tmp_path):
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(WAVES, ["pilot", "scale"])
    _record_embedding(instance, "pilot", 0, 99_999.0, 900)
    _record_embedding(instance, "pilot", 0, 1800.0, 900)
    _record_embedding(instance, "pilot", 1, 1800.0, 900)
    _record_embedding(instance, "scale", 0, 3600.0, 1000)
    instance.report_runless_asset_event(
        dg.AssetMaterialization("classifier", partition="pilot", metadata={"seconds": 7200.0})
    )
    store = LocalObjectStore(root=str(tmp_path / "store"))
    store.put_bytes("slices/pilot/shard-00.npy", b"\0" * 2_000_000)
    store.put_bytes("embeddings/scale/shard-00.arrow", b"\0" * 1_000_000)
    store.put_bytes("dvc-cache/ab/cdef", b"\0" * 500_000)
    labels = LabelStore(url=f"sqlite:///{tmp_path / 'labels.db'}", qa_fraction=0.0)
    _label_three_pilot_slices(labels)
    cost = CostSettings(rates={"storage_per_gb_month": 100.0})

    result = dg.materialize(
        [wave_costs],
        partition_key="pilot",
        instance=instance,
        resources={
            "object_store": store,
            "label_store": labels,
            "mlflow": MlflowTracking.local(tmp_path / "home"),
            "metrics": MetricsResource(pushgateway_url=CLOSED_PORT_URL, timeout_s=1.0),
            "cost": cost,
        },
    )

    figures = {k: v.value for k, v in result.asset_materializations_for_node("wave_costs")[0]
               .metadata.items()}
    # embedding (1800 + 1800 + 3600) s = 2 GPU-h x €0.35; retraining 7200 s = 2 GPU-h x €0.50
    assert figures["embedding_gpu_hours"] == 2.0
    assert figures["retraining_gpu_hours"] == 2.0
    assert figures["compute_eur"] == 1.70
    # 3.5 MB x €100/GB-month x 12 months
    assert figures["storage_eur"] == 4.20
    # 3 expert labels x (€0.50 + €0.05 QA)
    assert figures["labeling_eur"] == 1.65
    assert figures["total_eur"] == 7.55
    assert figures["budget_left_eur"] == 4500 - 7.55
    assert figures["compute_pct_of_cap"] == round(100 * 1.70 / 3000, 2)
    # 2,800 images in 7,200 GPU-s; 3,997,200 images left at that rate
    assert figures["images_done"] == 2800
    assert figures["projected_embedding_gpu_hours"] == round(3_997_200 / (2800 / 7200) / 3600, 3)
    assert figures["burndown"].startswith("![spend vs caps](data:image/png;base64,")
    assert figures["metrics_pushed"] is False
    mlflow = MlflowTracking.local(tmp_path / "home")
    artifacts = mlflow.client().list_artifacts(figures["mlflow_run_id"], "plots")
    assert [a.path for a in artifacts] == ["plots/burndown.png"]
    line = cost_line(dg.Definitions(resources={"cost": cost}), "pilot", instance)
    assert line.startswith("  costs[pilot]: spent €7.55 (compute €1.70 / storage €4.20 / labeling €1.65)")
    assert f"projected for 4,000,000 slices €{figures['projected_plan_total_eur']:,.2f} of €4,500" in line


def test_a_misspelt_cap_is_a_config_error_naming_the_key():
    with pytest.raises(CostConfigError, match=r"unknown keys \['totl_eur'\]"):
        CostSettings(caps={"totl_eur": 10.0}).parsed_caps()


def test_a_negative_rate_is_a_config_error_naming_the_rate():
    with pytest.raises(CostConfigError, match="rates.label=-0.5 must be a finite number"):
        CostSettings(rates={"label": -0.5}).parsed_rates()
