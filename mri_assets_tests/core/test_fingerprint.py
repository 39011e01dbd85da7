import numpy as np
import polars as pl
import pytest

from mri_assets.core.fingerprint import (
    compare_fingerprints,
    embedding_fingerprint,
    fingerprint_from_json,
    fingerprint_to_json,
    manifest_fingerprint,
    smoke_fingerprint,
)


def small_manifest(n: int = 20) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "image_id": [f"{i:024x}" for i in range(n)],
            "source_uri": [f"/tmp/run-a/raw/smoke/p{i % 4}/s{i}.dcm" for i in range(n)],
            "sha256": [f"{i * 7919:064x}" for i in range(n)],
            "slice_index": [i % 3 for i in range(n)],
            "patient_key": [f"p{i % 4:019d}" for i in range(n)],
            "split": [("train", "val", "holdout")[i % 3] for i in range(n)],
            "status": ["ok"] * (n - 1) + ["duplicate"],
            "reason": [None] * n,
        }
    )


def small_embeddings(ids: list[str], dim: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((len(ids), dim)).astype(np.float16)


def fingerprint_of(manifest, ids, vectors, device="cpu", metrics=None):
    metrics = {"ari_k2": 0.5, "nmi_k2": 0.4} if metrics is None else metrics
    return smoke_fingerprint(
        manifest, (ids, vectors), metrics, device, model_id="resnet18:none:abc"
    )


def test_manifest_fingerprint_ignores_row_order_and_source_paths():
    manifest = small_manifest()
    moved = manifest.reverse().with_columns(
        pl.col("source_uri").str.replace("/tmp/run-a", "/tmp/run-b")
    )

    assert manifest_fingerprint(manifest) == manifest_fingerprint(moved)


def test_manifest_fingerprint_changes_when_a_split_changes():
    manifest = small_manifest()
    changed = manifest.with_columns(
        pl.when(pl.col("image_id") == manifest["image_id"][3])
        .then(pl.lit("holdout"))
        .otherwise(pl.col("split"))
        .alias("split")
    )

    assert manifest_fingerprint(manifest) != manifest_fingerprint(changed)


def test_manifest_fingerprint_without_needed_column_names_it():
    with pytest.raises(ValueError, match=r"lacks columns \['patient_key'\]"):
        manifest_fingerprint(small_manifest().drop("patient_key"))


def test_embedding_fingerprint_is_independent_of_shard_order():
    ids = [f"{i:024x}" for i in range(10)]
    vectors = small_embeddings(ids)

    shuffled = np.random.default_rng(1).permutation(10)

    assert embedding_fingerprint(ids, vectors) == embedding_fingerprint(
        [ids[i] for i in shuffled], vectors[shuffled]
    )


def test_embedding_fingerprint_refuses_float32():
    ids = ["a", "b"]
    with pytest.raises(ValueError, match="float16"):
        embedding_fingerprint(ids, np.zeros((2, 4), dtype=np.float32))


def test_identical_runs_have_no_mismatch_after_a_json_round_trip():
    manifest = small_manifest()
    ids = manifest["image_id"].to_list()
    vectors = small_embeddings(ids)
    reference = fingerprint_from_json(fingerprint_to_json(fingerprint_of(manifest, ids, vectors)))

    assert compare_fingerprints(reference, fingerprint_of(manifest, ids, vectors.copy())) == []


def test_one_embedding_byte_changed_is_a_mismatch_naming_that_image_id():
    manifest = small_manifest()
    ids = manifest["image_id"].to_list()
    vectors = small_embeddings(ids)
    reference = fingerprint_of(manifest, ids, vectors)
    tampered = vectors.copy()
    tampered.view(np.uint8)[7, 5] ^= 0x01

    mismatches = compare_fingerprints(reference, fingerprint_of(manifest, ids, tampered))

    assert [(m.kind, m.items) for m in mismatches] == [("embeddings", (ids[7],))]
    assert "same device type 'cpu'" in mismatches[0].message


def test_changed_manifest_row_is_a_mismatch_naming_that_image_id():
    manifest = small_manifest()
    ids = manifest["image_id"].to_list()
    vectors = small_embeddings(ids)
    reference = fingerprint_of(manifest, ids, vectors)
    changed = manifest.with_columns(
        pl.when(pl.col("image_id") == ids[2])
        .then(pl.lit("quarantined"))
        .otherwise("status")
        .alias("status")
    )

    mismatches = compare_fingerprints(reference, fingerprint_of(changed, ids, vectors))

    assert [(m.kind, m.items) for m in mismatches] == [("manifest", (ids[2],))]


def test_metric_drift_beyond_tolerance_is_a_mismatch_and_within_is_not():
    manifest = small_manifest()
    ids = manifest["image_id"].to_list()
    vectors = small_embeddings(ids)
    reference = fingerprint_of(manifest, ids, vectors, metrics={"ari_k2": 0.5, "nmi_k2": 0.4})

    within = fingerprint_of(manifest, ids, vectors, metrics={"ari_k2": 0.5 + 5e-7, "nmi_k2": 0.4})
    beyond = fingerprint_of(manifest, ids, vectors, metrics={"ari_k2": 0.5 + 5e-6, "nmi_k2": 0.4})

    assert compare_fingerprints(reference, within) == []
    mismatches = compare_fingerprints(reference, beyond)
    assert [(m.kind, m.items) for m in mismatches] == [("metrics", ("ari_k2",))]


def test_across_device_types_small_float_noise_passes_cosine_check():
    manifest = small_manifest()
    ids = manifest["image_id"].to_list()
    vectors = small_embeddings(ids, dim=64)
    noise = np.random.default_rng(2).standard_normal(vectors.shape) * 1e-3
    gpu_vectors = (vectors.astype(np.float32) + noise).astype(np.float16)
    reference = fingerprint_of(manifest, ids, vectors, device="cpu")
    current = fingerprint_of(manifest, ids, gpu_vectors, device="cuda")

    assert reference["embeddings"]["hash"] != current["embeddings"]["hash"]
    assert compare_fingerprints(reference, current, (ids, vectors), (ids, gpu_vectors)) == []


def test_across_device_types_a_different_vector_fails_cosine_check_naming_it():
    manifest = small_manifest()
    ids = manifest["image_id"].to_list()
    vectors = small_embeddings(ids, dim=64)
    changed = vectors.copy()
    changed[4] = small_embeddings(ids[:1], dim=64, seed=9)[0]
    reference = fingerprint_of(manifest, ids, vectors, device="cpu")
    current = fingerprint_of(manifest, ids, changed, device="cuda")

    mismatches = compare_fingerprints(reference, current, (ids, vectors), (ids, changed))

    assert [(m.kind, m.items) for m in mismatches] == [("embeddings", (ids[4],))]
    assert "cosine similarity below 0.999" in mismatches[0].message


def test_across_device_types_without_arrays_asks_for_them():
    manifest = small_manifest()
    ids = manifest["image_id"].to_list()
    vectors = small_embeddings(ids)
    reference = fingerprint_of(manifest, ids, vectors, device="cpu")
    current = fingerprint_of(manifest, ids, vectors, device="cuda")

    with pytest.raises(ValueError, match="pass embeddings_ref and embeddings_cur"):
        compare_fingerprints(reference, current)


def test_missing_embedding_is_a_mismatch_naming_the_image_id():
    manifest = small_manifest()
    ids = manifest["image_id"].to_list()
    vectors = small_embeddings(ids)
    reference = fingerprint_of(manifest, ids, vectors)

    mismatches = compare_fingerprints(reference, fingerprint_of(manifest, ids[1:], vectors[1:]))

    assert [(m.kind, m.items) for m in mismatches] == [("embeddings", (ids[0],))]
    assert "one side only" in mismatches[0].message


def test_reference_of_another_format_is_refused():
    with pytest.raises(ValueError, match="regenerate the reference"):
        fingerprint_from_json('{"format": 0}')
