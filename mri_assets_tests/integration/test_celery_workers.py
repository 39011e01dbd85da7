"""The celery profile on real Redis with two real workers: GPU steps reach only the `gpu` worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mri_assets_tests import services

REPO = Path(__file__).resolve().parents[2]
WAVE = "wave-celery"
SHARDS = ("00", "01")
RUN_TIMEOUT_S = 420.0
CELERY_WORKER_KEY = "Celery worker"

ORCHESTRATOR = f"""
import json
import dagster as dg
from mri_assets.assets.support.partitions import WAVES, wave_shard_key
from mri_assets.cli.workers import materialize_partition

instance = dg.DagsterInstance.get()
instance.add_dynamic_partitions(WAVES, [{WAVE!r}])
runs = [materialize_partition("manifest", {WAVE!r}, instance)]
for shard in {SHARDS!r}:
    runs.append(materialize_partition("slices,embeddings", str(wave_shard_key({WAVE!r}, shard)), instance))
print("RUN_IDS " + json.dumps(runs))
"""


def _land_sample_wave(landing: Path, home: Path) -> None:
    from mri_assets.core.sample_data import build_sample_data
    from mri_assets.resources.landing import land_wave
    from mri_assets.resources.object_store import LocalObjectStore
    from mri_assets.resources.settings import IngestSettings

    build_sample_data(landing, n_slices=40, seed=0)
    land_wave(LocalObjectStore(root=str(landing)), "", LocalObjectStore(root=str(home / "store")),
              WAVE, IngestSettings().salt)


def _profile_env(home: Path, broker: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MRI_ASSETS_S3_BUCKET", "MLFLOW_TRACKING_URI", "MRI_ASSETS_LABELS_URL")}
    env.update({
        "MRI_ASSETS_HOME": str(home),
        "DAGSTER_HOME": str(home / "dagster"),
        "MRI_ASSETS_PROFILE": "celery",
        "MRI_ASSETS_CELERY_BROKER": broker,
        "MRI_ASSETS_SHARDS": str(len(SHARDS)),
        "DVC_NO_ANALYTICS": "1",
        "PYTHONPATH": os.pathsep.join(p for p in [str(REPO), os.environ.get("PYTHONPATH", "")] if p),
    })
    return env


def _start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=REPO, env=env, start_new_session=True)


def _tails(logs: list[Path]) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}" for log in logs)


def _wait_for_orchestrator(orchestrator: subprocess.Popen, workers: list[subprocess.Popen],
                           logs: list[Path]) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while orchestrator.poll() is None:
        dead = [w.args[-1] for w in workers if w.poll() is not None]
        if dead or time.monotonic() > deadline:
            pytest.fail(f"workers exited: {dead}" if dead else "runs did not finish in time"
                        f"\n{_tails(logs)}")
        time.sleep(1)
    assert orchestrator.returncode == 0, _tails(logs)


def _worker_of_each_step(instance, run_id: str) -> dict[str, str]:
    from dagster import DagsterEventType

    hosts = {}
    for record in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT):
        data = record.dagster_event.engine_event_data
        metadata = data.metadata if data else {}
        if CELERY_WORKER_KEY in metadata:
            hosts[record.step_key] = metadata[CELERY_WORKER_KEY].value
    return hosts


def test_worker_command_listens_on_the_celery_queue_of_its_name():
    from mri_assets.cli.workers import worker_command

    gpu = worker_command("gpu", pool="solo")
    default = worker_command("default")
    assert gpu[gpu.index("-Q") + 1] == "gpu" and gpu[gpu.index("-n") + 1] == "gpu@%h"
    assert default[default.index("-Q") + 1] == "dagster"
    with pytest.raises(ValueError, match="gpu, default"):
        worker_command("cpu")


def test_worker_config_module_carries_the_executor_broker_and_rejects_a_malformed_config(tmp_path):
    from dagster._core.errors import DagsterInvalidConfigError

    from mri_assets.cli.workers import CELERY_CONFIG_MODULE, write_worker_config
    from mri_assets.definitions.executors import celery_executor_config

    config = celery_executor_config({"MRI_ASSETS_CELERY_BROKER": "redis://10.0.0.5:6380/2"})
    folder = write_worker_config(config, tmp_path / "gpu")
    module = (folder / f"{CELERY_CONFIG_MODULE}.py").read_text()
    assert "broker_url = 'redis://10.0.0.5:6380/2'" in module
    assert "result_backend = 'redis://10.0.0.5:6380/2'" in module
    with pytest.raises(DagsterInvalidConfigError):
        write_worker_config({**config, "broker": ["not", "a", "url"]}, tmp_path / "bad")


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_embeddings_steps_run_on_the_gpu_worker_and_every_other_step_on_the_default_one(
    redis_url: str, tmp_path: Path
):
    import dagster as dg

    services.require_binary(str(Path(sys.executable).parent / "celery"))
    home = tmp_path / "mri_home"
    (home / "dagster").mkdir(parents=True)
    (home / "dagster" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    _land_sample_wave(tmp_path / "landing", home)
    env = _profile_env(home, redis_url)

    logs = [tmp_path / "worker-gpu.log", tmp_path / "worker-default.log", tmp_path / "orchestrator.log"]
    cli = [sys.executable, "-m", "mri_assets.cli", "worker", "--pool", "solo", "--queue"]
    processes = []
    try:
        processes.append(_start([*cli, "gpu"], env, logs[0]))
        processes.append(_start([*cli, "default"], env, logs[1]))
        orchestrator = _start([sys.executable, "-c", ORCHESTRATOR], env, logs[2])
        processes.append(orchestrator)
        _wait_for_orchestrator(orchestrator, processes[:2], logs)
    finally:
        for process in processes:
            services.stop_process(process, timeout=20)

    run_ids = json.loads(logs[2].read_text().split("RUN_IDS ", 1)[1].splitlines()[0])
    instance = dg.DagsterInstance.from_config(str(home / "dagster"))
    steps_by_host = [_worker_of_each_step(instance, run_id) for run_id in run_ids]
    assert [sorted(hosts) for hosts in steps_by_host] == [["manifest"]] + [["embeddings", "slices"]] * len(SHARDS)
    for hosts in steps_by_host:
        for step, host in hosts.items():
            expected = "gpu@" if step == "embeddings" else "default@"
            assert host.startswith(expected), f"step {step} ran on {host}, wanted {expected}..."

    materialized = instance.fetch_materializations(dg.AssetKey("embeddings"), limit=10).records
    partitions = sorted(record.partition_key for record in materialized)
    assert partitions == sorted(f"{shard}|{WAVE}" for shard in SHARDS)
    assert all(process.poll() is not None for process in processes)
