"""The labeling and retraining loop on a small real wave, in process, on a real instance."""

import dagster as dg
import polars as pl
import pytest
from mlflow.tracking import MlflowClient

from mri_assets.assets.retraining import REGISTERED_MODEL
from mri_assets.cli.operations import label_from_csv
from mri_assets.core.home import MriHome
from mri_assets.core.selection import ENTROPY_SELECTION, FIRST_BATCH_SELECTION, MODEL_ENTROPY
from mri_assets.definitions import build_defs
from mri_assets.definitions.local_run import dagster_instance, materialize_wave
from mri_assets.deployment import Deployment
from mri_assets.resources.compute import ComputeResource
from mri_assets.resources.settings import LabelingSettings, PseudoLabelSettings, TrainingSettings
from mri_assets.resources.wave_store import WaveStore
from mri_assets_tests.assets.wave_fixtures import land_sample_wave

QUEUE_FIRST = "manifest slices labeling_queue"  # the first queue needs no backbone
FEATURES = "gpu_budget embeddings pca_model clusters"


def _defs(home, **overrides):
    base = build_defs("local", MriHome(home))
    resources = {**base.resources,
                 "training": TrainingSettings(finetune_epochs=1, head_epochs=5),
                 "labeling": LabelingSettings(batch_size=60, holdout_per_wave=8), **overrides}
    return dg.Definitions(assets=base.assets, resources=resources, executor=base.executor)


@pytest.fixture(scope="module")
def labeled_wave(tmp_path_factory):
    home = tmp_path_factory.mktemp("loop")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MRI_ASSETS_HOME", str(home))
        defs = _defs(home)
        source = land_sample_wave(defs.resources["object_store"], home, "pilot", n_slices=160,
                                  include_bad=False)
        instance = dagster_instance(MriHome(home))
        for selection in (QUEUE_FIRST, FEATURES):
            report = materialize_wave(defs, instance, "pilot", selection)
            assert report.success, report.failed
        labeled = label_from_csv(Deployment.from_env(home=home), "pilot", source / "labels.csv")
        yield home, instance, source, labeled


def test_queue_fills_within_budget_and_clusters_log_to_mlflow(labeled_wave):
    home, instance, _, labeled = labeled_wave
    defs = _defs(home)
    queue = instance.fetch_materializations(dg.AssetKey("labeling_queue"), limit=1).records[0]
    metadata = {k: v.value for k, v in queue.asset_materialization.metadata.items()}
    assert 0 < metadata["queued"] <= metadata["offered"]
    assert metadata["queued_holdout"] > 0
    assert labeled.labeled >= metadata["queued_for_training"]
    assert metadata["selection"] == FIRST_BATCH_SELECTION, "no backbone, no classifier yet"
    assert "no clusters yet" in metadata["selection_detail"]
    embedded = instance.fetch_materializations(dg.AssetKey("embeddings"), limit=1).records[0]
    assert queue.storage_id < embedded.storage_id, "the queue was built before any embedding"
    manifest = defs.load_asset_value("manifest", partition_key="pilot", instance=instance)
    trainable = manifest.filter((pl.col("status") == "ok") & (pl.col("split") != "holdout"))
    assert metadata["queued_for_training"] == 60 < trainable.height
    assert metadata["strata_in_batch"] == trainable["patient_key"].n_unique(), \
        "every patient with training slices is in the first batch"
    assert materialize_wave(defs, instance, "pilot", "expert_labels clusters").success
    clusters = instance.fetch_materializations(dg.AssetKey("clusters"), limit=1).records[0]
    run_id = clusters.asset_materialization.metadata["mlflow_run_id"].value
    tracking = defs.resources["mlflow"]
    run = MlflowClient(tracking_uri=tracking.tracking_uri).get_run(run_id)
    assert 0.0 <= run.data.metrics["ari_k4"] <= 1.0 and "nmi_k2" in run.data.metrics
    artifacts = [a.path for a in MlflowClient(tracking.tracking_uri).list_artifacts(run_id, "plots")]
    assert artifacts == ["plots/projection.png"]


def test_failed_gate_promotes_nothing_and_skips_the_classifier(labeled_wave):
    home, instance, _, _ = labeled_wave
    strict = _defs(home, pseudo=PseudoLabelSettings(min_promoted_holdout=1_000_000))
    report = materialize_wave(strict, instance, "pilot", "expert_labels pseudo_labels classifier")
    assert not report.success
    events = instance.all_logs(report.runs[-1])
    succeeded = {e.step_key for e in events if e.dagster_event_type == dg.DagsterEventType.STEP_SUCCESS}
    touched = {e.step_key for e in events if e.is_dagster_event and e.step_key}
    assert "pseudo_labels" in touched and "classifier" not in succeeded
    assert not instance.fetch_materializations(dg.AssetKey("classifier"), limit=1).records
    frame = strict.load_asset_value("pseudo_labels", partition_key="pilot", instance=instance)
    assert frame.height > 0 and not frame["promoted"].any()
    gate = instance.event_log_storage.get_asset_check_execution_history(
        dg.AssetCheckKey(dg.AssetKey("pseudo_labels"), "pseudo_label_gate"), limit=1)[0]
    assert gate.status.value == "FAILED"


