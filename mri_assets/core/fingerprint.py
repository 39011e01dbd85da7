"""Reproducibility fingerprints for the nightly smoke run, and their comparison.

A fingerprint is a JSON-able dict:

    {"format": 1, "device_type": "cpu", "model_id": "...",
     "manifest": {"hash": ..., "rows": n, "items": {image_id: digest}},
     "embeddings": {"hash": ..., "count": n, "dim": d, "items": {image_id: digest}},
     "metrics": {"ari_k2": ..., "nmi_k2": ..., ...}}

Per-item digests let a mismatch name the image_ids that changed. Embeddings are compared exactly
(bytes) on the same device type and by cosine similarity across device types, where float
results legitimately differ in the last bits.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

FORMAT = 1
MANIFEST_COLUMNS = ("image_id", "sha256", "slice_index", "patient_key", "split", "status")
ITEM_DIGEST_CHARS = 16
COSINE_MIN = 0.999
METRIC_ATOL = 1e-6
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


def _manifest_rows(df: pl.DataFrame, columns: Sequence[str]) -> pl.DataFrame:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(
            f"manifest lacks columns {missing} needed for its fingerprint; it has {df.columns}"
        )
    return (
        df.select(columns)
        .sort(list(columns))
        .select(
            pl.col("image_id").cast(pl.Utf8),
            pl.concat_str(
                [pl.col(c).cast(pl.Utf8).fill_null(_NULL) for c in columns],
                separator=_FIELD_SEP,
            ).alias("row"),
        )
    )


def manifest_fingerprint(df: pl.DataFrame, columns: Sequence[str] = MANIFEST_COLUMNS) -> str:
    """sha256 of the manifest's relevant columns, rows sorted: independent of row order and paths."""
    rows = _manifest_rows(df, columns)["row"].to_list()
    digest = hashlib.sha256(_FIELD_SEP.join(columns).encode())
    digest.update("\n".join(rows).encode())
    return digest.hexdigest()


def manifest_items(df: pl.DataFrame, columns: Sequence[str] = MANIFEST_COLUMNS) -> dict[str, str]:
    rows = _manifest_rows(df, columns)
    duplicated = rows.filter(pl.col("image_id").is_duplicated())["image_id"].unique().to_list()
    if duplicated:
        raise ValueError(
            f"manifest repeats image_ids {sorted(duplicated)[:10]}; ids must be unique"
        )
    return {
        image_id: hashlib.sha256(row.encode()).hexdigest()[:ITEM_DIGEST_CHARS]
        for image_id, row in zip(rows["image_id"].to_list(), rows["row"].to_list(), strict=True)
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


def smoke_fingerprint(
    manifest: pl.DataFrame,
    embeddings: EmbeddingSet,
    metrics: Mapping[str, float],
    device_type: str,
    model_id: str = "",
) -> dict:
    """The JSON-able fingerprint of one smoke run (see the module docstring)."""
    ids, vectors = embeddings
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
            f"{len(items)} image_ids added, removed or changed",
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
            Mismatch("embeddings", f"{len(missing)} image_ids embedded on one side only", missing)
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
                f"for {len(changed)} image_ids",
                changed,
            )
        )
        return found
    if embeddings_ref is None or embeddings_cur is None:
        raise ValueError(
            f"reference was made on {reference['device_type']!r} and this run on "
            f"{current['device_type']!r}: pass embeddings_ref and embeddings_cur (ids, float16 "
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
                f"image_ids (lowest {worst:.6f})",
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
) -> list[Mismatch]:
    """Everything that differs between two fingerprints; empty when the run reproduces."""
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
    found += _compare_metrics(reference["metrics"], current["metrics"], metric_atol)
    return found
