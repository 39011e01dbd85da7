"""The deployment's object store and label store, for processes inside and outside Dagster.

The Dagster code location, the triage server and the command line all build these two stores
here, from the same `Deployment`, so a clinician's label and the pipeline's reads meet in one
label store, and the triage page reads the slices the pipeline wrote.
"""

from __future__ import annotations

from mri_assets.deployment import Deployment, Secret
from mri_assets.resources.label_store import LabelStore
from mri_assets.resources.object_store import LocalObjectStore, ObjectStore, S3ObjectStore


def object_store_for(deployment: Deployment) -> ObjectStore:
    """S3 (bucket, prefix, endpoint of the deployment) when it uses S3, else `HOME/store`."""
    home = deployment.home
    if deployment.uses_s3:
        settings = deployment.object_store
        return S3ObjectStore(
            bucket=deployment.bucket,
            prefix=settings.prefix,
            endpoint_url=settings.endpoint_url,
            cache_dir=str(home.cache),
        )
    return LocalObjectStore(root=str(home.store))


def label_store_for(deployment: Deployment) -> LabelStore:
    """The deployment's label store (PostgreSQL by URL, else SQLite under HOME)."""
    if deployment.labels_url is None:
        deployment.home.root.mkdir(parents=True, exist_ok=True)
    return LabelStore(url=deployment.labels_url_value)


def secret_config(secret: Secret | None, default: str):
    """A secret as Dagster resource config: `EnvVar(NAME)` where this process's environment holds
    it (so the UI never shows the value), the value where it came from elsewhere, else `default`."""
    import dagster as dg

    if secret is None:
        return default
    return dg.EnvVar(secret.variable) if secret.in_process_env else secret.value


def source_store_for(deployment: Deployment, uri: str) -> ObjectStore:
    """The store a landing source names (folder, `file://` or `s3://bucket/prefix`), reached with
    the deployment's S3 endpoint and region and cached under `HOME/cache`."""
    from mri_assets.resources.object_store import store_from_uri

    settings = deployment.object_store
    return store_from_uri(uri, cache_dir=deployment.home.cache,
                          endpoint_url=settings.source_endpoint_url, region_name=settings.region)
