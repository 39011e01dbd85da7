"""Sensors: cursor-based and idempotent (every request carries a run_key)."""


import json
import warnings

import dagster as dg

from mri_assets.assets.support.partitions import (
    SMOKE_WAVE,
    WAVES,
    shard_range_tags,
    wave_partitions,
    wave_shard_partitions,
)
from mri_assets.core.clustering import DriftDecision
from mri_assets.core.drift_watch import ClustersObservation, DriftWatch
from mri_assets.core.expert_labels import label_counts_by_wave
from mri_assets.core.manifest import WaveKeyError, validate_wave_key
from mri_assets.core.retrain_watch import RetrainWatch
from mri_assets.definitions.dagster_private import wrap_sensor_evaluation
from mri_assets.definitions.jobs import (
    ACTIVE_LEARNING_JOB,
    LABEL_REFRESH_JOB,
    RETRAIN_JOB,
    ingest_wave_job,
)
from mri_assets.definitions.wave_carry import carried_waves, without_carried
from mri_assets.deployment import LoopSettings
from mri_assets.resources.label_store import LabelStore
from mri_assets.resources.object_store import ObjectStore
from mri_assets.resources.settings import ClusteringSettings, RetrainSettings
from mri_assets.resources.wave_store import WaveStore


def ready_waves(store: ObjectStore) -> list[str]:
    """Waves whose landing area holds a `raw/WAVE/_READY` marker."""
    return WaveStore(store).landed_waves()


def real_waves(instance: dg.DagsterInstance) -> list[str]:
    """The `waves` partitions in the order they were added, without the smoke's (which only its
    own job materializes)."""
    return [wave for wave in instance.get_dynamic_partitions(WAVES) if wave != SMOKE_WAVE]


def wave_sensor_for(job) -> dg.SensorDefinition:
    """`wave_sensor`, requesting `job` for each landed wave: `carry_wave` in the local profile
    (the wave's stages in one run), `ingest_wave` elsewhere (automation carries the rest)."""

    # On every pass of the sensor daemon's loop (5 s). The loop's passes are not exactly 5 s
    # apart, so a 5 s minimum made every other pass skip the sensor; 1 s never does.
    @dg.sensor(name="wave_sensor", job=job, minimum_interval_seconds=1,
               default_status=dg.DefaultSensorStatus.RUNNING)
    def wave_sensor(context: dg.SensorEvaluationContext, object_store: ObjectStore):
        """The one way a landed wave starts: for every `raw/WAVE/_READY` marker whose wave has
        no manifest yet, adds the `waves` partition (when missing) and requests the wave's run.

        A wave dropped into the bucket and one landed with `mri-assets ingest-wave` take this
        same path (the command also adds the partition, so the wave can be selected at once; the
        run still comes from here). The run key is the wave: Dagster launches it once per wave.
        The smoke wave's landing (`raw/smoke/`) is left to the nightly smoke job.
        """
        return landed_wave_requests(context, object_store)

    return wave_sensor


def landed_wave_requests(context: dg.SensorEvaluationContext, object_store: ObjectStore):
    """What `wave_sensor` returns: a run request per landed wave without a manifest."""
    known = set(context.instance.get_dynamic_partitions(WAVES))
    ingested = context.instance.get_materialized_partitions(dg.AssetKey("manifest"))
    waiting, refused = [], []
    for wave in ready_waves(object_store):
        if wave in ingested or wave == SMOKE_WAVE:
            continue
        try:
            waiting.append(validate_wave_key(wave))
        except WaveKeyError as error:
            refused.append(str(error))
    for message in refused:
        context.log.warning(message)
    if not waiting:
        return dg.SkipReason("no landed wave without a manifest"
                             + (f"; refused: {refused}" if refused else ""))
    new_partitions = [wave for wave in waiting if wave not in known]
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=wave, partition_key=wave) for wave in waiting],
        dynamic_partitions_requests=(
            [wave_partitions.build_add_request(new_partitions)] if new_partitions else []),
    )


