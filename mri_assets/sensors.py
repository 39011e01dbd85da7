"""Sensors: cursor-based and idempotent (every request carries a run_key)."""


import dagster as dg

from mri_assets.core.manifest import READY_MARKER, WaveKeyError, validate_wave_key
from mri_assets.jobs import ingest_wave_job
from mri_assets.partitions import WAVES, wave_partitions
from mri_assets.resources.object_store import ObjectStore


def ready_waves(store: ObjectStore) -> list[str]:
    """Waves whose landing area holds a `raw/WAVE/_READY` marker."""
    return sorted(
        info.key.split("/")[1]
        for info in store.list("raw/")
        if info.key.count("/") == 2 and info.key.endswith("/" + READY_MARKER)
    )


@dg.sensor(job=ingest_wave_job, minimum_interval_seconds=30,
           default_status=dg.DefaultSensorStatus.RUNNING)
def wave_sensor(context: dg.SensorEvaluationContext, object_store: ObjectStore):
    """Adds a `waves` partition for every new `_READY` marker and requests its ingestion run."""
    known = set(context.instance.get_dynamic_partitions(WAVES))
    new_waves, refused = [], []
    for wave in ready_waves(object_store):
        if wave in known:
            continue
        try:
            new_waves.append(validate_wave_key(wave))
        except WaveKeyError as error:
            refused.append(str(error))
    for message in refused:
        context.log.warning(message)
    if not new_waves:
        return dg.SkipReason("no new _READY markers" + (f"; refused: {refused}" if refused else ""))
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=wave, partition_key=wave) for wave in new_waves],
        dynamic_partitions_requests=[wave_partitions.build_add_request(new_waves)],
    )
