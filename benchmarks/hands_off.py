"""Orchestration overhead as users meet it: a landed wave carried by the daemon to its first
labeling queue, against the in-process path on the same wave.

For each size: sample slices (seed 0, T1, no broken files) are built once; then
1. `dg dev` (webserver + daemon, as `make dev` starts it: DAGSTER_HOME is the repository, the
   records go to a fresh MRI_ASSETS_HOME) is started and waited for; the wave is landed with
   `mri-assets ingest-wave`, and from the moment that command returns nothing is typed: the
   script only watches the instance until `labeling_queue` of the wave is materialized;
2. on another fresh home the same sample is landed and `mri-assets run WAVE --select` the same
   assets (manifest .. labeling_queue) runs in one process.

Figures per path: marker -> labeling_queue seconds (since issue 20 the first queue follows the
slices, so it can come before the embeddings), marker -> settled (the wave's automated chain
done: queue and clusters materialized, no run left), the runs it made, `step_seconds` (the sum
of the steps' own durations, from each run's step stats), `overhead_share` = 1 - step_seconds /
settled wall; `ratio_vs_in_process` = daemon settled / in-process wall for the same assets
(`queue_ratio_vs_in_process` the same for the queue). The last line is one JSON object.

    nice -n 10 .venv/bin/python benchmarks/hands_off.py              # 300 and 20,000 slices
    nice -n 10 .venv/bin/python benchmarks/hands_off.py --sizes 300

The 300-slice wave runs the users' default backbone policy (a wave under pretrain.min_slices
embeds with the compute weights); larger waves run policy `off`, so that only orchestration is
compared, as in issue 21.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dagster as dg
import httpx

REPO = Path(__file__).resolve().parents[1]
WAVE_ASSETS = "manifest slices gpu_budget backbone embeddings pca_model clusters labeling_queue"
CARRY_JOB = "carry_wave"
DONE = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}


def _env(home: Path, size: int) -> dict[str, str]:
    env = {**os.environ, "MRI_ASSETS_HOME": str(home), "DAGSTER_HOME": str(REPO),
           "MRI_ASSETS_DAGSTER_DIR": str(home / "dagster"),
           "MRI_ASSETS_DAGSTER_LOGS": str(home / "dagster" / "storage"),
           "DVC_NO_ANALYTICS": "1", "MLFLOW_ENABLE_TELEMETRY": "false",
           "DAGSTER_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1"}
    if size > 1000:
        env["MRI_ASSETS_BACKBONE_POLICY"] = "off"
    env.pop("PYTEST_CURRENT_TEST", None)
    # A user's checkout keeps compiled bytecode (__pycache__) after its first import; with this
    # variable set (some sandboxes set it) every run worker compiles the code location again.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def _cli(env: dict[str, str], *args: str) -> None:
    subprocess.run([sys.executable, "-m", "mri_assets.cli", *args], env=env, cwd=REPO,
                   check=True, capture_output=True, text=True, timeout=3600)


def _instance(home: Path) -> dg.DagsterInstance:
    return dg.DagsterInstance.from_config(str(home / "dagster"))


def _latest(instance: dg.DagsterInstance, wave: str, asset: str = "labeling_queue"):
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[wave]),
        limit=1).records
    return records[0] if records else None


def _settled_at(instance: dg.DagsterInstance, wave: str) -> float | None:
    """When the wave's automated chain ended: its queue and its clusters both materialized."""
    found = [_latest(instance, wave, asset) for asset in ("labeling_queue", "clusters")]
    return max(r.timestamp for r in found) if all(found) else None


def _runs(instance: dg.DagsterInstance) -> list[dict]:
    """Every run of the instance: job, what it covered, seconds from launch to end, step seconds."""
    found = []
    for run in reversed(instance.get_runs()):
        stats = instance.get_run_stats(run.run_id)
        steps = instance.get_run_step_stats(run.run_id)
        step_s = sum((s.end_time or 0) - (s.start_time or 0) for s in steps
                     if s.start_time and s.end_time)
        covered = run.tags.get("dagster/partition") or (
            f"{run.tags.get('dagster/asset_partition_range_start')}.."
            f"{run.tags.get('dagster/asset_partition_range_end')}")
        selection = sorted(k.to_user_string() for k in run.asset_selection or [])
        created = instance.get_run_record_by_id(run.run_id).create_timestamp.timestamp()
        found.append({
            "run": run.run_id[:8], "job": run.job_name, "assets": selection, "partitions": covered,
            "status": run.status.value,
            "seconds": round((stats.end_time or time.time()) - created, 1),
            "step_seconds": round(step_s, 2),
        })
    return found


