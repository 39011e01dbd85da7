import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from mri_assets.core.plots import projection_png
from mri_assets.resources.mlflow_tracking import (
    STAGE_TAG,
    WAVE_TAG,
    MlflowTracking,
    MlflowTrackingError,
)


@pytest.fixture(scope="module")
def tracking(tmp_path_factory) -> MlflowTracking:
    return MlflowTracking.local(tmp_path_factory.mktemp("home"), experiment_name="test-deployment")


@pytest.fixture(scope="module")
def png() -> bytes:
    rng = np.random.default_rng(0)
    return projection_png(rng.normal(size=(60, 2)), rng.integers(0, 2, 60), None, "wave pilot")


def test_metrics_params_and_png_read_back_with_mlflow_client(tracking, png):
    with tracking.start_wave_run(
        "pilot", "clusters", tags={"model_id": "resnet18:none:abc"}
    ) as run_id:
        tracking.log_params(
            run_id, {"model_id": "resnet18:none:abc", "n_components": 12, "seed": 0}
        )
        tracking.log_metrics(run_id, {"ari_k4": 0.91, "nmi_k4": 0.88, "ari_k2": None})
        tracking.log_png(run_id, "projection", png)
        tracking.log_dict(run_id, "scores", {"k4": {"ari": 0.91}})

    client = MlflowClient(tracking_uri=tracking.tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"model_id": "resnet18:none:abc", "n_components": "12", "seed": "0"}
    assert run.data.metrics == {"ari_k4": 0.91, "nmi_k4": 0.88}
    assert run.data.tags[WAVE_TAG] == "pilot" and run.data.tags[STAGE_TAG] == "clusters"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "test-deployment"
    local = client.download_artifacts(run_id, "plots/projection.png")
    with open(local, "rb") as handle:
        assert handle.read() == png
    assert sorted(a.path for a in client.list_artifacts(run_id)) == ["plots", "scores.json"]


def test_same_wave_and_stage_reuse_one_run_other_waves_get_their_own(tracking):
    with tracking.start_wave_run("scale", "clusters") as first:
        tracking.log_metrics(first, {"ari_k4": 0.5})
    with tracking.start_wave_run("scale", "clusters") as again:
        tracking.log_metrics(again, {"ari_k4": 0.6}, step=1)
    with tracking.start_wave_run("scale", "pca_model") as other_stage:
        pass
    with tracking.start_wave_run("full-1", "clusters") as other_wave:
        pass
    assert again == first
    assert len({first, other_stage, other_wave}) == 3
    history = MlflowClient(tracking.tracking_uri).get_metric_history(first, "ari_k4")
    assert [m.value for m in history] == [0.5, 0.6]


def test_changed_param_on_reused_run_is_refused_and_new_run_supersedes(tracking):
    with tracking.start_wave_run("full-2", "clusters") as run_id:
        tracking.log_params(run_id, {"seed": 0})
    with (
        tracking.start_wave_run("full-2", "clusters") as same,
        pytest.raises(MlflowTrackingError, match="new_run=True"),
    ):
        tracking.log_params(same, {"seed": 1})
    with tracking.start_wave_run("full-2", "clusters", new_run=True) as fresh:
        tracking.log_params(fresh, {"seed": 1})
    assert fresh != run_id
    assert tracking.find_wave_run("full-2", "clusters") == fresh


def test_failing_block_marks_run_failed_and_leaves_no_active_run(tracking):
    with (
        pytest.raises(RuntimeError, match="boom"),
        tracking.start_wave_run("full-3", "clusters") as run_id,
    ):
        raise RuntimeError("boom")
    assert MlflowClient(tracking.tracking_uri).get_run(run_id).info.status == "FAILED"
    assert mlflow.active_run() is None


def test_non_png_bytes_are_rejected_with_a_reason(tracking):
    with (
        tracking.start_wave_run("full-4", "clusters") as run_id,
        pytest.raises(MlflowTrackingError, match="not PNG"),
    ):
        tracking.log_png(run_id, "projection", b"GIF89a")
