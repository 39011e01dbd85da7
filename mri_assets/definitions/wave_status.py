"""What a wave's runs wait for, in words: "queued behind the `gpu` pool (1 slot), 2 runs ahead".

`run_waits` reads it off the instance (the run queue and the pools' slot claims); the
`wave_waits_sensor` writes it on each unfinished run as the tag `mri_assets/waiting_for`, which
the UI shows on the run and in the runs list, and

    mri-assets status [WAVE]

prints it for a wave's unfinished runs (every wave's when none is named).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import dagster as dg

from mri_assets.assets.support.partitions import wave_of_partition

WAITING_TAG = "mri_assets/waiting_for"
UNFINISHED = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED,
              dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED]
RUNNING = "running"


@dataclass(frozen=True)
class RunWait:
    run_id: str
    job: str
    wave: str | None
    waiting_for: str


def run_wave(run: dg.DagsterRun) -> str | None:
    """The wave a run works on (its partition, or the start of its partition range)."""
    key = run.tags.get("dagster/partition") or run.tags.get("dagster/asset_partition_range_start")
    return wave_of_partition(key) if key else None


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _pool_waits(instance: dg.DagsterInstance) -> dict[str, str]:
    """run id -> words, for runs with a step waiting for a pool slot."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return {}
    waits: dict[str, str] = {}
    for pool in sorted(storage.get_concurrency_keys()):
        info = storage.get_concurrency_info(pool)
        holders = {slot.run_id for slot in info.claimed_slots}
        pending = sorted((step for step in info.pending_steps if step.assigned_timestamp is None),
                         key=lambda step: (-(step.priority or 0), step.enqueued_timestamp))
        before: list[str] = []
        for step in pending:
            if step.run_id not in waits:
                ahead = len(holders - {step.run_id}) + len(set(before) - {step.run_id})
                waits[step.run_id] = (f"queued behind the `{pool}` pool "
                                      f"({_plural(info.slot_count, 'slot')}), "
                                      f"{_plural(ahead, 'run')} ahead")
            before.append(step.run_id)
    return waits


def run_waits(instance: dg.DagsterInstance, wave: str | None = None,
              runs: list | None = None) -> list[RunWait]:
    """Every unfinished run (of `wave`), oldest first, with what it waits for (`runs`: those
    runs instead of the instance's own, oldest first)."""
    if runs is None:
        runs = list(reversed(instance.get_runs(filters=dg.RunsFilter(statuses=UNFINISHED))))
    config = instance.get_concurrency_config().run_queue_config
    limit = config.max_concurrent_runs if config is not None else None
    active = [r for r in runs if r.status != dg.DagsterRunStatus.QUEUED]
    pools = _pool_waits(instance)
    found, queued_before = [], 0
    for run in runs:
        if run.status == dg.DagsterRunStatus.QUEUED:
            limit_words = f"({_plural(limit, 'run')} at once)" if limit is not None else ""
            ahead = len(active) + queued_before
            words = (f"queued behind the run limit {limit_words}, {_plural(ahead, 'run')} ahead"
                     if ahead else "queued, next to start (the run queue's next pass)")
            queued_before += 1
        else:
            words = pools.get(run.run_id, RUNNING)
        if wave is None or run_wave(run) == wave:
            found.append(RunWait(run.run_id, run.job_name, run_wave(run), words))
    return found


def finished_words(run: dg.DagsterRun) -> str:
    """The tag a run keeps once it has ended, in place of what it waited for."""
    return f"finished ({run.status.value.lower()})"


@dg.sensor(minimum_interval_seconds=10, default_status=dg.DefaultSensorStatus.RUNNING)
def wave_waits_sensor(context: dg.SensorEvaluationContext):
    """Writes on every unfinished run what it waits for (tag `mri_assets/waiting_for`): the run
    limit, a pool's slots and how many runs are ahead, or `running`; and, once a run it tagged
    has ended, `finished (success)` (or its other final status), so no ended run keeps saying
    it waits. The cursor holds the runs tagged and not yet seen ended."""
    tagged = set(json.loads(context.cursor)) if context.cursor else set()
    changed = 0
    waits = run_waits(context.instance)
    for wait in waits:
        run = context.instance.get_run_by_id(wait.run_id)
        if run is not None and run.tags.get(WAITING_TAG) != wait.waiting_for:
            context.instance.add_run_tags(wait.run_id, {WAITING_TAG: wait.waiting_for})
            changed += 1
    unfinished = {wait.run_id for wait in waits}
    for run_id in sorted(tagged - unfinished):
        run = context.instance.get_run_by_id(run_id)
        if run is not None and run.is_finished:
            context.instance.add_run_tags(run_id, {WAITING_TAG: finished_words(run)})
            changed += 1
        elif run is not None:
            unfinished.add(run_id)  # between the two reads: look again next time
    context.update_cursor(json.dumps(sorted(unfinished)))
    return dg.SkipReason(f"{changed} runs' waiting_for updated")


def print_waits(home, wave: str | None = None) -> int:
    """Print what each unfinished run (of `wave`, or of every wave) waits for; `mri-assets status`."""
    from mri_assets.definitions.local_run import dagster_instance

    instance = dagster_instance(home, recover=False)
    waits = run_waits(instance, wave)
    if not waits:
        print(f"no unfinished run{' of wave ' + wave if wave else ''}")
    for wait in waits:
        print(f"{wait.run_id[:8]} {wait.job} [{wait.wave or '-'}]: {wait.waiting_for}")
    return 0
