"""Issue 21: under `dg dev` (webserver + daemon, as `make dev` starts them) the nightly smoke
wave is materialized by its own job only. The test launches `nightly_smoke` through the UI's
GraphQL API, as the schedule would, waits for it, lets the automation sensor tick after it, and
checks that no run but the smoke job's own touched a `smoke` partition and that the label
store holds no `smoke` item."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import httpx
import pytest
import sqlalchemy as sa

from mri_assets.assets.support.partitions import SMOKE_WAVE, wave_of_partition
from mri_assets_tests.services import free_port, stop_process

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
LAUNCH = """
mutation Launch($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}
"""
TICKS = """
query Ticks($selector: SensorSelector!) {
  sensorOrError(sensorSelector: $selector) {
    ... on Sensor { sensorState { ticks(limit: 5) { timestamp status } } }
  }
}
"""
# What an instance keeps in DAGSTER_HOME when dagster.yaml does not send it elsewhere.
DAGSTER_HOME_STATE = ("history", "schedules", "storage", "logs", ".nux", ".telemetry", ".logs_queue")
DONE = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}


def _wait(what: str, answer, timeout_s: float, log: Path):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = answer()
        if found:
            return found
        time.sleep(3)
    pytest.fail(f"no {what} within {timeout_s:.0f} s\n{log.read_text(errors='replace')[-8000:]}")


def _partitions_of(run: dg.DagsterRun) -> set[str]:
    keys = {run.tags.get("dagster/partition"), run.tags.get("dagster/asset_partition_range_start")}
    return {wave_of_partition(key) for key in keys if key}


@pytest.mark.timeout(3600)
def test_the_nightly_smoke_under_the_daemon_stays_apart(tmp_path):
    home = tmp_path / "home"
    (home / "dagster" / "storage").mkdir(parents=True)
    port = free_port()
    ui = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MRI_ASSETS_HOME": str(home), "DAGSTER_HOME": str(REPO),
           "MRI_ASSETS_DAGSTER_DIR": str(home / "dagster"),
           "MRI_ASSETS_DAGSTER_LOGS": str(home / "dagster" / "storage"),
           "DVC_NO_ANALYTICS": "1", "MLFLOW_ENABLE_TELEMETRY": "false",
           "DAGSTER_DISABLE_TELEMETRY": "1"}  # as `make dev` sets it
    env.pop("PYTEST_CURRENT_TEST", None)
    log = tmp_path / "dg-dev.log"
    with open(log, "wb") as out:
        dev = subprocess.Popen([str(Path(sys.executable).parent / "dg"), "dev", "-w",
                                "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
                               cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        _wait("webserver", lambda: _answers(f"{ui}/server_info"), 300, log)
        assert "dagster.yaml" not in log.read_text(errors="replace")  # no warning about it
        selector = {"repositoryLocationName": "mri_assets", "repositoryName": "__repository__",
                    "jobName": "nightly_smoke"}
        launched = httpx.post(f"{ui}/graphql", timeout=120, json={
            "query": LAUNCH, "variables": {"params": {"selector": selector, "runConfigData": {}}}},
        ).json()["data"]["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        smoke_run = launched["run"]["runId"]
        instance = dg.DagsterInstance.from_config(str(home / "dagster"))
        def ended() -> dg.DagsterRun | None:
            found = instance.get_run_by_id(smoke_run)
            return found if found is not None and found.status in DONE else None

        run = _wait("the end of the nightly_smoke run", ended, 2400, log)
        # The smoke wave itself went through (whether it reproduces its reference is the
        # smoke's own verdict, made on this machine's platform; not what this test is about).
        made = instance.fetch_materializations(dg.AssetRecordsFilter(
            asset_key=dg.AssetKey("clusters"), asset_partitions=[SMOKE_WAVE]), limit=1).records
        assert made, f"nightly_smoke ended {run.status.value} before clusters[smoke]\n" + \
            log.read_text(errors="replace")[-8000:]
        finished = time.time()
        sensor = {"repositoryLocationName": "mri_assets", "repositoryName": "__repository__",
                  "sensorName": "default_automation_condition_sensor"}

        def ticks_after() -> list:
            answer = httpx.post(f"{ui}/graphql", timeout=60, json={
                "query": TICKS, "variables": {"selector": sensor}}).json()
            ticks = answer["data"]["sensorOrError"]["sensorState"]["ticks"]
            return [t for t in ticks if t["timestamp"] > finished + 1
                    and t["status"] in ("SUCCESS", "SKIPPED")]

        _wait("two automation ticks after the smoke", lambda: len(ticks_after()) >= 2, 300, log)

        runs = instance.get_runs()
        smoke_runs = [r for r in runs if SMOKE_WAVE in _partitions_of(r)]
        assert smoke_runs, "the smoke job made no run of the smoke wave"
        strangers = [(r.run_id, r.job_name, dict(r.tags)) for r in smoke_runs
                     if "dagster/from_automation_condition" in r.tags
                     or "dagster/sensor_name" in r.tags or "dagster/backfill" in r.tags]
        assert strangers == []
        queued = {r.asset_selection and tuple(k.to_user_string() for k in r.asset_selection)
                  for r in smoke_runs}
        assert not any(sel and "labeling_queue" in sel for sel in queued), queued
        # The clinicians' label store: nothing of the smoke wave.
        engine = sa.create_engine(f"sqlite:///{home / 'labels.db'}")
        with engine.connect() as connection:
            tables = sa.inspect(connection).get_table_names()
            assert "queue_items" in tables or not tables
            if "queue_items" in tables:
                smoke_items = connection.execute(sa.text(
                    "SELECT count(*) FROM queue_items WHERE wave = :wave"),
                    {"wave": SMOKE_WAVE}).scalar()
                assert smoke_items == 0
        engine.dispose()
        # `make dev`'s instance (DAGSTER_HOME = the repository) wrote nothing into it.
        assert [name for name in DAGSTER_HOME_STATE if (REPO / name).exists()] == []
        labeling = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("labeling_queue"),
                                  asset_partitions=[SMOKE_WAVE]), limit=1).records
        assert labeling == []
    finally:
        stop_process(dev, timeout=60)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code < 500
    except httpx.HTTPError:
        return False
