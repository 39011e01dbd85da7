"""The operations the command line and the demo share: land a wave, materialize it, label it
from a ground-truth table. Each takes the `Deployment` its caller read at the edge."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import polars as pl

from mri_assets.assets.support.partitions import WAVES
from mri_assets.cli.simulated_clinician import SimulatedLabeling, label_queue_from_truth
from mri_assets.core.manifest import validate_wave_key
from mri_assets.core.slice_shards import manifest_key
from mri_assets.definitions import build_defs
from mri_assets.definitions.executors import shard_runs_for
from mri_assets.definitions.local_run import WaveRunReport, dagster_instance, materialize_wave
from mri_assets.deployment import Deployment
from mri_assets.resources.deployed import label_store_for, object_store_for, source_store_for
from mri_assets.resources.settings import DEV_SALT


def instance_for(deployment: Deployment) -> dg.DagsterInstance:
    return dagster_instance(deployment.home)


def landing_salt(deployment: Deployment) -> str:
    """The salt landing hashes DICOM patient ids with (landing runs outside Dagster)."""
    return deployment.salt.value if deployment.salt else DEV_SALT


def ingest_wave(deployment: Deployment, wave: str, source: str,
                on_file: Callable[[], None] | None = None) -> str:
    """Land `source` as `raw/WAVE/` of the deployment's store and register the partition."""
    from mri_assets.resources.landing import land_wave

    validate_wave_key(wave)
    report = land_wave(source_store_for(deployment, source), "", object_store_for(deployment),
                       wave, landing_salt(deployment), on_file=on_file)
    instance = instance_for(deployment)
    if not instance.has_dynamic_partition(WAVES, wave):
        instance.add_dynamic_partitions(WAVES, [wave])
    return report.describe()


def run_wave(deployment: Deployment, wave: str, selection: str | None,
             on_step: Callable[[str], None] | None = None) -> WaveRunReport:
    """Materialize the selected assets of `wave` in this process (see `local_run`): under the
    local profile a wave's shards in one range run per shard asset, as its automation runs them
    (one process start, one `dvc add` and `dvc push` for the range), else a run per shard."""
    return materialize_wave(build_defs(deployment), instance_for(deployment), wave, selection,
                            on_step=on_step, shard_runs=shard_runs_for(deployment))


def label_from_csv(deployment: Deployment, wave: str, labels_csv: Path, limit: int | None = None,
                   on_item: Callable[[], None] | None = None) -> SimulatedLabeling:
    """The simulated clinician: label the wave's queue from the sample's ground truth."""
    from mri_assets.core.sample_labels import ground_truth_for_wave

    store = object_store_for(deployment)
    manifest = pl.read_parquet(io.BytesIO(store.get_bytes(manifest_key(wave))))
    truth = ground_truth_for_wave(Path(labels_csv), manifest, wave)
    return label_queue_from_truth(label_store_for(deployment), truth,
                                  deployment.simulated_password_value, limit, on_item=on_item)
