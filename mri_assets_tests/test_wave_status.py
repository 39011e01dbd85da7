"""What a wave's runs wait for, said in words: the run limit, a pool's slots, runs ahead."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import dagster as dg

from mri_assets.definitions.wave_status import WAITING_TAG, run_waits, wave_waits_sensor

WAVE = "w1"


@dg.op
def noop() -> None:
    pass


@dg.job
def stage():
    noop()


def _run(instance: dg.DagsterInstance, status: dg.DagsterRunStatus, wave: str) -> str:
    run = dg.DagsterRun(job_name=stage.name, run_id=str(uuid.uuid4()),
                        status=dg.DagsterRunStatus.NOT_STARTED, tags={"dagster/partition": wave})
    instance.run_storage.add_run(run)
    instance.run_storage.handle_run_event(run.run_id, dg.DagsterEvent(
        event_type_value=dg.DagsterEventType.RUN_START.value, job_name=stage.name))
    assert instance.get_run_by_id(run.run_id).status == status
    return run.run_id


@dataclass
class Queued:
    """A queued run as `run_waits` reads it (a real one needs a code location's origin)."""
    run_id: str
    job_name: str = "stage"
    status: dg.DagsterRunStatus = dg.DagsterRunStatus.QUEUED
    tags: dict = field(default_factory=lambda: {"dagster/partition": WAVE})


def test_runs_say_what_they_wait_for(tmp_path):
    with dg.DagsterInstance.local_temp(str(tmp_path), overrides={
            "concurrency": {"runs": {"max_concurrent_runs": 2}}}) as instance:
        storage = instance.event_log_storage
        storage.set_concurrency_slots("gpu", 1)
        holder = _run(instance, dg.DagsterRunStatus.STARTED, "w0")
        first = _run(instance, dg.DagsterRunStatus.STARTED, WAVE)
        second = _run(instance, dg.DagsterRunStatus.STARTED, WAVE)
        assert storage.claim_concurrency_slot("gpu", holder, "embeddings").is_claimed
        assert not storage.claim_concurrency_slot("gpu", first, "embeddings").is_claimed
        time.sleep(1.1)  # the slot queue's order: its enqueue time, kept to the second
        assert not storage.claim_concurrency_slot("gpu", second, "embeddings").is_claimed

        words = {wait.run_id: wait.waiting_for for wait in run_waits(instance, WAVE)}
        assert words == {
            first: "queued behind the `gpu` pool (1 slot), 1 run ahead",
            second: "queued behind the `gpu` pool (1 slot), 2 runs ahead",
        }
        started = list(reversed(instance.get_runs()))
        queued = run_waits(instance, WAVE, runs=[*started, Queued("q1"), Queued("q2")])
        assert [(w.run_id, w.waiting_for) for w in queued[-2:]] == [
            ("q1", "queued behind the run limit (2 runs at once), 3 runs ahead"),
            ("q2", "queued behind the run limit (2 runs at once), 4 runs ahead")]
        assert next(w.run_id for w in run_waits(instance)) == holder

        alone = run_waits(instance, runs=[Queued("q0")])
        assert [w.waiting_for for w in alone] == ["queued, next to start (the run queue's next pass)"]

        context = dg.build_sensor_context(instance=instance)
        wave_waits_sensor(context)
        assert instance.get_run_by_id(second).tags[WAITING_TAG] == words[second]
        assert instance.get_run_by_id(holder).tags[WAITING_TAG] == "running"

        # A run that has ended no longer says it waits or runs.
        instance.run_storage.handle_run_event(holder, dg.DagsterEvent(
            event_type_value=dg.DagsterEventType.RUN_SUCCESS.value, job_name=stage.name))
        later = dg.build_sensor_context(instance=instance, cursor=context.cursor)
        wave_waits_sensor(later)
        assert instance.get_run_by_id(holder).tags[WAITING_TAG] == "finished (success)"
        assert instance.get_run_by_id(first).tags[WAITING_TAG] != "finished (success)"
        assert holder not in later.cursor and first in later.cursor


def test_mri_assets_status_prints_each_unfinished_run_of_a_wave(tmp_path, capsys):
    from mri_assets.cli.main import main
    from mri_assets.core.home import MriHome
    from mri_assets.definitions.local_run import dagster_instance

    home = tmp_path / "home"
    assert main(["--home", str(home), "status", WAVE]) == 0
    assert capsys.readouterr().out.strip() == f"no unfinished run of wave {WAVE}"
    instance = dagster_instance(MriHome(home))
    running = _run(instance, dg.DagsterRunStatus.STARTED, WAVE)
    _run(instance, dg.DagsterRunStatus.STARTED, "w0")
    assert main(["--home", str(home), "status", WAVE]) == 0
    assert capsys.readouterr().out.strip() == f"{running[:8]} stage [{WAVE}]: running"
    assert main(["--home", str(home), "status"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
