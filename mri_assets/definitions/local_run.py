"""Materialize a wave in this process, stage by stage, the way the CLI and the demo do.

Crash safety (no daemon runs beside these runs, so this module does what it would):
- every run carries the launching process's pid, host and start time as tags; on every start
  (`dagster_instance`), runs left unfinished by a process that is gone are marked failed, and
  the pool slots and queued claims of runs that ended are freed (`reclaim_dead_runs`);
- a run that holds a GPU step takes its pool slot before Dagster starts it, waiting here, where
  SIGTERM/SIGINT stop it and where holders that die meanwhile are reclaimed (Dagster's own wait
  for a slot ignores both signals and re-checks without sleeping);
- SIGTERM/SIGINT stop the wave: the step running is interrupted, its retries too, and the
  report names the signal (`_StopSignals`);
- temporaries left by dead processes are swept on every start (`core.temporaries`);
- the local MLflow store is created whole before any step (`MlflowTracking.prepare`).
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import psutil

from mri_assets.assets.support.gpu import GPU_POOL
from mri_assets.assets.support.partitions import (
    WAVES,
    shard_partitions,
    shard_range_tags,
    shards_done,
    wave_shard_key,
    wave_shard_partitions,
)
from mri_assets.core.home import MriHome
from mri_assets.core.progress import Progress
from mri_assets.core.temporaries import SweepReport, sweep
from mri_assets.core.wave_layout import wave_shard_count
from mri_assets.definitions.location_runs import location_stage
from mri_assets.resources.mlflow_tracking import MlflowTracking
from mri_assets.resources.object_store import SCRATCH_FOLDER

QUIET_CONSOLE = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
REPO_DAGSTER_YAML = Path(__file__).resolve().parents[2] / "deploy" / "local" / "dagster.yaml"


def dagster_instance(home: MriHome, recover: bool = True) -> dg.DagsterInstance:
    """The persistent Dagster instance under `HOME/dagster` (DAGSTER_HOME of `make dev`), set up
    on first use. It is opened from that folder, so no process environment is changed.

    `recover`: first clean up after processes that were killed (`recover_home`)."""
    home.ensure()
    target = home.dagster / "dagster.yaml"
    if not target.exists() and REPO_DAGSTER_YAML.exists():
        shutil.copyfile(REPO_DAGSTER_YAML, target)
    instance = dg.DagsterInstance.from_config(str(home.dagster))
    storage = instance.event_log_storage
    if storage.supports_global_concurrency_limits and GPU_POOL not in storage.get_concurrency_keys():
        storage.set_concurrency_slots(GPU_POOL, 1)
    if recover:
        recover_home(home, instance)
    return instance


@dataclass
class WaveRunReport:
    wave: str
    runs: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    interrupted: str | None = None  # the signal that stopped the wave: SIGTERM or SIGINT

    @property
    def success(self) -> bool:
        return not self.failed and self.interrupted is None

    @property
    def exit_code(self) -> int:
        """0, 1 for a failed step, 128 + the signal's number when a signal stopped the wave."""
        if self.interrupted is not None:
            return 128 + signal.Signals[self.interrupted].value
        return 0 if self.success else 1


def _stages(defs: dg.Definitions, selection: set[dg.AssetKey]) -> list[tuple[str, list[dg.AssetKey]]]:
    """Selected assets grouped into runs that share a partitions definition, in dependency order."""
    graph = defs.resolve_asset_graph()
    order = graph.toposorted_asset_keys
    stages: list[tuple[str, list[dg.AssetKey]]] = []
    for key in order:
        if key not in selection:
            continue
        partitions = graph.get(key).partitions_def
        kind = (
            "shard" if partitions == wave_shard_partitions
            else "wave" if partitions is not None else "none"
        )
        if stages and stages[-1][0] == kind:
            stages[-1][1].append(key)
            continue
        stages.append((kind, [key]))
    return stages


