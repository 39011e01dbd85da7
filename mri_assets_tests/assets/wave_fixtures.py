"""Small real waves for asset tests: sample data from real scans, landed into a test store."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from mri_assets.assets.support.partitions import WAVES
from mri_assets.core.home import MriHome
from mri_assets.core.sample_data import build_sample_data
from mri_assets.definitions import build_defs
from mri_assets.definitions.local_run import QUIET_CONSOLE
from mri_assets.resources.landing import land_wave
from mri_assets.resources.object_store import LocalObjectStore, ObjectStore
from mri_assets.resources.settings import DEV_SALT


def land_sample_wave(
    store: ObjectStore, workdir: Path, wave: str, n_slices: int = 60, seed: int = 0,
    style: str = "t1", include_bad: bool = True,
) -> Path:
    source = workdir / f"sample-{wave}"
    build_sample_data(source, n_slices=n_slices, seed=seed, wave_style=style, include_bad=include_bad)
    land_wave(LocalObjectStore(root=str(source)), "", store, wave, DEV_SALT)
    return source


def local_defs(home: Path) -> dg.Definitions:
    return build_defs("local", MriHome(home))


def materialize(defs: dg.Definitions, instance: dg.DagsterInstance, selection: list[str],
                partition_key, resources: dict | None = None, raise_on_error: bool = True):
    if isinstance(partition_key, str) and not instance.has_dynamic_partition(WAVES, partition_key):
        instance.add_dynamic_partitions(WAVES, [partition_key])
    return dg.materialize(
        assets=list(defs.assets or []),
        selection=[dg.AssetKey(name) for name in selection],
        partition_key=partition_key,
        instance=instance,
        resources={**defs.resources, **(resources or {})},
        raise_on_error=raise_on_error,
        run_config=QUIET_CONSOLE,
    )
