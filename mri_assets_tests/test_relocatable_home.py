"""A copied MRI_ASSETS_HOME is a home of its own: working on the copy never touches the original."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import dagster as dg
import pytest
from mlflow.tracking import MlflowClient

from mri_assets.definitions import build_defs
from mri_assets.definitions.local_run import dagster_instance, materialize_wave
from mri_assets.deployment import Deployment
from mri_assets_tests.assets.wave_fixtures import land_sample_wave

WAVE = "pilot"
UP_TO_CLUSTERS = "manifest slices gpu_budget embeddings pca_model clusters"


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every entry under `root`: size, mtime and sha256 of files, and the folders themselves."""
    entries: dict[str, tuple[int, int, str]] = {}
    for path in sorted(root.rglob("*")):
        relative = str(path.relative_to(root))
        if path.is_symlink():
            entries[relative] = (0, 0, f"link:{path.readlink()}")
        elif path.is_dir():
            entries[relative] = (0, 0, "dir")
        else:
            stat = path.stat()
            entries[relative] = (stat.st_size, stat.st_mtime_ns,
                                 hashlib.sha256(path.read_bytes()).hexdigest())
    return entries


def _run(home: Path, selection: str, monkeypatch: pytest.MonkeyPatch) -> tuple[dg.Definitions,
                                                                                   dg.DagsterInstance]:
    monkeypatch.setenv("MRI_ASSETS_HOME", str(home))
    deployment = Deployment.from_env()
    defs = build_defs(deployment)
    instance = dagster_instance(deployment.home)
    report = materialize_wave(defs, instance, WAVE, selection)
    assert report.success, report.failed
    return defs, instance


@pytest.mark.timeout(900)
def test_clusters_on_a_copied_home_leave_the_original_byte_for_byte_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    original = tmp_path / "original"
    monkeypatch.setenv("MRI_ASSETS_HOME", str(original))
    store = build_defs(Deployment.from_env()).resources["object_store"]
    land_sample_wave(store, tmp_path, WAVE, n_slices=48, include_bad=False)
    _run(original, UP_TO_CLUSTERS, monkeypatch)
    # The runs closed their label-store connections: the write-ahead log is folded into
    # labels.db now, not when a later garbage collection closes them (during the copy's run).
    assert not (original / "labels.db-wal").exists()

    copy = tmp_path / "copy"
    shutil.copytree(original, copy, symlinks=True)
    before = snapshot(original)

    defs, instance = _run(copy, "clusters", monkeypatch)

    assert snapshot(original) == before
    record = instance.fetch_materializations(dg.AssetKey("clusters"), limit=1).records[0]
    run_id = record.asset_materialization.metadata["mlflow_run_id"].value
    tracking = defs.resources["mlflow"]
    run = MlflowClient(tracking_uri=tracking.tracking_uri).get_run(run_id)
    assert run.info.artifact_uri.startswith((copy / "mlflow" / "artifacts").as_uri())
    assert {"dagster_run_id": record.run_id, "dagster_asset_key": "clusters",
            "dagster_partition": WAVE}.items() <= run.data.tags.items()
    link = record.asset_materialization.metadata["mlflow_run"]
    assert isinstance(link, dg.UrlMetadataValue) and link.value.endswith(f"/runs/{run_id}")
    assert (copy / "mlflow" / "artifacts").is_dir()