wave_sensor = wave_sensor_for(ingest_wave_job)


def clusters_observation(record, drift_k: int) -> ClustersObservation | None:
    """The drift-relevant figures of one `clusters` materialization record."""
    materialization = record.asset_materialization
    if materialization is None or materialization.partition is None:
        return None
    metadata = {key: value.value for key, value in materialization.metadata.items()}
    ari = metadata.get(f"ari_k{drift_k}")
    return ClustersObservation(
        storage_id=record.storage_id,
        wave=materialization.partition,
        model_id=str(metadata.get("model_id", "unknown")),
        k=drift_k,
        ari=float(ari) if isinstance(ari, (int, float)) else None,
    )


def drift_decisions(
    instance: dg.DagsterInstance, clustering: ClusteringSettings, cursor: str | None
) -> tuple[list[tuple[str, DriftDecision, str | None]], str]:
    """What `ari_drift_sensor` decides from the `clusters` materializations after `cursor`:
    (wave, decision, run key to request or None) in storage order, and the new cursor."""
    settings = clustering.checked()
    watch = DriftWatch.from_cursor(cursor)
    result = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("clusters"),
                              after_storage_id=watch.after_storage_id or None),
        limit=200, ascending=True,
    )
    decisions = []
    for record in result.records:
        seen = clusters_observation(record, settings.drift_k)
        if seen is None or seen.wave == SMOKE_WAVE:
            continue
        decision, run_key = watch.observe(seen, settings.drift_threshold, settings.baseline_wave)
        decisions.append((seen.wave, decision, run_key))
    return decisions, watch.to_cursor()


@dg.sensor(job_name=ACTIVE_LEARNING_JOB, minimum_interval_seconds=60,
           default_status=dg.DefaultSensorStatus.RUNNING)
def ari_drift_sensor(context: dg.SensorEvaluationContext, clustering: ClusteringSettings):
    """Requests active learning for a wave whose ARI at k drops > 10 % below the baseline's."""
    decisions, cursor = drift_decisions(context.instance, clustering, context.cursor)
    requests = []
    for wave, decision, run_key in decisions:
        context.log.info(f"clusters[{wave}]: {decision.status}: {decision.reason}")
        if run_key is not None:
            requests.append(dg.RunRequest(
                run_key=run_key, partition_key=wave,
                tags={"mri_assets/trigger": "ari_drift", "mri_assets/drift": decision.reason[:200]},
            ))
    return dg.SensorResult(run_requests=requests, cursor=cursor)


def labels_tick(context: dg.SensorEvaluationContext, label_store: LabelStore):
    """New clinicians' labels in a wave request its refresh (snapshot, clusters' ARI, pseudo-labels)."""
    seen: dict[str, int] = json.loads(context.cursor) if context.cursor else {}
    counts = label_counts_by_wave(label_store.labels_snapshot(None))
    known_waves = set(real_waves(context.instance))
    requests = [
        dg.RunRequest(run_key=f"labels:{wave}:{count}", partition_key=wave,
                      tags={"mri_assets/trigger": "new_labels"})
        for wave, count in sorted(counts.items())
        if count != seen.get(wave) and wave in known_waves
    ]
    return dg.SensorResult(run_requests=requests, cursor=json.dumps(counts, sort_keys=True))


def _metadata_value(record, name: str):
    entry = record.asset_materialization.metadata.get(name)
    return None if entry is None else entry.value


