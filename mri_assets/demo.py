"""`mri-assets demo`: sample data from real scans, a pilot wave, every asset, a short summary."""

from __future__ import annotations

import time

import polars as pl

from mri_assets.core.home import MriHome

PILOT = "pilot"


def _manifest_summary(defs, wave: str) -> str:
    frame: pl.DataFrame = defs.load_asset_value("manifest", partition_key=wave)
    counts = dict(frame.group_by("status").len().iter_rows())
    splits = dict(frame.filter(pl.col("status") == "ok").group_by("split").len().iter_rows())
    return (
        f"  manifest[{wave}]: {frame.height} slices = {counts.get('ok', 0)} ok + "
        f"{counts.get('duplicate', 0)} duplicate + {counts.get('quarantined', 0)} quarantined; "
        f"splits {dict(sorted(splits.items()))}"
    )


def run_demo(home: MriHome, slices: int, seed: int) -> int:
    from mri_assets.assets.costs import cost_line
    from mri_assets.cli import _defs, _ingest, _run_wave
    from mri_assets.core.sample_data import build_sample_data

    started = time.perf_counter()
    sample_dir = home.root / "sample" / PILOT
    print(f"1/3 sample data: {slices} slices from real scans into {sample_dir}")
    build_sample_data(sample_dir, n_slices=slices, seed=seed, wave_style="t1", progress=True)
    print(f"2/3 landing: {_ingest(home, PILOT, str(sample_dir))}")
    print(f"3/3 materializing wave {PILOT}")
    ok = _run_wave(home, PILOT, None)
    defs = _defs()
    print("\nsummary")
    print(_manifest_summary(defs, PILOT))
    print(f"  state: {home.root} (store, Dagster instance, MLflow, DVC, labels)")
    print("  look: `make dev` then http://127.0.0.1:3000 (assets, the waves partitions, sensors)")
    print(f"  total: {time.perf_counter() - started:.1f} s")
    print(cost_line(defs, PILOT))
    return 0 if ok else 1
