"""The nightly smoke run end to end through `mri-assets smoke`, on a small sample and 2 shards.

Each command runs in a subprocess: the shard count is read when `mri_assets.assets.support.partitions` is
imported, and 2 shards keep the runs short. The reference is written to a temp folder, never to
the committed one.
"""

import gzip
import io
import os
import subprocess
import sys
import textwrap
from datetime import UTC
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from mri_assets.core.embed import read_embeddings, write_embeddings
from mri_assets.core.sample_data import build_sample_data

pytestmark = pytest.mark.slow

SLICES = 60
SHARDS = "2"


def _env(home: Path) -> dict[str, str]:
    env = {**os.environ, "MRI_ASSETS_HOME": str(home), "MRI_ASSETS_SHARDS": SHARDS,
           "DVC_NO_ANALYTICS": "1"}
    env.pop("PUSHGATEWAY_URL", None)
    return env


def _smoke(home: Path, reference_dir: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mri_assets.cli", "smoke", "--slices", str(SLICES),
         "--reference-dir", str(reference_dir), *flags],
        env=_env(home), capture_output=True, text=True, timeout=900, check=False,
    )


def _manifest(home: Path) -> pl.DataFrame:
    return pl.read_parquet(home / "store" / "manifests" / "smoke" / "manifest.parquet")


def _recompress_sample(sample: Path) -> int:
    """Re-save every PNG at another zlib level and re-gzip every NIfTI at another level: what
    another zlib or Pillow build writes. Pixels stay; bytes (so sha256 and image_id) change."""
    changed = 0
    for path in sorted(sample.rglob("*.png")):
        if path.stat().st_size == 0:
            continue
        buffer = io.BytesIO()
        Image.open(path).save(buffer, format="PNG", compress_level=1)
        changed += buffer.getvalue() != path.read_bytes()
        path.write_bytes(buffer.getvalue())
    for path in sorted(sample.rglob("*.nii.gz")):
        again = gzip.compress(gzip.decompress(path.read_bytes()), compresslevel=1, mtime=0)
        changed += again != path.read_bytes()
        path.write_bytes(again)
    return changed


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
    manifest = _manifest(home).filter(pl.col("image_id") == ids[0]).row(0, named=True)
    key = f"{manifest['source_key'].removeprefix('raw/smoke/')}#{manifest['slice_index']}"
    assert key in result.stdout


def test_recompressed_inputs_still_reproduce_the_reference(tmp_path, clean_run, reference_dir):
    """A platform change (other compression of the same pixels) is not a pipeline change."""
    clean_home, first = clean_run
    assert first.returncode == 0, first.stdout + first.stderr
    home = tmp_path / "home"
    build_sample_data(home / "sample" / f"smoke-{SLICES}-0", SLICES, 0, wave_style="t1")
    changed_files = _recompress_sample(home / "sample" / f"smoke-{SLICES}-0")

    result = _smoke(home, reference_dir)

    assert changed_files > 5
    assert result.returncode == 0, result.stdout + result.stderr
    assert "smoke: PASS" in result.stdout
    new_ids = set(_manifest(home)["image_id"]) - set(_manifest(clean_home)["image_id"])
    assert len(new_ids) >= changed_files


CHANGED_WINDOW_RUN = textwrap.dedent("""
    import sys
    from pathlib import Path

    import dagster as dg

    from mri_assets.definitions import build_defs
    from mri_assets.deployment import Deployment
    from mri_assets.definitions.local_run import dagster_instance
    from mri_assets.definitions.smoke_run import run_smoke

    deployment = Deployment.from_env()
    defs = build_defs(deployment)
    ingest = defs.resources["ingest"].model_copy(
        update={"window_low_percentile": 1.0, "window_high_percentile": 99.0})
    defs = dg.Definitions(assets=list(defs.assets), resources={**defs.resources, "ingest": ingest})
    report = run_smoke(defs, dagster_instance(deployment.home), deployment.home,
                       reference_dir=Path(sys.argv[1]), n_slices=int(sys.argv[2]))
    print(f"smoke: {'PASS' if report.passed else 'FAIL'}: {report.detail}")
    print(report.metadata.get("mismatches"))
    sys.exit(0 if report.passed else 1)
""")


def test_a_changed_percentile_window_fails_naming_the_slices(tmp_path, reference_dir):
    """A real pipeline change (window 1/99 instead of 0.5/99.5) fails on any machine: the
    manifest's stored-slice checksums are compared exactly, keyed by object and slice."""
    result = subprocess.run(
        [sys.executable, "-c", CHANGED_WINDOW_RUN, str(reference_dir), str(SLICES)],
        env=_env(tmp_path / "home"), capture_output=True, text=True, timeout=900, check=False,
    )

    assert result.returncode == 1, result.stdout + result.stderr
    assert "smoke: FAIL" in result.stdout
    assert "slices (object#slice) added, removed or changed" in result.stdout
    assert "patient-0001/" in result.stdout and ".png#0" in result.stdout


def test_the_nightly_schedule_requests_one_smoke_run_per_utc_day():
    from datetime import datetime

    import dagster as dg

    from mri_assets.definitions.smoke_run import nightly_smoke_schedule

    night = datetime(2026, 11, 26, 2, 30, tzinfo=UTC)
    request = nightly_smoke_schedule(dg.build_schedule_context(scheduled_execution_time=night))

    assert nightly_smoke_schedule.execution_timezone == "UTC"
    assert nightly_smoke_schedule.job_name == "nightly_smoke"
    assert request.run_key == "nightly-smoke:2026-11-26"


def test_the_committed_reference_reproduces_on_a_clean_home(tmp_path):
    """What CI runs nightly: 1,000 sample slices against `mri_assets/smoke/` (made with the
    default 16 shards: the KMeans sample follows shard order), on whatever CPU CI has: exact on
    the reference's device type, within the measured tolerances on any other."""
    env = {**os.environ, "MRI_ASSETS_HOME": str(tmp_path / "home"), "DVC_NO_ANALYTICS": "1",
           "MRI_ASSETS_SHARDS": "16"}
    env.pop("PUSHGATEWAY_URL", None)
    result = subprocess.run([sys.executable, "-m", "mri_assets.cli", "smoke"], env=env,
                            capture_output=True, text=True, timeout=1200, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "smoke: PASS" in result.stdout
