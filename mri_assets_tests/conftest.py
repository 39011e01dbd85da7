"""Shared fixtures: a per-test MRI_ASSETS_HOME, and real services started once per session."""

from __future__ import annotations

import os

os.environ.setdefault("MRI_ASSETS_SHARDS", "4")  # before mri_assets.assets.support.partitions is imported
# The suite embeds with the seeded weights; the self-supervised backbone (the users' default)
# is trained by the tests about it (assets/test_backbone_asset.py, the hands-off wave).
os.environ.setdefault("MRI_ASSETS_BACKBONE_POLICY", "off")

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mri_assets_tests import services

S3_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
S3_UNSET_ENV = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE")


@pytest.fixture
def mri_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh MRI_ASSETS_HOME for one test, set in the environment."""
    home = tmp_path / "mri_home"
    home.mkdir()
    monkeypatch.setenv("MRI_ASSETS_HOME", str(home))
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    return home


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server for the session, with test credentials in the environment.

    The credentials stay set until the session ends, so subprocesses that tests start reach the
    server too. The endpoint itself is not put in AWS_ENDPOINT_URL: tests pass it explicitly.
    """
    with pytest.MonkeyPatch.context() as patch:
        for name, value in S3_TEST_ENV.items():
            patch.setenv(name, value)
        for name in S3_UNSET_ENV:
            patch.delenv(name, raising=False)
        with services.moto_server() as endpoint:
            yield endpoint


def _s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


@pytest.fixture
def versioned_bucket(s3_endpoint: str) -> str:
    """A fresh bucket on the moto server with versioning enabled; returns its name."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    client = _s3_client(s3_endpoint)
    client.create_bucket(Bucket=name)
    client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name


@pytest.fixture
def plain_bucket(s3_endpoint: str) -> str:
    """A fresh bucket on the moto server without versioning; returns its name."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    _s3_client(s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with services.redis_server() as url:
        yield url


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    with services.postgres_server() as url:
        yield url


@pytest.fixture(scope="session")
def pushgateway_url() -> Iterator[str]:
    with services.pushgateway() as url:
        yield url


@pytest.fixture
def labels_db(postgres_url: str) -> Iterator[str]:
    """A fresh database on the session's PostgreSQL server; its URL."""
    import sqlalchemy as sa

    name = f"labels_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    yield postgres_url.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f"DROP DATABASE {name} WITH (FORCE)")
    admin.dispose()
