"""The nightly reproducibility check: the `smoke` wave's fingerprint against the committed one.

The smoke wave is a fixed 1,000-slice sample (seed 0) run through ingestion, embeddings and
clustering. `smoke_reproduces` compares, slice by slice (keyed by content, see
`core/fingerprint.py`), the manifest's content exactly on every machine; the embeddings exactly on
the same device type and by cosine >= 0.999 across device types; ARI/NMI of the clusters against
the sample's ground truth within 1e-6 on the same device type and within 0.005 across device types,
with the reference in `mri_assets/smoke/`.

The check is registered only by the smoke run's definitions (`smoke_run.smoke_defs`), for the
`smoke` wave: it never reports on a wave it cannot compare.
"""

import io
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl

from mri_assets.core.clustering import DEFAULT_KS as KS
from mri_assets.core.clustering import cluster_scores
from mri_assets.core.fingerprint import (
    compare_fingerprints,
    fingerprint_from_json,
    fingerprint_to_json,
    keyed_embeddings,
    smoke_fingerprint,
)
from mri_assets.core.wave_keys import clusters_key, manifest_key, raw_prefix, truth_key
from mri_assets.resources.compute import ComputeResource
from mri_assets.resources.object_store import ObjectStore
from mri_assets.resources.wave_store import WaveStore

SMOKE_WAVE = "smoke"
SMOKE_SLICES = 1000
SMOKE_SEED = 0
SMOKE_CHECK = "smoke_reproduces"
REFERENCE_DIR = Path(__file__).resolve().parent.parent / "smoke"
TRUTH_KEY = truth_key(SMOKE_WAVE)
MAX_ITEMS_SHOWN = 20


def smoke_device_type(compute: ComputeResource) -> str:
    """`{device}-{kernels}-{precision}`, e.g. `cpu-avx2-fp32`, `cpu-avx512-bf16` or
    `cuda-sm90-fp16`.

    Runs of one device type must match bit for bit; the CPU instruction set (or the GPU's compute
    capability) is part of it because the math kernels, and so the last bits, change with it.
    CPUs with AMX tiles run other bf16 kernels than AVX-512 alone: they are `...-amx`.
    """
    import torch

    device, precision, _ = compute.device_and_precision()
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        kernels = f"sm{major}{minor}"
    else:
        kernels = torch.backends.cpu.get_cpu_capability().lower()
        if torch.cpu._is_amx_tile_supported():
            kernels += "-amx"
    return f"{device.type}-{kernels}-{precision}"


def reference_paths(device_type: str, reference_dir: Path = REFERENCE_DIR) -> tuple[Path, Path]:
    """The fingerprint JSON and the embeddings (for cosine across device types) of a reference."""
    stem = reference_dir / f"reference-{device_type}"
    return stem.with_suffix(".json"), stem.with_suffix(".embeddings.npz")


def find_reference(device_type: str, reference_dir: Path = REFERENCE_DIR) -> tuple[Path, Path]:
    """The reference of this device type when committed, else the first one there is."""
    same = reference_paths(device_type, reference_dir)
    if same[0].exists():
        return same
    others = sorted(reference_dir.glob("reference-*.json"))
    if not others:
        raise FileNotFoundError(
            f"no smoke reference in {reference_dir}: run `mri-assets smoke --update-reference`"
        )
    return reference_paths(others[0].name.removeprefix("reference-").removesuffix(".json"),
                           reference_dir)


def ground_truth(store: ObjectStore, wave: str, manifest: pl.DataFrame) -> pl.DataFrame:
    """`image_id` and the sample's class `label` per manifest row (`labels.csv` joined by raw key and slice index)."""
    truth = pl.read_csv(io.BytesIO(store.get_bytes(TRUTH_KEY)), schema_overrides={"label": pl.String})
    keyed = truth.select(
        (pl.lit(raw_prefix(wave)) + pl.col("relative_path")).alias("source_key"),
        pl.col("slice_index").cast(manifest["slice_index"].dtype),
        "label",
    )
    return manifest.select("image_id", "source_key", "slice_index").join(
        keyed, on=["source_key", "slice_index"], how="left"
    )


def truth_scores(store: ObjectStore, wave: str, manifest: pl.DataFrame) -> dict[str, float]:
    """ARI and NMI of each k's clusters against the sample's ground truth."""
    labeled = ground_truth(store, wave, manifest).select("image_id", "label")
    assigned = pl.read_parquet(io.BytesIO(store.get_bytes(clusters_key(wave))))
    joined = assigned.join(labeled, on="image_id", how="left").sort("image_id")
    metrics = {}
    for k in KS:
        scores = cluster_scores(joined["label"].to_list(), joined[f"cluster_k{k}"].to_numpy())
        for name in ("ari", "nmi"):
            if scores[name] is None:
                raise ValueError(f"smoke wave {wave}: {name} at k={k} not computable: {scores['reason']}")
            metrics[f"{name}_k{k}"] = float(scores[name])
    return metrics


