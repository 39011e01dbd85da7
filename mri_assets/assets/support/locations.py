"""Where an asset's file lies, as metadata that stays true when MRI_ASSETS_HOME moves.

A local store answers with the object's key (relative to `HOME/store`, so a copied home's
records point into the copy); a remote store with its full URI (`s3://bucket/prefix/key`).
"""

from __future__ import annotations

from mri_assets.resources.object_store import LocalObjectStore, ObjectStore


def stored_at(store: ObjectStore, key: str) -> str:
    return key if isinstance(store, LocalObjectStore) else store.uri(key)