def daemon_path(sample: Path, size: int, workdir: Path, timeout_s: float) -> dict:
    home = workdir / f"dev-{size}"
    (home / "dagster" / "storage").mkdir(parents=True)
    env = _env(home, size)
    port = _free_port()
    log = workdir / f"dg-dev-{size}.log"
    with open(log, "wb") as out:
        dev = subprocess.Popen(
            [str(Path(sys.executable).parent / "dg"), "dev", "-w", "workspace.yaml",
             "-h", "127.0.0.1", "-p", str(port)],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/server_info", dev, log)
        wave = f"bench-{size}"
        landing = time.time()
        _cli(env, "ingest-wave", wave, "--source", str(sample))
        marker = time.time()
        instance = _instance(home)
        deadline = time.monotonic() + timeout_s
        settled = None
        while settled is None or any(
                r["status"] not in {s.value for s in DONE} for r in _runs(instance)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the wave did not settle within {timeout_s:.0f} s; see {log}")
            failed = [r for r in _runs(instance) if r["status"] == "FAILURE"]
            if failed:
                raise RuntimeError(f"a run failed: {failed}; see {log}")
            time.sleep(1)
            settled = _settled_at(instance, wave)
        queue = _latest(instance, wave).timestamp - marker
        wall = settled - marker
        runs = _runs(instance)
    finally:
        _stop(dev)
    # A `carry_wave` run's one step spans the stage runs it makes in its process: their steps
    # are the work, its own is not counted again.
    step_s = sum(r["step_seconds"] for r in runs if r["job"] != CARRY_JOB)
    return {"marker_to_queue_s": round(queue, 1), "marker_to_settled_s": round(wall, 1),
            "landing_s": round(marker - landing, 1),
            "runs": len(runs), "launched_runs": sum(r["job"] == CARRY_JOB for r in runs) or len(runs),
            "step_seconds": round(step_s, 1),
            "overhead_share": round(1 - step_s / wall, 3), "run_list": runs}


def in_process_path(sample: Path, size: int, workdir: Path) -> dict:
    home = workdir / f"cli-{size}"
    home.mkdir(parents=True)
    # `mri-assets` keeps its instance in the home; with DAGSTER_HOME at the repository, Dagster's
    # usage log of the in-process run went to the repository's logs/ and .telemetry/.
    env = {**_env(home, size), "DAGSTER_HOME": str(home / "dagster")}
    wave = f"bench-{size}"
    _cli(env, "ingest-wave", wave, "--source", str(sample))
    started = time.time()
    _cli(env, "run", wave, "--select", WAVE_ASSETS)
    wall = time.time() - started
    instance = _instance(home)
    runs = _runs(instance)
    step_s = sum(r["step_seconds"] for r in runs)
    queue = _latest(instance, wave).timestamp - started
    return {"marker_to_queue_s": round(queue, 1), "marker_to_settled_s": round(wall, 1),
            "runs": len(runs),
            "step_seconds": round(step_s, 1), "overhead_share": round(1 - step_s / wall, 3),
            "run_list": runs}


def _stop(process: subprocess.Popen) -> None:
    """Stop `dg dev` and everything it started (its own process group)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
    except ProcessLookupError:
        pass


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_http(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"dg dev exited: {log.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(url, timeout=5).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"dg dev did not answer within {timeout_s:.0f} s")


def _label(size: int) -> str:
    return f"{size // 1000}k" if size >= 1000 and size % 1000 == 0 else str(size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[300, 20_000])
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--workdir", help="keep homes and logs here (default: a temporary folder)")
    args = parser.parse_args()
    from mri_assets.core.sample_data import build_sample_data

    summary: dict = {"cpu": _cpu(), "cores": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="hands-off-bench-") as scratch:
        workdir = Path(args.workdir or scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        for size in args.sizes:
            sample = workdir / f"sample-{size}"
            if not (sample / "labels.csv").exists():
                build_sample_data(sample, n_slices=size, seed=0, wave_style="t1",
                                  include_bad=False)
            daemon = daemon_path(sample, size, workdir, args.timeout)
            local = in_process_path(sample, size, workdir)
            label = _label(size)
            for name, result in (("dg dev", daemon), ("mri-assets run", local)):
                print(f"{size} slices, {name}: marker -> labeling_queue "
                      f"{result['marker_to_queue_s']} s, -> wave settled "
                      f"{result['marker_to_settled_s']} s, {result['runs']} runs, "
                      f"{result['step_seconds']} s of steps, overhead share "
                      f"{result['overhead_share']}")
                for run in result["run_list"]:
                    print(f"    {run['job']:<22} {','.join(run['assets']):<40} "
                          f"{run['partitions']:<28} {run['seconds']:>7} s "
                          f"(steps {run['step_seconds']} s) {run['status']}")
            summary.update({
                f"marker_to_queue_s_{label}": daemon["marker_to_queue_s"],
                f"marker_to_settled_s_{label}": daemon["marker_to_settled_s"],
                f"overhead_share_{label}": daemon["overhead_share"],
                f"step_seconds_{label}": daemon["step_seconds"],
                f"runs_per_wave_{label}": daemon["runs"],
                f"daemon_launched_runs_{label}": daemon["launched_runs"],
                f"in_process_queue_s_{label}": local["marker_to_queue_s"],
                f"in_process_s_{label}": local["marker_to_settled_s"],
                f"in_process_step_seconds_{label}": local["step_seconds"],
                f"in_process_runs_{label}": local["runs"],
                f"ratio_vs_in_process_{label}": round(
                    daemon["marker_to_settled_s"] / local["marker_to_settled_s"], 3),
                f"queue_ratio_vs_in_process_{label}": round(
                    daemon["marker_to_queue_s"] / local["marker_to_queue_s"], 3),
            })
    print(json.dumps(summary))


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
