"""A sample wave as arrays: the 256 px uint8 slices the pipeline would store, with their labels.

`decoded_sample` builds sample data (`core.sample_data.build_sample_data`) and decodes every
labelled slice with the ingest decoder (`core.imaging.process_object`, the same windowing and
resize as the `manifest` step), without a store or Dagster. For benchmarks and tests that need
real slices and their ground truth in memory.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mri_assets.core.imaging import process_object
from mri_assets.core.sample_data import CLASSES, LEVEL_CLASSES, build_sample_data


@dataclass(frozen=True)
class SampleSlices:
    images: np.ndarray  # uint8 (N, 256, 256)
    labels: np.ndarray  # int64 class index into CLASSES
    patients: np.ndarray  # int64 patient number (the sample's patient-NNNN folder)
    keys: tuple[str, ...]  # relative path + "#" + slice index
    levels: np.ndarray | None = None  # int64 index into LEVEL_CLASSES (`levels=True`), else None

    def __len__(self) -> int:
        return len(self.labels)

    def patient_split(self, holdout_fraction: float, seed: int) -> np.ndarray:
        """A bool mask of holdout slices: whole patients, a seeded `holdout_fraction` of them."""
        patients = np.unique(self.patients)
        rng = np.random.default_rng([seed, 7])
        count = max(1, round(len(patients) * holdout_fraction))
        chosen = rng.choice(patients, size=count, replace=False)
        return np.isin(self.patients, chosen)


def decoded_sample(out_dir: Path, n_slices: int, seed: int, wave_style: str = "t1",
                   levels: bool = False) -> SampleSlices:
    """Sample data under `out_dir` (kept), decoded into arrays in `labels.csv` order; with
    `levels` also the harder class set (`LEVEL_CLASSES`)."""
    summary = build_sample_data(Path(out_dir), n_slices=n_slices, seed=seed,
                                wave_style=wave_style, include_bad=False, levels=levels)
    with summary.labels_csv.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    decoded: dict[str, dict[int, np.ndarray]] = {}
    images, labels, patients, keys = [], [], [], []
    for row in rows:
        path = row["relative_path"]
        if path not in decoded:
            result = process_object((summary.out_dir / path).read_bytes(), Path(path).name)
            decoded[path] = {s.slice_index: s.pixels for s in result.slices}
        index = int(row["slice_index"])
        images.append(decoded[path][index])
        labels.append(CLASSES.index(row["label"]))
        patients.append(int(path.split("/")[0].rsplit("-", 1)[1]))
        keys.append(f"{path}#{index}")
    level_codes = (np.asarray([LEVEL_CLASSES.index(row["level"]) for row in rows], dtype=np.int64)
                   if levels else None)
    return SampleSlices(np.stack(images), np.asarray(labels, dtype=np.int64),
                        np.asarray(patients, dtype=np.int64), tuple(keys), level_codes)
