"""Crash-safe runs: `mri-assets run` killed with SIGKILL at the worst moments, then run again;
and the pieces that make it so (pool slots a dead run cannot hold, signals, temporaries that
name their writer, the MLflow store built whole), each on its own.

The kill tests land one small wave (48 sample slices, 2 shards) in fresh homes, run `mri-assets
run` in a subprocess as a person would, and SIGKILL it

- during `manifest`: the moment its step has written the wave's layout, before the IO manager
  stores the manifest (the shards' pixels are staged, no manifest exists yet);
- during `embeddings`: the moment the first embeddings shard reaches the store (the step is then
  storing it and tracking it in DVC; the run holds the `gpu` pool's only slot), and
- during the first MLflow set-up: the moment the schema's temporary file appears.

The same command is then run again. It must complete (the dead run marked failed, its slot
freed, the store built whole), the outputs must equal those of an uninterrupted run in another
home, and no temporary may be left anywhere in the home (`stray_temporaries`).
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pytest

WAVE = "pilot"
SHARDS = "2"
SELECT = "manifest slices gpu_budget embeddings pca_model clusters"
BIN = Path(sys.executable).parent
RUN_TIMEOUT_S = 600
KILL_WAIT_S = 300

# What counts as a stray temporary in a home, whoever wrote it: a file named like a temporary
# (`*.part`, `*.tmp`, hidden or not, and SQLite's journal of one), anything inside a scratch
# folder (the store's `.scratch`, `scratch/`, `mlflow/.scratch`), a store set aside as
# incomplete, and a pool-claim owner record left behind.
TEMPORARY_NAME = re.compile(r".*\.(part|tmp)(-journal|-wal|-shm)?$")
SCRATCH_FOLDERS = ("store/.scratch", "scratch", "mlflow/.scratch")


def stray_temporaries(home: Path) -> list[str]:
    found = []
    for path in home.rglob("*"):
        relative = path.relative_to(home).as_posix()
        temporary = path.is_file() and TEMPORARY_NAME.fullmatch(path.name)
        if temporary or ".incomplete-" in path.name:
            found.append(relative)
    for folder in SCRATCH_FOLDERS:
        if (home / folder).is_dir():
            found += [f"{folder}/{entry.name}" for entry in (home / folder).iterdir()]
    owners = home / "dagster" / "local_run_owners"
    if owners.is_dir():
        found += [f"dagster/local_run_owners/{entry.name}" for entry in owners.iterdir()]
    return sorted(found)


def _env(home: Path, tmp: Path) -> dict[str, str]:
    tmp.mkdir(parents=True, exist_ok=True)
    env = {key: value for key, value in os.environ.items() if not key.startswith("MRI_ASSETS_")}
    env.update(MRI_ASSETS_HOME=str(home), MRI_ASSETS_SHARDS=SHARDS, DVC_NO_ANALYTICS="1",
               TMPDIR=str(tmp), PYTHONUNBUFFERED="1")
    return env


def mri_assets(home: Path, tmp: Path, *args: str, timeout: float = RUN_TIMEOUT_S):
    return subprocess.run([str(BIN / "mri-assets"), *args], env=_env(home, tmp),
                          capture_output=True, text=True, timeout=timeout, check=False)


def start_run(home: Path, tmp: Path, log: Path, background: bool = False) -> subprocess.Popen:
    """`mri-assets run` of the test wave; `background`: with SIGINT ignored, as a shell starts
    `cmd &` in a script (here a shell that ignores SIGINT and execs the command)."""
    handle = open(log, "w")  # noqa: SIM115 - closed with the process by the caller
    command = [str(BIN / "mri-assets"), "run", WAVE, "--select", SELECT]
    if background:
        command = ["sh", "-c", 'trap "" INT; exec "$0" "$@"', *command]
    return subprocess.Popen(command, env=_env(home, tmp), stdout=handle, stderr=subprocess.STDOUT)


def kill_when(process: subprocess.Popen, ready, what: str) -> float:
    """SIGKILL `process` as soon as `ready()` is true; returns the seconds waited."""
    started = time.monotonic()
    while not ready():
        if process.poll() is not None:
            pytest.fail(f"mri-assets run ended (exit {process.returncode}) before {what}")
        if time.monotonic() - started > KILL_WAIT_S:
            process.kill()
            pytest.fail(f"no {what} after {KILL_WAIT_S} s")
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    return time.monotonic() - started


def land(home: Path, tmp: Path, sample: Path) -> None:
    result = mri_assets(home, tmp, "ingest-wave", WAVE, "--source", str(sample))
    assert result.returncode == 0, result.stderr[-3000:]


def _slices_by_id(store: Path) -> dict[str, tuple[bytes, tuple]]:
    """Every indexed slice of the wave: its pixels and its index row, by image id (rows within a
    shard's `.npy` follow the decoding workers' arrival order, which no run fixes)."""
    found = {}
    for index_file in sorted((store / "slices" / WAVE).glob("shard-*.parquet")):
        pixels = np.load(index_file.with_suffix(".npy"), mmap_mode="r")
        for row in pl.read_parquet(index_file).iter_rows(named=True):
            key = (index_file.stem, row["payload_crc32"], row["split"], row["slice_index"])
            found[row["image_id"]] = (pixels[row["row"]].tobytes(), key)
    return found


def outputs(home: Path) -> dict[str, object]:
    """What an uninterrupted run and a killed-then-rerun one must share, byte for byte where the
    bytes are fixed: the embeddings, the PCA file and the clusters Parquet exactly; the manifest
    by content (sorted by image id, `slice_row` left out: arrival order; store paths made
    relative to the home); the slices by image id (pixels and index rows)."""
    store = home / "store"
    manifest = pl.read_parquet(store / "manifests" / WAVE / "manifest.parquet")
    manifest = manifest.drop("slice_row").sort("image_id").with_columns(
        pl.col("source_uri").str.replace(home.resolve().as_uri(), "HOME", literal=True)
    )
    buffer = io.BytesIO()
    manifest.write_ipc(buffer)
    exact = {
        str(path.relative_to(store)): path.read_bytes()
        for pattern in (f"embeddings/{WAVE}/*.arrow", f"models/pca/{WAVE}.npz",
                        f"clusters/{WAVE}/*.parquet", f"manifests/{WAVE}/layout.json")
        for path in sorted(store.glob(pattern))
    }
    return {"manifest": buffer.getvalue(), "slices": _slices_by_id(store), **exact}


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("crash") / "sample"
    result = subprocess.run(
        [str(BIN / "mri-assets"), "sample-data", "--out", str(folder), "--slices", "48",
         "--no-bad"], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


@pytest.fixture(scope="module")
def reference(sample: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The outputs of an uninterrupted run."""
    root = tmp_path_factory.mktemp("reference")
    home, tmp = root / "home", root / "tmp"
    land(home, tmp, sample)
    result = mri_assets(home, tmp, "run", WAVE, "--select", SELECT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert stray_temporaries(home) == []
    return outputs(home)


@pytest.fixture
def fresh(sample: Path, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    land(home, tmp, sample)
    yield home, tmp


def _gpu_claims(home: Path) -> list[str]:
    """Run ids holding or waiting for the `gpu` pool, read without recovering anything."""
    import dagster as dg

    instance = dg.DagsterInstance.from_config(str(home / "dagster"))
    info = instance.event_log_storage.get_concurrency_info("gpu")
    return [slot.run_id for slot in info.claimed_slots] + [s.run_id for s in info.pending_steps]


def _unfinished_runs(home: Path) -> list[str]:
    import dagster as dg

    instance = dg.DagsterInstance.from_config(str(home / "dagster"))
    return [run.run_id for run in instance.get_runs() if not run.is_finished]


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_killed_during_embeddings_then_rerun_completes_with_the_same_outputs(
    fresh: tuple[Path, Path], reference: dict[str, object], tmp_path: Path
):
    home, tmp = fresh
    first_shard = home / "store" / "embeddings" / WAVE / "shard-00.arrow"
    process = start_run(home, tmp, tmp_path / "killed.log")
    kill_when(process, first_shard.exists, "embeddings shard")

    # What the kill left: a run at STARTED holding the pool's only slot, the step's scratch.
    assert _gpu_claims(home), "the killed run held no gpu slot: the kill came too late"
    dead = _unfinished_runs(home)
    assert dead
    assert [p for p in stray_temporaries(home) if p.startswith("store/.scratch/")]

    result = mri_assets(home, tmp, "run", WAVE, "--select", SELECT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "marked failed at the next start" in result.stderr
    assert "is gone (killed or crashed)" in result.stderr

    import dagster as dg

    instance = dg.DagsterInstance.from_config(str(home / "dagster"))
    for run_id in dead:
        assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.FAILURE
    assert _unfinished_runs(home) == [] and _gpu_claims(home) == []
    assert outputs(home) == reference
    assert stray_temporaries(home) == []


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_killed_between_the_layout_and_the_stored_manifest_then_rerun_completes_the_same(
    fresh: tuple[Path, Path], reference: dict[str, object], tmp_path: Path
):
    """The `manifest` step stages the shards and writes the layout; the IO manager then stores
    the manifest. A kill in between leaves staged pixels and a layout with no manifest."""
    home, tmp = fresh
    layout = home / "store" / "manifests" / WAVE / "layout.json"
    process = start_run(home, tmp, tmp_path / "killed.log")
    kill_when(process, layout.exists, "wave layout")
    assert not (layout.parent / "manifest.parquet").exists(), "the kill came too late"
    assert any((home / "store" / "staging" / WAVE).glob("shard-*.npy"))

    result = mri_assets(home, tmp, "run", WAVE, "--select", SELECT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert outputs(home) == reference
    assert stray_temporaries(home) == []


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_killed_during_the_first_mlflow_setup_then_rerun_completes_with_the_same_outputs(
    fresh: tuple[Path, Path], reference: dict[str, object], tmp_path: Path
):
    home, tmp = fresh
    mlflow = home / "mlflow"
    process = start_run(home, tmp, tmp_path / "killed.log")
    kill_when(process, lambda: mlflow.is_dir() and any(mlflow.glob(".mlflow.db.p*.tmp")),
              "MLflow schema being built")
    assert not (mlflow / "mlflow.db").exists(), "the store must appear whole or not at all"
    assert [p for p in stray_temporaries(home) if p.startswith("mlflow/.mlflow.db.p")]

    result = mri_assets(home, tmp, "run", WAVE, "--select", SELECT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert outputs(home) == reference
    assert stray_temporaries(home) == []


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("background", [False, True], ids=["terminal", "background-job"])
def test_sigterm_during_embeddings_stops_the_run_cleanly_without_retrying_the_step(
    fresh: tuple[Path, Path], tmp_path: Path, background: bool
):
    """Dagster retries an interrupted step under its RetryPolicy (embeddings: twice); a stop
    asked by a signal must not redo the work, and must leave nothing behind. The same when the
    command runs as a script's background job (`cmd &`, SIGINT ignored)."""
    import dagster as dg

    home, tmp = fresh
    log = tmp_path / "stopped.log"
    process = start_run(home, tmp, log, background)
    first_shard = home / "store" / "embeddings" / WAVE / "shard-00.arrow"
    started = time.monotonic()
    while not first_shard.exists():
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() - started < KILL_WAIT_S
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    asked = time.monotonic()
    assert process.wait(timeout=120) == 128 + signal.SIGTERM.value, log.read_text()[-3000:]
    assert time.monotonic() - asked < 60
    assert "stopped by SIGTERM" in log.read_text()

    instance = dg.DagsterInstance.from_config(str(home / "dagster"))
    last = instance.get_runs(limit=1)[0]
    assert last.status == dg.DagsterRunStatus.FAILURE
    succeeded = instance.all_logs(last.run_id, of_type=dg.DagsterEventType.STEP_SUCCESS)
    assert "embeddings" not in {event.step_key for event in succeeded}
    assert _unfinished_runs(home) == [] and _gpu_claims(home) == []
    assert stray_temporaries(home) == []


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_two_concurrent_first_runs_in_a_fresh_home_set_up_mlflow_without_error(
    sample: Path, tmp_path: Path
):
    """Two waves of one fresh home run at once up to `pca_model` (which logs to MLflow): both
    build nothing twice and fail on nothing; one waits for the other's `gpu` slot."""
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    other = tmp_path / "sample-second"  # other scans: the same would be duplicates of pilot's
    result = mri_assets(home, tmp, "sample-data", "--out", str(other), "--slices", "48",
                        "--seed", "1", "--no-bad")
    assert result.returncode == 0, result.stderr[-3000:]
    for wave, source in (("pilot", sample), ("second", other)):
        result = mri_assets(home, tmp, "ingest-wave", wave, "--source", str(source))
        assert result.returncode == 0, result.stderr[-3000:]
    select = "manifest slices gpu_budget embeddings pca_model"
    logs = [tmp_path / f"{wave}.log" for wave in ("pilot", "second")]
    processes = []
    for wave, log in zip(("pilot", "second"), logs, strict=True):
        handle = open(log, "w")  # noqa: SIM115
        processes.append(subprocess.Popen(
            [str(BIN / "mri-assets"), "run", wave, "--select", select], env=_env(home, tmp),
            stdout=handle, stderr=subprocess.STDOUT))
    codes = [process.wait(timeout=RUN_TIMEOUT_S) for process in processes]
    texts = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n".join(text[-3000:] for text in texts)
    assert not any("already exists" in text for text in texts)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{home.resolve() / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mri_assets-local")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(run.data.tags["mri_assets.wave"] for run in runs) == ["pilot", "second"]
    assert stray_temporaries(home) == []


# -- the pieces --------------------------------------------------------------------------------


def test_copying_an_object_onto_a_link_of_itself_leaves_no_temporary(tmp_path: Path):
    from mri_assets.resources.object_store import LocalObjectStore

    store = LocalObjectStore(root=str(tmp_path / "store"))
    store.put_bytes("staging/w/shard-00.npy", b"pixels")
    for _ in range(3):  # a rerun of `slices` links the same staged file again
        store.copy("staging/w/shard-00.npy", "slices/w/shard-00.npy")
    published = tmp_path / "store" / "slices" / "w"
    assert sorted(p.name for p in published.iterdir()) == ["shard-00.npy"]
    assert os.path.samefile(published / "shard-00.npy",
                            tmp_path / "store" / "staging" / "w" / "shard-00.npy")
    store.put_bytes("staging/w/shard-00.npy", b"rebuilt pixels")  # a new file: linked again
    store.copy("staging/w/shard-00.npy", "slices/w/shard-00.npy")
    assert store.get_bytes("slices/w/shard-00.npy") == b"rebuilt pixels"
    assert sorted(p.name for p in published.iterdir()) == ["shard-00.npy"]


def test_temporaries_name_their_writer():
    from mri_assets.core.temporaries import (
        is_temporary_file,
        scratch_prefix,
        temp_prefix,
        writer_pid,
    )

    name = f"{temp_prefix('shard-00.npy')}x1y2.part"
    assert is_temporary_file(name) and writer_pid(name) == os.getpid()
    assert is_temporary_file(f"{temp_prefix('mlflow.db')}ab.tmp-journal")
    assert writer_pid(f"{scratch_prefix()}k3j2") == os.getpid()
    assert not is_temporary_file("shard-00.npy") and not is_temporary_file(".dvc.lock")
    assert writer_pid(".shard-00.npy.abc123.part") is None


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_sweep_removes_what_dead_writers_left_and_nothing_a_live_one_writes(tmp_path: Path):
    from mri_assets.core.temporaries import sweep

    dead, live = _dead_pid(), os.getpid()
    home = tmp_path / "home"
    scratch = home / "store" / ".scratch"
    (home / "store" / "slices" / "w").mkdir(parents=True)
    (scratch / f"mri-assets-p{dead}-abc" / "spill").mkdir(parents=True)
    (scratch / f"mri-assets-p{dead}-abc" / "spill" / "rows.bin").write_bytes(b"x" * 1000)
    (scratch / f"mri-assets-p{live}-def").mkdir()
    (scratch / "mri-assets-old").mkdir()
    folder = home / "store" / "slices" / "w"
    stale = [folder / f".shard-00.npy.p{dead}.aa.part", home / f".mlflow.db.p{dead}.b.tmp",
             home / f".mlflow.db.p{dead}.b.tmp-journal"]
    kept = [folder / f".shard-01.npy.p{live}.cc.part", folder / "shard-00.npy",
            folder / ".shard-02.npy.recent.part", home / ".dvc.lock"]
    for path in stale + kept:
        path.write_bytes(b"data")
    old = folder / ".shard-03.npy.legacy.part"
    old.write_bytes(b"data")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    os.utime(scratch / "mri-assets-old", (time.time() - 7200, time.time() - 7200))

    report = sweep(home, [scratch])

    assert sorted(report.files) == sorted([*stale, old])
    assert sorted(p.name for p in report.folders) == sorted([f"mri-assets-p{dead}-abc",
                                                            "mri-assets-old"])
    assert all(path.exists() for path in kept)
    assert sorted(p.name for p in scratch.iterdir()) == [f"mri-assets-p{live}-def"]
    assert report.bytes == 1000 + 3 * 4 + 4


def _partial_mlflow_store(db: Path) -> None:
    """What a kill inside MLflow's own first set-up leaves: tables of several migrations
    created, the version not recorded, a later table missing."""
    import sqlite3

    from mri_assets.resources.mlflow_tracking import ensure_local_store

    ensure_local_store(db)
    with sqlite3.connect(db) as connection:
        connection.execute("DELETE FROM alembic_version")
        connection.execute("DROP TABLE review_queues")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_half_built_mlflow_store_is_set_aside_and_built_again(tmp_path: Path):
    from mri_assets.resources import mlflow_tracking
    from mri_assets.resources.mlflow_tracking import MlflowTracking

    _partial_mlflow_store(tmp_path / "mlflow" / "mlflow.db")
    meet = ("import sys; from mlflow.tracking import MlflowClient; "
            "MlflowClient(tracking_uri=sys.argv[1]).search_experiments()")
    broken = subprocess.run(  # the store as MLflow alone meets it
        [sys.executable, "-c", meet, f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"],
        capture_output=True, text=True, timeout=240, check=False)
    assert broken.returncode != 0 and "OperationalError" in broken.stderr

    mlflow_tracking._READY_STORES.clear()
    tracking = MlflowTracking.local(tmp_path)
    with tracking.start_wave_run("w", "clusters") as run_id:
        tracking.log_metrics(run_id, {"ari_k2": 0.5})
    names = sorted(p.name for p in (tmp_path / "mlflow").iterdir())
    assert [n for n in names if n.startswith("mlflow.db.incomplete-")]
    assert "mlflow.db" in names and not [n for n in names if n.endswith(".tmp")]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_processes_that_set_up_one_mlflow_store_at_once_build_it_once(tmp_path: Path):
    db = tmp_path / "mlflow" / "mlflow.db"
    script = ("import sys; from pathlib import Path; "
              "from mri_assets.resources.mlflow_tracking import MlflowTracking; "
              "t = MlflowTracking.local(Path(sys.argv[1])); "
              "print(t.experiment_id())")
    processes = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(3)]
    results = [process.communicate(timeout=240) for process in processes]
    assert [process.returncode for process in processes] == [0, 0, 0], results
    assert len({out.strip() for out, _ in results}) == 1  # one experiment for all
    assert sorted(p.name for p in db.parent.iterdir()) == [".mlflow.db.lock", "mlflow.db"]


def test_pooled_steps_are_the_steps_dagster_claims_slots_for(tmp_path: Path):
    import dagster as dg
    from dagster._core.execution.api import create_execution_plan

    from mri_assets.definitions.local_run import _stage_job, pooled_steps
    from mri_assets.definitions.location_runs import location_stage
    from mri_assets_tests.assets.wave_fixtures import local_defs

    defs = local_defs(tmp_path / "home")
    for kind, names in (("shard", ["slices", "embeddings"]),
                        ("wave", ["pca_model", "clusters", "classifier"])):
        keys = [dg.AssetKey(name) for name in names]
        stage = location_stage(defs, kind, keys)
        assert stage is not None  # what `mri-assets run` executes
        jobs = [stage.job.get_subset(asset_selection=set(keys)), _stage_job(defs, keys)]
        for job in jobs:
            plan = create_execution_plan(job)
            expected = sorted((step.pool, step.key) for step in plan.steps if step.pool)
            assert sorted(pooled_steps(defs, keys)) == expected and expected


WAITER = """
import sys
from pathlib import Path
import dagster as dg
from mri_assets.core.home import MriHome
from mri_assets.definitions.local_run import dagster_instance, materialize_wave

@dg.asset(pool="gpu")
def gpu_step() -> int:
    return 1

instance = dagster_instance(MriHome(Path(sys.argv[1])))
report = materialize_wave(dg.Definitions(assets=[gpu_step]), instance, "w")
print("REPORT", report.success, report.interrupted, flush=True)
sys.exit(report.exit_code)
"""


def _hold_gpu_slot(home: Path, owner_pid: int) -> str:
    """Take the `gpu` slot for a run id that process `owner_pid` owns (the way `_execute` records
    a claim made before its run exists); returns the run id."""
    import json
    import uuid

    import psutil

    from mri_assets.core.home import MriHome
    from mri_assets.definitions.local_run import _owners, dagster_instance, launcher_tags

    instance = dagster_instance(MriHome(home))
    run_id = str(uuid.uuid4())
    tags = {**launcher_tags(), "mri_assets/pid": str(owner_pid),
            "mri_assets/process_started": f"{psutil.Process(owner_pid).create_time():.2f}"}
    _owners(instance).mkdir(parents=True, exist_ok=True)
    (_owners(instance) / f"{run_id}.json").write_text(json.dumps(tags))
    assert instance.event_log_storage.claim_concurrency_slot("gpu", run_id, "other").is_claimed
    return run_id


def _start_waiter(home: Path, log: Path) -> subprocess.Popen:
    handle = open(log, "w")  # noqa: SIM115
    return subprocess.Popen([sys.executable, "-c", WAITER, str(home)], stdout=handle,
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _wait_for_text(log: Path, text: str, process: subprocess.Popen, limit_s: float = 240) -> None:
    started = time.monotonic()
    while text not in log.read_text():
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() - started < limit_s, log.read_text()[-3000:]
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_run_waiting_for_a_pool_slot_sleeps_and_stops_cleanly_on_a_signal(
    tmp_path: Path, stop: signal.Signals
):
    import psutil

    home = tmp_path / "home"
    holder = _hold_gpu_slot(home, os.getpid())  # a live holder: this test process
    process = _start_waiter(home, tmp_path / "waiter.log")
    _wait_for_text(tmp_path / "waiter.log", "waiting for a slot of pool 'gpu'", process)

    waiter = psutil.Process(process.pid)
    before = sum(waiter.cpu_times()[:2])
    time.sleep(3)
    assert sum(waiter.cpu_times()[:2]) - before < 0.5, "the wait spins"

    stopped = time.monotonic()
    process.send_signal(stop)
    assert process.wait(timeout=30) == 128 + stop.value
    assert time.monotonic() - stopped < 10
    assert f"REPORT False {stop.name}" in (tmp_path / "waiter.log").read_text()

    import dagster as dg

    instance = dg.DagsterInstance.from_config(str(home / "dagster"))
    info = instance.event_log_storage.get_concurrency_info("gpu")
    assert [slot.run_id for slot in info.claimed_slots] == [holder]
    assert info.pending_steps == [] or [s.run_id for s in info.pending_steps] == [holder]
    assert all(run.is_finished for run in instance.get_runs())
    assert list((home / "dagster" / "local_run_owners").iterdir()) == [
        home / "dagster" / "local_run_owners" / f"{holder}.json"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_waiting_run_takes_the_slot_of_a_holder_that_dies(tmp_path: Path):
    home = tmp_path / "home"
    holder_process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        _hold_gpu_slot(home, holder_process.pid)
        process = _start_waiter(home, tmp_path / "waiter.log")
        _wait_for_text(tmp_path / "waiter.log", "waiting for a slot of pool 'gpu'", process)
    finally:
        holder_process.kill()
        holder_process.wait()
    assert process.wait(timeout=120) == 0, (tmp_path / "waiter.log").read_text()[-3000:]
    assert "REPORT True None" in (tmp_path / "waiter.log").read_text()
    assert "freed its pool slots" in (tmp_path / "waiter.log").read_text()


def test_the_slots_of_a_run_that_ended_are_freed_on_the_next_start(tmp_path: Path):
    import dagster as dg

    from mri_assets.core.home import MriHome
    from mri_assets.definitions.local_run import dagster_instance

    @dg.asset
    def anything() -> int:
        return 1

    home = MriHome(tmp_path / "home")
    instance = dagster_instance(home)
    ended = dg.materialize([anything], instance=instance).run_id  # e.g. marked failed in the UI
    storage = instance.event_log_storage
    assert storage.claim_concurrency_slot("gpu", ended, "embeddings").is_claimed

    dagster_instance(home)

    assert storage.get_concurrency_info("gpu").claimed_slots == []


def test_runs_carry_their_launcher_and_a_dead_launchers_run_is_marked_failed(tmp_path: Path):
    import dagster as dg

    from mri_assets.core.home import MriHome
    from mri_assets.definitions.local_run import (
        PID_TAG,
        dagster_instance,
        launcher_gone,
        materialize_wave,
    )

    @dg.asset
    def anything() -> int:
        return 1

    home = MriHome(tmp_path / "home")
    instance = dagster_instance(home)
    report = materialize_wave(dg.Definitions(assets=[anything]), instance, "w")
    run = instance.get_run_by_id(report.runs[0])
    assert run.tags[PID_TAG] == str(os.getpid()) and launcher_gone(run.tags) is False

    # A run some process left at STARTED before it died.
    dead_tags = {**run.tags, PID_TAG: str(_dead_pid())}
    left = instance.create_run_for_job(dg.define_asset_job("j", [anything]).resolve(
        asset_graph=dg.Definitions(assets=[anything]).resolve_asset_graph()), tags=dead_tags,
        status=dg.DagsterRunStatus.STARTED)
    assert launcher_gone(left.tags) is True

    dagster_instance(home)

    after = instance.get_run_by_id(left.run_id)
    assert after.status == dg.DagsterRunStatus.FAILURE
    failure = instance.all_logs(left.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
    assert "is gone (killed or crashed)" in failure[0].message
