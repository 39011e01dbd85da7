"""The single `defs` of the deployment profile named by MRI_ASSETS_PROFILE (`local` by default).

A profile changes resources and the executor only; the assets are the same everywhere.
"""

from __future__ import annotations

import os

import dagster as dg

from mri_assets.assets import ingest
from mri_assets.core.home import MriHome
from mri_assets.executors import check_profile, executor_for
from mri_assets.jobs import ingest_wave_job
from mri_assets.resources.object_store import LocalObjectStore, ObjectStore
from mri_assets.resources.settings import IngestSettings
from mri_assets.sensors import wave_sensor

ASSET_MODULES = [ingest]


def _salt() -> str | dg.EnvVar:
    return dg.EnvVar("MRI_ASSETS_SALT") if os.environ.get("MRI_ASSETS_SALT") else IngestSettings().salt


def _object_store(profile: str, home: MriHome) -> ObjectStore:
    bucket = os.environ.get("MRI_ASSETS_S3_BUCKET")
    if profile == "k8s" or bucket:
        from mri_assets.resources.object_store import S3ObjectStore

        return S3ObjectStore(
            bucket=bucket or "mri-assets",
            prefix=os.environ.get("MRI_ASSETS_S3_PREFIX", ""),
            endpoint_url=os.environ.get("MRI_ASSETS_S3_ENDPOINT_URL") or None,
            cache_dir=str(home.cache),
        )
    return LocalObjectStore(root=str(home.store))


def _io_manager(profile: str, home: MriHome):
    if profile == "k8s":
        from dagster_aws.s3 import S3PickleIOManager, S3Resource

        return S3PickleIOManager(
            s3_resource=S3Resource(endpoint_url=os.environ.get("MRI_ASSETS_S3_ENDPOINT_URL")),
            s3_bucket=os.environ.get("MRI_ASSETS_S3_BUCKET", "mri-assets"),
            s3_prefix="dagster-io",
        )
    return dg.FilesystemIOManager(base_dir=str(home.dagster / "storage"))


def resources_for(profile: str, home: MriHome) -> dict:
    return {
        "object_store": _object_store(profile, home),
        "ingest": IngestSettings(salt=_salt()),
        "io_manager": _io_manager(profile, home),
    }


def build_defs(profile: str | None = None, home: MriHome | None = None) -> dg.Definitions:
    profile = check_profile(profile or os.environ.get("MRI_ASSETS_PROFILE", "local"))
    home = home or MriHome.from_env()
    return dg.Definitions(
        assets=dg.load_assets_from_modules(ASSET_MODULES),
        jobs=[ingest_wave_job],
        sensors=[wave_sensor],
        resources=resources_for(profile, home),
        executor=executor_for(profile),
    )


defs = build_defs()
