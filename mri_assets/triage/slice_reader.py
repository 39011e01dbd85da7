"""Reads one 256 px slice from the `slices` shards of a wave and encodes it as PNG.

Layout (docs/internals.md): `slices/{wave}/shard-{ss}.npy` (uint8, N×256×256) and the index
`slices/{wave}/shard-{ss}.parquet` (`image_id`, `row`, ...); the shard of an image is the one
the manifest gave it (`shard_for(image_id, n)`, n = the shard count the wave's layout records, not
the deployment's current MRI_ASSETS_SHARDS). The reader only ever builds keys from a validated wave
name and image id.
"""

from __future__ import annotations

import io
import re
import threading

import numpy as np
import polars as pl
from PIL import Image

from mri_assets.core.manifest import shard_for
from mri_assets.core.slice_shards import read_npy
from mri_assets.core.wave_keys import slice_keys
from mri_assets.core.wave_layout import WaveLayoutError, wave_shard_count
from mri_assets.resources.object_store import ObjectStore, ObjectStoreError

_WAVE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_IMAGE_ID = re.compile(r"^[0-9a-f]{24}-[0-9]{5,9}$")  # image_id_for: source sha256 prefix, slice


class SliceNotFound(LookupError):
    pass


def slice_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), mode="L").save(buffer, "PNG")
    return buffer.getvalue()


class SliceReader:
    """`reader(wave, image_id) -> PNG bytes` over an object store."""

    def __init__(self, store: ObjectStore, n_shards: int | None = None):
        self._store = store
        self._n_shards = n_shards  # None: each wave's own count, from its layout
        self._wave_shards: dict[str, int] = {}
        self._indexes: dict[tuple[str, int], dict[str, int]] = {}
        self._lock = threading.Lock()

    @property
    def store(self) -> ObjectStore:
        """The object store read from (the viewer reads the raw objects from it too)."""
        return self._store

    def _rows(self, wave: str, shard: int) -> dict[str, int]:
        if (wave, shard) not in self._indexes:
            try:
                path = self._store.local_path(slice_keys(wave, shard)[1])
            except ObjectStoreError as error:
                raise SliceNotFound(
                    f"wave {wave!r} has no slices shard {shard:02d}: materialize its slices"
                ) from error
            index = pl.read_parquet(path, columns=["image_id", "row"])
            self._indexes[(wave, shard)] = dict(zip(index["image_id"], index["row"], strict=True))
        return self._indexes[(wave, shard)]

    def _shard_count(self, wave: str) -> int:
        if self._n_shards is not None:
            return self._n_shards
        if wave not in self._wave_shards:
            try:
                self._wave_shards[wave] = wave_shard_count(self._store, wave)
            except (WaveLayoutError, ObjectStoreError) as error:
                raise SliceNotFound(f"wave {wave!r} has no layout: {error}") from error
        return self._wave_shards[wave]

    def __call__(self, wave: str, image_id: str) -> bytes:
        if not _WAVE.match(wave) or not _IMAGE_ID.match(image_id):
            raise SliceNotFound(f"not a valid wave/image id: {wave!r}/{image_id!r}")
        with self._lock:
            shard = shard_for(image_id, self._shard_count(wave))
            row = self._rows(wave, shard).get(image_id)
        if row is None:
            raise SliceNotFound(f"image {image_id!r} is not in wave {wave!r}'s slices")
        pixels = read_npy(self._store.local_path(slice_keys(wave, shard)[0]))
        return slice_png(pixels[row])
