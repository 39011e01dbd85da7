"""The nightly smoke run end to end through `mri-assets smoke`, on a small sample and 2 shards.

Each command runs in a subprocess: the shard count is read when `mri_assets.partitions` is
imported, and 2 shards keep the runs short. The reference is written to a temp folder, never to
the committed one.
"""

import os
import subprocess
import sys
from datetime import UTC
from pathlib import Path

import numpy as np
import pytest

from mri_assets.core.embed import read_embeddings, write_embeddings

pytestmark = pytest.mark.slow

SLICES = 60
SHARDS = "2"


def _smoke(home: Path, reference_dir: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MRI_ASSETS_HOME": str(home), "MRI_ASSETS_SHARDS": SHARDS,
           "DVC_NO_ANALYTICS": "1"}
    env.pop("PUSHGATEWAY_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "mri_assets.cli", "smoke", "--slices", str(SLICES),
         "--reference-dir", str(reference_dir), *flags],
        env=env, capture_output=True, text=True, timeout=900, check=False,
    )


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("reference")
    made = _smoke(tmp_path_factory.mktemp("home-reference"), folder, "--update-reference")
    assert made.returncode == 0, made.stdout + made.stderr
    return folder


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, reference_dir) -> tuple[Path, subprocess.CompletedProcess]:
    home = tmp_path_factory.mktemp("home-clean")
    return home, _smoke(home, reference_dir)


def test_update_reference_writes_the_fingerprint_and_its_embeddings(reference_dir):
    names = sorted(p.name for p in reference_dir.iterdir())
    assert len(names) == 2
    assert names[0].startswith("reference-cpu-") and names[0].endswith(".embeddings.npz")
    assert names[1].endswith(".json")


def test_a_clean_run_in_a_fresh_home_reproduces_the_reference(clean_run):
    _, result = clean_run
    assert result.returncode == 0, result.stdout + result.stderr
    assert "smoke: PASS" in result.stdout


def test_one_changed_embedding_byte_fails_the_check_naming_the_image(clean_run, reference_dir):
    home, first = clean_run
    assert first.returncode == 0, first.stdout + first.stderr
    shard = home / "store" / "embeddings" / "smoke" / "shard-00.arrow"
    ids, vectors, meta = read_embeddings(shard)
    raw = vectors.copy().view(np.uint8)
    raw[0, 0] ^= 0x01
    write_embeddings(shard, ids, raw.view(np.float16), meta["model_id"])

    result = _smoke(home, reference_dir, "--check-only")

    assert result.returncode == 1, result.stdout + result.stderr
    assert "smoke: FAIL" in result.stdout
    assert "embedding bytes differ on the same device type" in result.stdout
    assert ids[0] in result.stdout


def test_the_nightly_schedule_requests_one_smoke_run_per_utc_day():
    from datetime import datetime

    import dagster as dg

    from mri_assets.smoke_run import nightly_smoke_schedule

    night = datetime(2026, 11, 26, 2, 30, tzinfo=UTC)
    request = nightly_smoke_schedule(dg.build_schedule_context(scheduled_execution_time=night))

    assert nightly_smoke_schedule.execution_timezone == "UTC"
    assert nightly_smoke_schedule.job_name == "nightly_smoke"
    assert request.run_key == "nightly-smoke:2026-11-26"


def test_the_committed_reference_reproduces_on_a_clean_home(tmp_path):
    """What CI runs nightly: 1,000 sample slices against `mri_assets/smoke/` (made with the
    default 16 shards: the KMeans sample follows shard order)."""
    env = {**os.environ, "MRI_ASSETS_HOME": str(tmp_path / "home"), "DVC_NO_ANALYTICS": "1",
           "MRI_ASSETS_SHARDS": "16"}
    env.pop("PUSHGATEWAY_URL", None)
    result = subprocess.run([sys.executable, "-m", "mri_assets.cli", "smoke"], env=env,
                            capture_output=True, text=True, timeout=1200, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "smoke: PASS" in result.stdout