def test_classifier_is_registered_and_compared_with_the_baseline(labeled_wave):
    home, instance, _, _ = labeled_wave
    # 60 expert labels on a seeded backbone: the teacher is right more often than sure, so the
    # rule's confidence is lowered with the F1 threshold to let the classifier run at all.
    lenient = PseudoLabelSettings(f1_threshold=0.01, min_promoted_holdout=1, confidence_threshold=0.5)
    # MRI_ASSETS_PRECISION=fp32 (compute.precision) holds for the training loops too: on a CPU
    # with native bf16 they used to autocast to bf16 whatever the deployment asked.
    local = build_defs("local", MriHome(home)).resources["compute"]
    compute = ComputeResource(**{**{name: getattr(local, name)
                                     for name in ComputeResource.model_fields}, "precision": "fp32"})
    defs = _defs(home, pseudo=lenient, compute=compute)
    report = materialize_wave(defs, instance, "pilot", "expert_labels pseudo_labels classifier")
    assert report.success, report.failed
    record = instance.fetch_materializations(dg.AssetKey("classifier"), limit=1).records[0]
    metadata = {k: v.value for k, v in record.asset_materialization.metadata.items()}
    assert metadata["precision"] == "fp32"
    baseline = WaveStore(defs.resources["object_store"]).baseline("pilot")
    assert baseline["precision"] == "fp32", "the supervised baseline trains at that precision too"
    assert 0.0 <= metadata["macro_f1"] <= 1.0 and 0.0 <= metadata["baseline_macro_f1"] <= 1.0
    tracking = defs.resources["mlflow"]
    versions = MlflowClient(tracking_uri=tracking.tracking_uri).search_model_versions(
        f"name='{REGISTERED_MODEL}'")
    assert versions and versions[0].run_id == metadata["mlflow_run_id"]
    provenance = {"dagster_run_id": record.run_id, "dagster_asset_key": "classifier",
                  "dagster_partition": "pilot"}
    assert provenance.items() <= versions[0].tags.items()
    run = MlflowClient(tracking_uri=tracking.tracking_uri).get_run(metadata["mlflow_run_id"])
    assert provenance.items() <= run.data.tags.items()
    assert metadata["mlflow_run"].endswith(f"/runs/{metadata['mlflow_run_id']}")
    pseudo = defs.load_asset_value("pseudo_labels", partition_key="pilot", instance=instance)
    assert set(pseudo.columns) >= {"image_id", "label", "confidence", "knn_agreement", "promoted"}
    assert pseudo.filter(pl.col("promoted"))["confidence"].min() >= lenient.confidence_threshold
    store = defs.resources["object_store"]
    splits = WaveStore(store).splits("pilot", pseudo["image_id"].to_list())
    assert pseudo.height > 0 and "holdout" not in set(splits), "holdout slices are never pseudo-labeled"


def test_the_queue_ranks_by_the_classifiers_entropy_once_there_is_one(labeled_wave):
    home, instance, _, _ = labeled_wave
    lenient = PseudoLabelSettings(f1_threshold=0.01, min_promoted_holdout=1, confidence_threshold=0.5)
    defs = _defs(home, pseudo=lenient)
    report = materialize_wave(defs, instance, "pilot",
                              "expert_labels pseudo_labels classifier labeling_queue")
    assert report.success, report.failed
    classifier = instance.fetch_materializations(dg.AssetKey("classifier"), limit=1).records[0]
    trained = {k: v.value for k, v in classifier.asset_materialization.metadata.items()}
    assert {"stage1_macro_f1", "stage2_gain_macro_f1", "layer3_relative_change",
            "layer4_relative_change", "holdout_embedding_cosine"} <= trained.keys()
    assert trained["layer4_relative_change"] > 0 and trained["holdout_embedding_cosine"] < 1
    queue = instance.fetch_materializations(dg.AssetKey("labeling_queue"), limit=1).records[0]
    metadata = {k: v.value for k, v in queue.asset_materialization.metadata.items()}
    assert metadata["selection"] == ENTROPY_SELECTION
    assert metadata["entropy_source"] == MODEL_ENTROPY
    assert metadata["entropy_source_detail"].startswith("classifier of wave pilot")
