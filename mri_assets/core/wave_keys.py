"""Every object-store key of a wave, built and taken apart in this one module.

The layout table of docs/internals.md, as code: a wave's raw landing (its objects, listing and
marker), staging, slices, manifest and layout, backbone, embeddings, PCA, clusters, classifier
checkpoint, baseline report and ground truth. Keys are '/'-separated and relative to the store
root (a local folder, or `bucket/prefix` in S3). Pure string work, no store: the reader and
writer over a store is `resources.wave_store.WaveStore`. `test_architecture` fails on a key
f-string or path join anywhere else in the package.

`wave_of_key` is the inverse: the wave a key belongs to, read from its place in the layout, so
no caller guesses a wave from folder or file names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

WAVE_KEY_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
WAVE_KEY_MAX_LENGTH = 64

RAW_ROOT = "raw/"
READY_MARKER = "_READY"
LANDED_LISTING = "_LANDED.parquet"
TRUTH_NAME = "labels.csv"

# Roots whose second segment is the wave: `ROOT/WAVE/...`.
_WAVE_FOLDERS = ("raw", "staging", "slices", "manifests", "embeddings", "clusters")
# `models/KIND/WAVE.EXT`: the kinds and the extensions each is stored with.
_MODEL_FILES = {
    "pca": (".npz",),
    "classifier": (".pt",),
    "backbone": (".json", ".pt"),
    "baseline": (".json",),
}


class WaveKeyError(ValueError):
    """A wave key that Dagster partitions and store paths cannot carry."""


def validate_wave_key(wave: str) -> str:
    if wave and len(wave) > WAVE_KEY_MAX_LENGTH:
        raise WaveKeyError(
            f"invalid wave key {wave[:20]!r}… of {len(wave)} characters: at most "
            f"{WAVE_KEY_MAX_LENGTH}, lower-case letters, digits, '.', '_' or '-' (e.g. 'full-1')"
        )
    if not WAVE_KEY_PATTERN.match(wave or ""):
        raise WaveKeyError(
            f"invalid wave key {wave!r}: use lower-case letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (for example 'pilot' or 'full-1'); no commas"
        )
    return wave


def shard_name(shard: int) -> str:
    return f"shard-{shard:02d}"


def _join(*parts: str) -> str:
    return "/".join(parts)


def _model_key(kind: str, wave: str, extension: str) -> str:
    return _join("models", kind, wave + extension)


# Landing -----------------------------------------------------------------------------------

def raw_prefix(wave: str) -> str:
    """`raw/WAVE/`: the wave's landing area (the wave key is validated)."""
    return _join("raw", validate_wave_key(wave), "")


def raw_key(wave: str, relative: str) -> str:
    """The landed object at `relative` (its path below the landed folder)."""
    return raw_prefix(wave) + relative


def landing_marker_key(wave: str) -> str:
    """`raw/WAVE/_READY`, written last by a landing."""
    return raw_key(wave, READY_MARKER)


def landing_listing_key(wave: str) -> str:
    """`raw/WAVE/_LANDED.parquet`: key, size and sha256 of every landed object."""
    return raw_key(wave, LANDED_LISTING)


def landing_keys(wave: str) -> tuple[str, str]:
    """(marker key, listing key) of a wave's landing."""
    return landing_marker_key(wave), landing_listing_key(wave)


# Ingest ------------------------------------------------------------------------------------

def staging_prefix(wave: str) -> str:
    return _join("staging", wave, "")


def staged_file_name(shard: int) -> str:
    """The name of a shard's staging file, in the store and in a local staging folder."""
    return shard_name(shard) + ".npy"


def staged_pixels_key(wave: str, shard: int) -> str:
    """The shard's staged `.npy`: every decoded `ok` slice, in arrival order."""
    return staging_prefix(wave) + staged_file_name(shard)


def slices_prefix(wave: str) -> str:
    return _join("slices", wave, "")


def slice_keys(wave: str, shard: int) -> tuple[str, str]:
    """(`.npy` key, index `.parquet` key) of the wave's published slices shard."""
    base = slices_prefix(wave) + shard_name(shard)
    return base + ".npy", base + ".parquet"


def manifest_key(wave: str) -> str:
    return _join("manifests", wave, "manifest.parquet")


def layout_key(wave: str) -> str:
    return _join("manifests", wave, "layout.json")


# Models and results ------------------------------------------------------------------------

def backbone_record_key(wave: str) -> str:
    """The `backbone` asset's decision for the wave (JSON)."""
    return _model_key("backbone", wave, ".json")


def backbone_key(wave: str) -> str:
    """A self-supervised backbone trained on the wave."""
    return _model_key("backbone", wave, ".pt")


def embeddings_prefix(wave: str) -> str:
    return _join("embeddings", wave, "")


def embeddings_key(wave: str, shard: int) -> str:
    return embeddings_prefix(wave) + shard_name(shard) + ".arrow"


def pca_key(wave: str) -> str:
    return _model_key("pca", wave, ".npz")


def clusters_key(wave: str) -> str:
    return _join("clusters", wave, "clusters.parquet")


def checkpoint_key(wave: str) -> str:
    """The wave's classifier checkpoint."""
    return _model_key("classifier", wave, ".pt")


def baseline_key(wave: str) -> str:
    """The wave's supervised baseline report (expert labels only, JSON)."""
    return _model_key("baseline", wave, ".json")


def truth_key(wave: str) -> str:
    """`WAVE/labels.csv`: a wave's ground truth kept in the store (the smoke wave's)."""
    return _join(wave, TRUTH_NAME)


# Taking keys apart -------------------------------------------------------------------------

def wave_prefixes(wave: str) -> tuple[str, ...]:
    """The folders (and the one file) to list for every object of `wave`: a listing of each,
    filtered with `wave_of_key(key) == wave`, is exactly the wave's objects (the `models/KIND/`
    folders hold every wave's files)."""
    return (*(_join(root, wave, "") for root in _WAVE_FOLDERS),
            *(_join("models", kind, "") for kind in _MODEL_FILES), truth_key(wave))


def wave_of_key(key: str) -> str | None:
    """The wave `key` belongs to in the layout, or None for a key outside it (the DVC cache,
    MLflow artifacts, the IO manager's pickles). The wave is not validated: a folder landed
    under a name no partition can carry is still that folder's wave."""
    parts = key.split("/")
    if len(parts) >= 3 and parts[0] in _WAVE_FOLDERS and parts[1]:
        return parts[1]
    if len(parts) == 3 and parts[0] == "models" and parts[1] in _MODEL_FILES:
        for extension in _MODEL_FILES[parts[1]]:
            if parts[2].endswith(extension) and len(parts[2]) > len(extension):
                return parts[2][: -len(extension)]
        return None
    if len(parts) == 2 and parts[1] == TRUTH_NAME and parts[0]:
        return parts[0]
    return None


def is_landing_marker(key: str) -> bool:
    """`raw/WAVE/_READY` exactly (a `_READY` deeper in a landed folder marks nothing)."""
    parts = key.split("/")
    return len(parts) == 3 and parts[0] == "raw" and bool(parts[1]) and parts[2] == READY_MARKER


def bytes_by_wave(objects: Iterable[tuple[str, int]], waves: Iterable[str]) -> dict[str, int]:
    """Bytes per wave of `(key, size)` pairs; a key of no wave in `waves` counts under ""."""
    known = set(waves)
    totals: dict[str, int] = {}
    for key, size in objects:
        wave = wave_of_key(key)
        wave = wave if wave in known else ""
        totals[wave] = totals.get(wave, 0) + size
    return totals
