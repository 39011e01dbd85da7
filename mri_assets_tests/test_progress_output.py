"""What a person watching `mri-assets` sees, and what a run's log in the Dagster UI says, while long
steps work: a bar per stage and per long loop on the command's stderr, progress lines in the run
log, and no DEBUG lines on the console."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from mri_assets.core.home import MriHome
from mri_assets.core.sample_data import build_sample_data
from mri_assets.definitions.local_run import dagster_instance, materialize_wave, without_debug_lines

WAVE = "w"


def _user_lines(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    return [event.user_message for event in instance.all_logs(run_id)
            if not event.is_dagster_event and event.user_message]


@pytest.mark.slow
def test_mri_assets_run_draws_a_bar_per_stage_and_per_shards_images(tmp_path):
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("MRI_ASSETS_HOME", "DAGSTER_HOME")}
    env.update({"MRI_ASSETS_SHARDS": "2", "MRI_ASSETS_BACKBONE_POLICY": "off",
                "DVC_NO_ANALYTICS": "1", "MLFLOW_ENABLE_TELEMETRY": "false"})
    build_sample_data(tmp_path / "sample", n_slices=30, seed=0, include_bad=False)

    def mri_assets(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "mri_assets.cli", "--home", str(home), *args],
                              env=env, text=True, capture_output=True, timeout=900, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    landed = mri_assets("ingest-wave", WAVE, "--source", str(tmp_path / "sample"))
    assert re.search(rf"landing {WAVE}: \d+ files \[", landed.stderr), landed.stderr
    done = mri_assets("run", WAVE, "--select", "manifest slices backbone embeddings")
    frames = re.split(r"[\r\n]", done.stderr)
    # the stage bars: a timer per single run, a bar of shards for the shard stages
    assert any(re.fullmatch(rf"  manifest \[{WAVE}\] \[\d\d:\d\d\]", f) for f in frames), frames
    assert any(re.fullmatch(rf"  slices \[{WAVE}\]: 100%\|.*\| 2/2 shards \[.*\]", f) for f in frames)
    assert any(re.fullmatch(rf"  embeddings \[{WAVE}\]: 100%\|.*\| 2/2 shards \[.*\]", f) for f in frames)
    # the assets' own bars below them: objects decoded, images embedded
    assert any(re.match(rf"manifest {WAVE}: decoding: .*\d+/\d+ objects \[", f) for f in frames)
    assert any(re.match(rf"embeddings {WAVE}/0[01]: .*\d+/\d+ images \[", f) for f in frames)
    assert " - DEBUG - " not in done.stdout + done.stderr

    # under the local profile a wave's shards are one range run per shard asset (as its
    # automation runs them); the bar above still advanced shard by shard
    instance = dg.DagsterInstance.from_config(str(home / "dagster"))
    embedding_runs = [r for r in instance.get_runs()
                      if r.asset_selection == {dg.AssetKey("embeddings")}]
    assert len(embedding_runs) == 1
    lines = _user_lines(instance, embedding_runs[0].run_id)
    for shard in ("00", "01"):
        assert any(re.fullmatch(rf"embeddings {WAVE}/{shard}: started", line)
                   for line in lines), lines
        assert any(re.fullmatch(rf"embeddings {WAVE}/{shard}: done, \d+ images in [0-9.]+ s", line)
                   for line in lines), lines


def _stored_value(tmp_path: Path) -> tuple[dg.Definitions, dg.DagsterInstance]:
    @dg.asset
    def stored() -> int:
        return 7

    defs = dg.Definitions(assets=[stored])
    instance = dagster_instance(MriHome(tmp_path / "home"))
    return defs, instance


def test_a_value_loaded_outside_a_run_prints_debug_lines_unless_without_debug_lines(
        tmp_path, capfd):
    defs, instance = _stored_value(tmp_path)
    assert materialize_wave(defs, instance, "w").success
    capfd.readouterr()
    assert defs.load_asset_value("stored", instance=instance) == 7
    assert " - DEBUG - system - Loading file from" in capfd.readouterr().err  # as in the demo
    before = logging.root.manager.disable
    with without_debug_lines():
        assert defs.load_asset_value("stored", instance=instance) == 7
    assert " - DEBUG - " not in capfd.readouterr().err
    assert logging.root.manager.disable == before


def test_runs_started_without_debug_lines_keep_their_debug_records_in_the_event_log(tmp_path):
    defs, instance = _stored_value(tmp_path)
    with without_debug_lines():
        report = materialize_wave(defs, instance, "w")
    assert report.success
    debug = [e.user_message for e in instance.all_logs(report.runs[0])
             if e.level == logging.DEBUG and not e.is_dagster_event]
    assert any(line.startswith("Writing file at:") for line in debug), debug


@pytest.mark.slow
def test_the_backbone_run_log_has_a_line_per_tenth_of_the_pretraining_steps(
        mri_home, tmp_path, monkeypatch):
    from mri_assets.assets.backbone import PretrainSettings
    from mri_assets.assets.support.partitions import wave_shard_key
    from mri_assets.core import progress
    from mri_assets.core.wave_layout import wave_shard_count
    from mri_assets_tests.assets.wave_fixtures import land_sample_wave, local_defs, materialize

    monkeypatch.setattr(progress, "LOG_AFTER_S", 0.0)  # the tiny schedule lasts seconds, not minutes
    defs = local_defs(mri_home)
    store = defs.resources["object_store"]
    land_sample_wave(store, tmp_path, "pilot", n_slices=40, seed=0, include_bad=False)
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        materialize(defs, instance, ["manifest"], "pilot")
        for shard in range(wave_shard_count(store, "pilot")):
            materialize(defs, instance, ["slices"], wave_shard_key("pilot", shard))
        tiny = PretrainSettings(policy="first", epochs=2, batch_size=8, min_slices=0)
        result = materialize(defs, instance, ["backbone"], "pilot", resources={"pretrain": tiny})
        lines = _user_lines(instance, result.run_id)
    steps = int(re.search(r"backbone pilot: pretraining: started, (\d+) steps to do",
                          "\n".join(lines)).group(1))
    marks = [int(m.group(1)) for line in lines if (m := re.fullmatch(
        rf"backbone pilot: pretraining: (\d+)/{steps} steps \(\d+ %\), loss [0-9.]+.*", line))]
    assert len(marks) >= 2 and marks == sorted(marks) and marks[-1] == steps, lines
    assert any(re.fullmatch(rf"backbone pilot: pretraining: done, {steps} steps in [0-9.]+ s; "
                            r"loss [0-9.]+.*", line) for line in lines), lines


def test_a_bar_shows_its_total_and_its_end_even_when_the_loop_is_shorter_than_tqdms_interval():
    """A small shard's images pass in one batch well inside tqdm's 0.5 s between frames: the bar
    must still show `0/N` once the total is known and `N/N` at the end, before `close` clears it."""
    import io

    from mri_assets.core.progress import Progress, terminal_bars

    stream = io.StringIO()
    with terminal_bars(stream), Progress("embeddings w/00", "images") as shown:
        shown(0, 15)
        shown(15, 15)
    frames = re.split(r"[\r\n]", stream.getvalue())
    assert any(re.match(r"embeddings w/00: .*\b0/15 images \[", f) for f in frames), frames
    assert any(re.match(r"embeddings w/00: 100%\|.*\| 15/15 images \[", f) for f in frames), frames