def selected_keys(graph, selection: str | None) -> set[dg.AssetKey]:
    """Asset names separated by spaces or commas; `name+` adds everything downstream of it."""
    everything = set(graph.get_all_asset_keys())
    if not selection:
        return everything
    chosen: set[dg.AssetKey] = set()
    for token in selection.replace(",", " ").split():
        key = dg.AssetKey(token.rstrip("+"))
        if key not in everything:
            names = ", ".join(sorted(k.to_user_string() for k in everything))
            raise ValueError(f"unknown asset {token!r} in --select: choose from {names}")
        chosen.add(key)
        if token.endswith("+"):
            chosen |= dg.AssetSelection.assets(key).downstream().resolve(graph)
    return chosen


def wave_shard_keys(defs: dg.Definitions, wave: str) -> list[dg.MultiPartitionKey]:
    """The shard partitions of `wave`: as many as its layout records, within the shard dimension."""
    n_shards = wave_shard_count(defs.resources["object_store"], wave)
    dimension = len(shard_partitions.get_partition_keys())
    if n_shards > dimension:
        raise ValueError(
            f"wave {wave} was written with {n_shards} shards but MRI_ASSETS_SHARDS={dimension}: "
            f"set MRI_ASSETS_SHARDS={n_shards} to materialize its shard assets")
    return [wave_shard_key(wave, shard) for shard in range(n_shards)]


def materialize_wave(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    wave: str,
    selection: str | None = None,
    on_step: Callable[[str], None] | None = None,
    shard_runs: str = "per_shard",
) -> WaveRunReport:
    """Run every selected asset of `wave`: wave assets, then each shard, then the rest.

    `shard_runs="per_shard"` makes a run per shard partition (a bar of shards; a failed shard
    stops the wave before the next); `"per_wave"` one run over the range of the wave's shards,
    as the daemon's automation does locally (`partitions.each_shard` steps through them).

    SIGTERM or SIGINT (in the main thread of a process that left them at Python's defaults)
    stop the wave: while it waits for a pool slot or between runs at once, during a run by
    interrupting the current step (`_StopSignals`); the report says which signal."""
    if not instance.has_dynamic_partition(WAVES, wave):
        instance.add_dynamic_partitions(WAVES, [wave])
    graph = defs.resolve_asset_graph()
    chosen = selected_keys(graph, selection)
    chosen = {k for k in chosen if graph.get(k).is_materializable}
    report = WaveRunReport(wave)
    with _stop_signals() as stop:
        try:
            tracking = (defs.resources or {}).get("mlflow")
            if isinstance(tracking, MlflowTracking):
                tracking.prepare()
            for kind, keys in _stages(defs, chosen):
                partition_keys = (
                    wave_shard_keys(defs, wave)
                    if kind == "shard" else [wave] if kind == "wave" else [None]
                )
                range_tags: dict[str, str] = {}
                covered = "all"
                units = len(partition_keys)
                if kind == "shard" and shard_runs == "per_wave" and len(partition_keys) > 1:
                    range_tags = shard_range_tags(wave, 0, len(partition_keys) - 1)
                    covered = f"{wave} shards 0-{len(partition_keys) - 1}"
                    units = len(partition_keys) * len(keys)  # each asset steps through them
                    partition_keys = [None]
                # A run of the code location's stage job where `defs` has it (re-executable
                # from the UI, see `location_runs`), else the job `dg.materialize` builds.
                job = location_stage(defs, kind, keys) or _stage_job(defs, keys)
                pooled = pooled_steps(defs, keys)
                with _stage_bar(keys, wave, kind, units) as shown:
                    for partition_key in partition_keys:
                        label = f"{','.join(k.to_user_string() for k in keys)} [{partition_key or covered}]"
                        stop.check()
                        # a range run advances the bar shard by shard (`each_shard`)
                        with shards_done(lambda _shard: shown.advance()):
                            result = _execute(job, instance, partition_key, pooled, stop,
                                              range_tags)
                        report.runs.append(result.run_id)
                        stop.check()
                        if not result.success:
                            report.failed.append(label)
                            return report
                        if not range_tags:
                            shown.advance()
                        if on_step is not None:
                            on_step(label)
        except StopRequested as stopped:
            report.interrupted = stopped.signal.name
    return report


