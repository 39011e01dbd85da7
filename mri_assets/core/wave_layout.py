"""A wave's layout: the facts its files were written with (today: the shard count).

The `manifest` step writes `manifests/WAVE/layout.json` beside the manifest; every reader of the
wave's shards asks `wave_shard_count` instead of the deployment's current MRI_ASSETS_SHARDS, so
changing the setting never hides shards of a wave already written. A wave written before layouts
existed falls back to its manifest's `shard` column.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Protocol

import polars as pl

from mri_assets.core.wave_keys import layout_key, manifest_key

LAYOUT_FORMAT = 1


class WaveLayoutError(ValueError):
    """A layout file that cannot be read, or a wave without manifest."""


class ReadableStore(Protocol):
    def exists(self, key: str) -> bool: ...
    def get_bytes(self, key: str) -> bytes: ...
    def put_bytes(self, key: str, data: bytes) -> object: ...


@dataclass(frozen=True)
class WaveLayout:
    wave: str
    n_shards: int

    def to_json(self) -> bytes:
        return json.dumps({"format": LAYOUT_FORMAT, "wave": self.wave, "n_shards": self.n_shards},
                          sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> WaveLayout:
        try:
            raw = json.loads(data)
            layout = cls(wave=str(raw["wave"]), n_shards=int(raw["n_shards"]))
        except (ValueError, KeyError, TypeError) as error:
            raise WaveLayoutError(f"unreadable wave layout: {error}") from error
        if raw.get("format") != LAYOUT_FORMAT or layout.n_shards < 1:
            raise WaveLayoutError(f"wave layout of {layout.wave!r} has format {raw.get('format')!r} "
                                  f"and {layout.n_shards} shards: expected format {LAYOUT_FORMAT}")
        return layout


def write_wave_layout(store: ReadableStore, layout: WaveLayout) -> str:
    key = layout_key(layout.wave)
    store.put_bytes(key, layout.to_json())
    return key


def wave_layout(store: ReadableStore, wave: str) -> WaveLayout:
    """The wave's recorded layout; for a wave written before layouts, one read off its manifest."""
    key = layout_key(wave)
    if store.exists(key):
        return WaveLayout.from_json(store.get_bytes(key))
    if not store.exists(manifest_key(wave)):
        raise WaveLayoutError(f"wave {wave!r} has no manifest yet: materialize its manifest first")
    shards = pl.read_parquet(io.BytesIO(store.get_bytes(manifest_key(wave))), columns=["shard"])
    top = shards["shard"].max()
    return WaveLayout(wave, int(top) + 1 if top is not None else 1)


def wave_shard_count(store: ReadableStore, wave: str) -> int:
    return wave_layout(store, wave).n_shards