def retrain_tick(context: dg.SensorEvaluationContext, retrain: RetrainSettings,
                 label_store: LabelStore):
    """Requests retraining for the latest wave each time `every_slices` more slices are ingested,
    once the clinicians are done with that wave's queue: it has first reads and no expert or
    hold-out item is still queued or leased. Until then the crossing waits (it is not used up):
    a wave just ingested has nothing to learn from yet, and pseudo-labels need its labels."""
    watch = RetrainWatch.from_cursor(context.cursor)
    manifests = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("manifest"),
                              after_storage_id=watch.after_manifest or None),
        limit=1000, ascending=True,
    ).records
    trained = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("classifier"),
                              after_storage_id=watch.after_classifier or None),
        limit=1, ascending=False,
    ).records
    trained_at = trained[0].storage_id if trained else None
    for record in manifests:
        if trained_at is not None and record.storage_id > trained_at:
            watch.saw_classifier(trained_at)
            trained_at = None
        ok = _metadata_value(record, "ok")
        if record.partition_key and record.partition_key != SMOKE_WAVE and isinstance(ok, int):
            watch.saw_manifest(record.storage_id, record.partition_key, ok)
    if trained_at is not None:
        watch.saw_classifier(trained_at)
    waves = real_waves(context.instance)
    if not waves or not watch.due(retrain.every_slices):
        return dg.SensorResult(
            skip_reason=f"{watch.since_classifier()} slices since the last classifier, "
            f"retraining every {retrain.every_slices}", cursor=watch.to_cursor())
    wave = waves[-1]
    progress = label_store.wave_progress(wave)
    if progress["labeled"] == 0 or progress["open"]:
        return dg.SensorResult(
            skip_reason=f"retraining is due ({watch.since_classifier()} slices since the last "
            f"classifier) and waits for the clinicians: wave {wave} has {progress['labeled']} "
            f"labels and {progress['open']} queued items still open", cursor=watch.to_cursor())
    # The first queue is built before the backbone (labeling_queue): pseudo-labels need the
    # wave's embeddings, so the crossing also waits for its clusters (embeddings and PCA done).
    if not context.instance.fetch_materializations(dg.AssetRecordsFilter(
            asset_key=dg.AssetKey("clusters"), asset_partitions=[wave]), limit=1).records:
        return dg.SensorResult(
            skip_reason=f"retraining is due and wave {wave} is labelled; it waits for the wave's "
            "clusters (backbone, embeddings and PCA still running)", cursor=watch.to_cursor())
    run_key = watch.crossing(retrain.every_slices)
    request = dg.RunRequest(run_key=run_key, partition_key=wave,
                            tags={"mri_assets/trigger": "slices_ingested"})
    return dg.SensorResult(run_requests=[request], cursor=watch.to_cursor())


def loop_sensors(interval_s: int = LoopSettings.sensor_interval_s
                 ) -> tuple[dg.SensorDefinition, ...]:
    """`labels_sensor` and `retrain_sensor`, evaluated at most every `interval_s` seconds
    (`LoopSettings.sensor_interval_s`, MRI_ASSETS_LOOP_SENSOR_INTERVAL)."""
    return tuple(
        dg.sensor(name=name, job_name=job, minimum_interval_seconds=interval_s,
                  default_status=dg.DefaultSensorStatus.RUNNING)(tick)
        for name, job, tick in (("labels_sensor", LABEL_REFRESH_JOB, labels_tick),
                                ("retrain_sensor", RETRAIN_JOB, retrain_tick))
    )


labels_sensor, retrain_sensor = loop_sensors()


SHARD_RUNS = ("per_wave", "per_shard")


def _contiguous(shards: list[int]) -> list[tuple[int, int]]:
    """Sorted shard numbers as (first, last) runs of consecutive numbers."""
    spans: list[tuple[int, int]] = []
    for shard in sorted(set(shards)):
        if spans and shard == spans[-1][1] + 1:
            spans[-1] = (spans[-1][0], shard)
        else:
            spans.append((shard, shard))
    return spans