def _stage_bar(keys: list[dg.AssetKey], wave: str, kind: str, runs: int) -> Progress:
    """The terminal's line for a stage, when this process shows bars (`core.progress`): a bar of
    its shards, or a timer for a single run. The assets' own bars show below it while they run."""
    names = ", ".join(k.to_user_string() for k in keys)
    if kind == "shard":
        return Progress(f"  {names} [{wave}]", "shards", runs, leave=True)
    return Progress(f"  {names} [{wave if kind == 'wave' else 'all'}]", None, leave=True)


_QUIET_SINCE: list[int] = []  # the disable levels `without_debug_lines` replaced, innermost last


@contextmanager
def without_debug_lines() -> Iterator[None]:
    """No DEBUG lines on the console while inside; the runs started here keep theirs in their
    event log.

    Dagster loads a stored asset value outside a run (`Definitions.load_asset_value`, what the
    demo's summary reads) with a console logger of its own at DEBUG, which no instance setting
    reaches: it printed `Loading partition pilot from ... using PickledObjectFilesystemIOManager...`
    on the terminal. Python's `logging.disable(DEBUG)` silences that logger. A run started by
    `_execute` lifts it while it runs, so its DEBUG records still reach the run's event log (the
    console of those runs is at WARNING: `QUIET_CONSOLE`)."""
    previous = logging.root.manager.disable
    logging.disable(max(previous, logging.DEBUG))
    _QUIET_SINCE.append(previous)
    try:
        yield
    finally:
        _QUIET_SINCE.pop()
        logging.disable(previous)


@contextmanager
def _debug_in_run_log() -> Iterator[None]:
    if not _QUIET_SINCE:
        yield
        return
    now = logging.root.manager.disable
    logging.disable(_QUIET_SINCE[0])
    try:
        yield
    finally:
        logging.disable(now)


EPHEMERAL_JOB = "__ephemeral_asset_job__"  # the name `dg.materialize` gives its runs
PID_TAG = "mri_assets/pid"
HOST_TAG = "mri_assets/host"
PROCESS_STARTED_TAG = "mri_assets/process_started"
UNFINISHED = [dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
              dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]
SLOT_WAIT_NOTE_S = 300.0
SLOT_RECLAIM_S = 10.0
LOG = logging.getLogger("mri_assets.definitions.local_run")


class StopRequested(BaseException):
    """SIGTERM or SIGINT asked the wave to stop (a BaseException, like KeyboardInterrupt, so no
    `except Exception` swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signal = signal.Signals(signum)


class _StopSignals:
    """SIGTERM and SIGINT stop the wave.

    Outside a Dagster run a handler only records the signal; the runner stops at its next
    `check` (between runs, and at every poll while it waits for a pool slot), so no cleanup is
    ever cut short. During a run Dagster's own handlers take over: they interrupt the step
    running, but Dagster then retries an interrupted step under its RetryPolicy. So a watcher
    thread reads every signal from a wakeup file descriptor (Python writes to it whatever the
    handler), and once a stop is asked it sends SIGINT to this process every `RESEND_S` while
    the run lasts, the first time `RESEND_S` after the signal (so the interrupted attempt's own
    cleanup is not cut short): Dagster keeps it for the next attempt, which then fails as it
    starts, and the run fails after the policy's delays without redoing the work. Only the
    first signal is reported.
    """

    WANTED = (signal.SIGINT, signal.SIGTERM)
    RESEND_S = 2.0

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._in_run = threading.Event()
        self._closed = threading.Event()

    def check(self) -> None:
        if self.received is not None:
            raise StopRequested(self.received)

    @contextmanager
    def during_run(self) -> Iterator[None]:
        self._in_run.set()
        try:
            yield
        finally:
            self._in_run.clear()

    def _note(self, signum: int, _frame=None) -> None:
        if self.received is None and signum in self.WANTED:
            self.received = signal.Signals(signum)

    def _watch(self, read_end: int) -> None:
        last = None  # when a stop was first seen here, then when SIGINT was last sent
        while not self._closed.is_set():
            ready, _, _ = select.select([read_end], [], [], 0.2)
            if ready:
                try:
                    data = os.read(read_end, 512)
                except BlockingIOError:
                    data = b""
                for number in data:
                    self._note(number)
            if self.received is None:
                continue
            now = time.monotonic()
            last = now if last is None else last
            if self._in_run.is_set() and now - last >= self.RESEND_S:
                os.kill(os.getpid(), signal.SIGINT)
                last = now


class _NoStopSignals(_StopSignals):
    """Outside the main thread, or where the caller handles signals (a Dagster op runs the smoke
    wave): nothing is installed; the caller's handlers decide."""

    @contextmanager
    def during_run(self) -> Iterator[None]:
        yield


