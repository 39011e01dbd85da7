"""Every run `mri-assets run` starts is a run of a named job of the code location, so the Dagster
UI can re-execute it.

The command runs with `--home` only (no MRI_ASSETS_HOME in its environment); then the real
`dagster-webserver` on that home's instance re-executes its runs through the GraphQL mutation the
UI's "Re-execute" button sends. Runs of `execute_in_process` have no code location and are
refused there ("Expected non-None value").
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import httpx
import pytest

from mri_assets.core.sample_data import build_sample_data
from mri_assets.definitions.jobs import STAGE_JOBS
from mri_assets_tests.services import _http_answers, _running, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
WAVE = "cli"
REEXECUTE = """
mutation Reexecute($parent: String!) {
  launchPipelineReexecution(reexecutionParams: {parentRunId: $parent, strategy: ALL_STEPS}) {
    __typename
    ... on LaunchRunSuccess { run { runId jobName status assetSelection { path } tags { key value } } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}
"""


def _partitions(tags: dict[str, str]) -> str:
    """A run's partition, or its range as `FIRST..LAST`."""
    if "dagster/partition" in tags:
        return tags["dagster/partition"]
    return (f"{tags['dagster/asset_partition_range_start']}.."
            f"{tags['dagster/asset_partition_range_end']}")


def _mri_assets(env: dict[str, str], home: Path, *args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "mri_assets.cli", "--home", str(home), *args],
                          env=env, text=True, capture_output=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.timeout(1200)
def test_the_runs_of_mri_assets_run_are_re_executed_from_the_ui(tmp_path, monkeypatch):
    from mri_assets_tests import services

    monkeypatch.setattr(services, "STARTUP_TIMEOUT_S", 240.0)
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("MRI_ASSETS_HOME", "DAGSTER_HOME")}
    env.update({"MRI_ASSETS_SHARDS": "2", "DVC_NO_ANALYTICS": "1",
                "MLFLOW_ENABLE_TELEMETRY": "false"})
    build_sample_data(tmp_path / "sample", n_slices=30, seed=0, include_bad=False)
    _mri_assets(env, home, "ingest-wave", WAVE, "--source", str(tmp_path / "sample"))
    _mri_assets(env, home, "run", WAVE, "--select", "manifest slices")

    instance = dg.DagsterInstance.from_config(str(home / "dagster"))
    runs = list(reversed(instance.get_runs()))
    # under the local profile the wave's shards are one run over their range
    assert [(r.job_name, _partitions(r.tags)) for r in runs] == [
        (STAGE_JOBS["wave"], WAVE), (STAGE_JOBS["shard"], f"00|{WAVE}..01|{WAVE}")]
    for run in runs:
        assert run.status == dg.DagsterRunStatus.SUCCESS
        assert run.remote_job_origin.location_name == "mri_assets"
        assert run.job_code_origin.repository_origin.code_pointer.module == "mri_assets.definitions"
    assert runs[0].asset_selection == {dg.AssetKey("manifest")}
    assert runs[1].asset_selection == {dg.AssetKey("slices")}

    shutil.copyfile(REPO / "deploy" / "local" / "dagster.yaml", home / "dagster" / "dagster.yaml")
    port = free_port()
    command = [str(Path(sys.executable).parent / "dagster-webserver"), "-w",
               str(REPO / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)]
    webserver_env = {**env, "MRI_ASSETS_HOME": str(home), "DAGSTER_HOME": str(home / "dagster")}
    with _running(command, "dagster-webserver", _http_answers(f"http://127.0.0.1:{port}/server_info"),
                  tmp_path, webserver_env):
        for parent in runs:
            answer = httpx.post(f"http://127.0.0.1:{port}/graphql", timeout=300, json={
                "query": REEXECUTE, "variables": {"parent": parent.run_id}}).json()
            launched = answer["data"]["launchPipelineReexecution"]
            assert launched["__typename"] == "LaunchRunSuccess", launched
            child = launched["run"]
            assert child["jobName"] == parent.job_name
            assert [a["path"] for a in child["assetSelection"]] == [
                key.path for key in parent.asset_selection]
            tags = {tag["key"]: tag["value"] for tag in child["tags"]}
            assert _partitions(tags) == _partitions(parent.tags)
            assert tags["dagster/parent_run_id"] == parent.run_id
            assert child["status"] in ("QUEUED", "STARTING", "STARTED", "SUCCESS")