def current_fingerprint(
    store: ObjectStore, wave: str, device_type: str
) -> tuple[dict, tuple[list[str], np.ndarray]]:
    """This run's fingerprint and its embeddings (content keys, float16 rows)."""
    manifest = pl.read_parquet(io.BytesIO(store.get_bytes(manifest_key(wave))))
    embedded = WaveStore(store).wave_embeddings(wave)
    ids, model_id = embedded.ids, embedded.model_id
    vectors = embedded.matrix() if ids else np.zeros((0, 1), dtype=np.float16)
    metrics = truth_scores(store, wave, manifest)
    fingerprint = smoke_fingerprint(manifest, (ids, vectors), metrics, device_type, model_id)
    return fingerprint, keyed_embeddings(manifest, (ids, vectors))


def write_reference(
    fingerprint: dict, embeddings: tuple[list[str], np.ndarray], reference_dir: Path = REFERENCE_DIR
) -> tuple[Path, Path]:
    json_path, npz_path = reference_paths(fingerprint["device_type"], reference_dir)
    reference_dir.mkdir(parents=True, exist_ok=True)
    json_path.write_text(fingerprint_to_json(fingerprint))
    keys, vectors = embeddings
    with npz_path.open("wb") as handle:
        np.savez_compressed(handle, content_keys=np.asarray(keys), embeddings=vectors)
    return json_path, npz_path


def read_reference(json_path: Path, npz_path: Path) -> tuple[dict, tuple[list[str], np.ndarray] | None]:
    reference = fingerprint_from_json(json_path.read_text())
    if not npz_path.exists():
        return reference, None
    with np.load(npz_path) as data:
        return reference, (data["content_keys"].tolist(), data["embeddings"])


def compare_with_reference(
    store: ObjectStore, wave: str, device_type: str, reference_dir: Path = REFERENCE_DIR
) -> tuple[list, dict]:
    """(mismatches, evidence) between this run and the committed reference."""
    json_path, npz_path = find_reference(device_type, reference_dir)
    reference, reference_embeddings = read_reference(json_path, npz_path)
    current, embeddings = current_fingerprint(store, wave, device_type)
    mismatches = compare_fingerprints(reference, current, reference_embeddings, embeddings)
    evidence = {
        "reference": json_path.name,
        "reference_device_type": reference["device_type"],
        "device_type": device_type,
        "comparison": (
            "manifest content exactly; embeddings exact bytes, ARI/NMI within 1e-6"
            if reference["device_type"] == device_type
            else "manifest content exactly; embeddings by cosine, ARI/NMI within 0.005"
        ),
        "manifest_hash": current["manifest"]["hash"],
        "embedding_hash": current["embeddings"]["hash"],
        "metrics": current["metrics"],
    }
    return mismatches, evidence


class SmokeCheckConfig(dg.Config):
    reference_dir: str = str(REFERENCE_DIR)


@dg.asset_check(
    asset=dg.AssetKey("clusters"),
    name=SMOKE_CHECK,
    description="the smoke wave reproduces the committed fingerprint (manifest, embeddings, ARI/NMI)",
)
def smoke_reproduces(
    config: SmokeCheckConfig,
    object_store: ObjectStore,
    compute: ComputeResource,
) -> dg.AssetCheckResult:
    """Fails with the differing items when the smoke wave does not reproduce its reference.

    The check always compares the `smoke` wave, the only one with a reference, so it carries no
    partitions; only the smoke run registers it.
    """
    wave = SMOKE_WAVE
    mismatches, evidence = compare_with_reference(
        object_store, wave, smoke_device_type(compute), Path(config.reference_dir)
    )
    differing = [
        {**m.as_dict(), "items": list(m.items[:MAX_ITEMS_SHOWN]), "n_items": len(m.items)}
        for m in mismatches
    ]
    return dg.AssetCheckResult(
        passed=not mismatches,
        description="; ".join(m.message for m in mismatches) or "reproduces the reference",
        metadata={
            **{k: v for k, v in evidence.items() if k != "metrics"},
            "metrics": dg.MetadataValue.json(evidence["metrics"]),
            "mismatches": dg.MetadataValue.json(differing),
        },
    )

