"""Measure how far the smoke fingerprint moves when the platform changes and the pipeline does not.

Runs the 1,000-slice smoke wave (16 shards) once per platform variant, each in a fresh home and a
fresh subprocess, writes each run's fingerprint, and compares every variant with the first
(`native`: this machine's own kernels and precision) through `compare_fingerprints`:

- `native-again`: the same platform twice (must match exactly);
- `fp32`: float32 instead of the CPU's bf16 autocast (where the CPU has bf16);
- `avx2-fp32`: torch's and oneDNN's AVX2 kernels (`ATEN_CPU_CAPABILITY=avx2`,
  `ONEDNN_MAX_CPU_ISA=AVX2`), numpy without its AVX-512 loops and OpenBLAS on its Haswell kernels:
  what an AVX2-only machine runs.

It prints, per variant, the manifest mismatches (must be none: the manifest is ours), the lowest
embedding cosine and the largest ARI/NMI difference, and as its last line one JSON object:
`max_metric_diff_across_devices`, `min_cosine_across_devices`, `manifest_mismatches`,
`metric_tolerance` (`METRIC_ATOL_ACROSS_DEVICES`), `tolerance_headroom` (the tolerance divided by
the largest difference measured: the ratio against this baseline), `smoke_s` (median seconds of
one smoke run here).

    .venv/bin/python benchmarks/smoke_platforms.py
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUN_ONE = r"""
import sys
from pathlib import Path

import dagster as dg

from mri_assets.definitions import build_defs
from mri_assets.deployment import Deployment
from mri_assets.definitions.local_run import dagster_instance
from mri_assets.resources.compute import ComputeResource
from mri_assets.definitions.smoke_run import run_smoke

deployment = Deployment.from_env(home=sys.argv[1])
precision = sys.argv[3]
defs = build_defs(deployment)
compute = defs.resources["compute"]
fields = {name: getattr(compute, name) for name in ComputeResource.model_fields}
resources = {**defs.resources, "compute": ComputeResource(**{**fields, "precision": precision})}
defs = dg.Definitions(assets=list(defs.assets), resources=resources)
report = run_smoke(defs, dagster_instance(deployment.home), deployment.home.ensure(),
                   update_reference=True, reference_dir=Path(sys.argv[2]))
print("RESULT", report.passed, report.detail)
sys.exit(0 if report.passed else 1)
"""

AVX2_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "NPY_DISABLE_CPU_FEATURES": "AVX512F AVX512CD AVX512_SKX AVX512_CLX AVX512_CNL AVX512_ICL "
    "AVX512_SPR",
    "OPENBLAS_CORETYPE": "Haswell",
}
VARIANTS = (
    ("native", {}, "auto"),
    ("native-again", {}, "auto"),
    ("fp32", {}, "fp32"),
    ("avx2-fp32", AVX2_ENV, "fp32"),
)


def run_variant(root: Path, name: str, env_extra: dict, precision: str) -> tuple[Path, float]:
    home, reference = root / f"home-{name}", root / f"reference-{name}"
    env = {**os.environ, **env_extra, "MRI_ASSETS_SHARDS": "16", "DVC_NO_ANALYTICS": "1",
           "MRI_ASSETS_HOME": str(home)}
    env.pop("PUSHGATEWAY_URL", None)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", RUN_ONE, str(home), str(reference), precision],
                          env=env, capture_output=True, text=True, timeout=1800, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"variant {name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return reference, seconds


def main() -> None:
    from mri_assets.assets.smoke import read_reference
    from mri_assets.core.fingerprint import METRIC_ATOL_ACROSS_DEVICES, compare_fingerprints

    with tempfile.TemporaryDirectory(prefix="smoke-platforms-") as tmp:
        root = Path(tmp)
        runs, seconds = {}, []
        for name, env_extra, precision in VARIANTS:
            folder, took = run_variant(root, name, env_extra, precision)
            seconds.append(took)
            (json_path,) = folder.glob("reference-*.json")
            runs[name] = read_reference(json_path, json_path.with_suffix("").with_suffix(
                ".embeddings.npz"))
            print(f"{name}: {runs[name][0]['device_type']} in {took:.1f} s", flush=True)

        base, base_embeddings = runs["native"]
        worst_metric, worst_cosine, manifest_mismatches = 0.0, 1.0, 0
        for name, (fingerprint, embeddings) in runs.items():
            if name == "native":
                continue
            diffs = {k: abs(base["metrics"][k] - fingerprint["metrics"][k]) for k in base["metrics"]}
            mismatches = compare_fingerprints(base, fingerprint, base_embeddings, embeddings,
                                              cosine_min=-1.0, metric_atol=1.0,
                                              metric_atol_across_devices=1.0)
            manifest = [m for m in mismatches if m.kind == "manifest"]
            manifest_mismatches += sum(len(m.items) for m in manifest)
            cosine = _min_cosine(base_embeddings, embeddings)
            same = fingerprint["device_type"] == base["device_type"]
            print(f"  {name} vs native ({'same' if same else 'other'} device type "
                  f"{fingerprint['device_type']}): manifest mismatches "
                  f"{sum(len(m.items) for m in manifest)}, min cosine {cosine:.6f}, "
                  f"max |metric diff| {max(diffs.values()):.6f} "
                  f"({max(diffs, key=diffs.get)})", flush=True)
            if not same:
                worst_metric = max(worst_metric, max(diffs.values()))
                worst_cosine = min(worst_cosine, cosine)

    print(json.dumps({
        "max_metric_diff_across_devices": round(worst_metric, 6),
        "min_cosine_across_devices": round(worst_cosine, 6),
        "manifest_mismatches": manifest_mismatches,
        "metric_tolerance": METRIC_ATOL_ACROSS_DEVICES,
        "tolerance_headroom": round(METRIC_ATOL_ACROSS_DEVICES / worst_metric, 2)
        if worst_metric else None,
        "smoke_s": round(statistics.median(seconds), 1),
    }))


def _min_cosine(reference, current) -> float:
    import numpy as np

    ref_keys, ref = reference
    cur_keys, cur = current
    index = {key: i for i, key in enumerate(cur_keys)}
    common = [(i, index[k]) for i, k in enumerate(ref_keys) if k in index]
    a = ref[[i for i, _ in common]].astype(np.float64)
    b = cur[[j for _, j in common]].astype(np.float64)
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cosine.min())


if __name__ == "__main__":
    main()
