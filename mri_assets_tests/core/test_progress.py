"""`core.progress`: the run-log lines and terminal bars of long steps, and the loops' hooks."""

from __future__ import annotations

import io
import re
import time

import numpy as np
import pytest
import torch

from mri_assets.core import progress as progress_module
from mri_assets.core.embed import embed_shard
from mri_assets.core.progress import Progress, terminal_bars, terminal_stream


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_long_step_logs_its_start_a_line_per_tenth_of_the_total_and_its_end():
    clock, lines = Clock(), []
    with Progress("backbone pilot: pretraining", "steps", 40, log=lines.append,
                  clock=clock) as shown:
        for step in range(1, 41):
            clock.now += 3.0  # 3 s a step: the step runs 120 s
            shown(step, loss=4.0 - step / 20)
    assert lines[0] == "backbone pilot: pretraining: started, 40 steps to do"
    marks = [int(m.group(1)) for line in lines[1:-1]
             if (m := re.match(r"backbone pilot: pretraining: (\d+)/40 steps \(\d+ %\), loss ", line))]
    assert len(marks) == len(lines) - 2, lines
    # quiet for the first LOG_AFTER_S (10 s: three steps), then one line per 4 steps
    assert marks == [4, 8, 12, 16, 20, 24, 28, 32, 36, 40]
    assert "about 84 s left" in lines[3]  # 12 steps in 36 s, 28 to go at 3 s each
    assert lines[-1] == "backbone pilot: pretraining: done, 40 steps in 120.0 s; loss 2"


def test_a_short_step_logs_only_its_start_and_end():
    clock, lines = Clock(), []
    with Progress("embeddings pilot/00", "images", 500, log=lines.append, clock=clock) as shown:
        for done in range(50, 501, 50):
            clock.now += 0.2
            shown(done)
    assert lines == ["embeddings pilot/00: started, 500 images to do",
                     "embeddings pilot/00: done, 500 images in 2.0 s"]


def test_without_a_total_a_line_comes_at_least_every_log_every_s():
    clock, lines = Clock(), []
    with Progress("landing pilot", "files", log=lines.append, log_every_s=60.0,
                  clock=clock) as shown:
        for _ in range(300):
            clock.now += 1.0
            shown.advance()
    between = lines[1:-1]
    assert [line.split(":")[1].strip() for line in between] == [
        "60 files, 60 s elapsed", "120 files, 120 s elapsed", "180 files, 180 s elapsed",
        "240 files, 240 s elapsed", "300 files, 300 s elapsed"]


def test_a_step_that_fails_says_stopped_not_done():
    lines = []
    with pytest.raises(RuntimeError), Progress("classifier pilot: stage 2", "steps", 10,
                                               log=lines.append) as shown:
        shown(3)
        raise RuntimeError("boom")
    assert lines[-1].startswith("classifier pilot: stage 2: stopped after 3 steps in ")


def test_the_pretraining_hook_takes_step_entries_and_epoch_entries():
    shown = Progress("backbone pilot", "steps", bar=False)
    shown.pretraining_entry({"step": 7, "steps": 168, "loss": 3.5, "seconds": 40.0})
    assert (shown.done, shown.total, shown.figures) == (7, 168, {"loss": 3.5})
    by_epoch = Progress("backbone pilot", "steps", 168, bar=False)
    by_epoch.pretraining_entry({"epoch": 1, "loss": 3.1, "steps": 28, "seconds": 190.0})
    assert (by_epoch.done, by_epoch.total, by_epoch.figures) == (28, 168, {"loss": 3.1, "epoch": 2})


def test_bars_are_drawn_only_where_the_process_shows_them():
    outside = Progress("manifest pilot: decoding", "objects", 20)
    outside(5)
    outside.close()
    assert terminal_stream() is None
    stream = io.StringIO()
    with terminal_bars(stream):
        with Progress("manifest pilot: decoding", "objects", 20, leave=True) as shown:
            shown(20)
        with Progress("  clusters [pilot]", None, leave=True):
            pass
    assert terminal_stream() is None
    drawn = stream.getvalue()
    assert re.search(r"manifest pilot: decoding: 100%\|.*\| 20/20 objects \[", drawn), drawn
    assert "  clusters [pilot] [00:00]\n" in drawn
    assert "ETA" not in drawn and "?" in drawn  # the first frame has no rate yet


def test_the_heartbeat_redraws_a_bar_whose_unit_takes_long(monkeypatch):
    monkeypatch.setattr(progress_module, "HEARTBEAT_S", 0.05)
    stream = io.StringIO()
    with terminal_bars(stream), Progress("backbone pilot: pretraining", "steps", 100) as shown:
        shown(1)
        drawn = len(stream.getvalue())
        deadline = time.monotonic() + 10.0
        while len(stream.getvalue()) == drawn and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(stream.getvalue()) > drawn, "no redraw while no step ended"
    assert shown.done == 1


def test_bars_reach_the_commands_stderr_while_a_run_captures_the_process_stderr(capfd, tmp_path):
    """A Dagster run in this process points file descriptor 2 at its compute-log file (and
    mirrors it with `tail`); the bars go to the copy of stderr taken when the command began."""
    import os

    with terminal_bars() as stream:
        assert stream is terminal_stream()
        saved = os.dup(2)
        with open(tmp_path / "captured.err", "w") as captured:
            os.dup2(captured.fileno(), 2)
            try:
                with Progress("landing pilot", "files", 3, leave=True) as shown:
                    shown(3)
            finally:
                os.dup2(saved, 2)
                os.close(saved)
    assert "landing pilot: 100%" in capfd.readouterr().err
    assert (tmp_path / "captured.err").read_text() == ""


def test_embed_shard_reports_the_images_done_after_every_batch(tmp_path):
    from mri_assets.core.backbone import build_backbone
    from mri_assets_tests.core.test_embed import _mni_slices, _write_shard

    pixels = _mni_slices(5)
    npy, index = _write_shard(tmp_path, pixels, np.arange(5))
    calls = []
    result = embed_shard(npy, index, build_backbone(seed=0), torch.device("cpu"), "fp32", batch_size=2,
                         num_workers=0, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(0, 5), (2, 5), (4, 5), (5, 5)]
    assert result.images == 5


def test_train_two_stage_reports_every_stage2_step_with_its_loss():
    from mri_assets.core.training.two_stage import train_two_stage
    from mri_assets_tests.core.training.pattern_fixtures import FAST, build_model, pattern_data

    calls, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # several times faster on the shared 2-core machine
    try:
        train_two_stage(build_model(), pattern_data(4, train_seed=1, eval_seed=2), FAST,
                        progress=lambda done, total, **figures: calls.append((done, total, figures)))
    finally:
        torch.set_num_threads(threads)
    # 16 rows, batches of 8, one stage-2 epoch: two steps
    assert [(done, total) for done, total, _ in calls] == [(1, 2), (2, 2)]
    assert all(np.isfinite(figures["loss"]) and figures["epoch"] == 1 for *_, figures in calls)
