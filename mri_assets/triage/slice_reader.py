"""Reads one 256 px slice from the `slices` shards of a wave and encodes it as PNG.

Layout (docs/internals.md): `slices/{wave}/shard-{ss}.npy` (uint8, N×256×256) and the index
`slices/{wave}/shard-{ss}.parquet` (`image_id`, `row`, ...); the shard of an image is
`int(sha256(image_id)[:8], 16) % n_shards`, where n_shards is the number of index files.
The reader only ever builds keys from a validated wave name and image id.
"""

from __future__ import annotations

import hashlib
import io
import re
import threading

import numpy as np
import polars as pl
from PIL import Image

from mri_assets.resources.object_store import ObjectStore

_WAVE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_IMAGE_ID = re.compile(r"^[0-9a-f]{8,64}$")


class SliceNotFound(LookupError):
    pass


def shard_of(image_id: str, n_shards: int) -> int:
    return int(hashlib.sha256(image_id.encode()).hexdigest()[:8], 16) % n_shards


def slice_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), mode="L").save(buffer, "PNG")
    return buffer.getvalue()


class SliceReader:
    """`reader(wave, image_id) -> PNG bytes` over an object store."""

    def __init__(self, store: ObjectStore):
        self._store = store
        self._indexes: dict[tuple[str, int], dict[str, int]] = {}
        self._n_shards: dict[str, int] = {}
        self._lock = threading.Lock()

    def _shard_count(self, wave: str) -> int:
        if wave not in self._n_shards:
            keys = [i.key for i in self._store.list(f"slices/{wave}/")]
            count = sum(1 for k in keys if re.search(r"/shard-\d+\.parquet$", k))
            if count == 0:
                raise SliceNotFound(f"wave {wave!r} has no slices shards in the store")
            self._n_shards[wave] = count
        return self._n_shards[wave]

    def _rows(self, wave: str, shard: int) -> dict[str, int]:
        if (wave, shard) not in self._indexes:
            path = self._store.local_path(f"slices/{wave}/shard-{shard:02d}.parquet")
            index = pl.read_parquet(path, columns=["image_id", "row"])
            self._indexes[(wave, shard)] = dict(zip(index["image_id"], index["row"], strict=True))
        return self._indexes[(wave, shard)]

    def __call__(self, wave: str, image_id: str) -> bytes:
        if not _WAVE.match(wave) or not _IMAGE_ID.match(image_id):
            raise SliceNotFound(f"not a valid wave/image id: {wave!r}/{image_id!r}")
        with self._lock:
            shard = shard_of(image_id, self._shard_count(wave))
            row = self._rows(wave, shard).get(image_id)
        if row is None:
            raise SliceNotFound(f"image {image_id!r} is not in wave {wave!r}'s slices")
        pixels = np.load(
            self._store.local_path(f"slices/{wave}/shard-{shard:02d}.npy"), mmap_mode="r"
        )
        return slice_png(pixels[row])
