"""Manifest building: identifiers, patient keys, deterministic splits, duplicates, reconciliation.

The per-object work (decode, window, resize, pixel hash) lives in `core.imaging`; this module turns
its results into manifest rows and finishes the manifest with polars expressions, so a
4,000,000-row listing costs seconds, not a Python loop per row.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import polars as pl

# Wave keys and the raw prefix belong to `core.wave_keys` (still importable from here).
from mri_assets.core.wave_keys import (  # noqa: F401
    READY_MARKER,
    WAVE_KEY_MAX_LENGTH,
    WAVE_KEY_PATTERN,
    WaveKeyError,
    raw_prefix,
    validate_wave_key,
)

SPLITS = ("train", "val", "holdout")
STATUSES = ("ok", "duplicate", "quarantined")

MANIFEST_SCHEMA: dict[str, pl.DataType] = {
    "image_id": pl.String,
    "wave": pl.String,
    "source_uri": pl.String,
    "source_key": pl.String,
    "source_version": pl.String,
    "slice_index": pl.Int32,
    "sha256": pl.String,
    "pixel_sha256": pl.String,
    "format": pl.String,
    "height": pl.Int32,
    "width": pl.Int32,
    "window_low": pl.Float32,
    "window_high": pl.Float32,
    "normalization": pl.String,
    "patient_key": pl.String,
    "split": pl.String,
    "shard": pl.Int32,
    "slice_row": pl.Int64,
    "payload_crc32": pl.Int64,
    "status": pl.String,
    "reason": pl.String,
    "duplicate_of": pl.String,
}


class ManifestError(ValueError):
    """A manifest that cannot be built or does not reconcile."""


@dataclass(frozen=True)
class ManifestSettings:
    salt: str
    split_seed: int = 0
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    n_shards: int = 16

    def __post_init__(self) -> None:
        if not self.salt:
            raise ManifestError("the patient_key salt is empty: set MRI_ASSETS_SALT")
        fractions = self.split_fractions
        if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-9:
            raise ManifestError(
                f"split fractions {fractions} (ingest.train_fraction, val_fraction, "
                "holdout_fraction) must be three non-negative numbers that sum to 1"
            )
        if self.n_shards < 1:
            raise ManifestError(
                f"n_shards must be at least 1 (MRI_ASSETS_SHARDS), got {self.n_shards}")


def image_id_for(source_sha256: str, slice_index: int) -> str:
    """Stable for the same source bytes and slice index."""
    return f"{source_sha256[:24]}-{slice_index:05d}"


_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix(values: np.ndarray) -> np.ndarray:
    z = values.astype(np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _MIX_1
        z = (z ^ (z >> np.uint64(27))) * _MIX_2
    return z ^ (z >> np.uint64(31))


def _shards_from_parts(
    sha_prefix_values: np.ndarray, slice_indices: np.ndarray, n_shards: int
) -> np.ndarray:
    with np.errstate(over="ignore"):
        mixed = sha_prefix_values.astype(np.uint64) ^ (slice_indices.astype(np.uint64) * _GOLDEN)
    return (_splitmix(mixed) % np.uint64(n_shards)).astype(np.int32)


_MASK_64 = (1 << 64) - 1


def shard_for(image_id: str, n_shards: int) -> int:
    """Stable hash of an `image_id` into one of `n_shards` shards: `shards_for` on one id, in
    plain integers (the decoding workers call it once per slice)."""
    sha_part, _, slice_part = image_id.rpartition("-")
    z = int(sha_part[:15], 16) ^ ((int(slice_part) * int(_GOLDEN)) & _MASK_64)
    z = ((z ^ (z >> 30)) * int(_MIX_1)) & _MASK_64
    z = ((z ^ (z >> 27)) * int(_MIX_2)) & _MASK_64
    return (z ^ (z >> 31)) % n_shards


def shards_for(image_ids: pl.Series, n_shards: int) -> pl.Series:
    parts = image_ids.str.split_exact("-", 1)
    sha_values = parts.struct.field("field_0").str.slice(0, 15).str.to_integer(base=16)
    slice_values = parts.struct.field("field_1").cast(pl.Int64)
    shards = _shards_from_parts(sha_values.to_numpy(), slice_values.to_numpy(), n_shards)
    return pl.Series("shard", shards, dtype=pl.Int32)


def patient_key_for(identifier: str, salt: str) -> str:
    """Salted hash of a patient identifier; the identifier itself is never stored."""
    return hashlib.sha256(f"{salt}:{identifier}".encode()).hexdigest()[:20]


def patient_identifier(source_key: str, wave: str, dicom_patient_id: str | None) -> str:
    """DICOM PatientID when present, else the first folder below the wave, else the file stem."""
    if dicom_patient_id and dicom_patient_id.strip():
        return f"dicom:{dicom_patient_id.strip()}"
    prefix = raw_prefix(wave)
    if not source_key.startswith(prefix):
        raise ValueError(f"{source_key!r} is not below {prefix!r}")
    parts = [part for part in source_key[len(prefix):].split("/") if part]
    if len(parts) > 1:
        return f"folder:{parts[0]}"
    return f"file:{parts[-1].split('.')[0]}"


def split_for_patient(
    patient_key: str, seed: int, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
) -> str:
    """A pure function of the patient key and the seed: adding waves never moves a patient."""
    digest = hashlib.sha256(f"split:{seed}:{patient_key}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    if position < fractions[0]:
        return SPLITS[0]
    if position < fractions[0] + fractions[1]:
        return SPLITS[1]
    return SPLITS[2]


EARLIER_SCHEMA = {"pixel_sha256": pl.String, "image_id": pl.String, "wave": pl.String}


def earlier_ok_slices(manifests: list[tuple[str, str]], pixel_hashes: pl.Series) -> pl.DataFrame:
    """Slices `ok` in earlier waves whose pixels are among `pixel_hashes`: `pixel_sha256`,
    `image_id`, `wave`, one row per pixel hash (the earliest wave's, then the smallest id).

    `manifests` = (wave, manifest Parquet path), earliest wave first. The earlier manifests are
    the index: each is scanned (4 columns, filtered as it streams), so memory grows with the
    current wave's hashes and the matches, never with the slices ingested before.
    """
    wanted = pixel_hashes.drop_nulls().unique()
    if not manifests or wanted.len() == 0:
        return pl.DataFrame(schema=EARLIER_SCHEMA)
    scans = [
        pl.scan_parquet(path)
        .filter((pl.col("status") == "ok") & pl.col("pixel_sha256").is_in(wanted.implode()))
        .select("pixel_sha256", "image_id", pl.lit(wave).alias("wave"),
                pl.lit(order, dtype=pl.Int32).alias("_order"))
        for order, (wave, path) in enumerate(manifests)
    ]
    found = pl.concat(scans).collect(engine="streaming")
    return (
        found.sort("_order", "image_id")
        .unique("pixel_sha256", keep="first", maintain_order=True)
        .select([pl.col(name).cast(dtype) for name, dtype in EARLIER_SCHEMA.items()])
    )


def _mark_earlier_duplicates(frame: pl.DataFrame, earlier: pl.DataFrame) -> pl.DataFrame:
    """Readable slices whose pixels were already `ok` in an earlier wave become its duplicates."""
    if earlier.height == 0:
        return frame
    lookup = earlier.select("pixel_sha256", pl.col("image_id").alias("_earlier_id"),
                            pl.col("wave").alias("_earlier_wave"))
    frame = frame.join(lookup, on="pixel_sha256", how="left", maintain_order="left")
    hit = pl.col("status").is_in(["ok", "duplicate"]) & pl.col("_earlier_id").is_not_null()
    return frame.with_columns(
        pl.when(hit).then(pl.lit("duplicate")).otherwise(pl.col("status")).alias("status"),
        pl.when(hit).then(pl.col("_earlier_id")).otherwise(pl.col("duplicate_of"))
        .alias("duplicate_of"),
        pl.when(hit)
        .then(pl.format("same pixels as {} of wave {}", pl.col("_earlier_id"),
                        pl.col("_earlier_wave")))
        .otherwise(pl.col("reason")).alias("reason"),
    ).drop("_earlier_id", "_earlier_wave")


def finish_manifest(rows: pl.DataFrame, settings: ManifestSettings,
                    earlier: pl.DataFrame | None = None) -> pl.DataFrame:
    """Add image ids, shards, patient keys, splits and duplicate marks to per-slice rows.

    `rows` carries `source_key`, `source_sha256` as `sha256`, `slice_index`, `patient_identifier`,
    `pixel_sha256` (null for quarantined rows), `status` (`ok` or `quarantined`) and `reason`.
    The raw patient identifier is dropped here: it never reaches the stored manifest.
    `earlier` (from `earlier_ok_slices`): slices already `ok` in earlier waves; a slice of this
    wave with the same pixels is their `duplicate`, whichever copy of this wave it is.
    """
    frame = rows.with_columns(
        pl.format(
            "{}-{}",
            pl.col("sha256").str.slice(0, 24),
            pl.col("slice_index").cast(pl.String).str.zfill(5),
        ).alias("image_id")
    )
    frame = frame.with_columns(shards_for(frame["image_id"], settings.n_shards))
    patients = frame.select(pl.col("patient_identifier").unique())["patient_identifier"]
    keys = [patient_key_for(identifier, settings.salt) for identifier in patients]
    lookup = pl.DataFrame(
        {
            "patient_identifier": patients,
            "patient_key": keys,
            "split": [
                split_for_patient(k, settings.split_seed, settings.split_fractions) for k in keys
            ],
        }
    )
    frame = frame.join(lookup, on="patient_identifier", how="left").drop("patient_identifier")
    frame = frame.sort(["source_key", "slice_index"])
    readable = pl.col("status") == "ok"
    frame = frame.with_columns(
        (readable & ~pl.col("pixel_sha256").is_first_distinct()).alias("_duplicate")
    )
    first_copies = (
        frame.filter(readable & ~pl.col("_duplicate"))
        .select("pixel_sha256", pl.col("image_id").alias("duplicate_of"))
    )
    duplicates = (
        frame.filter(pl.col("_duplicate"))
        .drop("_duplicate")
        .join(first_copies, on="pixel_sha256", how="left")
        .with_columns(
            pl.lit("duplicate").alias("status"),
            pl.format("same pixels as {}", pl.col("duplicate_of")).alias("reason"),
        )
    )
    frame = pl.concat(
        [frame.filter(~pl.col("_duplicate")).drop("_duplicate"), duplicates],
        how="diagonal_relaxed",
    )
    if "duplicate_of" not in frame.columns:
        frame = frame.with_columns(pl.lit(None, dtype=pl.String).alias("duplicate_of"))
    if earlier is not None:
        frame = _mark_earlier_duplicates(frame, earlier)
    frame = frame.sort(["source_key", "slice_index"])
    for name, dtype in MANIFEST_SCHEMA.items():
        if name not in frame.columns:
            frame = frame.with_columns(pl.lit(None, dtype=dtype).alias(name))
    return frame.select(
        [pl.col(name).cast(dtype) for name, dtype in MANIFEST_SCHEMA.items()]
        + [pl.col(c) for c in frame.columns if c not in MANIFEST_SCHEMA]
    )


@dataclass(frozen=True)
class Reconciliation:
    listed_objects: int
    objects_in_manifest: int
    missing_objects: tuple[str, ...]
    unexpected_objects: tuple[str, ...]
    rows: int
    ok: int
    duplicate: int
    quarantined: int
    unknown_status: int

    @property
    def passed(self) -> bool:
        return (
            not self.missing_objects
            and not self.unexpected_objects
            and self.unknown_status == 0
            and self.rows == self.ok + self.duplicate + self.quarantined
        )

    def describe(self) -> str:
        if self.passed:
            return (
                f"{self.listed_objects} listed objects expand to {self.rows} rows = "
                f"{self.ok} ok + {self.duplicate} duplicate + {self.quarantined} quarantined"
            )
        return (
            f"counts do not reconcile: {len(self.missing_objects)} listed objects have no row "
            f"(first: {list(self.missing_objects[:3])}), {len(self.unexpected_objects)} rows come "
            f"from objects that were not listed, {self.unknown_status} rows have an unknown status"
        )


def reconcile(listed_keys: list[str], manifest: pl.DataFrame) -> Reconciliation:
    """Listed objects must expand to ok + duplicate + quarantined rows, nothing lost or added."""
    listed = set(listed_keys)
    present = set(manifest["source_key"].unique().to_list())
    counts = dict(manifest.group_by("status").len().iter_rows())
    return Reconciliation(
        listed_objects=len(listed),
        objects_in_manifest=len(present),
        missing_objects=tuple(sorted(listed - present)),
        unexpected_objects=tuple(sorted(present - listed)),
        rows=manifest.height,
        ok=counts.get("ok", 0),
        duplicate=counts.get("duplicate", 0),
        quarantined=counts.get("quarantined", 0),
        unknown_status=sum(v for k, v in counts.items() if k not in STATUSES),
    )