@contextmanager
def _stop_signals() -> Iterator[_StopSignals]:
    if threading.current_thread() is not threading.main_thread():
        yield _NoStopSignals()
        return
    if signal.getsignal(signal.SIGINT) not in (signal.default_int_handler, signal.SIG_IGN):
        # The caller handles signals (a Dagster op). Dagster's `capture_interrupts` (every
        # in-process run) sets SIGTERM to SIGINT's handler when it ends: leave SIGTERM as the
        # caller had it.
        sigterm = signal.getsignal(signal.SIGTERM)
        try:
            yield _NoStopSignals()
        finally:
            if sigterm is not None:
                signal.signal(signal.SIGTERM, sigterm)
        return
    # A terminal's process, or a script's background job (`cmd &`, SIGINT ignored): both stop on
    # SIGTERM. While the wave runs SIGINT is handled too (a background job gets none from the
    # terminal); the caller's handlers come back at the end.
    stop = _StopSignals()
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    os.set_blocking(write_end, False)
    previous = {number: signal.signal(number, stop._note) for number in stop.WANTED}
    previous_wakeup = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    watcher = threading.Thread(target=stop._watch, args=(read_end,), daemon=True,
                               name="mri-assets-stop-signals")
    watcher.start()
    try:
        yield stop
    finally:
        stop._closed.set()
        watcher.join(timeout=5)
        signal.set_wakeup_fd(previous_wakeup)
        for number, handler in previous.items():
            signal.signal(number, handler)
        os.close(read_end)
        os.close(write_end)


def _stage_job(defs: dg.Definitions, keys: list[dg.AssetKey]) -> dg.JobDefinition:
    """The job `dg.materialize` would build for `keys` (same name, assets and resources)."""
    stage = dg.Definitions(
        jobs=[dg.define_asset_job(EPHEMERAL_JOB, selection=keys)],
        assets=list(defs.assets or []),
        resources=defs.resources or {},
    )
    return stage.resolve_job_def(EPHEMERAL_JOB)


def pooled_steps(defs: dg.Definitions, keys: list[dg.AssetKey]) -> list[tuple[str, str]]:
    """(pool, step key) of every step among `keys` that runs in a concurrency pool."""
    wanted = set(keys)
    found = []
    for assets_def in defs.assets or []:
        if not isinstance(assets_def, dg.AssetsDefinition) or not wanted & set(assets_def.keys):
            continue
        pool = assets_def.op.pool
        if pool:
            found.append((pool, assets_def.op.name))
    return found


def launcher_tags() -> dict[str, str]:
    """Run tags naming this process: what `reclaim_dead_runs` checks to know it is gone."""
    return {
        PID_TAG: str(os.getpid()),
        HOST_TAG: socket.gethostname(),
        PROCESS_STARTED_TAG: f"{psutil.Process().create_time():.2f}",
    }


