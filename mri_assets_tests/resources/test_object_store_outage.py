"""Outages that speak: an S3 endpoint that stops answering fails a command within two minutes,
naming the endpoint, with each retry said on the console while it happens."""

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import pytest

from mri_assets.resources.object_store import (
    S3_CONNECT_TIMEOUT_S,
    S3_MAX_ATTEMPTS,
    S3_READ_TIMEOUT_S,
    ObjectStoreError,
    S3ObjectStore,
)
from mri_assets_tests import services


def test_the_default_budget_fits_two_minutes_even_for_a_step_dagster_retries_twice():
    # a dead endpoint either refuses to connect (connect timeout) or accepts and never answers
    # (read timeout); botocore's standard backoff adds at most 2 + 4 s between three attempts
    one_call = S3_MAX_ATTEMPTS * max(S3_CONNECT_TIMEOUT_S, S3_READ_TIMEOUT_S) + 6
    assert one_call <= 40
    assert 3 * one_call + 2 * 5 < 120  # embeddings: RetryPolicy(max_retries=2, delay=5)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("endpoint_url", "localhost:9000", "not an http(s) URL"),
    ("max_attempts", 0, "must be 1 to 10"),
    ("read_timeout_s", 0, "must be in (0, 600]"),
])
def test_s3_settings_that_cannot_work_are_refused_in_one_line(field, value, message):
    store = S3ObjectStore(bucket="b", **{field: value})
    with pytest.raises(ObjectStoreError) as info:
        store.exists("k")
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.integration
@pytest.mark.slow
def test_a_stopped_s3_server_fails_ingest_wave_within_two_minutes_naming_the_endpoint(
        s3_endpoint, tmp_path):
    # a server of its own (the session's stays up for the other tests), stopped with SIGSTOP:
    # connections are still accepted by the kernel, nothing ever answers
    port = services.free_port()
    url = f"http://127.0.0.1:{port}"
    command = [services._venv_binary("moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with tempfile.TemporaryDirectory(prefix="moto-") as workdir, services._running(
            command, "moto_server", services._http_answers(f"{url}/moto-api/"),
            Path(workdir)) as server:
        client = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
        client.create_bucket(Bucket="landing")
        client.put_object(Bucket="landing", Key="site-a/scan.png", Body=b"not looked at")
        env = {**os.environ, "MRI_ASSETS_S3_ENDPOINT_URL": url, "MRI_ASSETS_HOME": str(tmp_path)}
        env.pop("MRI_ASSETS_S3_BUCKET", None)
        os.kill(server.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            done = subprocess.run(
                [sys.executable, "-m", "mri_assets.cli", "ingest-wave", "w1", "--source",
                 "s3://landing/site-a"], env=env, capture_output=True, text=True, timeout=170,
                check=False,
                cwd=tmp_path)
            elapsed = time.monotonic() - started
        finally:
            os.kill(server.pid, signal.SIGCONT)
    assert done.returncode != 0, done.stdout
    assert elapsed < 120, elapsed
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and url in errors[0] and "stopped answering" in errors[0], done.stderr
    retries = [line for line in done.stderr.splitlines() if "retrying" in line]
    assert len(retries) == S3_MAX_ATTEMPTS - 1 and all(url in line for line in retries)
    assert "attempt 1 of 3" in retries[0]
