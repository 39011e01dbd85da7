"""Celery workers of the `celery` profile, and runs whose steps go to them.

A worker is dagster-celery's own Celery app (`dagster_celery.app`) listening on one queue: `gpu`
for steps tagged `dagster-celery/queue: gpu` (the embeddings), `default` (Celery queue `dagster`)
for every other step. Worker and executor take the broker from the same deployment settings
(`MRI_ASSETS_CELERY_BROKER`, `MRI_ASSETS_CELERY_BACKEND`; see `executors.celery_executor_config`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

import yaml

from mri_assets.definitions.executors import DEFAULT_QUEUE, GPU_QUEUE, celery_executor_config
from mri_assets.deployment import Deployment, child_environment

QUEUES = {"gpu": GPU_QUEUE, "default": DEFAULT_QUEUE}
POOLS = ("prefork", "solo", "threads")
CELERY_APP = "dagster_celery.app"
CELERY_CONFIG_MODULE = "dagster_celery_config"
DEFINITIONS_MODULE = "mri_assets.definitions"


def celery_queue(queue: str) -> str:
    """The Celery queue behind a `mri-assets worker --queue` name."""
    if queue not in QUEUES:
        raise ValueError(f"unknown worker queue {queue!r}: use one of {', '.join(QUEUES)}")
    return QUEUES[queue]


def write_worker_config(executor_config: Mapping, folder: Path) -> Path:
    """Write the worker's settings into `folder`; returns the folder to put on PYTHONPATH.

    `executor.yaml` holds the executor config block (`dagster-celery worker start -y` and
    `dagster-celery worker list -y` read it); `dagster_celery_config.py` is the module that
    `dagster_celery.app` loads at start, built from that block after dagster-celery's own schema
    validated it.
    """
    from dagster_celery.cli import get_validated_config

    folder.mkdir(parents=True, exist_ok=True)
    config_yaml = folder / "executor.yaml"
    config_yaml.write_text(yaml.safe_dump({"execution": {"config": dict(executor_config)}}))
    validated = get_validated_config(str(config_yaml))
    lines = [f"broker_url = {str(validated['broker'])!r}"]
    if validated.get("backend"):
        lines.append(f"result_backend = {str(validated['backend'])!r}")
    for key, value in (validated.get("config_source") or {}).items():
        lines.append(f"{key} = {value!r}")
    (folder / f"{CELERY_CONFIG_MODULE}.py").write_text("\n".join(lines) + "\n")
    return folder


def venv_bin() -> Path:
    return Path(sys.executable).parent


def worker_command(
    queue: str, name: str | None = None, concurrency: int = 1, pool: str = "prefork",
    loglevel: str = "INFO",
) -> list[str]:
    """The `celery worker` command line of one queue's worker (what `dagster-celery worker start` runs)."""
    if pool not in POOLS:
        raise ValueError(f"unknown Celery pool {pool!r}: use one of {', '.join(POOLS)}")
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    return [
        str(venv_bin() / "celery"), "-A", CELERY_APP, "worker",
        "-Q", celery_queue(queue),
        "-n", f"{name or queue}@%h",
        "-I", DEFINITIONS_MODULE,
        "--concurrency", str(concurrency),
        "--pool", pool,
        "--prefetch-multiplier", "1",
        "--loglevel", loglevel,
        "--without-gossip",
        "--without-mingle",
    ]


def worker_env(config_dir: Path, env: Mapping[str, str]) -> dict[str, str]:
    """The worker's environment: the venv's `bin/` first on PATH, the config module importable."""
    merged = dict(env)
    merged["PATH"] = os.pathsep.join([str(venv_bin()), env.get("PATH", "")])
    merged["PYTHONPATH"] = os.pathsep.join(p for p in [str(config_dir), env.get("PYTHONPATH", "")] if p)
    merged["MRI_ASSETS_PROFILE"] = "celery"
    return merged


def start_worker(
    deployment: Deployment, queue: str, config_dir: Path, name: str | None = None,
    concurrency: int = 1, pool: str = "prefork", loglevel: str = "INFO",
) -> None:
    """Replace this process with a Celery worker for `queue` (never returns). The worker loads
    `mri_assets.definitions`, which reads the same environment into the same deployment."""
    command = worker_command(queue, name, concurrency, pool, loglevel)
    config_dir = write_worker_config(celery_executor_config(deployment), config_dir)
    os.execve(command[0], command, worker_env(config_dir, child_environment()))


def materialize_partition(select: str, partition: str | None, instance) -> str:
    """Run the assets of `select` for one partition with the executor of MRI_ASSETS_PROFILE.

    The programmatic twin of `dagster asset materialize -m mri_assets.definitions`: the job is
    reconstructable from the module, so Celery workers (or step pods) can load it. Returns the
    run id; raises RuntimeError naming the run when it failed.
    """
    import dagster as dg

    from mri_assets.definitions.dagster_private import reconstructable_repository

    recon_repo = reconstructable_repository(DEFINITIONS_MODULE, "defs", os.getcwd())
    repository = recon_repo.get_definition()
    wanted = [dg.AssetKey.from_user_string(name.strip()) for name in select.split(",")]
    keys = dg.AssetSelection.assets(*wanted).resolve(repository.asset_graph)
    job = repository.get_implicit_job_def_for_assets(keys)
    if job is None:
        raise ValueError(f"assets {select!r} do not share one partitions definition: select fewer")
    tags = job.get_tags_for_partition_key(partition, selected_asset_keys=keys) if partition else {}
    with dg.execute_job(
        recon_repo.get_reconstructable_job(job.name), instance=instance,
        asset_selection=list(keys), tags=tags,
    ) as result:
        if not result.success:
            raise RuntimeError(f"run {result.run_id} of {select} [{partition}] failed")
        return result.run_id