def launcher_gone(tags: Mapping[str, str]) -> bool | None:
    """True when the process these launcher tags name no longer runs (its pid is free, or taken
    by a process that started at another time); False when it runs; None when unknown (no
    launcher tags, or another host)."""
    try:
        pid, host = int(tags[PID_TAG]), tags[HOST_TAG]
        started = float(tags[PROCESS_STARTED_TAG])
    except (KeyError, ValueError):
        return None
    if host != socket.gethostname():
        return None
    try:
        process = psutil.Process(pid)
        return process.status() == psutil.STATUS_ZOMBIE or abs(process.create_time() - started) > 1
    except psutil.NoSuchProcess:
        return True


def _owners(instance: dg.DagsterInstance) -> Path:
    """Launcher tags of run ids that hold or wait for a pool slot before their run exists."""
    return Path(instance.root_directory) / "local_run_owners"


def _execute(job: dg.JobDefinition, instance: dg.DagsterInstance, partition_key: str | None,
             pooled: list[tuple[str, str]], stop: _StopSignals,
             extra_tags: Mapping[str, str] | None = None) -> dg.ExecuteInProcessResult:
    run_id = str(uuid.uuid4())
    tags = {**(extra_tags or {}), **launcher_tags()}
    owner = _owners(instance) / f"{run_id}.json"
    storage = instance.event_log_storage
    try:
        if pooled and storage.supports_global_concurrency_limits:
            owner.parent.mkdir(parents=True, exist_ok=True)
            owner.write_text(json.dumps(tags))
            claim_pool_slots(instance, run_id, pooled, stop.check)
        with stop.during_run(), _debug_in_run_log():
            return job.execute_in_process(
                run_config=QUIET_CONSOLE, instance=instance, partition_key=partition_key,
                raise_on_error=False, run_id=run_id, tags=tags,
            )
    finally:
        run = instance.get_run_by_id(run_id)
        if run is not None and not run.is_finished:  # an exception or a signal stopped it here
            instance.report_run_failed(run, message="stopped before it could finish (see the "
                                       "command's output: a signal or an error in the runner)")
        if storage.supports_global_concurrency_limits:
            storage.free_concurrency_slots_for_run(run_id)
        owner.unlink(missing_ok=True)


def claim_pool_slots(instance: dg.DagsterInstance, run_id: str, pooled: list[tuple[str, str]],
                     check_stop: Callable[[], None] = lambda: None) -> None:
    """Claim the pool slot of each pooled step for `run_id` (the claims Dagster's own executor
    makes, so it finds them granted). While a slot is taken: sleep, reclaim the slots of dead
    runs every few seconds, say who holds it, and call `check_stop` (which raises to stop)."""
    storage = instance.event_log_storage
    config = storage.get_pool_config()
    if getattr(config.pool_granularity, "value", "op") == "run":
        return  # pools limit whole runs there, which the daemon's run queue enforces
    for pool, step_key in pooled:
        if pool not in {limit.name for limit in storage.get_pool_limits()}:
            if config.default_pool_limit is None:
                continue  # an unlimited pool
            storage.initialize_concurrency_limit_to_default(pool)
        delay, started = 0.1, time.monotonic()
        reclaimed, noted = started, started - SLOT_WAIT_NOTE_S + 2.0  # first note after 2 s
        while not storage.claim_concurrency_slot(pool, run_id, step_key).is_claimed:
            now = time.monotonic()
            if now - reclaimed > SLOT_RECLAIM_S:
                for note in reclaim_dead_runs(instance):
                    LOG.warning(note)
                reclaimed = now
            if now - noted > SLOT_WAIT_NOTE_S:
                LOG.warning(_slot_holders(instance, pool, run_id))
                noted = now
            check_stop()
            time.sleep(delay)
            delay = min(delay * 1.5, 2.0)
            check_stop()


