"""Every use of Dagster's private API (`dagster._…`), in this one module.

Why there is any: runs made with `execute_in_process` name no code location, so the UI cannot
re-execute them (dagster-io/dagster#19458). `location_runs` makes the runs of `mri-assets run`
runs of the code location's jobs instead, which takes the run-creation internals below; the
Celery path reconstructs the code location's repository from its module. Nothing public does
either today (`DagsterGraphQLClient` launches runs only where a webserver is up, and those run
in the webserver's process, not in the command's).

`USED` lists each private name with the keyword arguments this package passes to it;
`private_api_problems()` checks them against the installed Dagster, and
`mri_assets_tests/test_dagster_private.py` fails with those sentences after an upgrade that
moved or changed one. `test_architecture` fails on a private import anywhere else.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Mapping

import dagster as dg
from dagster._core.definitions.job_base import InMemoryJob
from dagster._core.definitions.reconstruct import ReconstructableRepository
from dagster._core.definitions.repository_definition import SINGLETON_REPOSITORY_NAME
from dagster._core.definitions.sensor_definition import wrap_sensor_evaluation
from dagster._core.execution.api import create_execution_plan, execute_run
from dagster._core.execution.execute_in_process import merge_run_tags
from dagster._core.origin import JobPythonOrigin
from dagster._core.remote_origin import (
    ManagedGrpcPythonEnvCodeLocationOrigin,
    RemoteJobOrigin,
    RemoteRepositoryOrigin,
)
from dagster._core.storage.fs_io_manager import PickledObjectFilesystemIOManager
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

__all__ = [
    "PickledObjectFilesystemIOManager",
    "execute_as_location_run",
    "job_origins",
    "private_api_problems",
    "reconstructable_repository",
    "wrap_sensor_evaluation",
]

ISSUE = "dagster-io/dagster#19458"

# (module, attribute path, keyword arguments this package passes, who needs it)
USED: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("dagster._core.definitions.job_base", "InMemoryJob", (), "location_runs"),
    ("dagster._core.definitions.reconstruct", "ReconstructableRepository.for_module", (),
     "location_runs, workers"),
    ("dagster._core.definitions.reconstruct", "ReconstructableRepository.get_python_origin", (),
     "location_runs"),
    ("dagster._core.definitions.repository_definition", "SINGLETON_REPOSITORY_NAME", (),
     "location_runs"),
    ("dagster._core.definitions.sensor_definition", "wrap_sensor_evaluation", (), "sensors"),
    ("dagster._core.execution.api", "create_execution_plan",
     ("run_config", "instance_ref", "tags"), "location_runs"),
    ("dagster._core.execution.api", "execute_run", ("raise_on_error",), "location_runs"),
    ("dagster._core.execution.execute_in_process", "merge_run_tags",
     ("job_def", "partition_key", "tags", "asset_selection", "instance", "run_config"),
     "location_runs"),
    ("dagster._core.origin", "JobPythonOrigin", (), "location_runs"),
    ("dagster._core.remote_origin", "ManagedGrpcPythonEnvCodeLocationOrigin",
     ("loadable_target_origin", "location_name"), "location_runs"),
    ("dagster._core.remote_origin", "RemoteJobOrigin", (), "location_runs"),
    ("dagster._core.remote_origin", "RemoteRepositoryOrigin", (), "location_runs"),
    ("dagster._core.storage.fs_io_manager", "PickledObjectFilesystemIOManager", ("base_dir",),
     "code_location"),
    ("dagster._core.types.loadable_target_origin", "LoadableTargetOrigin",
     ("executable_path", "module_name", "working_directory"), "location_runs"),
    ("dagster", "DagsterInstance.create_run_for_job",
     ("job_def", "execution_plan", "run_id", "run_config", "tags", "asset_selection",
      "remote_job_origin", "job_code_origin"), "location_runs"),
    ("dagster", "JobDefinition.as_ephemeral_job", ("resource_defs", "input_values"),
     "location_runs"),
)


def private_api_problems() -> list[str]:
    """One sentence per private name of `USED` that the installed Dagster no longer has, or whose
    signature no longer takes a keyword this package passes; empty when all is as expected."""
    problems = []
    for module_name, path, keywords, users in USED:
        where = f"{module_name}.{path}"
        try:
            target: object = importlib.import_module(module_name)
            for part in path.split("."):
                target = getattr(target, part)
        except (ImportError, AttributeError) as error:
            problems.append(f"dagster {dg.__version__}: {where} is gone ({error}); {users} "
                            f"need it ({ISSUE}): find its new home and update {__name__}")
            continue
        if not keywords:
            continue
        try:
            accepted = inspect.signature(target).parameters  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue  # a class whose signature Python cannot read: presence is what we can check
        missing = [name for name in keywords if name not in accepted]
        if missing and not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
            problems.append(f"dagster {dg.__version__}: {where} no longer takes {missing}; "
                            f"{users} pass them ({ISSUE}): update {__name__}")
    return problems


def reconstructable_repository(module: str, attribute: str,
                               working_directory: str) -> ReconstructableRepository:
    """The code location's repository, loadable again from its module in another process."""
    return ReconstructableRepository.for_module(module, attribute, working_directory)


def job_origins(*, module: str, attribute: str, working_directory: str, location_name: str,
                job_name: str) -> tuple[RemoteJobOrigin, JobPythonOrigin]:
    """(remote origin, code origin) of job `job_name` of the code location the webserver loads
    from `module` (workspace.yaml), as a run launched from the UI records them."""
    location = ManagedGrpcPythonEnvCodeLocationOrigin(
        loadable_target_origin=LoadableTargetOrigin(
            executable_path=sys.executable, module_name=module,
            working_directory=working_directory),
        location_name=location_name,
    )
    remote = RemoteJobOrigin(RemoteRepositoryOrigin(location, SINGLETON_REPOSITORY_NAME), job_name)
    repository = reconstructable_repository(module, attribute, working_directory)
    return remote, JobPythonOrigin(job_name, repository.get_python_origin())


def execute_as_location_run(
    job: dg.JobDefinition,
    keys: frozenset[dg.AssetKey],
    origins: tuple[RemoteJobOrigin, JobPythonOrigin],
    *,
    run_config: Mapping[str, object],
    instance: dg.DagsterInstance,
    partition_key: str | None,
    raise_on_error: bool,
    run_id: str | None,
    tags: Mapping[str, str] | None,
):
    """What `JobDefinition.execute_in_process` does for the subset of `job` to `keys`, but the run
    is created with `origins`, so the UI lists it under that job and can re-execute it."""
    here = job.as_ephemeral_job(resource_defs={}, input_values={})
    subset = here.get_subset(asset_selection=set(keys))
    run_tags = merge_run_tags(job_def=subset, partition_key=partition_key, tags=tags,
                              asset_selection=list(keys), instance=instance,
                              run_config=run_config)
    plan = create_execution_plan(InMemoryJob(subset), run_config=run_config,
                                 instance_ref=instance.get_ref(), tags=run_tags)
    remote_origin, code_origin = origins
    run = instance.create_run_for_job(
        job_def=subset, execution_plan=plan, run_id=run_id, run_config=run_config,
        tags={**subset.run_tags, **run_tags}, asset_selection=keys,
        remote_job_origin=remote_origin, job_code_origin=code_origin,
    )
    return execute_run(InMemoryJob(here), run, instance, raise_on_error=raise_on_error)
