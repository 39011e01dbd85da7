"""The triage server of a PostgreSQL + S3 deployment uses that deployment's stores.

`mri-assets triage add-user` and `mri-assets triage serve` run as the commands a site runs, with
MRI_ASSETS_LABELS_URL on PostgreSQL and the object store on moto_server (versioned bucket). A
clinician's label posted over HTTP is read back by the `expert_labels` asset of the same
deployment, and the image route answers with a slice the pipeline wrote to S3.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import polars as pl
import pytest
from PIL import Image

from mri_assets.core.slice_shards import manifest_key
from mri_assets.definitions import build_defs
from mri_assets.definitions.local_run import dagster_instance, materialize_wave
from mri_assets.deployment import Deployment
from mri_assets.resources.deployed import label_store_for
from mri_assets.resources.object_store import S3ObjectStore
from mri_assets_tests.assets.wave_fixtures import land_sample_wave, materialize
from mri_assets_tests.services import free_port, stop_process
from mri_assets_tests.triage.conftest import CLASSES, PASSWORD, SECRET, log_in

pytestmark = pytest.mark.integration
WAVE = "pilot"


@pytest.fixture
def deployment_env(tmp_path: Path, labels_db: str, s3_endpoint: str, versioned_bucket: str,
                   monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The production shape: labels on PostgreSQL, objects on S3; set here and for subprocesses."""
    settings = {
        "MRI_ASSETS_HOME": str(tmp_path / "home"),
        "MRI_ASSETS_LABELS_URL": labels_db,
        "MRI_ASSETS_S3_BUCKET": versioned_bucket,
        "MRI_ASSETS_S3_PREFIX": "site-a",
        "MRI_ASSETS_S3_ENDPOINT_URL": s3_endpoint,
        "MRI_ASSETS_TRIAGE_SECRET": SECRET,
        "DVC_NO_ANALYTICS": "1",
    }
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    return {**os.environ, **settings}


def _cli(env: dict[str, str], *args: str, stdin: str | None = None) -> None:
    subprocess.run([sys.executable, "-m", "mri_assets.cli", *args], env=env, input=stdin,
                   text=True, check=True, capture_output=True, timeout=300)


def _serving(env: dict[str, str], port: int) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "mri_assets.cli", "triage", "serve", "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"triage serve exited {process.returncode}: {process.stdout.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/login", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.3)
    stop_process(process)
    raise RuntimeError("triage serve did not answer within 120 s")


@pytest.mark.timeout(600)
def test_a_clinicians_label_over_http_reaches_the_pipeline_of_the_same_deployment(
    deployment_env, tmp_path
):
    deployment = Deployment.from_env()
    defs = build_defs(deployment)
    store = defs.resources["object_store"]
    assert isinstance(store, S3ObjectStore)
    instance = dagster_instance(deployment.home.ensure())
    land_sample_wave(store, tmp_path, WAVE, n_slices=24, include_bad=False)
    assert materialize_wave(defs, instance, WAVE, "manifest slices").success
    manifest = pl.read_parquet(io.BytesIO(store.get_bytes(manifest_key(WAVE))))
    ok_ids = manifest.filter(pl.col("status") == "ok")["image_id"].to_list()[:3]
    label_store_for(deployment).enqueue(
        WAVE, [{"image_id": i, "priority": float(n)} for n, i in enumerate(ok_ids)], CLASSES)

    _cli(deployment_env, "triage", "add-user", "alice", "--role", "clinician", "--password-stdin",
         stdin=PASSWORD + "\n")
    assert label_store_for(deployment).annotator_role("alice") == "clinician"
    assert deployment.labels_url_value.startswith("postgresql")

    port = free_port()
    server = _serving(deployment_env, port)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            csrf = log_in(client, "alice")
            item = client.get("/api/next").json()["item"]
            image = client.get(item["image_url"])
            assert image.status_code == 200 and image.headers["content-type"] == "image/png"
            assert Image.open(io.BytesIO(image.content)).size == (256, 256)
            answer = client.post("/api/label", json={"item_id": item["id"], "label": "coronal"},
                                 headers={"X-CSRF-Token": csrf})
            assert answer.status_code == 200, answer.text
    finally:
        stop_process(server)

    result = materialize(defs, instance, ["expert_labels"], WAVE)
    labels = result.output_for_node("expert_labels")
    row = labels.filter(pl.col("annotator") == "alice")
    assert row.height == 1 and row["label"][0] == "coronal"
    assert row["image_id"][0] in ok_ids
