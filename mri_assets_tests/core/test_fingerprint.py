import numpy as np
import polars as pl
import pytest

from mri_assets.core.fingerprint import (
    METRIC_ATOL_ACROSS_DEVICES,
    compare_fingerprints,
    content_keys_by_image_id,
    embedding_fingerprint,
    fingerprint_from_json,
    fingerprint_to_json,
    keyed_embeddings,
    manifest_fingerprint,
    smoke_fingerprint,
)


def small_manifest(n: int = 20) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "image_id": [f"{i:024x}-{i % 3:05d}" for i in range(n)],
            "source_uri": [f"/tmp/run-a/raw/smoke/p{i % 4}/s{i}.dcm" for i in range(n)],
            "source_key": [f"raw/smoke/p{i % 4}/s{i}.dcm" for i in range(n)],
            "sha256": [f"{i * 7919:064x}" for i in range(n)],
            "pixel_sha256": [f"{i * 104729:064x}" for i in range(n)],
            "payload_crc32": [i * 31 for i in range(n - 1)] + [None],
            "slice_index": [i % 3 for i in range(n)],
            "patient_key": [f"p{i % 4:019d}" for i in range(n)],
            "split": [("train", "val", "holdout")[i % 3] for i in range(n)],
            "status": ["ok"] * (n - 1) + ["duplicate"],
            "reason": [None] * n,
        }
    )


def key_of(manifest: pl.DataFrame, image_id: str) -> str:
    return content_keys_by_image_id(manifest)[image_id]


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


def test_content_keys_are_the_path_inside_the_wave_and_the_slice_index():
    manifest = small_manifest()

    assert key_of(manifest, manifest["image_id"][5]) == "p1/s5.dcm#2"


def test_manifest_fingerprint_ignores_source_bytes_ids_and_wave_name():
    """Another zlib or compression level changes the source bytes, hence sha256 and image_id,
    without changing one decoded pixel: the fingerprint is the same."""
    manifest = small_manifest()
    recompressed = manifest.with_columns(
        pl.col("sha256").str.replace("^0", "f"),
        (pl.lit("e") + pl.col("image_id").str.slice(1)).alias("image_id"),
        pl.col("source_key").str.replace("raw/smoke/", "raw/smoke-copy/"),
    )

    assert manifest_fingerprint(manifest) == manifest_fingerprint(recompressed)


def test_changed_stored_slice_pixels_are_a_mismatch_naming_the_object_and_slice():
    manifest = small_manifest()
    ids = manifest["image_id"].to_list()
    vectors = small_embeddings(ids)
    reference = fingerprint_of(manifest, ids, vectors)
    rewindowed = manifest.with_columns(
        pl.when(pl.col("image_id") == ids[6]).then(pl.lit(1)).otherwise("payload_crc32")
        .alias("payload_crc32")
    )

    mismatches = compare_fingerprints(reference, fingerprint_of(rewindowed, ids, vectors))

    assert [(m.kind, m.items) for m in mismatches] == [("manifest", ("p2/s6.dcm#0",))]


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


def test_one_embedding_byte_changed_is_a_mismatch_naming_that_slice():
    manifest = small_manifest()
    ids = manifest["image_id"].to_list()
    vectors = small_embeddings(ids)
    reference = fingerprint_of(manifest, ids, vectors)
    tampered = vectors.copy()
    tampered.view(np.uint8)[7, 5] ^= 0x01

    mismatches = compare_fingerprints(reference, fingerprint_of(manifest, ids, tampered))

    assert [(m.kind, m.items) for m in mismatches] == [("embeddings", (key_of(manifest, ids[7]),))]
    assert "same device type 'cpu'" in mismatches[0].message


def test_changed_manifest_row_is_a_mismatch_naming_that_slice():
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

    assert [(m.kind, m.items) for m in mismatches] == [("manifest", (key_of(manifest, ids[2]),))]


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


def test_across_device_types_metrics_have_the_measured_tolerance_and_no_more():
    manifest = small_manifest()
    ids = manifest["image_id"].to_list()
    vectors = small_embeddings(ids)
    keyed = keyed_embeddings(manifest, (ids, vectors))
    reference = fingerprint_of(manifest, ids, vectors, device="cpu-avx512-bf16")
    bound = METRIC_ATOL_ACROSS_DEVICES

    within = fingerprint_of(manifest, ids, vectors, device="cpu-avx2-fp32",
                            metrics={"ari_k2": 0.5 + 0.9 * bound, "nmi_k2": 0.4 - 0.9 * bound})
    beyond = fingerprint_of(manifest, ids, vectors, device="cpu-avx2-fp32",
                            metrics={"ari_k2": 0.5 + 1.5 * bound, "nmi_k2": 0.4})

    assert compare_fingerprints(reference, within, keyed, keyed) == []
    mismatches = compare_fingerprints(reference, beyond, keyed, keyed)
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
    assert compare_fingerprints(reference, current, keyed_embeddings(manifest, (ids, vectors)),
                                keyed_embeddings(manifest, (ids, gpu_vectors))) == []


def test_across_device_types_a_different_vector_fails_cosine_check_naming_it():
    manifest = small_manifest()
    ids = manifest["image_id"].to_list()
    vectors = small_embeddings(ids, dim=64)
    changed = vectors.copy()
    changed[4] = small_embeddings(ids[:1], dim=64, seed=9)[0]
    reference = fingerprint_of(manifest, ids, vectors, device="cpu")
    current = fingerprint_of(manifest, ids, changed, device="cuda")

    mismatches = compare_fingerprints(reference, current, keyed_embeddings(manifest, (ids, vectors)),
                                      keyed_embeddings(manifest, (ids, changed)))

    assert [(m.kind, m.items) for m in mismatches] == [("embeddings", (key_of(manifest, ids[4]),))]
    assert "cosine similarity below 0.999" in mismatches[0].message


def test_across_device_types_without_arrays_asks_for_them():
    manifest = small_manifest()
    ids = manifest["image_id"].to_list()
    vectors = small_embeddings(ids)
    reference = fingerprint_of(manifest, ids, vectors, device="cpu")
    current = fingerprint_of(manifest, ids, vectors, device="cuda")

    with pytest.raises(ValueError, match="pass embeddings_ref and embeddings_cur"):
        compare_fingerprints(reference, current)


def test_missing_embedding_is_a_mismatch_naming_the_slice():
    manifest = small_manifest()
    ids = manifest["image_id"].to_list()
    vectors = small_embeddings(ids)
    reference = fingerprint_of(manifest, ids, vectors)

    mismatches = compare_fingerprints(reference, fingerprint_of(manifest, ids[1:], vectors[1:]))

    assert [(m.kind, m.items) for m in mismatches] == [("embeddings", (key_of(manifest, ids[0]),))]
    assert "one side only" in mismatches[0].message


def test_reference_of_another_format_is_refused():
    with pytest.raises(ValueError, match="regenerate the reference"):
        fingerprint_from_json('{"format": 0}')