def group_shard_requests(requests: list[dg.RunRequest]) -> list[dg.RunRequest]:
    """One run per wave, asset selection and span of consecutive shards instead of one run per
    shard partition: the shard requests of one automation tick become partition-range runs (the
    shard assets step through their shards in that run, `partitions.each_shard`). Every other
    request is kept as it is."""
    kept: list[dg.RunRequest] = []
    groups: dict[tuple, list[tuple[int, dg.RunRequest]]] = {}
    for request in requests:
        key = request.partition_key
        if key is None or "|" not in str(key):
            kept.append(request)
            continue
        parts = wave_shard_partitions.get_partition_key_from_str(str(key)).keys_by_dimension
        selection = tuple(sorted(request.asset_selection or [], key=lambda k: k.to_user_string()))
        checks = tuple(sorted(request.asset_check_keys or [], key=str))
        groups.setdefault((parts["wave"], selection, checks), []).append(
            (int(parts["shard"]), request))
    for (wave, selection, checks), members in groups.items():
        by_shard = dict(members)
        for first, last in _contiguous(list(by_shard)):
            if first == last:
                kept.append(by_shard[first])
                continue
            tags = {k: v for k, v in (by_shard[first].tags or {}).items()
                    if not k.startswith("dagster/partition")}
            kept.append(dg.RunRequest(
                asset_selection=list(selection), asset_check_keys=list(checks),
                tags={**tags, **shard_range_tags(wave, first, last)}))
    return kept


class WaveAutomationSensor(dg.AutomationConditionSensorDefinition):
    """Dagster's automation sensor, evaluated in the code location (the conditions hold Python:
    `automation.NOT_SMOKE`), that launches its runs itself rather than through backfills (the
    backfill daemon's 30 s loop would add a wait to every stage of a wave).

    `shard_runs="per_wave"` (the local profile) turns the shard requests of a tick into one run
    per wave and shard asset over the range of its shards; `"per_shard"` (Celery, Kubernetes)
    keeps a run per shard partition, whose steps the executor fans out to workers or pods.
    It requests nothing for a wave whose latest `carry_wave` run has not succeeded
    (`wave_carry.carried_waves`): that run materializes the wave's stages itself.
    """

    def __init__(self, name: str, *, shard_runs: str, **kwargs) -> None:
        if shard_runs not in SHARD_RUNS:
            raise ValueError(f"shard_runs must be one of {SHARD_RUNS}, got {shard_runs!r}")
        with warnings.catch_warnings():  # use_user_code_server is a beta parameter
            warnings.simplefilter("ignore", dg.BetaWarning)
            super().__init__(name, use_user_code_server=True, emit_backfills=False, **kwargs)
        self._shard_runs = shard_runs
        self._init_kwargs = kwargs
        evaluate = self._raw_fn

        def guarded(context: dg.SensorEvaluationContext):
            result = evaluate(context)
            requests = without_carried(list(result.run_requests or []),
                                       carried_waves(context.instance))
            if shard_runs == "per_wave":
                requests = group_shard_requests(requests)
            return dg.SensorResult(
                run_requests=requests,
                cursor=result.cursor,
                automation_condition_evaluations=result.automation_condition_evaluations,
            )

        self._raw_fn = guarded
        self._evaluation_fn = wrap_sensor_evaluation(self._name, guarded)

    @property
    def shard_runs(self) -> str:
        return self._shard_runs

    def with_attributes(self, *, jobs=None, metadata=None) -> "WaveAutomationSensor":
        kwargs = {**self._init_kwargs}
        if metadata is not None:
            kwargs["metadata"] = metadata
        return WaveAutomationSensor(self.name, shard_runs=self._shard_runs, **kwargs)


AUTOMATION_SENSOR = "default_automation_condition_sensor"


def automation_sensor(shard_runs: str) -> WaveAutomationSensor:
    """The sensor that carries a wave from its manifest to its first labeling queue; it runs by
    default (Dagster's own is stopped unless declared) and looks on every pass of the daemon's
    sensor loop (5 s; a minimum interval of 5 s made every other pass skip it, so each stage of a
    wave waited up to 10 s for the next)."""
    return WaveAutomationSensor(
        AUTOMATION_SENSOR,
        shard_runs=shard_runs,
        target=dg.AssetSelection.all(),
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=1,
        description="Materializes what the assets' automation conditions ask for (slices, "
        "gpu_budget, backbone, embeddings, pca_model, clusters, labeling_queue after a wave's "
        f"manifest), never for the smoke wave; shard runs: {shard_runs}.",
    )
