"""Reproducibility fingerprints for the nightly smoke run, and their comparison.

A fingerprint is a JSON-able dict:

    {"format": 2, "device_type": "cpu-avx512-bf16", "model_id": "...",
     "manifest": {"hash": ..., "rows": n, "items": {content_key: digest}},
     "embeddings": {"hash": ..., "count": n, "dim": d, "items": {content_key: digest}},
     "metrics": {"ari_k2": ..., "nmi_k2": ..., ...}}

Items are keyed by *content*, not by `image_id`: the content key of a manifest row is the object's
path inside its wave plus the slice index (`patient-0001/series-02.nii.gz#17`), and a row's
digest covers what the pipeline made of it (decoded pixels `pixel_sha256`, the stored 256 px slice
`payload_crc32`, status, reason, patient key, split). `image_id` is the sha256 of the source
bytes, which a platform can change without changing one pixel (another zlib, another PNG or gzip
compression level); the content key and digest change only when a pixel or a decision changes.

What is ours is compared exactly on every machine: the manifest's content (integer decoding,
integer-exact percentiles and a fixed-point resize give the same bytes on every CPU). What is the
platform's is compared exactly only on the same device type (device, instruction set, precision):
embedding bytes and ARI/NMI. Across device types embeddings are compared by cosine and ARI/NMI
within `METRIC_ATOL_ACROSS_DEVICES`, a bound measured between fp32 and bf16 and between AVX2 and
AVX-512 kernels (README, "Reproducibility smoke test").
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

FORMAT = 2
MANIFEST_COLUMNS = (
    "content_key", "slice_index", "pixel_sha256", "payload_crc32", "status", "reason",
    "patient_key", "split",
)
ITEM_DIGEST_CHARS = 16
COSINE_MIN = 0.999
METRIC_ATOL = 1e-6
METRIC_ATOL_ACROSS_DEVICES = 0.005
_FIELD_SEP = "\x1f"
_NULL = "\x00"

EmbeddingSet = tuple[Sequence[str], np.ndarray]


@dataclass(frozen=True)
class Mismatch:
    kind: str
    message: str
    items: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "message": self.message, "items": list(self.items)}


def with_content_keys(df: pl.DataFrame) -> pl.DataFrame:
    """The manifest with `content_key`: the object's path inside its wave + `#` + slice index.

    `source_key` is `raw/WAVE/PATH`; the key keeps `PATH`, so the same sample landed as another
    wave, or re-encoded with other bytes, has the same keys.
    """
    if "content_key" in df.columns:
        return df
    for needed in ("source_key", "slice_index"):
        if needed not in df.columns:
            raise ValueError(
                f"manifest lacks column {needed!r} needed for content keys; it has {df.columns}"
            )
    path = pl.col("source_key").str.replace(r"^raw/[^/]+/", "")
    return df.with_columns(
        (path + pl.lit("#") + pl.col("slice_index").cast(pl.Utf8)).alias("content_key")
    )


def content_keys_by_image_id(df: pl.DataFrame) -> dict[str, str]:
    keyed = with_content_keys(df)
    return dict(zip(keyed["image_id"].to_list(), keyed["content_key"].to_list(), strict=True))


def _manifest_rows(df: pl.DataFrame, columns: Sequence[str]) -> pl.DataFrame:
    df = with_content_keys(df)
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(
            f"manifest lacks columns {missing} needed for its fingerprint; it has {df.columns}"
        )
    return (
        df.select(columns)
        .sort(list(columns))
        .select(
            pl.col("content_key").cast(pl.Utf8),
            pl.concat_str(
                [pl.col(c).cast(pl.Utf8).fill_null(_NULL) for c in columns],
                separator=_FIELD_SEP,
            ).alias("row"),
        )
    )


def manifest_fingerprint(df: pl.DataFrame, columns: Sequence[str] = MANIFEST_COLUMNS) -> str:
    """sha256 of the manifest's content columns, rows sorted: independent of row order, the
    wave's name, storage paths and the source bytes' encoding."""
    rows = _manifest_rows(df, columns)["row"].to_list()
    digest = hashlib.sha256(_FIELD_SEP.join(columns).encode())
    digest.update("\n".join(rows).encode())
    return digest.hexdigest()


def manifest_items(df: pl.DataFrame, columns: Sequence[str] = MANIFEST_COLUMNS) -> dict[str, str]:
    rows = _manifest_rows(df, columns)
    duplicated = rows.filter(pl.col("content_key").is_duplicated())["content_key"].unique()
    if len(duplicated):
        raise ValueError(
            f"manifest repeats content keys {sorted(duplicated.to_list())[:10]}; "
            "each object's slice must appear once"
        )
    return {
        key: hashlib.sha256(row.encode()).hexdigest()[:ITEM_DIGEST_CHARS]
        for key, row in zip(rows["content_key"].to_list(), rows["row"].to_list(), strict=True)
    }


def _ordered_embeddings(ids: Sequence[str], vectors: np.ndarray) -> tuple[list[str], np.ndarray]:
    if vectors.dtype != np.float16:
        raise ValueError(f"embeddings must be float16 as stored, got {vectors.dtype}")
    if vectors.ndim != 2 or vectors.shape[0] != len(ids):
        raise ValueError(
            f"embeddings shape {vectors.shape} does not match {len(ids)} image_ids; "
            "pass one row per image_id"
        )
    ids = [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        raise ValueError("image_ids repeat; pass each embedding once")
    order = np.argsort(np.asarray(ids), kind="stable")
    return [ids[i] for i in order], np.ascontiguousarray(vectors[order].astype("<f2"))


def embedding_fingerprint(ids: Sequence[str], vectors: np.ndarray) -> str:
    """sha256 over (image_id, exact float16 bytes) in image_id order."""
    ordered_ids, ordered = _ordered_embeddings(ids, vectors)
    digest = hashlib.sha256(f"{ordered.shape[1]}".encode())
    for image_id, row in zip(ordered_ids, ordered, strict=True):
        digest.update(image_id.encode() + b"\x00" + row.tobytes())
    return digest.hexdigest()


def embedding_items(ids: Sequence[str], vectors: np.ndarray) -> dict[str, str]:
    ordered_ids, ordered = _ordered_embeddings(ids, vectors)
    return {
        image_id: hashlib.sha256(row.tobytes()).hexdigest()[:ITEM_DIGEST_CHARS]
        for image_id, row in zip(ordered_ids, ordered, strict=True)
    }


def keyed_embeddings(manifest: pl.DataFrame, embeddings: EmbeddingSet) -> EmbeddingSet:
    """`(image_ids, vectors)` -> `(content_keys, vectors)` through the manifest."""
    ids, vectors = embeddings
    keys = content_keys_by_image_id(manifest)
    unknown = [i for i in ids if i not in keys]
    if unknown:
        raise ValueError(f"{len(unknown)} embedded image_ids are not in the manifest: {unknown[:5]}")
    return [keys[i] for i in ids], vectors


def smoke_fingerprint(
    manifest: pl.DataFrame,
    embeddings: EmbeddingSet,
    metrics: Mapping[str, float],
    device_type: str,
    model_id: str = "",
) -> dict:
    """The JSON-able fingerprint of one smoke run (see the module docstring).

    `embeddings` are keyed by image_id as stored; they are re-keyed by content through the
    manifest (use `keyed_embeddings` for the same arrays as the reference stores them)."""
    ids, vectors = keyed_embeddings(manifest, embeddings)
    return {
        "format": FORMAT,
        "device_type": device_type,
        "model_id": model_id,
        "manifest": {
            "hash": manifest_fingerprint(manifest),
            "rows": manifest.height,
            "items": manifest_items(manifest),
        },
        "embeddings": {
            "hash": embedding_fingerprint(ids, vectors),
            "count": len(ids),
            "dim": int(vectors.shape[1]),
            "items": embedding_items(ids, vectors),
        },
        "metrics": {name: float(value) for name, value in sorted(metrics.items())},
    }


def fingerprint_to_json(fingerprint: Mapping) -> str:
    return json.dumps(fingerprint, indent=1, sort_keys=True) + "\n"


def fingerprint_from_json(text: str) -> dict:
    fingerprint = json.loads(text)
    if fingerprint.get("format") != FORMAT:
        raise ValueError(
            f"fingerprint format {fingerprint.get('format')!r} is not {FORMAT}; "
            "regenerate the reference with this version"
        )
    return fingerprint


def _changed_items(reference: Mapping[str, str], current: Mapping[str, str]) -> tuple[str, ...]:
    return tuple(
        sorted(i for i in reference.keys() | current.keys() if reference.get(i) != current.get(i))
    )


def _compare_manifest(reference: Mapping, current: Mapping) -> list[Mismatch]:
    if reference["hash"] == current["hash"]:
        return []
    items = _changed_items(reference["items"], current["items"])
    return [
        Mismatch(
            "manifest",
            f"manifest hash differs ({reference['rows']} reference rows, {current['rows']} now); "
            f"{len(items)} slices (object#slice) added, removed or changed",
            items,
        )
    ]


def _cosine_by_id(embeddings_ref: EmbeddingSet, embeddings_cur: EmbeddingSet) -> dict[str, float]:
    ref_ids, ref = _ordered_embeddings(*embeddings_ref)
    cur_ids, cur = _ordered_embeddings(*embeddings_cur)
    common = sorted(set(ref_ids) & set(cur_ids))
    ref_rows = ref[np.searchsorted(np.asarray(ref_ids), common)].astype(np.float64)
    cur_rows = cur[np.searchsorted(np.asarray(cur_ids), common)].astype(np.float64)
    if ref_rows.shape[1:] != cur_rows.shape[1:]:
        return {image_id: -1.0 for image_id in common}
    norms = np.linalg.norm(ref_rows, axis=1) * np.linalg.norm(cur_rows, axis=1)
    dots = np.einsum("ij,ij->i", ref_rows, cur_rows)
    both_zero = (np.linalg.norm(ref_rows, axis=1) == 0) & (np.linalg.norm(cur_rows, axis=1) == 0)
    cosine = np.where(both_zero, 1.0, dots / np.where(norms == 0, 1.0, norms))
    return dict(zip(common, cosine.tolist(), strict=True))


def _compare_embeddings(
    reference: Mapping,
    current: Mapping,
    embeddings_ref: EmbeddingSet | None,
    embeddings_cur: EmbeddingSet | None,
    cosine_min: float,
) -> list[Mismatch]:
    ref_fp, cur_fp = reference["embeddings"], current["embeddings"]
    missing = _changed_items(dict.fromkeys(ref_fp["items"], ""), dict.fromkeys(cur_fp["items"], ""))
    found = []
    if missing:
        found.append(
            Mismatch("embeddings", f"{len(missing)} slices embedded on one side only", missing)
        )
    if reference["device_type"] == current["device_type"]:
        if ref_fp["hash"] == cur_fp["hash"]:
            return found
        shared = ref_fp["items"].keys() & cur_fp["items"].keys()
        changed = tuple(sorted(i for i in shared if ref_fp["items"][i] != cur_fp["items"][i]))
        if missing and not changed:
            return found
        found.append(
            Mismatch(
                "embeddings",
                f"embedding bytes differ on the same device type {current['device_type']!r} "
                f"for {len(changed)} slices",
                changed,
            )
        )
        return found
    if embeddings_ref is None or embeddings_cur is None:
        raise ValueError(
            f"reference was made on {reference['device_type']!r} and this run on "
            f"{current['device_type']!r}: pass embeddings_ref and embeddings_cur (keys, float16 "
            "array) to compare by cosine similarity"
        )
    cosine = _cosine_by_id(embeddings_ref, embeddings_cur)
    low = tuple(sorted(i for i, value in cosine.items() if value < cosine_min))
    if low:
        worst = min(cosine[i] for i in low)
        found.append(
            Mismatch(
                "embeddings",
                f"cosine similarity below {cosine_min} across device types "
                f"({reference['device_type']!r} -> {current['device_type']!r}) for {len(low)} "
                f"slices (lowest {worst:.6f})",
                low,
            )
        )
    return found


def _compare_metrics(reference: Mapping, current: Mapping, atol: float) -> list[Mismatch]:
    found = []
    for name in sorted(reference.keys() | current.keys()):
        if name not in reference or name not in current:
            side = "reference" if name not in reference else "this run"
            found.append(Mismatch("metrics", f"metric {name!r} missing from {side}", (name,)))
            continue
        diff = abs(float(reference[name]) - float(current[name]))
        if not diff <= atol:
            found.append(
                Mismatch(
                    "metrics",
                    f"{name}: reference {reference[name]!r}, now {current[name]!r} "
                    f"(|diff| {diff:.3g} > {atol:g})",
                    (name,),
                )
            )
    return found


def compare_fingerprints(
    reference: Mapping,
    current: Mapping,
    embeddings_ref: EmbeddingSet | None = None,
    embeddings_cur: EmbeddingSet | None = None,
    *,
    cosine_min: float = COSINE_MIN,
    metric_atol: float = METRIC_ATOL,
    metric_atol_across_devices: float = METRIC_ATOL_ACROSS_DEVICES,
) -> list[Mismatch]:
    """Everything that differs between two fingerprints; empty when the run reproduces.

    Metrics must match within `metric_atol` on the same device type and within
    `metric_atol_across_devices` across device types."""
    same_device = reference.get("device_type") == current.get("device_type")
    found: list[Mismatch] = []
    if reference.get("model_id", "") != current.get("model_id", ""):
        found.append(
            Mismatch(
                "model",
                f"model_id {reference.get('model_id')!r} in the reference, "
                f"{current.get('model_id')!r} now",
            )
        )
    found += _compare_manifest(reference["manifest"], current["manifest"])
    found += _compare_embeddings(reference, current, embeddings_ref, embeddings_cur, cosine_min)
    found += _compare_metrics(reference["metrics"], current["metrics"],
                              metric_atol if same_device else metric_atol_across_devices)
    return found