def _slot_holders(instance: dg.DagsterInstance, pool: str, waiting: str) -> str:
    info = instance.event_log_storage.get_concurrency_info(pool)
    holding = [slot.run_id for slot in info.claimed_slots]
    holding += [step.run_id for step in info.pending_steps
                if step.assigned_timestamp is not None and step.run_id not in holding]
    holders = []
    for run_id in holding:
        run = instance.get_run_by_id(run_id)
        if run is None:
            try:
                owner = json.loads((_owners(instance) / f"{run_id}.json").read_text())
                holders.append(f"{run_id} (about to start, pid {owner[PID_TAG]})")
            except (OSError, ValueError, KeyError):
                holders.append(f"{run_id} (no run recorded)")
            continue
        ours = f"pid {run.tags[PID_TAG]}" if PID_TAG in run.tags else "not started by mri-assets"
        holders.append(f"{run_id} ({run.status.value}, {ours})")
    ahead = [step for step in info.pending_steps
             if step.assigned_timestamp is None and step.run_id != waiting]
    queue = f", {len(ahead)} other claim(s) queued" if ahead else ""
    return (f"waiting for a slot of pool {pool!r} (limit {info.limit}), held by "
            f"{', '.join(holders) or 'nobody right now'}{queue}; a run whose process is gone is reclaimed "
            "automatically; one started elsewhere frees its slot when it ends (in the Dagster UI, "
            "terminate it or mark it failed if no process runs it); Ctrl-C stops this wave")


def reclaim_dead_runs(instance: dg.DagsterInstance) -> list[str]:
    """Mark failed the runs a process of this host left unfinished and that process is gone,
    and free the pool slots and queued claims of every run that has ended (whoever ended it:
    Dagster's daemon does this after `free_slots_after_run_end_seconds`, and no daemon runs
    beside `mri-assets run`). Returns one line per change."""
    notes = []
    host_runs = dg.RunsFilter(statuses=UNFINISHED, tags={HOST_TAG: socket.gethostname()})
    for record in instance.get_run_records(filters=host_runs):
        run = record.dagster_run
        if launcher_gone(run.tags):
            message = (f"marked failed at the next start: the process that ran it (pid "
                       f"{run.tags[PID_TAG]} on {run.tags[HOST_TAG]}) is gone (killed or crashed) "
                       f"and left it {run.status.value}")
            instance.report_run_failed(run, message=message)
            notes.append(f"run {run.run_id}: {message}")
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return notes
    owners = _owners(instance)
    holders: set[str] = set()
    for info in storage.get_concurrency_infos(list(storage.get_concurrency_keys())).values():
        holders |= {slot.run_id for slot in info.claimed_slots}
        holders |= {step.run_id for step in info.pending_steps}
    for run_id in sorted(holders):
        run = instance.get_run_by_id(run_id)
        if run is not None:
            ended = run.is_finished
        else:  # claimed by `_execute` before its run exists
            owner = owners / f"{run_id}.json"
            try:
                ended = launcher_gone(json.loads(owner.read_text())) is not False
            except (OSError, ValueError):
                ended = not owner.exists()
        if ended:
            storage.free_concurrency_slots_for_run(run_id)
            owner_file = owners / f"{run_id}.json"
            owner_file.unlink(missing_ok=True)
            notes.append(f"run {run_id}: freed its pool slots "
                         f"({run.status.value if run else 'its process is gone'})")
    for owner in owners.glob("*.json") if owners.is_dir() else []:
        try:
            gone = launcher_gone(json.loads(owner.read_text())) is True
        except (OSError, ValueError):
            gone = False
        if gone:
            owner.unlink(missing_ok=True)
    return notes


def sweep_home(home: MriHome) -> SweepReport:
    """Remove the temporaries that processes which are gone left in the home (see
    `core.temporaries`): atomic-write files anywhere, the scratch folders' entries."""
    return sweep(home.root, [home.store / SCRATCH_FOLDER, home.scratch, home.mlflow / ".scratch"])


def recover_home(home: MriHome, instance: dg.DagsterInstance) -> list[str]:
    """What every start does before running anything: reclaim dead runs, sweep temporaries.
    The lines are logged as warnings (the console shows them) and returned."""
    notes = reclaim_dead_runs(instance)
    swept = sweep_home(home)
    if swept.count:
        notes.append(swept.describe())
    for note in notes:
        LOG.warning(note)
    return notes
